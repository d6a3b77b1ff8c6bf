//! A harness that drives one [`BrokerState`] with arbitrary operations and checks every output
//! against the policy, for the `broker_core` fuzz target and a property test (`cargo test`).
//!
//! Bytes decode into operations: IP packets from a real WireGuard client (raw, or built from
//! chosen fields: TCP, UDP, echo, ICMP errors quoting flows, fragments, spoofed sources, the
//! service address), packets from connector links and from internet egress (raw, or replies to
//! flows the device opened), time, link changes (down, up, stale, draining, MTU), policy
//! changes, new handshakes and replayed datagrams. After every operation the outputs are
//! drained and checked, with [`Policy::evaluate`] as the oracle:
//!
//! - a packet for a link is the device's own packet (its source is the device's address), of
//!   a flow the policy allows to an application of that link's site, and fits the link;
//! - a packet for egress is the device's own packet, of a flow the policy allows to the
//!   internet (no application), to a public address (or a configured DNS upstream);
//! - a packet to the device is a service answer (from the service address), a deny reply to a
//!   flow the policy denies, a "too big" answer to a packet larger than a link of its site
//!   carries, or a packet from a link or egress of a flow the device opened and the policy
//!   allows (for links: to an application of that link's site);
//! - decisions logged agree with the policy.
//!
//! A violation panics with a description and the operations that led to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;

use super::{Assignment, BrokerState, Event, LinkId, Routed, Transmit, WorkerConfig, WorkerId};
use crate::flow::IdleTimeouts;
use crate::keys::PrivateKey;
use crate::packet::{self, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketKind};
use crate::policy::{Action, Decision, DeviceId, Policy, Reason};
use crate::posture::service_address;
use crate::wg::{Output, Session, WireGuardError};

/// Operations per input at most (keeps one fuzz input quick).
pub const MAX_OPS: usize = 256;

/// Which checks and inputs a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Also require that an ICMP error a device sends goes to the other end of the flow it
    /// quotes (its outer destination is the flow's destination), for links and egress.
    pub icmp_error_destination: bool,
    /// Include the policy change that lists the sites in another order and moves an
    /// application to the other site.
    pub reordered_sites: bool,
}

impl Options {
    /// Every check, every input.
    pub const ALL: Options = Options {
        icmp_error_destination: true,
        reordered_sites: true,
    };

    /// Everything but what finds known, unfixed bugs, so that the property test passes and
    /// the fuzzer looks for new ones. None is known now: the two this harness found (an ICMP
    /// error from a device forwarded to whatever its outer header named; a flow re-decided
    /// after a policy change kept a connector of another site) are fixed and have their tests
    /// at the end of `broker/tests.rs`. A newly found bug gets its flag here, off, until fixed.
    pub const WITHOUT_KNOWN_BUGS: Options = Options::ALL;
}

/// What a run exercised (to see that the checks had something to check).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub ops: usize,
    /// Packets from the client that reached the core.
    pub client_packets: usize,
    pub to_links: usize,
    pub to_internet: usize,
    pub from_links: usize,
    pub from_internet: usize,
    pub deny_replies: usize,
    pub too_big_replies: usize,
    pub service_answers: usize,
    pub decisions: usize,
    pub policy_changes: usize,
    pub handshakes: usize,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.ops += o.ops;
        self.client_packets += o.client_packets;
        self.to_links += o.to_links;
        self.to_internet += o.to_internet;
        self.from_links += o.from_links;
        self.from_internet += o.from_internet;
        self.deny_replies += o.deny_replies;
        self.too_big_replies += o.too_big_replies;
        self.service_answers += o.service_answers;
        self.decisions += o.decisions;
        self.policy_changes += o.policy_changes;
        self.handshakes += o.handshakes;
    }
}

/// Runs the operations `data` decodes into, checking every output; panics on a violation.
pub fn run(data: &[u8], options: Options) -> Stats {
    let mut h = Harness::new(options);
    let mut input = Input(data);
    while !input.0.is_empty() && h.stats.ops < MAX_OPS {
        h.step(&mut input);
    }
    h.stats
}

// ---- the fixed world ----

/// The policies the harness switches between. `@KEY@` is the client's public key.
const POLICY_BASE: &str = r#"
[[groups]]
name = "eng"
[[users]]
name = "alice"
groups = ["eng"]
[[devices]]
name = "alice-laptop"
user = "alice"
public_key = "@KEY@"
address = "100.118.0.2"
[[sites]]
name = "dc1"
[[sites]]
name = "dc2"
[[applications]]
name = "web"
site = "dc1"
addresses = ["10.20.0.0/24"]
protocols = ["tcp"]
ports = [80, 443]
[[applications]]
name = "db"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp", "udp"]
ports = [5432]
[[applications]]
name = "metrics"
site = "dc2"
addresses = ["10.30.0.0/16"]
protocols = ["udp", "icmp"]
ports = [53, "3000-3010"]
[[applications]]
name = "ssh"
site = "dc2"
addresses = ["10.30.0.0/16", "172.16.5.0/24"]
protocols = ["tcp"]
ports = [22]
[[applications]]
name = "vault"
site = "dc2"
addresses = ["10.30.5.0/24"]
protocols = ["tcp", "udp", "icmp"]
[[rules]]
name = "eng-apps"
action = "allow"
groups = ["eng"]
applications = ["web", "metrics", "ssh", "vault"]
[[rules]]
name = "no-db"
action = "deny"
groups = ["eng"]
applications = ["db"]
[[rules]]
name = "no-vault"
action = "deny"
users = ["alice"]
applications = ["vault"]
[dns]
upstreams = ["udp://9.9.9.9"]
[[tunnels]]
name = "eng-full"
groups = ["eng"]
mode = "full"
"#;

/// The base policy edited: sites listed the other way round, ssh moved to dc1, web loses 443,
/// db allowed, metrics denied, a private DNS upstream.
const POLICY_REORDERED: &str = r#"
[[groups]]
name = "eng"
[[users]]
name = "alice"
groups = ["eng"]
[[devices]]
name = "alice-laptop"
user = "alice"
public_key = "@KEY@"
address = "100.118.0.2"
[[sites]]
name = "dc2"
[[sites]]
name = "dc1"
[[applications]]
name = "web"
site = "dc1"
addresses = ["10.20.0.0/24"]
protocols = ["tcp"]
ports = [80]
[[applications]]
name = "db"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp", "udp"]
ports = [5432]
[[applications]]
name = "metrics"
site = "dc2"
addresses = ["10.30.0.0/16"]
protocols = ["udp", "icmp"]
ports = [53, "3000-3010"]
[[applications]]
name = "ssh"
site = "dc1"
addresses = ["10.30.0.0/16", "172.16.5.0/24"]
protocols = ["tcp"]
ports = [22]
[[applications]]
name = "vault"
site = "dc2"
addresses = ["10.30.5.0/24"]
protocols = ["tcp", "udp", "icmp"]
[[rules]]
name = "eng-apps"
action = "allow"
groups = ["eng"]
applications = ["web", "db", "ssh", "vault"]
[[rules]]
name = "no-metrics"
action = "deny"
users = ["alice"]
applications = ["metrics"]
[dns]
upstreams = ["udp://10.99.0.53"]
[[tunnels]]
name = "eng-full"
groups = ["eng"]
mode = "full"
"#;

/// The base policy as a split tunnel with only web allowed.
fn policy_split() -> String {
    POLICY_BASE
        .replace(
            "applications = [\"web\", \"metrics\", \"ssh\", \"vault\"]",
            "applications = [\"web\"]",
        )
        .replace(
            "[[tunnels]]\nname = \"eng-full\"\ngroups = [\"eng\"]\nmode = \"full\"\n",
            "",
        )
}

/// The base policy with the device at another address.
fn policy_moved() -> String {
    POLICY_BASE.replace("address = \"100.118.0.2\"", "address = \"100.118.0.9\"")
}

/// The base policy without the device.
fn policy_without_device() -> String {
    POLICY_BASE.replace(
        "[[devices]]\nname = \"alice-laptop\"\nuser = \"alice\"\npublic_key = \"@KEY@\"\naddress = \"100.118.0.2\"\n",
        "",
    )
}

/// Index of [`POLICY_REORDERED`] in [`Fixed::policies`].
const REORDERED: usize = 1;

/// Connector links the harness may bring up: id and site (a link keeps its site). dc9 is in no
/// policy.
const LINKS: [(u64, &str); 4] = [(1, "dc1"), (2, "dc2"), (3, "dc1"), (4, "dc9")];
const MAX_DATAGRAMS: [usize; 4] = [1400, 1280, 576, 65535];

/// Destinations and sources worth hitting: application addresses of both sites, internet
/// addresses, the DNS upstreams, private and special addresses, the service address.
const ADDRESSES: [[u8; 4]; 16] = [
    [10, 20, 0, 10],   // web and db (dc1)
    [10, 20, 0, 77],   // web
    [10, 30, 0, 53],   // metrics and ssh (dc2)
    [10, 30, 5, 5],    // vault: denied, inside the ssh and metrics range
    [172, 16, 5, 9],   // ssh
    [203, 0, 113, 80], // the internet
    [198, 51, 100, 7], // the internet
    [9, 9, 9, 9],      // DNS upstream of the base policy
    [10, 99, 0, 53],   // DNS upstream of the reordered policy (private)
    [192, 168, 1, 50], // private, no application
    [100, 118, 0, 1],  // the service address
    [100, 118, 0, 3],  // another device's address
    [100, 119, 0, 5],  // a synthetic application address
    [224, 0, 0, 251],  // multicast
    [8, 8, 8, 8],      // the internet (DNS there bypasses the upstreams)
    [0, 0, 0, 0],
];
const V6_ADDRESSES: [&str; 4] = ["fd00::2", "2001:db8::1", "::ffff:10.20.0.10", "fe80::1"];
const PORTS: [u16; 16] = [
    80, 443, 5432, 53, 853, 22, 3000, 3010, 3011, 7443, 7444, 8080, 40000, 0, 65535, 123,
];
const SERVICE_PORTS: [u16; 4] = [
    crate::posture::POSTURE_PORT,
    crate::dns::DNS_PORT,
    crate::api::STATUS_PORT,
    9,
];
const DNS_NAMES: [&str; 4] = [
    "web.corp.example",
    "www.example.com",
    "payroll.corp.example",
    "x",
];
const APPS: [&str; 3] = ["web", "ssh", "metrics"];
/// Flows worth opening (protocol, destination, port): every application of both sites, the
/// edges between them, the internet and its DNS rules.
const TARGETS: [(u8, [u8; 4], u16); 16] = [
    (PROTO_TCP, [10, 20, 0, 10], 80),    // web (dc1)
    (PROTO_TCP, [10, 20, 0, 77], 443),   // web; not in the reordered policy
    (PROTO_TCP, [10, 20, 0, 10], 5432),  // db: denied, then allowed
    (PROTO_UDP, [10, 20, 0, 10], 5432),  // db over UDP
    (PROTO_UDP, [10, 30, 0, 53], 53),    // metrics (dc2)
    (PROTO_UDP, [10, 30, 0, 53], 3005),  // metrics
    (PROTO_ICMP, [10, 30, 0, 53], 0),    // metrics, echo
    (PROTO_TCP, [10, 30, 0, 53], 22),    // ssh: dc2, then dc1
    (PROTO_TCP, [172, 16, 5, 9], 22),    // ssh
    (PROTO_TCP, [10, 30, 5, 5], 22),     // vault: the deny wins over ssh's allow
    (PROTO_UDP, [10, 30, 5, 5], 3001),   // vault
    (PROTO_TCP, [203, 0, 113, 80], 443), // the internet
    (PROTO_UDP, [9, 9, 9, 9], 53),       // DNS upstream
    (PROTO_UDP, [8, 8, 8, 8], 53),       // DNS elsewhere: refused
    (PROTO_TCP, [10, 99, 0, 53], 853),   // private upstream (reordered policy)
    (PROTO_ICMP, [198, 51, 100, 7], 0),  // the internet, echo
];

fn client_endpoint() -> SocketAddr {
    SocketAddr::from(([10, 99, 1, 2], 40000))
}

struct Fixed {
    client_key: PrivateKey,
    broker_key: PrivateKey,
    policies: Vec<Arc<Policy>>,
}

fn key_from(seed: u8) -> PrivateKey {
    let text = base64::engine::general_purpose::STANDARD.encode([seed; 32]);
    PrivateKey::parse(&text).expect("a key from 32 bytes")
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let client_key = key_from(0x11);
        let broker_key = key_from(0x22);
        let key = client_key.public().to_string();
        let texts = [
            POLICY_BASE.to_string(),
            POLICY_REORDERED.to_string(),
            policy_split(),
            policy_moved(),
            policy_without_device(),
        ];
        let policies = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let text = t.replace("@KEY@", &key);
                let p = Policy::parse(std::path::Path::new("oracle.toml"), &text)
                    .unwrap_or_else(|e| panic!("oracle policy {i}: {e}"));
                Arc::new(p)
            })
            .collect();
        Fixed {
            client_key,
            broker_key,
            policies,
        }
    })
}

// ---- input ----

/// The fuzzer's bytes, read front to back; zeros once they run out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

// ---- packets ----

/// A packet to build: addresses, protocol, ports (the echo identifier for ICMP echo).
#[derive(Debug, Clone, Copy)]
struct Shape {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    /// TCP flags; for ICMP echo bit 0 says reply.
    flags: u8,
    /// Don't fragment (IPv4).
    df: bool,
    /// 0: whole; 1: a first fragment (more follow); 2: a later fragment.
    fragment: u8,
    payload: usize,
    mss: Option<u16>,
}

impl Shape {
    fn of(key: &FlowKey) -> Shape {
        Shape {
            proto: key.proto,
            src: key.src,
            dst: key.dst,
            sport: key.sport,
            dport: key.dport,
            flags: packet::TCP_SYN,
            df: true,
            fragment: 0,
            payload: 0,
            mss: None,
        }
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IP packet around `transport` (IPv4 when both addresses are, else IPv6).
fn ip_packet(s: &Shape, proto: u8, transport: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(48 + transport.len());
    match (s.src, s.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = (20 + transport.len()).min(usize::from(u16::MAX)) as u16;
            let mut frag: u16 = if s.df { 0x4000 } else { 0 };
            match s.fragment {
                1 => frag |= 0x2000,
                2 => frag |= 185,
                _ => {}
            }
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0x12, 0x34]);
            p.extend_from_slice(&frag.to_be_bytes());
            p.extend_from_slice(&[64, proto, 0, 0]);
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.octets());
            let c = checksum(&p);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (src, dst) => {
            let ext = if s.fragment != 0 { 8 } else { 0 };
            let len = (ext + transport.len()).min(usize::from(u16::MAX)) as u16;
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&len.to_be_bytes());
            p.push(if ext != 0 { 44 } else { proto });
            p.push(64);
            p.extend_from_slice(&v6(src).octets());
            p.extend_from_slice(&v6(dst).octets());
            if ext != 0 {
                let off: u16 = if s.fragment == 2 { 185 << 3 } else { 1 };
                p.extend_from_slice(&[proto, 0]);
                p.extend_from_slice(&off.to_be_bytes());
                p.extend_from_slice(&[0, 0, 0x56, 0x78]);
            }
        }
    }
    p.extend_from_slice(transport);
    p
}

fn icmp_proto(s: &Shape) -> u8 {
    if s.src.is_ipv4() && s.dst.is_ipv4() {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    }
}

/// A packet of the flow `s` describes (TCP, UDP, ICMP echo, or another protocol).
fn build(s: &Shape) -> Vec<u8> {
    let payload = vec![0x5a; s.payload];
    let mut t = Vec::with_capacity(28 + s.payload);
    match s.proto {
        PROTO_TCP => {
            let opts = if s.mss.is_some() { 4 } else { 0 };
            t.extend_from_slice(&s.sport.to_be_bytes());
            t.extend_from_slice(&s.dport.to_be_bytes());
            t.extend_from_slice(&1000u32.to_be_bytes());
            t.extend_from_slice(&u32::from(s.flags & 0x10 != 0).to_be_bytes());
            t.push((((20 + opts) / 4) << 4) as u8);
            t.push(s.flags);
            t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            if let Some(mss) = s.mss {
                t.extend_from_slice(&[2, 4]);
                t.extend_from_slice(&mss.to_be_bytes());
            }
        }
        PROTO_UDP => {
            let len = (8 + s.payload).min(usize::from(u16::MAX)) as u16;
            t.extend_from_slice(&s.sport.to_be_bytes());
            t.extend_from_slice(&s.dport.to_be_bytes());
            t.extend_from_slice(&len.to_be_bytes());
            t.extend_from_slice(&[0, 0]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let reply = s.flags & 1 != 0;
            let ty = match (icmp_proto(s) == PROTO_ICMP, reply) {
                (true, false) => 8,
                (true, true) => 0,
                (false, false) => 128,
                (false, true) => 129,
            };
            t.extend_from_slice(&[ty, 0, 0, 0]);
            t.extend_from_slice(&s.sport.to_be_bytes());
            t.extend_from_slice(&[0, 1]);
        }
        _ => {}
    }
    t.extend_from_slice(&payload);
    let proto = match s.proto {
        PROTO_ICMP | PROTO_ICMPV6 => icmp_proto(s),
        p => p,
    };
    ip_packet(s, proto, &t)
}

/// An ICMP error from `s.src` to `s.dst` (type `ty`) quoting the start of `quoted`.
fn build_icmp_error(s: &Shape, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut t = vec![ty, code, 0, 0, 0, 0, 0x05, 0x00];
    t.extend_from_slice(quoted);
    t.extend(std::iter::repeat_n(0x5a, s.payload.min(64)));
    let proto = icmp_proto(s);
    let mut s = *s;
    s.fragment = 0;
    ip_packet(&s, proto, &t)
}

/// What boringtun hands over of a decrypted packet: cut to the length its IP header states;
/// None when it refuses it.
fn wg_view(p: &[u8]) -> Option<&[u8]> {
    let len = match p.first()? >> 4 {
        4 if p.len() >= 20 => usize::from(u16::from_be_bytes([p[2], p[3]])),
        6 if p.len() >= 40 => 40 + usize::from(u16::from_be_bytes([p[4], p[5]])),
        _ => return None,
    };
    p.get(..len)
}

fn describe(p: &[u8]) -> String {
    let mut s = format!("{} bytes, {:?}: ", p.len(), packet::classify(p));
    for b in p.iter().take(64) {
        let _ = write!(s, "{b:02x}");
    }
    if p.len() > 64 {
        s.push_str("..");
    }
    s
}

// ---- the harness ----

#[derive(Debug, Clone)]
enum Op {
    Client(Vec<u8>),
    Link(LinkId, Vec<u8>),
    Egress(Vec<u8>),
    Time(Duration),
    LinkUp(LinkId, usize),
    LinkDown(LinkId),
    LinkMtu(LinkId, usize),
    LinkStale(LinkId, bool),
    LinkHealth(LinkId, bool, Vec<String>),
    Policy(usize),
    Handshake,
    Replay,
    Datagram(Vec<u8>),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Client(p) => write!(f, "client sends {}", describe(p)),
            Op::Link(l, p) => write!(f, "link {} sends {}", l.0, describe(p)),
            Op::Egress(p) => write!(f, "egress sends {}", describe(p)),
            Op::Policy(i) => write!(f, "policy {i}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// What the step's outputs may answer.
enum Ctx {
    /// Nothing: no packets may come out.
    Quiet,
    /// The device's packet, as the core got it (None: refused before the core).
    Client(Option<Vec<u8>>),
    Link(LinkId, Vec<u8>),
    Egress(Vec<u8>),
}

#[derive(Debug, Clone, Copy)]
struct LinkModel {
    site: &'static str,
    max: usize,
}

/// A decrypted packet to the device, or one the client refused (we cannot see it).
type Seen = Option<Vec<u8>>;

struct Harness {
    options: Options,
    core: BrokerState,
    client: Session,
    assignment: Arc<Assignment>,
    policy: Arc<Policy>,
    policy_index: usize,
    /// The client's device in the current policy.
    device: Option<DeviceId>,
    /// Its address (the last one it had when it is not in the policy).
    address: IpAddr,
    links: BTreeMap<LinkId, LinkModel>,
    now: Instant,
    unix: u64,
    /// Every flow the device sent a packet of (its source was the device's address then).
    opened: HashSet<FlowKey>,
    /// The latest of them, to answer.
    recent: Vec<FlowKey>,
    /// The link each flow's latest packet went out on.
    sent_via: HashMap<FlowKey, LinkId>,
    last_datagram: Vec<u8>,
    log: Vec<Op>,
    stats: Stats,
    buf: Vec<u8>,
}

impl Harness {
    fn new(options: Options) -> Harness {
        let f = fixed();
        let policy = f.policies[0].clone();
        let assignment = Arc::new(Assignment::new(1).next(&policy));
        let now = Instant::now();
        let config = WorkerConfig {
            worker: WorkerId(0),
            name: "oracle".into(),
            timeouts: IdleTimeouts::default(),
            // Small, so that full tables are reached too.
            max_flows: 48,
            max_flows_per_device: 32,
            overlay_mtu: crate::mtu::DEFAULT_OVERLAY_MTU,
        };
        let core = BrokerState::new(
            f.broker_key.clone(),
            config,
            policy.clone(),
            assignment.clone(),
            now,
        );
        let client = Session::new(&f.client_key, f.broker_key.public(), None, 1, None);
        let device = policy.device_by_key(&f.client_key.public());
        let address = policy.devices[device.expect("device") as usize].address;
        let mut h = Harness {
            options,
            core,
            client,
            assignment,
            policy,
            policy_index: 0,
            device,
            address,
            links: BTreeMap::new(),
            now,
            unix: 1_700_000_000,
            opened: HashSet::new(),
            recent: Vec::new(),
            sent_via: HashMap::new(),
            last_datagram: Vec::new(),
            log: Vec::new(),
            stats: Stats::default(),
            buf: vec![0u8; 70_000],
        };
        h.link_up(LinkId(1), 1400);
        h.link_up(LinkId(2), 1400);
        h.handshake();
        h
    }

    fn fail(&self, what: String) -> ! {
        let mut s = format!("broker oracle: {what}\npolicy {}; ", self.policy_index);
        let _ = writeln!(s, "links {:?}", self.links);
        let _ = writeln!(s, "operations ({}):", self.log.len());
        let skip = self.log.len().saturating_sub(40);
        for (i, op) in self.log.iter().enumerate().skip(skip) {
            let _ = writeln!(s, "  #{i}: {op}");
        }
        panic!("{s}");
    }

    fn link_up(&mut self, link: LinkId, max: usize) {
        let Some(&(_, site)) = LINKS.iter().find(|(id, _)| *id == link.0) else {
            return;
        };
        self.core.link_up(link, site, &format!("c{}", link.0), max);
        self.links.insert(link, LinkModel { site, max });
    }

    // ---- decoding ----

    fn address(&self, input: &mut Input) -> IpAddr {
        match input.u8() {
            b @ 0..=223 => IpAddr::V4(ADDRESSES[usize::from(b) % ADDRESSES.len()].into()),
            224..=243 => IpAddr::V4(Ipv4Addr::from(input.u32())),
            b => V6_ADDRESSES[usize::from(b) % V6_ADDRESSES.len()]
                .parse()
                .expect("v6"),
        }
    }

    /// Mostly the device's own address; sometimes another one.
    fn device_side(&self, input: &mut Input) -> IpAddr {
        match input.u8() % 8 {
            0..=5 => self.address,
            6 => {
                if self.address == IpAddr::from([100, 118, 0, 2]) {
                    IpAddr::from([100, 118, 0, 9])
                } else {
                    IpAddr::from([100, 118, 0, 2])
                }
            }
            _ => self.address(input),
        }
    }

    fn port(input: &mut Input) -> u16 {
        match input.u8() {
            b @ 0..=191 => PORTS[usize::from(b) % PORTS.len()],
            _ => input.u16(),
        }
    }

    fn proto(input: &mut Input) -> u8 {
        match input.u8() % 8 {
            0..=2 => PROTO_TCP,
            3..=4 => PROTO_UDP,
            5..=6 => PROTO_ICMP,
            _ => [47, 50, 132, 0][usize::from(input.u8() % 4)],
        }
    }

    /// Flags, fragmenting and size of a packet.
    fn extras(s: &mut Shape, input: &mut Input) {
        let b = input.u8();
        s.flags = match b % 8 {
            0..=2 => packet::TCP_SYN,
            3 => 0x12,
            4 => 0x10,
            5 => 0x11,
            6 => 0x04,
            _ => input.u8(),
        };
        s.df = b & 0x08 == 0;
        s.fragment = match b >> 4 {
            0 => 1,
            1 => 2,
            _ => 0,
        };
        let c = input.u8();
        s.payload = match c % 8 {
            0..=4 => usize::from(c >> 3),
            5 => 500 + usize::from(input.u16()) % 1100,
            _ => 1330 + usize::from(input.u8()) % 120,
        };
        if c & 0x80 != 0 && s.proto == PROTO_TCP {
            s.mss = Some(1200 + input.u16() % 400);
        }
    }

    /// A flow the device opened: the latest one half of the time.
    fn recent(&self, input: &mut Input) -> Option<FlowKey> {
        let b = input.u8();
        let n = self.recent.len();
        match b {
            _ if n == 0 => None,
            0..=127 => Some(self.recent[n - 1]),
            _ => Some(self.recent[usize::from(b) % n]),
        }
    }

    /// A packet from the device: a new flow, or one it used lately.
    fn client_shape(&self, input: &mut Input) -> Shape {
        let mut s = match input.u8() % 8 {
            0..=2 => match self.recent(input) {
                Some(k) => Shape::of(&k),
                None => self.target_shape(input),
            },
            3..=5 => self.target_shape(input),
            _ => self.fresh_client_shape(input),
        };
        Self::extras(&mut s, input);
        s
    }

    /// A flow to one of [`TARGETS`] from the device.
    fn target_shape(&self, input: &mut Input) -> Shape {
        let b = input.u8();
        let (proto, dst, dport) = TARGETS[usize::from(b) % TARGETS.len()];
        let sport = 40000 + u16::from(b >> 4);
        let dport = if proto == PROTO_ICMP { sport } else { dport };
        Shape::of(&FlowKey {
            proto,
            src: self.address,
            dst: IpAddr::from(dst),
            sport,
            dport,
        })
    }

    fn fresh_client_shape(&self, input: &mut Input) -> Shape {
        let proto = Self::proto(input);
        let src = self.device_side(input);
        let dst = self.address(input);
        let sport = Self::port(input);
        let dport = Self::port(input);
        let (sport, dport) = if proto == PROTO_ICMP {
            (sport, sport)
        } else {
            (sport, dport)
        };
        Shape::of(&FlowKey {
            proto,
            src,
            dst,
            sport,
            dport,
        })
    }

    /// A packet towards the device: a reply in a flow it opened (returned too), or anything.
    fn reply_shape(&self, input: &mut Input) -> (Shape, Option<FlowKey>) {
        let mut flow = None;
        let mut s = match input.u8() % 4 {
            0 => {
                let proto = Self::proto(input);
                let src = self.address(input);
                let dst = self.device_side(input);
                let sport = Self::port(input);
                let dport = Self::port(input);
                let (sport, dport) = if proto == PROTO_ICMP {
                    (sport, sport)
                } else {
                    (sport, dport)
                };
                Shape::of(&FlowKey {
                    proto,
                    src,
                    dst,
                    sport,
                    dport,
                })
            }
            _ => match self.recent(input) {
                Some(k) => {
                    flow = Some(k);
                    Shape::of(&k.reversed())
                }
                None => Shape::of(&FlowKey {
                    proto: PROTO_TCP,
                    src: IpAddr::from([10, 20, 0, 10]),
                    dst: self.address,
                    sport: 80,
                    dport: 40000,
                }),
            },
        };
        Self::extras(&mut s, input);
        if s.proto == PROTO_ICMP || s.proto == PROTO_ICMPV6 {
            s.flags |= 1; // echo reply
        }
        (s, flow)
    }

    /// An ICMP error from `outer` quoting a packet of `about` (as that packet went).
    fn icmp_error(input: &mut Input, outer: Shape, about: &Shape) -> Vec<u8> {
        let b = input.u8();
        let v4 = icmp_proto(&outer) == PROTO_ICMP;
        let (ty, code) = match (v4, b % 4) {
            (true, 0) => (3, 3),
            (true, 1) => (3, 4),
            (true, 2) => (11, 0),
            (true, _) => (12, 0),
            (false, 0) => (1, 4),
            (false, 1) => (2, 0),
            (false, 2) => (3, 0),
            (false, _) => (4, 0),
        };
        let mut quoted = *about;
        quoted.payload = 0;
        quoted.mss = None;
        quoted.fragment = if b & 0x40 != 0 { 2 } else { 0 };
        let q = build(&quoted);
        let hl = if q[0] >> 4 == 4 { 20 } else { 40 };
        let cut = if b & 0x80 != 0 {
            q.len()
        } else {
            (hl + 8).min(q.len())
        };
        build_icmp_error(&outer, ty, code, &q[..cut])
    }

    fn link_id(b: u8) -> LinkId {
        LinkId(u64::from(b % 5) + 1)
    }

    fn decode(&mut self, input: &mut Input) -> Op {
        match input.u8() % 32 {
            0..=9 => Op::Client(build(&self.client_shape(input))),
            10 | 11 => {
                // The device reports an error about a packet it got: it goes back to the
                // packet's source, usually.
                let about = self.client_shape(input).reversed_shape();
                let mut outer = Shape::of(&FlowKey {
                    proto: PROTO_ICMP,
                    src: self.device_side(input),
                    dst: about.src,
                    sport: 0,
                    dport: 0,
                });
                if input.u8().is_multiple_of(4) {
                    outer.dst = self.address(input);
                }
                Op::Client(Self::icmp_error(input, outer, &about))
            }
            12 => {
                let n = usize::from(input.u8() % 80);
                let flags = input.u8();
                let mut p = input.bytes(n).to_vec();
                if flags & 1 != 0 && p.len() >= 20 {
                    p[0] = 0x45;
                    if let IpAddr::V4(a) = self.address {
                        p[12..16].copy_from_slice(&a.octets());
                    }
                }
                if flags & 2 != 0 && p.len() >= 20 && p[0] >> 4 == 4 {
                    let len = p.len() as u16;
                    p[2..4].copy_from_slice(&len.to_be_bytes());
                }
                Op::Client(p)
            }
            13 => {
                // To the service address: a token, an application name, the status, echo.
                let b = input.u8();
                let sport = Self::port(input);
                let service = service_address(&self.policy.device_range);
                let src = if b & 0x80 != 0 {
                    self.device_side(input)
                } else {
                    self.address
                };
                let mut out = vec![0u8; 1500];
                let n = match b % 4 {
                    0 => packet::build_echo(src, service, true, sport, 1, b"probe", &mut out),
                    1 => {
                        let name = DNS_NAMES[usize::from(input.u8()) % DNS_NAMES.len()];
                        let q = crate::dns::build_query(
                            sport,
                            name,
                            hickory_proto::rr::RecordType::A,
                            false,
                        );
                        packet::build_udp(src, sport, service, crate::dns::DNS_PORT, &q, &mut out)
                    }
                    _ => {
                        let port = SERVICE_PORTS[usize::from(input.u8()) % SERVICE_PORTS.len()];
                        let n = usize::from(input.u8() % 64);
                        let body = input.bytes(n);
                        packet::build_udp(src, sport, service, port, body, &mut out)
                    }
                };
                out.truncate(n.unwrap_or(0));
                Op::Client(out)
            }
            14..=19 => {
                // Usually from the link the flow went out on.
                let b = input.u8();
                let (p, flow) = self.reply(input);
                let link = match flow.and_then(|k| self.sent_via.get(&k)) {
                    Some(l) if b & 1 == 0 => *l,
                    _ => Self::link_id(b >> 1),
                };
                Op::Link(link, p)
            }
            20 => {
                let b = input.u8();
                let n = usize::from(input.u8() % 80);
                let p = input.bytes(n).to_vec();
                if b & 1 == 0 {
                    Op::Link(Self::link_id(b >> 1), p)
                } else {
                    Op::Egress(p)
                }
            }
            21..=23 => Op::Egress(self.reply(input).0),
            24 | 25 => {
                let b = input.u8();
                let ms = match b % 8 {
                    0 => 10,
                    1 => 250,
                    2 => 1_000,
                    3 => 5_000,
                    4 => 11_000,
                    5 => 31_000,
                    6 => 121_000,
                    _ => 1_000 * u64::from(input.u16()),
                };
                Op::Time(Duration::from_millis(ms))
            }
            26 | 27 => {
                let b = input.u8();
                let link = Self::link_id(b);
                match (b >> 4) % 4 {
                    0 => Op::LinkDown(link),
                    1 | 2 => Op::LinkUp(link, MAX_DATAGRAMS[usize::from(b >> 6) % 4]),
                    _ => Op::LinkMtu(link, MAX_DATAGRAMS[usize::from(b >> 6) % 4]),
                }
            }
            28 => {
                let b = input.u8();
                let link = Self::link_id(b);
                if b & 0x10 != 0 {
                    Op::LinkStale(link, b & 0x20 != 0)
                } else {
                    // Bits 5 to 7 name applications the connector cannot reach.
                    let unreachable = APPS
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| b & (0x20 << i) != 0)
                        .map(|(_, a)| a.to_string())
                        .collect();
                    Op::LinkHealth(link, b & 0x08 != 0, unreachable)
                }
            }
            29 => {
                // Mostly the base and the reordered policy.
                let mut i = [0, 0, 1, 1, 2, 3, 4, 0][usize::from(input.u8() % 8)];
                if i == REORDERED && !self.options.reordered_sites {
                    i = 0;
                }
                Op::Policy(i)
            }
            30 => Op::Handshake,
            _ => {
                if input.u8() & 1 == 0 {
                    Op::Replay
                } else {
                    let n = usize::from(input.u8() % 160);
                    let mut d = input.bytes(n).to_vec();
                    if let Some(b) = d.first_mut() {
                        *b %= 5;
                    }
                    Op::Datagram(d)
                }
            }
        }
    }

    /// A packet towards the device (for links and egress): a packet of a flow, or an ICMP
    /// error about one.
    fn reply(&mut self, input: &mut Input) -> (Vec<u8>, Option<FlowKey>) {
        let (s, flow) = self.reply_shape(input);
        if input.u8().is_multiple_of(4) {
            // An ICMP error about the device's packet, from its destination or a router.
            let about = s.reversed_shape();
            let mut outer = Shape::of(&FlowKey {
                proto: PROTO_ICMP,
                src: s.src,
                dst: s.dst,
                sport: 0,
                dport: 0,
            });
            if input.u8().is_multiple_of(2) {
                outer.src = self.address(input);
            }
            (Self::icmp_error(input, outer, &about), flow)
        } else {
            (build(&s), flow)
        }
    }

    // ---- running ----

    fn step(&mut self, input: &mut Input) {
        let op = self.decode(input);
        self.stats.ops += 1;
        self.log.push(op.clone());
        match op {
            Op::Client(p) => self.client_sends(&p),
            Op::Link(link, p) => {
                self.core.handle_link_packet(link, &p, self.now);
                self.settle(Ctx::Link(link, p));
            }
            Op::Egress(p) => {
                self.core.handle_egress_packet(&p, self.now);
                self.settle(Ctx::Egress(p));
            }
            Op::Time(d) => {
                self.now += d;
                self.unix += d.as_secs();
                self.core.handle_timeout(self.now, self.unix);
                self.settle(Ctx::Quiet);
            }
            Op::LinkUp(link, max) => {
                self.link_up(link, max);
                self.settle(Ctx::Quiet);
            }
            Op::LinkDown(link) => {
                self.core.link_down(link);
                self.links.remove(&link);
                self.settle(Ctx::Quiet);
            }
            Op::LinkMtu(link, max) => {
                self.core.link_mtu(link, max);
                if let Some(l) = self.links.get_mut(&link) {
                    l.max = max;
                }
                self.settle(Ctx::Quiet);
            }
            Op::LinkStale(link, stale) => {
                self.core.link_stale(link, stale);
                self.settle(Ctx::Quiet);
            }
            Op::LinkHealth(link, draining, unreachable) => {
                self.core.link_health(link, draining, &unreachable);
                self.settle(Ctx::Quiet);
            }
            Op::Policy(i) => {
                let p = fixed().policies[i].clone();
                let a = Arc::new(self.assignment.next(&p));
                self.core.set_policy(p.clone(), a.clone());
                self.assignment = a;
                self.device = p.device_by_key(&fixed().client_key.public());
                if let Some(d) = self.device {
                    self.address = p.devices[d as usize].address;
                }
                self.policy = p;
                self.policy_index = i;
                self.stats.policy_changes += 1;
                self.settle(Ctx::Quiet);
            }
            Op::Handshake => self.handshake(),
            Op::Replay => {
                let d = self.last_datagram.clone();
                self.wg(&d);
                self.settle(Ctx::Quiet);
            }
            Op::Datagram(d) => {
                self.wg(&d);
                self.settle(Ctx::Quiet);
            }
        }
    }

    fn wg(&mut self, datagram: &[u8]) {
        let r = self.core.handle_wg(client_endpoint(), datagram, self.now);
        if r != Routed::Here {
            self.fail(format!("a datagram was routed to {r:?} with one worker"));
        }
    }

    fn handshake(&mut self) {
        self.stats.handshakes += 1;
        let init = match self.client.initiate(&mut self.buf, true) {
            Output::Network(d) => d.to_vec(),
            _ => return,
        };
        self.wg(&init);
        self.settle(Ctx::Quiet);
    }

    fn client_sends(&mut self, pkt: &[u8]) {
        let datagram = match self.client.encapsulate(pkt, &mut self.buf) {
            Output::Network(d) => Ok(d.to_vec()),
            other => Err(format!("the client cannot send: {other:?}")),
        };
        let datagram = datagram.unwrap_or_else(|e| self.fail(e));
        if datagram.first() != Some(&4) {
            self.fail("the client has no session".into());
        }
        self.last_datagram = datagram.clone();
        self.wg(&datagram);
        let got = wg_view(pkt).map(<[u8]>::to_vec);
        if got.is_some() {
            self.stats.client_packets += 1;
        }
        if let Some(key) = got.as_deref().and_then(|q| self.client_flow(q))
            && key.dst != self.service()
            && self.opened.insert(key)
        {
            if self.recent.len() == 16 {
                self.recent.remove(0);
            }
            self.recent.push(key);
        }
        self.settle(Ctx::Client(got));
    }

    /// Drains the core, decrypts what went to the client, checks it all; datagrams the client
    /// answers with (handshake, keepalive) go back to the core.
    fn settle(&mut self, ctx: Ctx) {
        let mut ctx = ctx;
        for _ in 0..4 {
            let mut links = Vec::new();
            let mut egress = Vec::new();
            let mut datagrams = Vec::new();
            while let Some(t) = self.core.poll_transmit() {
                match t {
                    Transmit::Peer(d) => {
                        let seg = d.segment_size.unwrap_or(d.contents.len()).max(1);
                        for c in d.contents.chunks(seg) {
                            datagrams.push((d.to, c.to_vec()));
                        }
                    }
                    Transmit::Link { link, packet } => links.push((link, packet.to_vec())),
                    Transmit::Egress(p) => egress.push(p.to_vec()),
                }
            }
            let mut events = Vec::new();
            while let Some(e) = self.core.poll_event() {
                events.push(e);
            }
            let mut seen: Vec<Seen> = Vec::new();
            let mut feedback = Vec::new();
            for (to, d) in &datagrams {
                if *to != client_endpoint() {
                    self.fail(format!("a datagram to {to}, not the client"));
                }
                match self.client.decapsulate(Some(to.ip()), d, &mut self.buf) {
                    Output::Tunnel(p) => seen.push(Some(p.to_vec())),
                    Output::Network(n) => {
                        feedback.push(n.to_vec());
                        while let Output::Network(n) = self.client.flush(&mut self.buf) {
                            feedback.push(n.to_vec());
                        }
                    }
                    Output::Done => {}
                    Output::Error(WireGuardError::InvalidPacket) => seen.push(None),
                    Output::Error(_) => {}
                }
            }
            self.check_transmits(&ctx, &links, &egress);
            self.check_seen(&ctx, &seen);
            self.check_events(&ctx, &events);
            if feedback.is_empty() {
                return;
            }
            for d in feedback {
                self.wg(&d);
            }
            ctx = Ctx::Quiet;
        }
    }

    // ---- the oracle ----

    fn service(&self) -> IpAddr {
        service_address(&self.policy.device_range)
    }

    /// The policy's decision on a flow of the device. Synthetic addresses stand for names
    /// only once the device asked for them; these policies have no name-based applications,
    /// so flows to them are denied.
    fn expected(&self, key: &FlowKey) -> Decision {
        let Some(device) = self.device else {
            return Decision {
                action: Action::Deny,
                application: None,
                reason: Reason::UnknownDevice,
                risk_logged: false,
            };
        };
        if let IpAddr::V4(a) = key.dst
            && self.policy.dns.app_range.contains(&a)
        {
            return Decision {
                action: Action::Deny,
                application: None,
                reason: Reason::DefaultDeny,
                risk_logged: false,
            };
        }
        self.policy
            .evaluate(device, key, &crate::policy::Facts::new(None, self.unix))
    }

    fn site_of(&self, d: &Decision) -> Option<&str> {
        let app = &self.policy.applications[d.application? as usize];
        Some(&self.policy.sites[app.site as usize])
    }

    /// The flow of a packet from the device, when the device may send it (its source and the
    /// flow's are the device's address).
    fn client_flow(&self, pkt: &[u8]) -> Option<FlowKey> {
        self.device?;
        let (key, src) = match packet::classify(pkt).ok()? {
            PacketKind::Flow(k) => (k, k.src),
            PacketKind::IcmpError { outer, about } => (about.reversed(), outer.src),
        };
        (src == self.address && key.src == self.address).then_some(key)
    }

    /// The device's flow a packet towards it belongs to.
    fn reply_flow(&self, pkt: &[u8]) -> Option<FlowKey> {
        match packet::classify(pkt).ok()? {
            PacketKind::Flow(k) => Some(k.reversed()),
            PacketKind::IcmpError { about, .. } => Some(about),
        }
    }

    /// Where a packet the device sent goes, when it is an ICMP error: its outer destination
    /// must be the flow's other end.
    fn check_icmp_destination(&self, pkt: &[u8], key: &FlowKey, to: &str) {
        if !self.options.icmp_error_destination {
            return;
        }
        if let Ok(PacketKind::IcmpError { outer, .. }) = packet::classify(pkt)
            && outer.dst != key.dst
        {
            self.fail(format!(
                "an ICMP error from the device about its flow {key:?} went to {to} for {}, \
                 not the flow's destination: {}",
                outer.dst,
                describe(pkt)
            ));
        }
    }

    fn check_transmits(&mut self, ctx: &Ctx, links: &[(LinkId, Vec<u8>)], egress: &[Vec<u8>]) {
        if links.len() + egress.len() > 1 {
            self.fail(format!(
                "one packet from the device left {} times",
                links.len() + egress.len()
            ));
        }
        let sent = match ctx {
            Ctx::Client(Some(q)) => Some(q.as_slice()),
            _ => None,
        };
        for (link, pkt) in links {
            self.stats.to_links += 1;
            let Some(q) = sent else {
                self.fail(format!(
                    "a packet for link {} without a packet from the device: {}",
                    link.0,
                    describe(pkt)
                ));
            };
            let Some(model) = self.links.get(link).copied() else {
                self.fail(format!(
                    "a packet for link {}, which is down: {}",
                    link.0,
                    describe(pkt)
                ));
            };
            if pkt.len() != q.len() || packet::classify(pkt) != packet::classify(q) {
                self.fail(format!(
                    "link {} got {} for the device's {}",
                    link.0,
                    describe(pkt),
                    describe(q)
                ));
            }
            if pkt.len() > model.max {
                self.fail(format!(
                    "link {} carries {} bytes, got {}",
                    link.0,
                    model.max,
                    describe(pkt)
                ));
            }
            let Some(key) = self.client_flow(pkt) else {
                self.fail(format!(
                    "link {} got a packet that is not the device's: {}",
                    link.0,
                    describe(pkt)
                ));
            };
            let d = self.expected(&key);
            if !d.allowed() || key.dst == self.service() {
                self.fail(format!(
                    "link {} got a packet of {key:?}, which the policy does not allow \
                     ({d:?}): {}",
                    link.0,
                    describe(pkt)
                ));
            }
            if self.site_of(&d) != Some(model.site) {
                self.fail(format!(
                    "link {} of site {} got a packet of {key:?}, whose application {:?} is \
                     at site {:?}: {}",
                    link.0,
                    model.site,
                    self.policy.app_name(d.application),
                    self.site_of(&d),
                    describe(pkt)
                ));
            }
            self.check_icmp_destination(pkt, &key, &format!("link {}", link.0));
            self.sent_via.insert(key, *link);
        }
        for pkt in egress {
            self.stats.to_internet += 1;
            let Some(q) = sent else {
                self.fail(format!(
                    "a packet for egress without a packet from the device: {}",
                    describe(pkt)
                ));
            };
            if pkt != q {
                self.fail(format!(
                    "egress got {} for the device's {}",
                    describe(pkt),
                    describe(q)
                ));
            }
            let Some(key) = self.client_flow(pkt) else {
                self.fail(format!(
                    "egress got a packet that is not the device's: {}",
                    describe(pkt)
                ));
            };
            let d = self.expected(&key);
            if !d.allowed() || d.application.is_some() {
                self.fail(format!(
                    "egress got a packet of {key:?}, which the policy does not send to the \
                     internet ({d:?}): {}",
                    describe(pkt)
                ));
            }
            let public = !crate::tunnel::is_private(key.dst)
                || self.policy.dns.upstream_addrs.contains(&key.dst);
            if !public || self.policy.device_range.contains(&key.dst) {
                self.fail(format!(
                    "egress got a packet to {}, not a public address: {}",
                    key.dst,
                    describe(pkt)
                ));
            }
            self.check_icmp_destination(pkt, &key, "egress");
        }
    }

    /// Why the device may get `pkt` from `link` (None: from egress); Err says why not.
    fn deliverable(&self, link: Option<LinkId>, pkt: &[u8]) -> Result<(), String> {
        let key = self.reply_flow(pkt).ok_or("it does not parse")?;
        if self.device.is_none() || key.src != self.address {
            return Err(format!("its flow {key:?} is not the device's"));
        }
        if !self.opened.contains(&key) {
            return Err(format!("the device never opened its flow {key:?}"));
        }
        let d = self.expected(&key);
        if !d.allowed() {
            return Err(format!("the policy does not allow its flow {key:?}: {d:?}"));
        }
        match link {
            None if d.application.is_some() => Err(format!(
                "its flow {key:?} is to the application {:?}, not the internet",
                self.policy.app_name(d.application)
            )),
            None => Ok(()),
            Some(link) => {
                let Some(model) = self.links.get(&link) else {
                    return Err(format!("link {} is down", link.0));
                };
                if self.site_of(&d) != Some(model.site) {
                    return Err(format!(
                        "its flow {key:?} is to {:?} at site {:?}, the link is of site {}",
                        self.policy.app_name(d.application),
                        self.site_of(&d),
                        model.site
                    ));
                }
                Ok(())
            }
        }
    }

    fn check_seen(&mut self, ctx: &Ctx, seen: &[Seen]) {
        if seen.is_empty() {
            return;
        }
        if seen.len() > 1 {
            self.fail(format!(
                "{} packets to the device for one input",
                seen.len()
            ));
        }
        let p = &seen[0];
        let show = |p: &Seen| {
            p.as_deref()
                .map_or("a packet the client refused".into(), describe)
        };
        match ctx {
            Ctx::Quiet | Ctx::Client(None) => {
                self.fail(format!("the device got {} out of nothing", show(p)));
            }
            Ctx::Link(..) | Ctx::Egress(..) => {
                let (link, pkt) = match ctx {
                    Ctx::Link(l, p) => (Some(*l), p),
                    Ctx::Egress(p) => (None, p),
                    _ => unreachable!(),
                };
                let from = link.map_or("egress".to_string(), |l| format!("link {}", l.0));
                if let Some(p) = p
                    && Some(p.as_slice()) != wg_view(pkt)
                {
                    self.fail(format!(
                        "the device got {} for {} from {from}",
                        describe(p),
                        describe(pkt)
                    ));
                }
                if let Err(why) = self.deliverable(link, pkt) {
                    self.fail(format!(
                        "the device got {} from {from}, but {why}",
                        describe(pkt)
                    ));
                }
                if link.is_some() {
                    self.stats.from_links += 1;
                } else {
                    self.stats.from_internet += 1;
                }
            }
            Ctx::Client(Some(q)) => {
                let Some(p) = p else {
                    self.fail(format!(
                        "the device got a packet it refused after sending {}",
                        describe(q)
                    ));
                };
                let Some(key) = self.client_flow(q) else {
                    self.fail(format!(
                        "the device got {} for {}, which is not its own",
                        describe(p),
                        describe(q)
                    ));
                };
                if key.dst == self.service() {
                    self.check_service_answer(&key, p, q);
                    return;
                }
                let d = self.expected(&key);
                let mut out = vec![0u8; 1500];
                if !d.allowed() {
                    if let Some(n) = packet::deny_reply(q, &mut out)
                        && out[..n] == p[..]
                    {
                        self.stats.deny_replies += 1;
                        return;
                    }
                } else if let Some(site) = self.site_of(&d) {
                    for model in self.links.values().filter(|l| l.site == site) {
                        let mtu = model.max.min(usize::from(u16::MAX)) as u16;
                        if q.len() > model.max
                            && let Some(n) = packet::too_big_reply(q, mtu, &mut out)
                            && out[..n] == p[..]
                        {
                            self.stats.too_big_replies += 1;
                            return;
                        }
                    }
                }
                self.fail(format!(
                    "the device got {} after sending {} of {key:?} ({d:?}): neither a deny \
                     reply to a denied flow nor a \"too big\" answer from a link of its site",
                    describe(p),
                    describe(q)
                ));
            }
        }
    }

    fn check_service_answer(&mut self, key: &FlowKey, p: &[u8], q: &[u8]) {
        let ok_addresses = packet::addresses(p) == Ok((key.dst, key.src));
        let udp = matches!(packet::classify(p), Ok(PacketKind::Flow(k))
            if k.proto == PROTO_UDP && k.sport == key.dport && k.dport == key.sport);
        let echo = packet::echo(p).is_some_and(|e| !e.request && e.id == key.sport);
        if !ok_addresses || !(udp || echo) {
            self.fail(format!(
                "the device got {} from the service for {}",
                describe(p),
                describe(q)
            ));
        }
        self.stats.service_answers += 1;
    }

    fn check_events(&mut self, ctx: &Ctx, events: &[Event]) {
        for e in events {
            match e {
                Event::Decision(r) => {
                    self.stats.decisions += 1;
                    let key = match ctx {
                        Ctx::Client(Some(q)) => self.client_flow(q),
                        Ctx::Link(_, p) | Ctx::Egress(p) => self.reply_flow(p),
                        _ => None,
                    };
                    let Some(key) = key else {
                        self.fail(format!("a decision with no flow in sight: {r:?}"));
                    };
                    if (r.src, r.dst, r.sport, r.dport, r.proto)
                        != (key.src, key.dst, key.sport, key.dport, key.proto_name())
                    {
                        self.fail(format!("a decision on another flow than {key:?}: {r:?}"));
                    }
                    let d = self.expected(&key);
                    let internet = matches!(d.reason, Reason::Egress(_) | Reason::EgressRefused(_));
                    let app = match d.application {
                        None if internet => Some("internet"),
                        a => self.policy.app_name(a),
                    };
                    if r.decision != d.action || r.application.as_deref() != app {
                        self.fail(format!(
                            "the decision logged for {key:?} is {r:?}, the policy says {d:?}"
                        ));
                    }
                }
                Event::MapName { .. } => {
                    self.fail(format!(
                        "a name mapped, with no name-based application: {e:?}"
                    ));
                }
                Event::AppDns(r) if r.result == "synthetic" => {
                    self.fail(format!("a synthetic address for a name: {r:?}"));
                }
                Event::Posture(r) if r.result != "refused" => {
                    self.fail(format!("a posture change with no token keys: {r:?}"));
                }
                Event::AppDns(_) | Event::Posture(_) | Event::Summary(_) | Event::Flow(_) => {}
            }
        }
    }
}

impl Shape {
    /// The same flow the other way (as the answer travels).
    fn reversed_shape(&self) -> Shape {
        Shape {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}
