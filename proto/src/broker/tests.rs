//! The broker worker's behaviour, driven through its inputs and read from its outputs, with a
//! real WireGuard client session on the other side.

use super::*;
use crate::api::{STATUS_PORT, TunnelStatus};
use crate::dns::DNS_PORT;
use crate::flow::FlowEnd;
use crate::packet::{PROTO_TCP, deny_reply};
use crate::policy::Action;
use crate::posture::{POSTURE_PORT, TokenAnswer, TokenSigner};
use std::path::Path;

/// Everything a worker put out, as a test reads it.
#[derive(Default)]
struct Recorder {
    udp: Vec<(SocketAddr, Vec<u8>)>,
    site: Vec<(LinkId, Vec<u8>)>,
    decisions: Vec<DecisionRecord>,
    postures: Vec<PostureRecord>,
    maps: Vec<(LinkId, IpAddr, IpAddr, String, Vec<String>)>,
    dns: Vec<AppDnsRecord>,
    egress: Vec<Vec<u8>>,
    summaries: Vec<SummaryRecord>,
    flows: Vec<super::events::FlowRecord>,
}

impl Recorder {
    /// Drains the worker's transmits and events; GSO trains are split into datagrams.
    fn drain(&mut self, core: &mut BrokerState) {
        while let Some(t) = core.poll_transmit() {
            match t {
                Transmit::Peer(d) => {
                    let seg = d.segment_size.unwrap_or(d.contents.len());
                    for c in d.contents.chunks(seg) {
                        self.udp.push((d.to, c.to_vec()));
                    }
                }
                Transmit::Link { link, packet } => self.site.push((link, packet.to_vec())),
                Transmit::Egress(p) => self.egress.push(p.to_vec()),
            }
        }
        while let Some(e) = core.poll_event() {
            match e {
                Event::Decision(d) => self.decisions.push(d),
                Event::Posture(p) => self.postures.push(p),
                Event::AppDns(r) => self.dns.push(r),
                Event::Summary(r) => self.summaries.push(r),
                Event::Flow(r) => self.flows.push(r),
                Event::MapName {
                    link,
                    device,
                    synthetic,
                    name,
                    deny,
                } => self.maps.push((link, device, synthetic, name, deny)),
            }
        }
    }
}

const POLICY: &str = r#"
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
[[applications]]
name = "web"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [80]
[[applications]]
name = "db"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [5432]
[[rules]]
name = "eng-web"
action = "allow"
groups = ["eng"]
applications = ["web"]
[[rules]]
name = "no-db"
action = "deny"
groups = ["eng"]
applications = ["db"]
[[applications]]
name = "wiki-by-name"
site = "dc1"
names = ["wiki.corp.example", "*.dev.corp.example"]
protocols = ["tcp"]
ports = [80]
[[applications]]
name = "payroll"
site = "dc1"
names = ["payroll.corp.example"]
protocols = ["tcp"]
[[rules]]
name = "eng-wiki-name"
action = "allow"
groups = ["eng"]
applications = ["wiki-by-name"]
"#;

fn tcp_syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    // A SYN is answered by deny_reply with an RST; build one through the same module by
    // turning a valid RST test packet around is more work than writing the 40 bytes.
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = PROTO_TCP;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x02;
    p
}

struct Fixture {
    core: BrokerState,
    client: Session,
    from: SocketAddr,
    now: Instant,
    /// The latest time given to `handle_timeout` (it only moves forward).
    clock: Instant,
}

fn policy_text(client: &PrivateKey) -> String {
    POLICY.replace("@KEY@", &client.public().to_string())
}

fn worker_config() -> WorkerConfig {
    WorkerConfig {
        worker: WorkerId(0),
        name: "test-broker".into(),
        timeouts: IdleTimeouts::default(),
        max_flows: 1000,
        max_flows_per_device: 100,
        overlay_mtu: crate::mtu::DEFAULT_OVERLAY_MTU,
    }
}

/// A broker worker (the only one) and a client session with a completed handshake.
fn fixture() -> Fixture {
    fixture_with(worker_config())
}

fn fixture_with(config: WorkerConfig) -> Fixture {
    let client_key = PrivateKey::generate();
    let broker_key = PrivateKey::generate();
    let policy = Arc::new(Policy::parse(Path::new("p.toml"), &policy_text(&client_key)).unwrap());
    let assignment = Arc::new(Assignment::new(1).next(&policy));
    let now = Instant::now();
    let core = BrokerState::new(broker_key.clone(), config, policy, assignment, now);
    let mut client = Session::new(&client_key, broker_key.public(), None, 1, None);
    let from: SocketAddr = "10.99.1.2:40000".parse().unwrap();
    let mut buf = vec![0u8; 2048];
    let Output::Network(init) = client.initiate(&mut buf, false) else {
        panic!()
    };
    let init = init.to_vec();
    let mut f = Fixture {
        core,
        client,
        from,
        now,
        clock: now,
    };
    let mut io = Recorder::default();
    f.core.link_up(LinkId(1), "dc1", "c1", 1400);
    f.wg(&init, &mut io);
    assert_eq!(io.udp.len(), 1, "handshake response");
    let resp = io.udp[0].1.clone();
    let _ = f.client.decapsulate(Some(from.ip()), &resp, &mut buf);
    f
}

impl Fixture {
    /// Feeds a datagram from the client's address and collects what comes out.
    fn wg(&mut self, datagram: &[u8], io: &mut Recorder) {
        assert_eq!(
            self.core.handle_wg(self.from, datagram, self.now),
            Routed::Here
        );
        io.drain(&mut self.core);
    }

    /// Sends an IP packet from the client through the broker worker.
    fn send(&mut self, pkt: &[u8], io: &mut Recorder) {
        let mut buf = vec![0u8; 2048];
        let Output::Network(data) = self.client.encapsulate(pkt, &mut buf) else {
            panic!()
        };
        let data = data.to_vec();
        self.wg(&data, io);
    }

    fn site_packet(&mut self, link: LinkId, pkt: &[u8], io: &mut Recorder) {
        self.core.handle_link_packet(link, pkt, self.now);
        io.drain(&mut self.core);
    }

    fn egress(&mut self, pkt: &[u8], io: &mut Recorder) {
        self.core.handle_egress_packet(pkt, self.now);
        io.drain(&mut self.core);
    }

    fn tick(&mut self, now: Instant, unix: u64, io: &mut Recorder) {
        self.clock = self.clock.max(now) + Duration::from_secs(1);
        self.core.handle_timeout(self.clock, unix);
        io.drain(&mut self.core);
    }

    /// Runs the timers at exactly `t` (later than any time given before).
    fn tick_to(&mut self, t: Instant, io: &mut Recorder) {
        self.clock = t;
        self.core.handle_timeout(t, 0);
        io.drain(&mut self.core);
    }

    fn set_policy(&mut self, p: Policy) {
        let p = Arc::new(p);
        let a = Arc::new(Assignment::new(1).next(&p));
        self.core.set_policy(p, a);
    }

    /// Decrypts what the broker sent back to the client.
    fn receive(&mut self, io: &Recorder) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        io.udp
            .iter()
            .filter_map(
                |(_, d)| match self.client.decapsulate(Some(self.from.ip()), d, &mut buf) {
                    Output::Tunnel(p) => Some(p.to_vec()),
                    _ => None,
                },
            )
            .collect()
    }
}
#[test]
fn probes_status_with_denials_and_internet_egress() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let me = IpAddr::from([100, 118, 0, 2]);
    let service = IpAddr::from([100, 118, 0, 1]);
    // An echo to the service address is answered inside the tunnel (RTT probes).
    let mut pkt = vec![0u8; 256];
    let n = packet::build_echo(me, service, true, 7, 9, b"probe", &mut pkt).unwrap();
    f.send(&pkt[..n], &mut io);
    let got = f.receive(&io);
    let e = got
        .iter()
        .find_map(|p| packet::echo(p))
        .expect("echo reply");
    assert_eq!(
        (e.request, e.id, e.seq, e.payload),
        (false, 7, 9, &b"probe"[..])
    );
    // A denied flow shows in the device's status, with its rule.
    io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 2], 40001, [10, 20, 0, 10], 5432),
        &mut io,
    );
    let n = packet::build_udp(me, 40744, service, STATUS_PORT, b"status", &mut pkt).unwrap();
    io.udp.clear();
    f.send(&pkt[..n], &mut io);
    let answers = f.receive(&io);
    let status: TunnelStatus =
        serde_json::from_slice(packet::udp_payload(&answers[0]).unwrap()).unwrap();
    let d = status.denials.last().expect("a denial");
    assert_eq!((d.dport, d.rule.as_deref()), (5432, Some("no-db")));
    // Not an application and no full tunnel for this user: default deny, nothing leaves.
    io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 2], 40002, [203, 0, 113, 80], 80),
        &mut io,
    );
    assert!(io.egress.is_empty());
    assert_eq!(
        io.decisions.last().unwrap().reason,
        "default deny: no allow rule covers this user and application"
    );
    // With a full tunnel for the group, the internet is carried (and logged as such), a
    // private address and DNS around the stub are not.
    let key = f.core.policy().devices[0].public_key.to_string();
    let full = format!(
        "{}\n[dns]\nupstreams = [\"udp://10.99.0.53\"]\n[[tunnels]]\nname = \"eng-full\"\ngroups = [\"eng\"]\nmode = \"full\"\n",
        POLICY.replace("@KEY@", &key)
    );
    f.set_policy(Policy::parse(Path::new("p.toml"), &full).unwrap());
    io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 2], 40003, [203, 0, 113, 80], 80),
        &mut io,
    );
    assert_eq!(io.egress.len(), 1, "carried to the internet");
    let r = io.decisions.last().unwrap();
    assert_eq!(r.application.as_deref(), Some("internet"));
    assert_eq!(r.rule.as_deref(), Some("eng-full"));
    // The reply comes back from the egress interface to the device.
    let mut reply = tcp_syn([203, 0, 113, 80], 80, [100, 118, 0, 2], 40003);
    reply[33] = 0x12;
    io.udp.clear();
    f.egress(&reply, &mut io);
    assert_eq!(f.receive(&io).len(), 1);
    // Unsolicited from the internet: dropped.
    io.udp.clear();
    f.egress(&tcp_syn([203, 0, 113, 9], 80, [100, 118, 0, 2], 1), &mut io);
    assert!(io.udp.is_empty());
    for (dst, port) in [([192, 168, 1, 50], 80), ([8, 8, 8, 8], 53)] {
        io = Recorder::default();
        f.send(&tcp_syn([100, 118, 0, 2], 40004, dst, port), &mut io);
        assert!(io.egress.is_empty(), "{dst:?}:{port} refused");
        assert_eq!(io.decisions.last().unwrap().decision, Action::Deny);
    }
}

impl Fixture {
    /// Asks the broker's in-tunnel DNS service; returns the decoded answer.
    fn ask(&mut self, name: &str, io: &mut Recorder) -> hickory_proto::op::Message {
        let q = crate::dns::build_query(77, name, hickory_proto::rr::RecordType::A, false);
        let mut pkt = vec![0u8; 2048];
        let n = packet::build_udp(
            IpAddr::from([100, 118, 0, 2]),
            5353,
            IpAddr::from([100, 118, 0, 1]),
            DNS_PORT,
            &q,
            &mut pkt,
        )
        .unwrap();
        io.udp.clear();
        self.send(&pkt[..n], io);
        let replies = self.receive(io);
        assert_eq!(replies.len(), 1, "one answer per query");
        hickory_proto::op::Message::from_vec(packet::udp_payload(&replies[0]).unwrap()).unwrap()
    }
}

#[test]
fn application_names_get_synthetic_addresses_and_flows_to_them_are_authorized() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RData;
    let mut f = fixture();
    let mut io = Recorder::default();
    let m = f.ask("Wiki.corp.example.", &mut io);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let RData::A(a) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    let wiki = a.0;
    assert!(f.core.policy().dns.app_range.contains(&wiki));
    // Stable for the session.
    let again = f.ask("wiki.corp.example", &mut io);
    assert_eq!(again.answers[0].data, m.answers[0].data);
    // A wildcard name gets its own address.
    let dev = f.ask("build.dev.corp.example", &mut io);
    let RData::A(d) = &dev.answers[0].data else {
        panic!()
    };
    assert_ne!(d.0, wiki);
    // An application alice may not use, and a name that is no application.
    let payroll = f.ask("payroll.corp.example", &mut io);
    assert_eq!(payroll.metadata.response_code, ResponseCode::NXDomain);
    let other = f.ask("www.corp.example", &mut io);
    assert_eq!(other.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        io.dns.iter().map(|r| r.result).collect::<Vec<_>>(),
        [
            "synthetic",
            "synthetic",
            "synthetic",
            "nxdomain",
            "not-an-application"
        ]
    );

    // A flow to the synthetic address is the application's: the connector learns the name
    // first, then gets the packet.
    io.site.clear();
    let syn = tcp_syn([100, 118, 0, 2], 40100, wiki.octets(), 80);
    f.send(&syn, &mut io);
    assert_eq!(io.site.len(), 1);
    // With the name go the address-based deny rules of the device's user (no-db: 10.20.0.10
    // TCP 5432), so a name resolving there at the site is refused by the connector.
    assert_eq!(
        io.maps,
        [(
            LinkId(1),
            IpAddr::from([100, 118, 0, 2]),
            IpAddr::V4(wiki),
            "wiki.corp.example".to_string(),
            vec!["10.20.0.10:5432".to_string()]
        )]
    );
    // The connector restarts (its link goes and comes back, its translations are gone): the
    // flow's next packet takes the new link, and the name goes to it first.
    f.core.link_down(LinkId(1));
    f.core.link_up(LinkId(3), "dc1", "c1", 1400);
    io.maps.clear();
    io.site.clear();
    let next = tcp_segment([100, 118, 0, 2], 40100, wiki.octets(), 80, 0x10);
    f.send(&next, &mut io);
    assert_eq!(
        io.maps.len(),
        1,
        "the name was not sent again after the restart"
    );
    assert_eq!(io.maps[0].0, LinkId(3));
    assert_eq!(
        io.site.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        [LinkId(3)]
    );
    let last = io.decisions.last().unwrap();
    assert_eq!(last.application.as_deref(), Some("wiki-by-name"));
    assert_eq!(last.rule.as_deref(), Some("eng-wiki-name"));
    // The same flow again: no second mapping.
    f.send(&syn, &mut io);
    assert_eq!(io.maps.len(), 1);
    // Another port of the same name is not part of the application.
    let ssh = tcp_syn([100, 118, 0, 2], 40101, wiki.octets(), 22);
    f.send(&ssh, &mut io);
    assert_eq!(io.decisions.last().unwrap().decision, Action::Deny);
    // A synthetic address never handed out is denied.
    let stray = tcp_syn([100, 118, 0, 2], 40102, [100, 119, 200, 1], 80);
    f.send(&stray, &mut io);
    let last = io.decisions.last().unwrap();
    assert_eq!(
        (last.decision, last.reason),
        (
            Action::Deny,
            "default deny: no allow rule covers this user and application"
        )
    );
}

#[test]
fn allowed_flow_goes_to_its_site_once_decided() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let syn = tcp_syn([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80);
    f.send(&syn, &mut io);
    f.send(&syn, &mut io);
    assert_eq!(io.site.len(), 2);
    assert_eq!(io.site[0], (LinkId(1), syn.clone()));
    assert_eq!(io.decisions.len(), 1, "a flow is decided once");
    let d = &io.decisions[0];
    assert_eq!(
        (d.decision, d.rule.as_deref(), d.application.as_deref()),
        (Action::Allow, Some("eng-web"), Some("web"))
    );
    // The reply from the site reaches the client.
    let mut reply = syn.clone();
    reply[12..16].copy_from_slice(&[10, 20, 0, 10]);
    reply[16..20].copy_from_slice(&[100, 118, 0, 2]);
    reply[20..22].copy_from_slice(&80u16.to_be_bytes());
    reply[22..24].copy_from_slice(&40000u16.to_be_bytes());
    let mut io2 = Recorder::default();
    f.site_packet(LinkId(1), &reply, &mut io2);
    assert_eq!(f.receive(&io2), vec![reply.clone()]);
    // The same packet from another site, or a packet of no flow, is not delivered.
    let mut io3 = Recorder::default();
    f.core.link_up(LinkId(2), "dc2", "c9", 1400);
    f.site_packet(LinkId(2), &reply, &mut io3);
    let mut stray = reply.clone();
    stray[22..24].copy_from_slice(&1234u16.to_be_bytes());
    f.site_packet(LinkId(1), &stray, &mut io3);
    assert!(io3.udp.is_empty());
    assert_eq!(f.core.counters().drops.unsolicited_from_site, 2);
}

fn tcp_segment(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut p = tcp_syn(src, sport, dst, dport);
    p[33] = flags;
    p
}

#[test]
fn flows_are_spread_over_connectors_stay_on_theirs_and_move_when_one_goes() {
    let mut f = fixture();
    f.core.link_up(LinkId(2), "dc1", "c2", 1400);
    let mut io = Recorder::default();
    let client = [100, 118, 0, 2];
    // Four new flows: two per connector.
    for port in 0..4 {
        f.send(&tcp_syn(client, 41000 + port, [10, 20, 0, 10], 80), &mut io);
    }
    let on = |io: &Recorder, link: u64| io.site.iter().filter(|(l, _)| *l == LinkId(link)).count();
    assert_eq!((on(&io, 1), on(&io, 2)), (2, 2));
    // A flow stays on its connector.
    let first = io.site[0].0;
    io.site.clear();
    f.send(&tcp_syn(client, 41000, [10, 20, 0, 10], 80), &mut io);
    assert_eq!(io.site[0].0, first);
    // Connector 2 drains: new flows avoid it, its flows carry on there.
    f.core.link_health(LinkId(2), true, &[]);
    io.site.clear();
    for port in 10..13 {
        f.send(&tcp_syn(client, 41000 + port, [10, 20, 0, 10], 80), &mut io);
    }
    assert_eq!((on(&io, 1), on(&io, 2)), (3, 0));
    let on_two = f
        .core
        .flows
        .iter()
        .find(|(_, fl, _)| fl.link == FlowLink::Via(LinkId(2)))
        .map(|(k, _, _)| *k)
        .unwrap();
    // Once answered, the flow carries on through the draining connector.
    let reply = tcp_segment([10, 20, 0, 10], 80, client, on_two.sport, 0x12);
    f.site_packet(LinkId(2), &reply, &mut io);
    io.site.clear();
    f.send(&tcp_syn(client, on_two.sport, [10, 20, 0, 10], 80), &mut io);
    assert_eq!(io.site[0].0, LinkId(2));
    let links = f.core.snapshot().links;
    assert_eq!(links[1].state, LinkState::Draining);
    // Connector 2 goes away: its flows move to connector 1 on their next packet.
    f.core.link_down(LinkId(2));
    io.site.clear();
    f.send(&tcp_syn(client, on_two.sport, [10, 20, 0, 10], 80), &mut io);
    assert_eq!(io.site[0].0, LinkId(1));
    assert_eq!(f.core.counters().flows.moved, 1);
    // With no connector at all the packet is dropped and counted, not sent.
    f.core.link_down(LinkId(1));
    io.site.clear();
    f.send(&tcp_syn(client, 41099, [10, 20, 0, 10], 80), &mut io);
    assert!(io.site.is_empty());
    assert_eq!(f.core.counters().drops.no_connector, 1);
}

#[test]
fn a_syn_retry_leaves_a_silent_connector_but_answered_flows_stay() {
    let mut f = fixture();
    f.core.link_up(LinkId(2), "dc1", "c2", 1400);
    let mut io = Recorder::default();
    let client = [100, 118, 0, 2];
    let app = [10, 20, 0, 10];
    f.send(&tcp_syn(client, 43000, app, 80), &mut io);
    f.send(&tcp_syn(client, 43001, app, 80), &mut io);
    let first = io.site[0].0;
    let other = if first == LinkId(1) {
        LinkId(2)
    } else {
        LinkId(1)
    };
    assert_eq!(io.site[1].0, other);
    // The second flow was answered through its connector.
    let reply = tcp_segment(app, 80, client, 43001, 0x12);
    f.site_packet(other, &reply, &mut io);
    // Both connectors go silent for a moment; the first flow's SYN retry moves, the
    // answered flow stays put.
    f.core.link_stale(first, true);
    f.core.link_stale(other, true);
    io.site.clear();
    f.send(&tcp_syn(client, 43001, app, 80), &mut io);
    assert_eq!(io.site[0].0, other);
    f.core.link_stale(other, false);
    f.send(&tcp_syn(client, 43000, app, 80), &mut io);
    assert_eq!(
        io.site[1].0, other,
        "the unanswered flow moved off the silent one"
    );
}

#[test]
fn ended_tcp_flows_stop_counting_as_open() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let client = [100, 118, 0, 2];
    let t0 = f.now;
    f.send(&tcp_syn(client, 42000, [10, 20, 0, 10], 80), &mut io);
    f.send(&tcp_syn(client, 42001, [10, 20, 0, 10], 80), &mut io);
    // Connector loads are recounted every 5 s.
    f.tick_to(t0 + Duration::from_secs(5), &mut io);
    assert_eq!(f.core.snapshot().links[0].flows, 2);
    // FIN from the client and from the server end the first flow; a reset the second.
    f.now = t0 + Duration::from_secs(6);
    f.send(
        &tcp_segment(client, 42000, [10, 20, 0, 10], 80, 0x11),
        &mut io,
    );
    let fin_back = tcp_segment([10, 20, 0, 10], 80, client, 42000, 0x11);
    f.site_packet(LinkId(1), &fin_back, &mut io);
    f.send(
        &tcp_segment(client, 42001, [10, 20, 0, 10], 80, 0x04),
        &mut io,
    );
    f.tick_to(t0 + Duration::from_secs(10), &mut io);
    assert_eq!(f.core.snapshot().links[0].flows, 0);
    // They linger briefly for late segments (10 s), then go.
    assert_eq!(f.core.flow_count(), 2);
    f.tick_to(t0 + Duration::from_secs(17), &mut io);
    assert_eq!(f.core.flow_count(), 0);
    // Each left a flow record: its traffic each way, its duration, why it ended.
    let len = tcp_syn(client, 1, [10, 20, 0, 10], 80).len() as u64;
    let mut records = io.flows.clone();
    records.sort_by_key(|r| r.sport);
    assert_eq!(records.len(), 2, "{records:?}");
    let (fin, rst) = (&records[0], &records[1]);
    assert_eq!(
        (fin.sport, fin.end, rst.end),
        (42000, FlowEnd::Closed, FlowEnd::Closed)
    );
    assert_eq!(
        (
            fin.traffic.packets_out,
            fin.traffic.bytes_out,
            fin.traffic.packets_in,
            fin.traffic.bytes_in
        ),
        (2, 2 * len, 1, len)
    );
    assert_eq!((rst.traffic.packets_out, rst.traffic.packets_in), (2, 0));
    assert_eq!(fin.duration_ms, 6000);
    assert_eq!(
        (fin.meta.user.as_str(), fin.meta.application.as_deref()),
        ("alice", Some("web"))
    );
    assert_eq!(f.core.counters().flows.records, 2);
    let decisions = f.core.snapshot().decisions;
    assert_eq!(decisions.values().sum::<u64>(), 2);
    assert!(decisions.keys().all(|(result, _)| *result == "allow"));
}

#[test]
fn flows_below_the_monitored_level_are_recorded_without_destinations_and_summed() {
    let mut f = fixture();
    let key = f.core.policy().devices[0].public_key;
    let text = format!(
        "{}\n[risk]\naggregate_below = true\n",
        POLICY.replace("@KEY@", &key.to_string())
    );
    f.set_policy(Policy::parse(Path::new("p.toml"), &text).unwrap());
    let mut io = Recorder::default();
    let client = [100, 118, 0, 2];
    let t0 = f.now;
    for port in [42000, 42001, 42002] {
        f.send(&tcp_syn(client, port, [10, 20, 0, 10], 80), &mut io);
        f.send(
            &tcp_segment(client, port, [10, 20, 0, 10], 80, 0x04),
            &mut io,
        );
    }
    // The decisions name the application, not where it is.
    assert_eq!(io.decisions.len(), 3);
    for d in &io.decisions {
        assert_eq!(d.application.as_deref(), Some("web"), "{d:?}");
        assert_eq!(
            (d.dst.to_string().as_str(), d.dport, d.sport),
            ("0.0.0.0", 0, 0)
        );
    }
    // No record per flow: one for the three, at the end of the report period.
    f.tick_to(t0 + Duration::from_secs(5), &mut io);
    f.tick_to(
        t0 + crate::flow::FLOW_REPORT_EVERY + Duration::from_secs(6),
        &mut io,
    );
    assert_eq!(io.flows.len(), 1, "{:?}", io.flows);
    let r = &io.flows[0];
    assert_eq!((r.end, r.flows, r.dport), (FlowEnd::Aggregate, Some(3), 0));
    assert_eq!(r.dst.to_string(), "0.0.0.0");
    assert_eq!(r.traffic.packets_out, 6, "{r:?}");
    assert_eq!(r.meta.application.as_deref(), Some("web"));
    assert_eq!(f.core.counters().flows.records, 1);
}

#[test]
fn denied_flow_gets_an_rst_through_the_tunnel() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let syn = tcp_syn([100, 118, 0, 2], 40001, [10, 20, 0, 10], 5432);
    f.send(&syn, &mut io);
    assert!(io.site.is_empty());
    assert_eq!(io.decisions[0].rule.as_deref(), Some("no-db"));
    let got = f.receive(&io);
    let mut expected = vec![0u8; 1500];
    let n = deny_reply(&syn, &mut expected).unwrap();
    assert_eq!(got, vec![expected[..n].to_vec()]);
    // Port 22: no application at all, default deny.
    let mut io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 2], 40002, [10, 20, 0, 10], 22),
        &mut io,
    );
    assert_eq!(
        (
            io.decisions[0].rule.as_deref(),
            io.decisions[0].application.as_deref()
        ),
        (None, None)
    );
    assert_eq!(f.receive(&io).len(), 1);
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    let mut f = fixture();
    let mut io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 3], 40000, [10, 20, 0, 10], 80),
        &mut io,
    );
    assert!(io.site.is_empty() && io.decisions.is_empty());
    assert_eq!(f.core.counters().drops.spoofed_source, 1);
}

#[test]
fn policy_change_recuts_existing_flows() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let syn = tcp_syn([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80);
    f.send(&syn, &mut io);
    assert_eq!(io.site.len(), 1);
    // New policy: the allow rule becomes a deny.
    let key = f.core.policy().devices[0].public_key;
    let text = POLICY.replace("@KEY@", &key.to_string()).replace(
        "name = \"eng-web\"\naction = \"allow\"",
        "name = \"eng-web\"\naction = \"deny\"",
    );
    f.set_policy(Policy::parse(Path::new("p.toml"), &text).unwrap());
    let mut io = Recorder::default();
    f.send(&syn, &mut io);
    assert!(io.site.is_empty(), "the existing flow is cut");
    assert_eq!(io.decisions.len(), 1);
    assert_eq!(io.decisions[0].decision, Action::Deny);
    // The WireGuard session survived the reload: the RST arrived.
    assert_eq!(f.receive(&io).len(), 1);
}

/// POLICY with posture: web (port 80) is sensitivity 3 and needs the edr check; a new
/// level-1 app "wiki" (port 8080) needs only the client check.
fn posture_policy(key: &PublicKeyBytes) -> Policy {
    let text = POLICY
        .replace("@KEY@", &key.to_string())
        .replace("ports = [80]\n", "ports = [80]\nsensitivity = 3\n")
        + r#"
[[applications]]
name = "wiki"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [8080]
[[rules]]
name = "eng-wiki"
action = "allow"
groups = ["eng"]
applications = ["wiki"]
[[posture_checks]]
name = "client"
kind = "min_client_version"
version = "0.1"
[[posture_checks]]
name = "edr"
kind = "process_running"
process = "edr-agent"
[sensitivity]
level1 = ["client"]
level3 = ["client", "edr"]
"#;
    Policy::parse(Path::new("p.toml"), &text).unwrap()
}

fn claims_for(key: &PublicKeyBytes, edr: bool, iat: u64) -> PostureClaims {
    PostureClaims {
        device: "alice-laptop".into(),
        device_key: key.to_string(),
        user: "alice".into(),
        groups: vec!["eng".into()],
        checks: [("client".to_string(), true), ("edr".to_string(), edr)].into(),
        iat,
        exp: iat + 300,
        kid: String::new(),
        auth_time: None,
    }
}

impl Fixture {
    /// Presents a token inside the tunnel; returns the broker's answer.
    fn present(&mut self, token: &str) -> TokenAnswer {
        let mut pkt = vec![0u8; 5000];
        let n = packet::build_udp(
            IpAddr::from([100, 118, 0, 2]),
            40999,
            IpAddr::from([100, 118, 0, 1]),
            POSTURE_PORT,
            token.as_bytes(),
            &mut pkt,
        )
        .unwrap();
        let mut io = Recorder::default();
        self.send(&pkt[..n], &mut io);
        let replies = self.receive(&io);
        assert_eq!(replies.len(), 1, "one answer per token");
        serde_json::from_slice(packet::udp_payload(&replies[0]).unwrap()).unwrap()
    }

    /// Sends a SYN to port `dport`; true when it went to the site.
    fn reaches(&mut self, sport: u16, dport: u16) -> bool {
        let mut io = Recorder::default();
        self.send(
            &tcp_syn([100, 118, 0, 2], sport, [10, 20, 0, 10], dport),
            &mut io,
        );
        !io.site.is_empty()
    }
}

#[test]
fn posture_tokens_gate_sensitive_apps_and_a_failing_check_cuts_them() {
    let mut f = fixture();
    let key = f.core.policy().devices[0].public_key;
    f.set_policy(posture_policy(&key));
    let signer = TokenSigner::generate();
    f.core.set_token_keys(TokenVerifier::from_signer(&signer));
    let t0 = 1_000_000;
    f.tick(f.now, t0, &mut Recorder::default());

    // No token yet: both apps need checks.
    assert!(!f.reaches(50000, 80));
    assert!(!f.reaches(50001, 8080));
    let answer = f.present(&signer.issue(claims_for(&key, true, t0)));
    assert!(answer.accepted, "{answer:?}");
    // Same 5-tuples again: decided anew after the posture change, now allowed.
    assert!(f.reaches(50000, 80));
    assert!(f.reaches(50001, 8080));

    // The EDR check starts failing: the level-3 flow is cut, the level-1 flow continues.
    assert!(
        f.present(&signer.issue(claims_for(&key, false, t0 + 1)))
            .accepted
    );
    let mut io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 2], 50000, [10, 20, 0, 10], 80),
        &mut io,
    );
    assert!(io.site.is_empty());
    assert_eq!(io.decisions[0].check.as_deref(), Some("edr"));
    assert_eq!(f.receive(&io).len(), 1, "the cut flow gets an RST");
    assert!(f.reaches(50001, 8080));

    // Fixed again: access returns by itself.
    assert!(
        f.present(&signer.issue(claims_for(&key, true, t0 + 2)))
            .accepted
    );
    assert!(f.reaches(50000, 80));

    // Expiry: the tick past exp drops the posture and the flows need a new token.
    let mut io = Recorder::default();
    f.tick(f.now, t0 + 2 + 300, &mut io);
    assert_eq!(io.postures[0].result, "expired");
    assert!(!f.reaches(50000, 80));
    assert!(!f.reaches(50001, 8080));
}

#[test]
fn bad_tokens_are_refused_with_the_reason() {
    let mut f = fixture();
    let key = f.core.policy().devices[0].public_key;
    f.set_policy(posture_policy(&key));
    let signer = TokenSigner::generate();
    f.core.set_token_keys(TokenVerifier::from_signer(&signer));
    let t0 = 1_000_000;
    f.tick(f.now, t0, &mut Recorder::default());

    let forged = TokenSigner::generate().issue(claims_for(&key, true, t0));
    assert!(f.present(&forged).error.contains("unknown key"));
    let expired = signer.issue(claims_for(&key, true, t0 - 400));
    assert!(f.present(&expired).error.contains("expired"));
    let other = PrivateKey::generate().public();
    let stolen = signer.issue(claims_for(&other, true, t0));
    assert!(f.present(&stolen).error.contains("another device"));
    let good = signer.issue(claims_for(&key, false, t0));
    let (body, sig) = good.split_once('.').unwrap();
    let edited = format!("{}x.{sig}", &body[..body.len() - 1]);
    assert!(!f.present(&edited).accepted);
    assert!(!f.present("not a token").accepted);
    assert_eq!(f.core.counters().posture.refused, 5);
    assert_eq!(f.core.counters().posture.accepted, 0);
    assert!(!f.reaches(50000, 8080), "nothing was let in");
}

#[test]
fn garbage_datagrams_are_counted_not_fatal() {
    let mut f = fixture();
    let mut io = Recorder::default();
    for junk in [
        &[][..],
        &[1, 2, 3][..],
        &[4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        &[0xff; 200][..],
    ] {
        f.wg(junk, &mut io);
    }
    assert_eq!(
        f.core.counters().drops.invalid_wireguard + f.core.counters().drops.unknown_peer,
        4
    );
    // A malformed inner packet from an authenticated peer is dropped and counted: a valid
    // IPv4 header announcing TCP with only two bytes of TCP header.
    let mut short = tcp_syn([100, 118, 0, 2], 1, [10, 20, 0, 10], 80);
    short.truncate(22);
    short[2..4].copy_from_slice(&22u16.to_be_bytes());
    f.send(&short, &mut io);
    assert_eq!(f.core.counters().drops.malformed, 1);
    assert!(io.site.is_empty());
}

/// Random operations through the oracle harness (`oracle`, also the `broker_core` fuzz
/// target): packets from a WireGuard client, connector links and egress, time, link and policy
/// changes; every output is checked against the policy. The checks that find the known bugs
/// below are left out until they are fixed (see `oracle::Options::WITHOUT_KNOWN_BUGS`).
#[test]
fn random_operations_keep_to_the_policy() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let total = std::cell::RefCell::new(oracle::Stats::default());
    let result = runner.run(&proptest::collection::vec(any::<u8>(), 0..2000), |data| {
        let s = oracle::run(&data, oracle::Options::WITHOUT_KNOWN_BUGS);
        total.borrow_mut().add(&s);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The checks had something to check.
    let t = total.into_inner();
    assert!(
        t.to_links > 100
            && t.to_internet > 100
            && t.from_links > 20
            && t.from_internet > 20
            && t.deny_replies > 100
            && t.too_big_replies > 5
            && t.service_answers > 20
            && t.policy_changes > 20,
        "{t:?}"
    );
}

// ---- Known bugs, found by the oracle (`oracle`, the `broker_core` fuzz target). Ignored until
// fixed; then also turn their checks back on in `oracle::Options::WITHOUT_KNOWN_BUGS`. ----

/// Two sites and ssh at `ssh_site`; the sites listed in `sites` order.
fn sites_policy(key: &PublicKeyBytes, sites: [&str; 2], ssh_site: &str) -> Policy {
    let text = format!(
        r#"
[[groups]]
name = "eng"
[[users]]
name = "alice"
groups = ["eng"]
[[devices]]
name = "alice-laptop"
user = "alice"
public_key = "{key}"
address = "100.118.0.2"
[[sites]]
name = "{}"
[[sites]]
name = "{}"
[[applications]]
name = "ssh"
site = "{ssh_site}"
addresses = ["10.30.0.0/16"]
protocols = ["tcp"]
ports = [22]
[[rules]]
name = "eng-ssh"
action = "allow"
groups = ["eng"]
applications = ["ssh"]
"#,
        sites[0], sites[1]
    );
    Policy::parse(Path::new("p.toml"), &text).unwrap()
}

/// Known bug: when a policy change moves an application to another site and the sites are
/// listed so that the new site has the index the old one had, a flow re-decided on its next
/// packet keeps its connector (`authorize` compares the previous decision's `SiteId`, an index
/// into the *old* policy's sites, with the new one). Its packets keep going to the old site's
/// connector, and that connector's replies are still delivered.
#[test]
fn a_flow_whose_application_moved_site_leaves_the_old_sites_connector() {
    let mut f = fixture();
    let key = f.core.policy().devices[0].public_key;
    f.core.link_up(LinkId(2), "dc2", "c2", 1400);
    f.set_policy(sites_policy(&key, ["dc1", "dc2"], "dc2"));
    let syn = tcp_syn([100, 118, 0, 2], 40000, [10, 30, 0, 53], 22);
    let mut io = Recorder::default();
    f.send(&syn, &mut io);
    assert_eq!(io.site[0].0, LinkId(2), "ssh is at dc2");
    // ssh moves to dc1, which is now listed second: index 1, as dc2 was.
    f.set_policy(sites_policy(&key, ["dc2", "dc1"], "dc1"));
    let mut io = Recorder::default();
    f.send(&syn, &mut io);
    assert_eq!(
        io.site.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        [LinkId(1)],
        "ssh is at dc1 now: its packets go to dc1's connector"
    );
}

/// An ICMP error (port unreachable) from `src` to `dst` quoting the start of `quoted`.
fn icmp_error(src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let quoted = &quoted[..quoted.len().min(28)];
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((28 + quoted.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = packet::PROTO_ICMP;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20] = 3;
    p[21] = 3;
    p.extend_from_slice(quoted);
    p
}

/// An ICMP error from a device is forwarded only when the flow it quotes exists for that
/// device and its outer destination is that flow's other end: an error quoting an allowed flow
/// (web, 10.20.0.10:80) but addressed elsewhere would carry bytes of the device's choosing to
/// any host of the site (the report: five "port unreachable" errors reached the site's DNS
/// server 10.20.0.53), or through egress to private ranges.
#[test]
fn an_icmp_error_from_a_device_goes_only_to_the_flows_other_end() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let from_web = tcp_syn([10, 20, 0, 10], 80, [100, 118, 0, 2], 40000);
    // No flow yet: an error never opens one.
    f.send(
        &icmp_error([100, 118, 0, 2], [10, 20, 0, 10], &from_web),
        &mut io,
    );
    assert!(io.site.is_empty(), "an error opened a flow");
    // The flow exists; errors addressed to another host of the site or to an address that is
    // no application at all are dropped and counted.
    f.send(
        &tcp_syn([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80),
        &mut io,
    );
    assert_eq!(io.site.len(), 1);
    io.site.clear();
    for dst in [[10, 20, 0, 53], [10, 20, 0, 99]] {
        f.send(&icmp_error([100, 118, 0, 2], dst, &from_web), &mut io);
    }
    assert!(io.site.is_empty(), "errors went to the site: {:?}", io.site);
    assert_eq!(f.core.counters().drops.icmp_mismatch, 2);
    // The error that belongs to the flow goes to its other end.
    let good = icmp_error([100, 118, 0, 2], [10, 20, 0, 10], &from_web);
    f.send(&good, &mut io);
    assert_eq!(io.site, vec![(LinkId(1), good)]);

    // The same at internet egress: an error quoting a carried flow reaches only that flow's
    // remote end, never a private address.
    let key = f.core.policy().devices[0].public_key.to_string();
    let full = format!(
        "{}\n[dns]\nupstreams = [\"udp://10.99.0.53\"]\n[[tunnels]]\nname = \"eng-full\"\ngroups = [\"eng\"]\nmode = \"full\"\n",
        POLICY.replace("@KEY@", &key)
    );
    f.set_policy(Policy::parse(Path::new("p.toml"), &full).unwrap());
    io = Recorder::default();
    f.send(
        &tcp_syn([100, 118, 0, 2], 40003, [203, 0, 113, 80], 80),
        &mut io,
    );
    assert_eq!(io.egress.len(), 1);
    let from_site = tcp_syn([203, 0, 113, 80], 80, [100, 118, 0, 2], 40003);
    for dst in [[192, 168, 1, 1], [10, 20, 0, 53], [198, 51, 100, 1]] {
        f.send(&icmp_error([100, 118, 0, 2], dst, &from_site), &mut io);
    }
    assert_eq!(
        io.egress.len(),
        1,
        "an error left through egress to another host"
    );
    assert!(io.site.is_empty());
    assert_eq!(f.core.counters().drops.icmp_mismatch, 5);
    f.send(
        &icmp_error([100, 118, 0, 2], [203, 0, 113, 80], &from_site),
        &mut io,
    );
    assert_eq!(io.egress.len(), 2, "the flow's own error is carried");
}

/// Later IP fragments carry no transport header, so no flow can be found for them: dropped
/// and counted as malformed. (A first fragment is decided by its ports like any packet.)
#[test]
fn later_fragments_from_a_device_are_dropped_and_counted() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let mut frag = tcp_syn([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80);
    frag[6..8].copy_from_slice(&(0x2000u16 | 185).to_be_bytes());
    f.send(&frag, &mut io);
    assert!(io.site.is_empty());
    assert_eq!(f.core.counters().drops.malformed, 1);
}

#[test]
fn a_port_scan_is_summed_up_in_the_log_and_stops_at_the_device_cap() {
    let mut f = fixture_with(WorkerConfig {
        max_flows_per_device: 2000,
        max_flows: 10_000,
        ..worker_config()
    });
    let mut io = Recorder::default();
    // 5,000 new flows to the database port range in one go: denied by rule, answered, but
    // the log gets its share of lines and one summary for the rest.
    for port in 0..5000u16 {
        f.send(
            &tcp_syn([100, 118, 0, 2], 20000 + port, [10, 20, 0, 10], 5432),
            &mut io,
        );
    }
    let logged = io.decisions.len() as u64;
    assert!(logged <= 200 + 1, "{logged} lines for one device's scan");
    f.tick(f.now, 0, &mut io);
    let s = io.summaries.last().expect("a summary line");
    assert_eq!(s.device, "alice-laptop");
    assert_eq!(s.denied + s.allowed + logged, 2000);
    assert_eq!(f.core.counters().flows.denied, 2000);
    assert_eq!(f.core.counters().flows.summarized, 2000 - logged);
    // The device's cap (2,000 flows here) stops the scan: the flows past it are dropped and
    // counted, not decided or logged.
    assert_eq!(f.core.counters().drops.flow_table_full, 3000);
}

#[test]
fn in_tunnel_services_are_rate_limited_per_device() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let me = IpAddr::from([100, 118, 0, 2]);
    let service = IpAddr::from([100, 118, 0, 1]);
    let mut pkt = vec![0u8; 256];
    for seq in 0..1000u16 {
        let n = packet::build_echo(me, service, true, 7, seq, b"probe", &mut pkt).unwrap();
        f.send(&pkt[..n], &mut io);
    }
    let answers = f.receive(&io).len();
    assert!(
        (200..=202).contains(&answers),
        "{answers} answers to 1,000 requests at once"
    );
    assert_eq!(
        f.core.counters().drops.service_rate_limited as usize,
        1000 - answers
    );
}

/// A device's endpoint moves only on input that authenticates as that device: a packet that
/// decrypted for its session or a fully verified handshake. Everything an unauthenticated host
/// can send from elsewhere (a replayed initiation, a cookie reply naming the session, a replayed
/// or forged data message, an initiation claiming the device's public key) leaves it in place.
#[test]
fn only_authenticated_input_moves_a_devices_endpoint() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let mut buf = vec![0u8; 2048];
    // A fresh handshake from the device's own address; its initiation is captured.
    let Output::Network(init) = f.client.initiate(&mut buf, true) else {
        panic!()
    };
    let init = init.to_vec();
    f.wg(&init, &mut io);
    let resp = io.udp.last().expect("handshake response").1.clone();
    assert_eq!(resp[0], 2);
    let _ = f.client.decapsulate(Some(f.from.ip()), &resp, &mut buf);
    // A flow, and one data message captured on the way.
    let syn = tcp_syn([100, 118, 0, 2], 40001, [10, 20, 0, 10], 80);
    let Output::Network(data) = f.client.encapsulate(&syn, &mut buf) else {
        panic!()
    };
    let data = data.to_vec();
    f.wg(&data, &mut io);
    assert_eq!(io.site.len(), 1);

    let attacker: SocketAddr = "203.0.113.9:4444".parse().unwrap();
    let broker_index = &resp[4..8];
    let mut cookie_reply = vec![3u8, 0, 0, 0];
    cookie_reply.extend_from_slice(broker_index);
    cookie_reply.extend_from_slice(&[0x5a; 24 + 16 + 16]);
    let mut forged_data = vec![4u8, 0, 0, 0];
    forged_data.extend_from_slice(broker_index);
    forged_data.extend_from_slice(&[0xa5; 8 + 16 + 20]);
    let mut keepalive_like = forged_data[..32].to_vec();
    keepalive_like[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    for d in [&init, &cookie_reply, &data, &forged_data, &keepalive_like] {
        f.core.handle_wg(attacker, d, f.now);
        io.drain(&mut f.core);
    }
    assert!(
        io.udp.iter().all(|(to, d)| *to != attacker || d[0] == 3),
        "nothing but a cookie reply goes to the attacker: {:?}",
        io.udp.iter().map(|(to, d)| (to, d[0])).collect::<Vec<_>>()
    );
    // The app's answer still goes to the device's own address.
    let mut reply = syn.clone();
    reply[12..16].copy_from_slice(&[10, 20, 0, 10]);
    reply[16..20].copy_from_slice(&[100, 118, 0, 2]);
    reply[20..22].copy_from_slice(&80u16.to_be_bytes());
    reply[22..24].copy_from_slice(&40001u16.to_be_bytes());
    let mut io2 = Recorder::default();
    f.site_packet(LinkId(1), &reply, &mut io2);
    assert_eq!(
        io2.udp.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
        vec![f.from],
        "the device's return traffic was redirected"
    );
    assert_eq!(f.receive(&io2), vec![reply]);
    assert_eq!(f.core.counters().handshakes.completed, 2);

    // The device really moving (a new handshake from its new address) does move it.
    let roamed: SocketAddr = "198.51.100.7:5555".parse().unwrap();
    let Output::Network(init) = f.client.initiate(&mut buf, true) else {
        panic!()
    };
    let init = init.to_vec();
    f.core.handle_wg(roamed, &init, f.now);
    let mut io3 = Recorder::default();
    io3.drain(&mut f.core);
    assert_eq!(io3.udp.last().map(|(to, d)| (*to, d[0])), Some((roamed, 2)));
}

#[test]
fn totals_agree_with_the_snapshot() {
    let mut f = fixture();
    let mut io = Recorder::default();
    let client = [100, 118, 0, 2];
    f.send(&tcp_syn(client, 42000, [10, 20, 0, 10], 80), &mut io);
    f.send(&tcp_syn(client, 42001, [10, 20, 0, 10], 80), &mut io);
    let snap = f.core.snapshot();
    let t = f.core.totals(Duration::from_secs(180));
    assert_eq!(t.flows, snap.flows);
    assert_eq!(t.counters.flows.allowed, snap.counters.flows.allowed);
    let online = snap
        .peers
        .iter()
        .filter(|p| p.seconds_since_handshake.is_some_and(|s| s < 180))
        .count();
    assert_eq!(t.peers_online, online);
    assert!(t.peers_online >= 1, "the fixture's client handshook");
    assert_eq!(f.core.totals(Duration::ZERO).peers_online, 0);
}
