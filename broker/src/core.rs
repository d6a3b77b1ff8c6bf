//! The broker's data plane as a state machine without I/O.
//!
//! Input: WireGuard datagrams from clients ([`BrokerCore::handle_wg`]), IP packets from
//! connectors ([`BrokerCore::handle_site_packet`]), timer ticks and policy changes. Output goes
//! through the [`Io`] trait: UDP datagrams to send, packets for a site's connector, decision
//! records. Time comes in as `now`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tracing::{debug, info, trace, warn};

use crate::pool::{ConnectorPool, LinkId, LinkInfo};

use sekisho_proto::api::{Denial, STATUS_PORT, TunnelStatus};
use sekisho_proto::dns::{AppName, DNS_PORT, SyntheticMap};
use sekisho_proto::flow::{FlowEntry, FlowTable, IdleTimeouts, TcpEnd};
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_proto::packet::{self, FlowKey, PacketKind};
use sekisho_proto::policy::{Action, DeviceId, Policy, Reason, SiteId};
use sekisho_proto::posture::{
    POSTURE_PORT, PostureClaims, TokenAnswer, TokenError, TokenVerifier, service_address,
};
use sekisho_proto::wg::{Output, Responder, Route, Session};

/// Largest datagram or packet handled (a jumbo-frame IP packet plus WireGuard overhead).
pub const BUF_SIZE: usize = 65536;

/// What the core asks the I/O shell to do.
pub trait Io {
    /// Send a UDP datagram from the WireGuard socket.
    fn send_udp(&mut self, to: SocketAddr, data: &[u8]);
    /// Hand an IP packet to the connector on `link`; false when that link is gone.
    fn send_to_link(&mut self, link: LinkId, packet: &[u8]) -> bool;
    /// Record a flow decision (one JSON line in the decision log); false when the log cannot
    /// take it (its writer is behind), so the core can count what was lost.
    fn decision(&mut self, record: DecisionRecord) -> bool;
    /// Record a posture event (token accepted, refused or expired) in the same log.
    fn posture(&mut self, record: PostureRecord) -> bool;
    /// Tell the connector on `link` that `synthetic`, for flows from `device`, stands for the
    /// host name `name` (sent before the flow's first packet).
    fn map_name(&mut self, link: LinkId, device: IpAddr, synthetic: IpAddr, name: &str);
    /// Record an application-name query answered by the broker.
    fn app_dns(&mut self, record: AppDnsRecord);
    /// Hand an IP packet of a full-tunnel device to the internet (the egress interface, with
    /// source NAT); false when this broker has no egress.
    fn send_to_egress(&mut self, packet: &[u8]) -> bool;
}

/// The `site` of flows that leave through internet egress instead of a connector.
const EGRESS: SiteId = SiteId::MAX;

/// An application name asked through the tunnel, as written to the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppDnsRecord {
    pub event: &'static str,
    pub device: String,
    pub user: String,
    pub name: String,
    /// "synthetic" (answered with an address), "nxdomain" (an application this user may not
    /// use), "not-an-application" or "full" (no synthetic address left for this device).
    pub result: &'static str,
    pub application: Option<String>,
    pub address: Option<IpAddr>,
}

/// A posture token presented, refused or expired, as written to the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostureRecord {
    pub event: &'static str,
    pub result: &'static str,
    /// The device whose tunnel it came on.
    pub device: String,
    pub user: String,
    /// For refusals: the error kind (bad-signature, expired, wrong-device, ...) and text.
    pub reason: Option<String>,
    /// Checks that fail according to an accepted token.
    pub failing_checks: Vec<String>,
    pub exp: Option<u64>,
}

/// One flow decision, as written to the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecisionRecord {
    pub event: &'static str,
    pub decision: Action,
    pub device: String,
    pub user: String,
    pub application: Option<String>,
    pub site: Option<String>,
    pub rule: Option<String>,
    pub reason: &'static str,
    /// The posture check that failed, when that decided.
    pub check: Option<String>,
    pub proto: &'static str,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// Counters a person or a test can read through the control socket.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub packets_from_clients: u64,
    pub packets_to_clients: u64,
    pub packets_to_sites: u64,
    pub packets_from_sites: u64,
    pub handshakes: u64,
    pub flows_allowed: u64,
    pub flows_denied: u64,
    pub deny_replies: u64,
    pub dropped_spoofed_source: u64,
    pub dropped_malformed: u64,
    pub dropped_invalid_wireguard: u64,
    pub dropped_unknown_peer: u64,
    pub dropped_no_connector: u64,
    pub dropped_unsolicited_from_site: u64,
    pub dropped_denied: u64,
    pub dropped_flow_table_full: u64,
    pub dropped_no_endpoint: u64,
    pub decisions_not_logged: u64,
    pub cookie_replies: u64,
    pub policy_generation: u64,
    pub posture_tokens_accepted: u64,
    pub posture_tokens_refused: u64,
    pub posture_tokens_expired: u64,
    pub app_dns_queries: u64,
    pub app_dns_malformed: u64,
    pub packets_to_internet: u64,
    pub packets_from_internet: u64,
    pub dropped_no_egress: u64,
    pub dropped_unsolicited_from_internet: u64,
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    pub bytes_to_sites: u64,
    pub bytes_from_sites: u64,
    pub bytes_to_internet: u64,
    pub bytes_from_internet: u64,
    /// Flows given another connector because theirs went away.
    pub flows_moved: u64,
    /// Connector links that went stale (nothing heard for a while).
    pub connector_stale_events: u64,
}

/// Names one device may bind to synthetic addresses at once.
const SYNTHETIC_NAMES_PER_DEVICE: usize = 4096;

struct Peer {
    device: DeviceId,
    key: PublicKeyBytes,
    address: IpAddr,
    session: Session,
    endpoint: Option<SocketAddr>,
    /// The verified posture of the device, from its latest accepted token.
    posture: Option<PostureClaims>,
    /// Bumped when `posture` changes: the peer's cached flows are then decided anew.
    generation: u64,
    /// The device's synthetic addresses (name-based applications), for its session here.
    names: SyntheticMap,
    /// The latest denials, oldest first (the device's status command shows them).
    denials: std::collections::VecDeque<Denial>,
}

/// Denials kept per peer for its status.
const DENIALS_KEPT: usize = 10;

/// A cached decision for one flow.
#[derive(Debug, Clone)]
pub struct Flow {
    allowed: bool,
    peer: u32,
    /// The application's site (index into the policy's sites), when allowed. Valid as long as
    /// `generation` is current: a policy change re-decides the flow before its next use.
    site: SiteId,
    /// The application (index into the policy's applications), `NO_APP` for internet flows.
    app: u32,
    /// The connector link the flow goes through; 0 before one was found, `LINK_GONE` after
    /// it closed.
    link: LinkId,
    /// How far the TCP flow has ended.
    tcp: TcpEnd,
    /// A packet came back: the flow is set up at its connector.
    answered: bool,
    generation: u64,
    peer_generation: u64,
}

const NO_APP: u32 = u32::MAX;
/// The `link` of a flow whose connector link closed (it gets another on its next packet).
const LINK_GONE: LinkId = LinkId::MAX;

impl FlowEntry for Flow {
    fn allowed(&self) -> bool {
        self.allowed
    }
    fn owner(&self) -> u32 {
        self.peer
    }
    fn closed(&self) -> bool {
        self.tcp.ended()
    }
}

/// What to do with a packet of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Forward: the flow is allowed, to this site, through this connector link (0: none).
    Allow(SiteId, LinkId),
    /// Answer with a deny reply.
    Deny,
    /// Drop silently (no such peer, connector-initiated, or no room in the flow table).
    Drop,
}

/// Summary of a peer for the control socket.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub device: String,
    pub user: String,
    pub address: IpAddr,
    pub endpoint: Option<SocketAddr>,
    pub seconds_since_handshake: Option<u64>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    /// Expiry of the accepted posture token (Unix seconds), if any.
    pub posture_expires: Option<u64>,
    pub failing_checks: Vec<String>,
}

pub struct BrokerCore {
    responder: Responder,
    policy: Arc<Policy>,
    generation: u64,
    tokens: TokenVerifier,
    /// Wall-clock Unix seconds, as of the last tick (token expiry is wall-clock time).
    unix_now: u64,
    service: IpAddr,
    /// This broker's name, told to devices in their status.
    name: String,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<PublicKeyBytes, u32>,
    by_addr: HashMap<IpAddr, u32>,
    flows: FlowTable<Flow>,
    /// The connectors of every site.
    pool: ConnectorPool,
    /// The site of each connector link, as an index into the current policy's sites.
    link_sites: HashMap<LinkId, SiteId>,
    stats: Stats,
    /// Flow decisions by (result, reason).
    decisions: std::collections::BTreeMap<(&'static str, &'static str), u64>,
    /// Decrypted packets from clients.
    buf: Vec<u8>,
    /// Deny replies and cookie replies.
    reply: Vec<u8>,
    /// Encrypted datagrams to clients.
    send_buf: Vec<u8>,
    last_second: Option<Instant>,
}

impl BrokerCore {
    pub fn new(
        key: PrivateKey,
        policy: Policy,
        timeouts: IdleTimeouts,
        max_flows: usize,
        max_flows_per_device: usize,
    ) -> Self {
        let mut core = BrokerCore {
            responder: Responder::new(key),
            policy: Arc::new(policy.clone()),
            generation: 0,
            tokens: TokenVerifier::new(),
            unix_now: 0,
            service: service_address(&policy.device_range),
            name: String::new(),
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            flows: FlowTable::new(timeouts, max_flows, max_flows_per_device),
            pool: ConnectorPool::default(),
            link_sites: HashMap::new(),
            stats: Stats::default(),
            decisions: Default::default(),
            buf: vec![0; BUF_SIZE],
            reply: vec![0; BUF_SIZE],
            send_buf: vec![0; BUF_SIZE],
            last_second: None,
        };
        core.set_policy(policy);
        core
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn public_key(&self) -> PublicKeyBytes {
        self.responder.private_key().public()
    }

    /// Replaces the policy. Peers of devices that stay keep their WireGuard sessions; removed
    /// devices lose theirs and their flows. Cached flows are re-evaluated on their next packet.
    pub fn set_policy(&mut self, policy: Policy) {
        let policy = Arc::new(policy);
        let mut keep = vec![false; self.peers.len()];
        for (id, dev) in policy.devices.iter().enumerate() {
            let id = id as DeviceId;
            match self.by_key.get(&dev.public_key).copied() {
                Some(slot) => {
                    keep[slot as usize] = true;
                    if let Some(peer) = self.peers[slot as usize].as_mut() {
                        peer.device = id;
                        peer.address = dev.address;
                        if !peer
                            .names
                            .contains(IpAddr::V4(policy.dns.app_range.network()))
                        {
                            peer.names =
                                SyntheticMap::new(policy.dns.app_range, SYNTHETIC_NAMES_PER_DEVICE);
                        }
                    }
                }
                None => {
                    let slot = self
                        .peers
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or(self.peers.len());
                    // Session indices are 24 bits; the slot plus one keeps index 0 unused.
                    let session = Session::new(
                        self.responder.private_key(),
                        dev.public_key,
                        None,
                        slot as u32 + 1,
                        Some(self.responder.limiter()),
                    );
                    let peer = Peer {
                        device: id,
                        key: dev.public_key,
                        address: dev.address,
                        session,
                        endpoint: None,
                        posture: None,
                        generation: 0,
                        names: SyntheticMap::new(policy.dns.app_range, SYNTHETIC_NAMES_PER_DEVICE),
                        denials: Default::default(),
                    };
                    if slot == self.peers.len() {
                        self.peers.push(Some(peer));
                        keep.push(true);
                    } else {
                        self.peers[slot] = Some(peer);
                        keep[slot] = true;
                    }
                    self.by_key.insert(dev.public_key, slot as u32);
                }
            }
        }
        for (slot, kept) in keep.iter().enumerate() {
            if !kept && self.peers[slot].take().is_some() {
                debug!(slot, "peer removed from policy");
            }
        }
        self.by_key.retain(|_, slot| keep[*slot as usize]);
        self.by_addr = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(slot, p)| p.as_ref().map(|p| (p.address, slot as u32)))
            .collect();
        let peers = &self.peers;
        self.flows
            .retain(|_, f, _| peers.get(f.peer as usize).is_some_and(Option::is_some));
        self.service = service_address(&policy.device_range);
        self.policy = policy;
        self.index_link_sites();
        self.generation += 1;
        self.stats.policy_generation = self.generation;
    }

    fn index_link_sites(&mut self) {
        let sites = &self.policy.sites;
        self.link_sites = self
            .pool
            .links()
            .iter()
            .filter_map(|l| {
                let s = sites.iter().position(|s| *s == l.site)?;
                Some((l.id, s as SiteId))
            })
            .collect();
    }

    /// A connector of `site` linked (`connector` names it in logs and metrics).
    pub fn link_up(&mut self, link: LinkId, site: &str, connector: &str) {
        self.pool.up(link, site, connector);
        self.index_link_sites();
    }

    /// A connector link closed: its flows get another connector of their site on their next
    /// packet.
    pub fn link_down(&mut self, link: LinkId) {
        if let Some(name) = self.pool.down(link) {
            // Marked here, once, so the packet path needs no lookup to notice.
            let mut moving = 0;
            self.flows.retain(|_, f, _| {
                if f.link == link {
                    f.link = LINK_GONE;
                    moving += 1;
                }
                true
            });
            info!(connector = %name, flows = moving, "connector link gone; its flows go to another connector of the site");
        }
        self.link_sites.remove(&link);
    }

    /// The connector's report: draining (no new flows) and the applications it cannot reach.
    pub fn link_health(&mut self, link: LinkId, draining: bool, unreachable: &[String]) {
        if self.pool.set_health(link, draining, unreachable) {
            let name = self.pool.describe(link).map(|(n, _)| n.to_string());
            info!(connector = ?name, draining, ?unreachable, "connector health");
        }
    }

    /// Whether the link is silent (stale links get new flows only when nothing else can).
    pub fn link_stale(&mut self, link: LinkId, stale: bool) {
        if self.pool.set_stale(link, stale) {
            let name = self.pool.describe(link).map(|(n, _)| n.to_string());
            if stale {
                self.stats.connector_stale_events += 1;
                warn!(connector = ?name, "connector link silent; no new flows to it");
            } else {
                info!(connector = ?name, "connector link answers again");
            }
        }
    }

    /// The connector links with their state and open flows.
    pub fn connector_links(&self) -> Vec<LinkInfo> {
        self.pool.links()
    }

    /// Flow decisions by (result, reason) since start.
    pub fn decision_counts(
        &self,
    ) -> &std::collections::BTreeMap<(&'static str, &'static str), u64> {
        &self.decisions
    }

    /// Names this broker in what devices see of it.
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    /// The accepted posture claims of the peer with this key, if it has a valid token.
    pub fn posture_of(&self, key: &PublicKeyBytes) -> Option<PostureClaims> {
        let slot = *self.by_key.get(key)?;
        self.peers[slot as usize].as_ref()?.posture.clone()
    }

    /// The keys posture tokens may be signed with (several during a rotation). The control
    /// plane that issues tokens calls this; until then no token is accepted.
    pub fn set_token_keys(&mut self, verifier: TokenVerifier) {
        self.tokens = verifier;
    }

    /// A datagram arrived on the WireGuard socket.
    pub fn handle_wg(&mut self, from: SocketAddr, datagram: &[u8], now: Instant, io: &mut impl Io) {
        let slot = match self.responder.route(from.ip(), datagram, &mut self.reply) {
            Route::Cookie(cookie) => {
                self.stats.cookie_replies += 1;
                io.send_udp(from, cookie);
                return;
            }
            Route::Invalid(e) => {
                self.stats.dropped_invalid_wireguard += 1;
                trace!(?e, "invalid WireGuard datagram");
                return;
            }
            Route::Initiation(key) => match self.by_key.get(&key) {
                Some(&slot) => slot,
                None => {
                    self.stats.dropped_unknown_peer += 1;
                    debug!("handshake from a key not in the policy");
                    return;
                }
            },
            Route::Session(index) => index.wrapping_sub(1),
        };
        let mut buf = std::mem::take(&mut self.buf);
        let base = buf.as_ptr().addr();
        let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
            self.stats.dropped_unknown_peer += 1;
            self.buf = buf;
            return;
        };
        match peer
            .session
            .decapsulate(Some(from.ip()), datagram, &mut buf)
        {
            Output::Network(reply) => {
                peer.endpoint = Some(from);
                self.stats.handshakes += 1;
                io.send_udp(from, reply);
                while let Output::Network(queued) = peer.session.flush(&mut buf) {
                    io.send_udp(from, queued);
                }
            }
            Output::Tunnel(inner) => {
                peer.endpoint = Some(from);
                self.stats.packets_from_clients += 1;
                self.stats.bytes_from_clients += inner.len() as u64;
                // `inner` borrows `buf`; find it by position so `self` can be borrowed again.
                let start = inner.as_ptr().addr() - base;
                let range = start..start + inner.len();
                self.handle_client_packet(slot, &buf[range], now, io);
            }
            Output::Done => peer.endpoint = Some(from),
            Output::Error(e) => {
                self.stats.dropped_invalid_wireguard += 1;
                trace!(?e, "WireGuard rejected a datagram");
            }
        }
        self.buf = buf;
    }

    /// Looks up the flow `key` of peer `slot`, or decides it when it is new or its decision is
    /// stale (policy or posture changed). A flow that does not exist is only created when
    /// `may_create`: connectors cannot open flows. One table lookup when the decision is current.
    fn authorize(
        &mut self,
        slot: u32,
        key: &FlowKey,
        now: Instant,
        io: &mut impl Io,
        may_create: bool,
        tcp: TcpEnd,
    ) -> Verdict {
        let generation = self.generation;
        let Some(peer) = self.peers.get(slot as usize).and_then(Option::as_ref) else {
            return Verdict::Drop;
        };
        let peer_generation = peer.generation;
        let previous = match self.flows.touch(key, now) {
            Some(flow)
                if flow.generation == generation
                    && flow.peer_generation == peer_generation
                    && flow.peer == slot =>
            {
                flow.tcp.merge(tcp);
                flow.answered |= !may_create;
                if !flow.allowed {
                    return Verdict::Deny;
                }
                // A flow moves when its connector is gone (or there was none yet), or, while
                // nothing came back yet (a SYN being retried), when its connector went silent
                // or drains: the retry then reaches the application through another one.
                let moves = flow.link == 0
                    || flow.link == LINK_GONE
                    || (!flow.answered && !self.pool.takes_new(flow.link));
                if flow.site != EGRESS && may_create && moves {
                    let p = &self.policy;
                    let app = &p.applications[flow.app as usize];
                    let link = self
                        .pool
                        .pick(&p.sites[app.site as usize], &app.name)
                        .unwrap_or(0);
                    if link != 0 {
                        if flow.link != 0 {
                            self.stats.flows_moved += 1;
                        }
                        if let Some(b) = peer.names.lookup(key.dst) {
                            io.map_name(link, key.src, key.dst, &b.name);
                        }
                    }
                    flow.link = link;
                }
                return Verdict::Allow(flow.site, flow.link);
            }
            Some(flow) => Some((flow.allowed, flow.site, flow.link, flow.tcp, flow.answered)),
            None if may_create => None,
            None => return Verdict::Drop,
        };
        let previous_link = match previous {
            Some((true, site, link, _, _)) if self.pool.contains(link) => Some((site, link)),
            _ => None,
        };
        let mut tcp = tcp;
        if let Some(p) = previous {
            tcp.merge(p.3);
        }
        let answered = !may_create || previous.is_some_and(|p| p.4);
        let previous = previous.map(|p| p.0);
        let p = &self.policy;
        let binding = peer.names.lookup(key.dst);
        let decision = if peer.names.contains(key.dst) {
            // A synthetic address: the flow is to the application whose name it stands for.
            match binding.and_then(|b| p.app_by_name(&b.app)) {
                Some(app) => p.evaluate_named(peer.device, key, peer.posture.as_ref(), app),
                None => sekisho_proto::policy::Decision {
                    action: Action::Deny,
                    application: None,
                    reason: Reason::DefaultDeny,
                },
            }
        } else {
            p.evaluate(peer.device, key, peer.posture.as_ref())
        };
        let allowed = decision.allowed();
        // The flow's connector: the one it had (a flow stays on its connector), else the
        // least loaded healthy one of the site.
        let link = match (allowed, decision.application) {
            (true, Some(a)) => {
                let app = &p.applications[a as usize];
                match previous_link {
                    Some((site, link)) if site == app.site => link,
                    _ if may_create => {
                        let picked = self
                            .pool
                            .pick(&p.sites[app.site as usize], &app.name)
                            .unwrap_or(0);
                        if picked != 0
                            && let Some(b) = binding
                        {
                            io.map_name(picked, key.src, key.dst, &b.name);
                        }
                        picked
                    }
                    _ => 0,
                }
            }
            _ => 0,
        };
        // A flow re-checked after a policy change is logged only when its answer changed.
        if previous != Some(allowed) {
            if allowed {
                self.stats.flows_allowed += 1;
            } else {
                self.stats.flows_denied += 1;
            }
            let result = if allowed { "allow" } else { "deny" };
            *self
                .decisions
                .entry((result, self.policy.reason_text(decision.reason)))
                .or_insert(0) += 1;
            let record = self.record(
                peer.device,
                key,
                decision.action,
                decision.application,
                decision.reason,
            );
            if !allowed
                && let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut)
            {
                if peer.denials.len() == DENIALS_KEPT {
                    peer.denials.pop_front();
                }
                peer.denials.push_back(Denial {
                    at: self.unix_now,
                    application: record.application.clone(),
                    proto: record.proto.to_string(),
                    dst: record.dst,
                    dport: record.dport,
                    rule: record.rule.clone(),
                    reason: record.reason.to_string(),
                    check: record.check.clone(),
                });
            }
            if !io.decision(record) {
                self.stats.decisions_not_logged += 1;
            }
        }
        let site = match decision.application {
            Some(a) => self.policy.applications[a as usize].site,
            None => EGRESS,
        };
        let flow = Flow {
            allowed,
            peer: slot,
            site,
            app: decision.application.unwrap_or(NO_APP),
            link,
            tcp,
            answered,
            generation,
            peer_generation,
        };
        match self.flows.insert(*key, flow, now) {
            Ok(_) if allowed => Verdict::Allow(site, link),
            Ok(_) => Verdict::Deny,
            Err(_) => {
                self.stats.dropped_flow_table_full += 1;
                Verdict::Drop
            }
        }
    }

    fn record(
        &self,
        device: DeviceId,
        key: &FlowKey,
        action: Action,
        app: Option<u32>,
        reason: Reason,
    ) -> DecisionRecord {
        let p = &self.policy;
        let internet = matches!(reason, Reason::Egress(_) | Reason::EgressRefused(_));
        DecisionRecord {
            event: "flow",
            decision: action,
            device: p.device(device).name.clone(),
            user: p.user_of(device).name.clone(),
            application: match app {
                None if internet => Some("internet".to_string()),
                _ => p.app_name(app).map(str::to_string),
            },
            site: app.map(|a| p.sites[p.applications[a as usize].site as usize].clone()),
            rule: p.rule_name(reason).map(str::to_string),
            reason: p.reason_text(reason),
            check: p.check_name(reason).map(str::to_string),
            proto: key.proto_name(),
            src: key.src,
            sport: key.sport,
            dst: key.dst,
            dport: key.dport,
        }
    }

    fn handle_client_packet(&mut self, slot: u32, pkt: &[u8], now: Instant, io: &mut impl Io) {
        let Some(address) = self.peers[slot as usize].as_ref().map(|p| p.address) else {
            return;
        };
        let (key, src) = match packet::classify(pkt) {
            Ok(PacketKind::Flow(k)) => (k, k.src),
            // The client reports an error about a packet it got from an app: it belongs to the
            // client's flow towards that app.
            Ok(PacketKind::IcmpError { outer, about }) => (about.reversed(), outer.src),
            Err(e) => {
                self.stats.dropped_malformed += 1;
                trace!(%e, "malformed packet from client");
                return;
            }
        };
        if src != address || key.src != address {
            self.stats.dropped_spoofed_source += 1;
            debug!(
                slot,
                "dropped packet with a source address that is not the peer's own"
            );
            return;
        }
        if key.dst == self.service {
            if key.proto == packet::PROTO_UDP && key.dport == POSTURE_PORT {
                self.handle_token(slot, &key, pkt, io);
            } else if key.proto == packet::PROTO_UDP && key.dport == DNS_PORT {
                self.handle_app_dns(slot, &key, pkt, io);
            } else if key.proto == packet::PROTO_UDP && key.dport == STATUS_PORT {
                self.handle_status(slot, &key, io);
            } else if let Some(e) = packet::echo(pkt).filter(|e| e.request) {
                // Devices probe every broker's round-trip time and liveness inside the tunnel.
                let mut reply = std::mem::take(&mut self.reply);
                if let Some(n) =
                    packet::build_echo(e.dst, e.src, false, e.id, e.seq, e.payload, &mut reply)
                {
                    self.send_to_peer(slot, &reply[..n], io);
                }
                self.reply = reply;
            }
            return;
        }
        match self.authorize(slot, &key, now, io, true, TcpEnd::of(pkt, true)) {
            Verdict::Allow(EGRESS, _) => {
                if io.send_to_egress(pkt) {
                    self.stats.packets_to_internet += 1;
                    self.stats.bytes_to_internet += pkt.len() as u64;
                } else {
                    self.stats.dropped_no_egress += 1;
                }
            }
            Verdict::Allow(_, link) => {
                if link != 0 && io.send_to_link(link, pkt) {
                    self.stats.packets_to_sites += 1;
                    self.stats.bytes_to_sites += pkt.len() as u64;
                } else {
                    self.stats.dropped_no_connector += 1;
                }
            }
            Verdict::Deny => {
                self.stats.dropped_denied += 1;
                let mut reply = std::mem::take(&mut self.reply);
                if let Some(n) = packet::deny_reply(pkt, &mut reply) {
                    self.stats.deny_replies += 1;
                    self.send_to_peer(slot, &reply[..n], io);
                }
                self.reply = reply;
            }
            Verdict::Drop => {}
        }
    }

    /// A posture token arrived inside the tunnel of peer `slot`: verify it against this tunnel's
    /// key and the wall clock, keep it if good, and answer either way.
    fn handle_token(&mut self, slot: u32, key: &FlowKey, pkt: &[u8], io: &mut impl Io) {
        let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let policy = &self.policy;
        let device = policy.device(peer.device);
        let token = packet::udp_payload(pkt)
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or("");
        let verified = self
            .tokens
            .verify(token, self.unix_now, &peer.key)
            .and_then(|c| {
                // The token must also name the device and user the policy has for this key.
                if c.device != device.name || c.user != policy.user_of(peer.device).name {
                    Err(TokenError::WrongDevice(c.device.clone()))
                } else {
                    Ok(c)
                }
            });
        let mut record = PostureRecord {
            event: "posture",
            result: "accepted",
            device: device.name.clone(),
            user: policy.user_of(peer.device).name.clone(),
            reason: None,
            failing_checks: Vec::new(),
            exp: None,
        };
        let answer = match verified {
            Ok(claims) => {
                self.stats.posture_tokens_accepted += 1;
                record.failing_checks = claims
                    .checks
                    .iter()
                    .filter(|(_, ok)| !**ok)
                    .map(|(n, _)| n.clone())
                    .collect();
                record.exp = Some(claims.exp);
                let changed = peer
                    .posture
                    .as_ref()
                    .is_none_or(|old| old.checks != claims.checks);
                let answer = TokenAnswer {
                    accepted: true,
                    exp: claims.exp,
                    error: String::new(),
                };
                peer.posture = Some(claims);
                if changed {
                    peer.generation += 1;
                }
                answer
            }
            Err(e) => {
                self.stats.posture_tokens_refused += 1;
                record.result = "refused";
                record.reason = Some(format!("{}: {e}", e.kind()));
                TokenAnswer {
                    accepted: false,
                    exp: 0,
                    error: e.to_string(),
                }
            }
        };
        io.posture(record);
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        self.answer_service(slot, key, &body, io);
    }

    /// The device's own view of its session here: broker name, latest denials, posture.
    fn handle_status(&mut self, slot: u32, key: &FlowKey, io: &mut impl Io) {
        let Some(peer) = self.peers.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        let status = TunnelStatus {
            broker: self.name.clone(),
            denials: peer.denials.iter().cloned().collect(),
            posture_expires: peer.posture.as_ref().map(|p| p.exp),
            failing_checks: peer
                .posture
                .as_ref()
                .map(|p| {
                    p.checks
                        .iter()
                        .filter(|(_, ok)| !**ok)
                        .map(|(n, _)| n.clone())
                        .collect()
                })
                .unwrap_or_default(),
        };
        let body = serde_json::to_vec(&status).unwrap_or_default();
        self.answer_service(slot, key, &body, io);
    }

    /// Sends `body` back through the tunnel of peer `slot` as the UDP answer to the service
    /// request `key` (posture token, application name).
    fn answer_service(&mut self, slot: u32, key: &FlowKey, body: &[u8], io: &mut impl Io) {
        let mut reply = std::mem::take(&mut self.reply);
        if let Some(n) = packet::build_udp(key.dst, key.dport, key.src, key.sport, body, &mut reply)
        {
            self.send_to_peer(slot, &reply[..n], io);
        }
        self.reply = reply;
    }

    /// A DNS query for a name in a private zone, from peer `slot`: an application this user may
    /// use gets a synthetic address (bound for the session), one the user may not use NXDOMAIN,
    /// any other name REFUSED (the client then resolves it upstream).
    fn handle_app_dns(&mut self, slot: u32, key: &FlowKey, pkt: &[u8], io: &mut impl Io) {
        let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let Some(query) = packet::udp_payload(pkt) else {
            self.stats.app_dns_malformed += 1;
            return;
        };
        let policy = &self.policy;
        let user = policy.device(peer.device).user;
        let mut record = AppDnsRecord {
            event: "app-dns",
            device: policy.device(peer.device).name.clone(),
            user: policy.user_of(peer.device).name.clone(),
            name: String::new(),
            result: "not-an-application",
            application: None,
            address: None,
        };
        let answer = sekisho_proto::dns::app_answer(query, |name| {
            record.name = name.to_string();
            let Some(app) = policy.app_for_name(name) else {
                return AppName::NotApp;
            };
            let app_name = &policy.applications[app as usize].name;
            record.application = Some(app_name.clone());
            if !policy.user_may_use(user, app) {
                record.result = "nxdomain";
                return AppName::NotEntitled;
            }
            match peer.names.assign(name, app_name) {
                Some(a) => {
                    record.result = "synthetic";
                    record.address = Some(IpAddr::V4(a));
                    AppName::Entitled(vec![IpAddr::V4(a)])
                }
                None => {
                    record.result = "full";
                    AppName::NotEntitled
                }
            }
        });
        let Some(answer) = answer else {
            self.stats.app_dns_malformed += 1;
            return;
        };
        self.stats.app_dns_queries += 1;
        if !record.name.is_empty() {
            io.app_dns(record);
        }
        self.answer_service(slot, key, &answer, io);
    }

    /// Encrypts `pkt` for peer `slot` and sends it to the peer's last known endpoint.
    fn send_to_peer(&mut self, slot: u32, pkt: &[u8], io: &mut impl Io) {
        let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            self.stats.dropped_no_endpoint += 1;
            return;
        };
        match peer.session.encapsulate(pkt, &mut self.send_buf) {
            Output::Network(data) => {
                self.stats.bytes_to_clients += pkt.len() as u64;
                io.send_udp(endpoint, data);
                self.stats.packets_to_clients += 1;
            }
            Output::Error(e) => debug!(?e, "cannot encapsulate for client"),
            _ => {}
        }
    }

    /// An IP packet arrived from the internet (egress interface, after the kernel undid the
    /// source NAT). Delivered only as part of a flow a full-tunnel device opened.
    pub fn handle_egress_packet(&mut self, pkt: &[u8], now: Instant, io: &mut impl Io) {
        self.stats.packets_from_internet += 1;
        self.stats.bytes_from_internet += pkt.len() as u64;
        if !self.deliver_reply(pkt, now, io, |s, _| s == EGRESS) {
            self.stats.dropped_unsolicited_from_internet += 1;
        }
    }

    /// An IP packet arrived from the connector on `link`. It is delivered only as part of a flow
    /// a client opened and the policy allows to that connector's site: a connector cannot start
    /// flows to clients.
    pub fn handle_site_packet(&mut self, link: LinkId, pkt: &[u8], now: Instant, io: &mut impl Io) {
        self.stats.packets_from_sites += 1;
        self.stats.bytes_from_sites += pkt.len() as u64;
        let site = self.link_sites.get(&link).copied();
        if !self.deliver_reply(pkt, now, io, |s, l| {
            l == link || Some(s) == site && s != EGRESS
        }) {
            self.stats.dropped_unsolicited_from_site += 1;
        }
    }

    /// Delivers a packet coming back towards a device (from a site or the internet) when it
    /// belongs to an allowed flow the device opened whose way out `from_ok` accepts; false when
    /// it is unsolicited (malformed packets are counted here).
    fn deliver_reply(
        &mut self,
        pkt: &[u8],
        now: Instant,
        io: &mut impl Io,
        from_ok: impl Fn(SiteId, LinkId) -> bool,
    ) -> bool {
        let key = match packet::classify(pkt) {
            Ok(PacketKind::Flow(k)) => k.reversed(),
            Ok(PacketKind::IcmpError { about, .. }) => about,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return true;
            }
        };
        let Some(&slot) = self.by_addr.get(&key.src) else {
            return false;
        };
        match self.authorize(slot, &key, now, io, false, TcpEnd::of(pkt, false)) {
            Verdict::Allow(s, l) if from_ok(s, l) => {
                self.send_to_peer(slot, pkt, io);
                true
            }
            _ => false,
        }
    }

    /// Runs timers: WireGuard keepalives and rekeys, flow expiry, rate-limit windows, posture
    /// token expiry (against `unix_now`, wall-clock seconds). Call every 100–250 ms.
    pub fn tick(&mut self, now: Instant, unix_now: u64, io: &mut impl Io) {
        self.unix_now = unix_now;
        for peer in self.peers.iter_mut().flatten() {
            if peer.posture.as_ref().is_some_and(|c| c.exp <= unix_now) {
                peer.posture = None;
                peer.generation += 1;
                self.stats.posture_tokens_expired += 1;
                let p = &self.policy;
                io.posture(PostureRecord {
                    event: "posture",
                    result: "expired",
                    device: p.device(peer.device).name.clone(),
                    user: p.user_of(peer.device).name.clone(),
                    reason: Some("token expired".into()),
                    failing_checks: Vec::new(),
                    exp: None,
                });
            }
        }
        for peer in self.peers.iter_mut().flatten() {
            if let Output::Network(data) = peer.session.tick(&mut self.send_buf)
                && let Some(ep) = peer.endpoint
            {
                io.send_udp(ep, data);
            }
        }
        let second_passed = self
            .last_second
            .is_none_or(|t| now.saturating_duration_since(t).as_secs() >= 1);
        if second_passed {
            self.last_second = Some(now);
            self.responder.reset_rate_limit();
            let expired = self.flows.expire(now);
            if expired > 0 {
                trace!(expired, "idle flows expired");
            }
            self.pool.recount(
                self.flows
                    .iter()
                    .filter(|(_, f, _)| f.allowed && f.link != 0 && !f.closed())
                    .map(|(_, f, _)| f.link),
            );
        }
    }

    pub fn peers(&self) -> Vec<PeerInfo> {
        self.peers
            .iter()
            .flatten()
            .map(|p| {
                let (tx, rx) = p.session.traffic();
                PeerInfo {
                    device: self.policy.device(p.device).name.clone(),
                    user: self.policy.user_of(p.device).name.clone(),
                    address: p.address,
                    endpoint: p.endpoint,
                    seconds_since_handshake: p.session.time_since_handshake().map(|d| d.as_secs()),
                    tx_bytes: tx,
                    rx_bytes: rx,
                    posture_expires: p.posture.as_ref().map(|c| c.exp),
                    failing_checks: p
                        .posture
                        .as_ref()
                        .map(|c| {
                            c.checks
                                .iter()
                                .filter(|(_, ok)| !**ok)
                                .map(|(n, _)| n.clone())
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Logs a one-line summary of the current policy.
    pub fn log_policy_summary(&self) {
        let p = &self.policy;
        info!(
            generation = self.generation,
            devices = p.devices.len(),
            applications = p.applications.len(),
            rules = p.rules.len(),
            "policy in force"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sekisho_proto::packet::{PROTO_TCP, deny_reply};
    use sekisho_proto::posture::TokenSigner;
    use std::path::Path;
    use std::time::Duration;

    #[derive(Default)]
    struct Recorder {
        udp: Vec<(SocketAddr, Vec<u8>)>,
        site: Vec<(LinkId, Vec<u8>)>,
        decisions: Vec<DecisionRecord>,
        postures: Vec<PostureRecord>,
        site_up: bool,
        maps: Vec<(LinkId, IpAddr, IpAddr, String)>,
        dns: Vec<AppDnsRecord>,
        egress: Vec<Vec<u8>>,
    }

    impl Io for Recorder {
        fn send_udp(&mut self, to: SocketAddr, data: &[u8]) {
            self.udp.push((to, data.to_vec()));
        }
        fn send_to_link(&mut self, link: LinkId, packet: &[u8]) -> bool {
            self.site.push((link, packet.to_vec()));
            self.site_up
        }
        fn decision(&mut self, record: DecisionRecord) -> bool {
            self.decisions.push(record);
            true
        }
        fn posture(&mut self, record: PostureRecord) -> bool {
            self.postures.push(record);
            true
        }
        fn map_name(&mut self, link: LinkId, device: IpAddr, synthetic: IpAddr, name: &str) {
            self.maps.push((link, device, synthetic, name.to_string()));
        }
        fn app_dns(&mut self, record: AppDnsRecord) {
            self.dns.push(record);
        }
        fn send_to_egress(&mut self, packet: &[u8]) -> bool {
            self.egress.push(packet.to_vec());
            true
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
        core: BrokerCore,
        client: Session,
        from: SocketAddr,
        now: Instant,
    }

    fn policy_text(client: &PrivateKey) -> String {
        POLICY.replace("@KEY@", &client.public().to_string())
    }

    /// A broker core and a client session with a completed handshake.
    fn fixture() -> Fixture {
        let client_key = PrivateKey::generate();
        let broker_key = PrivateKey::generate();
        let policy = Policy::parse(Path::new("p.toml"), &policy_text(&client_key)).unwrap();
        let mut core = BrokerCore::new(
            broker_key.clone(),
            policy,
            IdleTimeouts::default(),
            1000,
            100,
        );
        let mut client = Session::new(&client_key, broker_key.public(), None, 1, None);
        let from: SocketAddr = "10.99.1.2:40000".parse().unwrap();
        let now = Instant::now();
        let mut buf = vec![0u8; 2048];
        let Output::Network(init) = client.initiate(&mut buf, false) else {
            panic!()
        };
        let mut io = Recorder::default();
        core.link_up(1, "dc1", "c1");
        core.handle_wg(from, init, now, &mut io);
        assert_eq!(io.udp.len(), 1, "handshake response");
        let resp = io.udp[0].1.clone();
        let _ = client.decapsulate(Some(from.ip()), &resp, &mut buf);
        Fixture {
            core,
            client,
            from,
            now,
        }
    }

    impl Fixture {
        /// Sends an IP packet from the client through the broker core.
        fn send(&mut self, pkt: &[u8], io: &mut Recorder) {
            let mut buf = vec![0u8; 2048];
            let Output::Network(data) = self.client.encapsulate(pkt, &mut buf) else {
                panic!()
            };
            let data = data.to_vec();
            self.core.handle_wg(self.from, &data, self.now, io);
        }

        /// Decrypts what the broker sent back to the client.
        fn receive(&mut self, io: &Recorder) -> Vec<Vec<u8>> {
            let mut buf = vec![0u8; 2048];
            io.udp
                .iter()
                .filter_map(|(_, d)| {
                    match self.client.decapsulate(Some(self.from.ip()), d, &mut buf) {
                        Output::Tunnel(p) => Some(p.to_vec()),
                        _ => None,
                    }
                })
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
        f.core
            .set_policy(Policy::parse(Path::new("p.toml"), &full).unwrap());
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
        f.core.handle_egress_packet(&reply, f.now, &mut io);
        assert_eq!(f.receive(&io).len(), 1);
        // Unsolicited from the internet: dropped.
        io.udp.clear();
        f.core.handle_egress_packet(
            &tcp_syn([203, 0, 113, 9], 80, [100, 118, 0, 2], 1),
            f.now,
            &mut io,
        );
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
            let q =
                sekisho_proto::dns::build_query(77, name, hickory_proto::rr::RecordType::A, false);
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
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
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
        assert_eq!(
            io.maps,
            [(
                1,
                IpAddr::from([100, 118, 0, 2]),
                IpAddr::V4(wiki),
                "wiki.corp.example".to_string()
            )]
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
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
        let syn = tcp_syn([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80);
        f.send(&syn, &mut io);
        f.send(&syn, &mut io);
        assert_eq!(io.site.len(), 2);
        assert_eq!(io.site[0], (1, syn.clone()));
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
        f.core.handle_site_packet(1, &reply, f.now, &mut io2);
        assert_eq!(f.receive(&io2), vec![reply.clone()]);
        // The same packet from another site, or a packet of no flow, is not delivered.
        let mut io3 = Recorder::default();
        f.core.link_up(2, "dc2", "c9");
        f.core.handle_site_packet(2, &reply, f.now, &mut io3);
        let mut stray = reply.clone();
        stray[22..24].copy_from_slice(&1234u16.to_be_bytes());
        f.core.handle_site_packet(1, &stray, f.now, &mut io3);
        assert!(io3.udp.is_empty());
        assert_eq!(f.core.stats().dropped_unsolicited_from_site, 2);
    }

    fn tcp_segment(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut p = tcp_syn(src, sport, dst, dport);
        p[33] = flags;
        p
    }

    #[test]
    fn flows_are_spread_over_connectors_stay_on_theirs_and_move_when_one_goes() {
        let mut f = fixture();
        f.core.link_up(2, "dc1", "c2");
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
        let client = [100, 118, 0, 2];
        // Four new flows: two per connector.
        for port in 0..4 {
            f.send(&tcp_syn(client, 41000 + port, [10, 20, 0, 10], 80), &mut io);
        }
        let on = |io: &Recorder, link: LinkId| io.site.iter().filter(|(l, _)| *l == link).count();
        assert_eq!((on(&io, 1), on(&io, 2)), (2, 2));
        // A flow stays on its connector.
        let first = io.site[0].0;
        io.site.clear();
        f.send(&tcp_syn(client, 41000, [10, 20, 0, 10], 80), &mut io);
        assert_eq!(io.site[0].0, first);
        // Connector 2 drains: new flows avoid it, its flows carry on there.
        f.core.link_health(2, true, &[]);
        io.site.clear();
        for port in 10..13 {
            f.send(&tcp_syn(client, 41000 + port, [10, 20, 0, 10], 80), &mut io);
        }
        assert_eq!((on(&io, 1), on(&io, 2)), (3, 0));
        let on_two = f
            .core
            .flows
            .iter()
            .find(|(_, fl, _)| fl.link == 2)
            .map(|(k, _, _)| *k)
            .unwrap();
        // Once answered, the flow carries on through the draining connector.
        let reply = tcp_segment([10, 20, 0, 10], 80, client, on_two.sport, 0x12);
        f.core.handle_site_packet(2, &reply, f.now, &mut io);
        io.site.clear();
        f.send(&tcp_syn(client, on_two.sport, [10, 20, 0, 10], 80), &mut io);
        assert_eq!(io.site[0].0, 2);
        let links = f.core.connector_links();
        assert_eq!(links[1].state, crate::pool::LinkState::Draining);
        // Connector 2 goes away: its flows move to connector 1 on their next packet.
        f.core.link_down(2);
        io.site.clear();
        f.send(&tcp_syn(client, on_two.sport, [10, 20, 0, 10], 80), &mut io);
        assert_eq!(io.site[0].0, 1);
        assert_eq!(f.core.stats().flows_moved, 1);
        // With no connector at all the packet is dropped and counted, not sent.
        f.core.link_down(1);
        io.site.clear();
        f.send(&tcp_syn(client, 41099, [10, 20, 0, 10], 80), &mut io);
        assert!(io.site.is_empty());
        assert_eq!(f.core.stats().dropped_no_connector, 1);
    }

    #[test]
    fn a_syn_retry_leaves_a_silent_connector_but_answered_flows_stay() {
        let mut f = fixture();
        f.core.link_up(2, "dc1", "c2");
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
        let client = [100, 118, 0, 2];
        let app = [10, 20, 0, 10];
        f.send(&tcp_syn(client, 43000, app, 80), &mut io);
        f.send(&tcp_syn(client, 43001, app, 80), &mut io);
        let first = io.site[0].0;
        let other = if first == 1 { 2 } else { 1 };
        assert_eq!(io.site[1].0, other);
        // The second flow was answered through its connector.
        let reply = tcp_segment(app, 80, client, 43001, 0x12);
        f.core.handle_site_packet(other, &reply, f.now, &mut io);
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
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
        let client = [100, 118, 0, 2];
        f.send(&tcp_syn(client, 42000, [10, 20, 0, 10], 80), &mut io);
        f.send(&tcp_syn(client, 42001, [10, 20, 0, 10], 80), &mut io);
        f.core.tick(f.now + Duration::from_secs(1), 0, &mut io);
        assert_eq!(f.core.connector_links()[0].flows, 2);
        // FIN from the client and from the server end the first flow; a reset the second.
        f.send(
            &tcp_segment(client, 42000, [10, 20, 0, 10], 80, 0x11),
            &mut io,
        );
        let fin_back = tcp_segment([10, 20, 0, 10], 80, client, 42000, 0x11);
        f.core.handle_site_packet(1, &fin_back, f.now, &mut io);
        f.core.tick(f.now + Duration::from_secs(2), 0, &mut io);
        assert_eq!(f.core.connector_links()[0].flows, 1);
        f.send(
            &tcp_segment(client, 42001, [10, 20, 0, 10], 80, 0x04),
            &mut io,
        );
        f.core.tick(f.now + Duration::from_secs(3), 0, &mut io);
        assert_eq!(f.core.connector_links()[0].flows, 0);
        // They linger briefly for late segments, then go.
        assert_eq!(f.core.flow_count(), 2);
        f.core.tick(f.now + Duration::from_secs(15), 0, &mut io);
        assert_eq!(f.core.flow_count(), 0);
        let decisions = f.core.decision_counts();
        assert_eq!(decisions.values().sum::<u64>(), 2);
        assert!(decisions.keys().all(|(result, _)| *result == "allow"));
    }

    #[test]
    fn denied_flow_gets_an_rst_through_the_tunnel() {
        let mut f = fixture();
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
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
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
        f.send(
            &tcp_syn([100, 118, 0, 3], 40000, [10, 20, 0, 10], 80),
            &mut io,
        );
        assert!(io.site.is_empty() && io.decisions.is_empty());
        assert_eq!(f.core.stats().dropped_spoofed_source, 1);
    }

    #[test]
    fn policy_change_recuts_existing_flows() {
        let mut f = fixture();
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
        let syn = tcp_syn([100, 118, 0, 2], 40000, [10, 20, 0, 10], 80);
        f.send(&syn, &mut io);
        assert_eq!(io.site.len(), 1);
        // New policy: the allow rule becomes a deny.
        let key = f.core.policy().devices[0].public_key;
        let text = POLICY.replace("@KEY@", &key.to_string()).replace(
            "name = \"eng-web\"\naction = \"allow\"",
            "name = \"eng-web\"\naction = \"deny\"",
        );
        f.core
            .set_policy(Policy::parse(Path::new("p.toml"), &text).unwrap());
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
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
            let mut io = Recorder {
                site_up: true,
                ..Default::default()
            };
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
        f.core.set_policy(posture_policy(&key));
        let signer = TokenSigner::generate();
        f.core.set_token_keys(TokenVerifier::from_signer(&signer));
        let t0 = 1_000_000;
        f.core.tick(f.now, t0, &mut Recorder::default());

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
        let mut io = Recorder {
            site_up: true,
            ..Default::default()
        };
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
        f.core.tick(f.now, t0 + 2 + 300, &mut io);
        assert_eq!(io.postures[0].result, "expired");
        assert!(!f.reaches(50000, 80));
        assert!(!f.reaches(50001, 8080));
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let mut f = fixture();
        let key = f.core.policy().devices[0].public_key;
        f.core.set_policy(posture_policy(&key));
        let signer = TokenSigner::generate();
        f.core.set_token_keys(TokenVerifier::from_signer(&signer));
        let t0 = 1_000_000;
        f.core.tick(f.now, t0, &mut Recorder::default());

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
        assert_eq!(f.core.stats().posture_tokens_refused, 5);
        assert_eq!(f.core.stats().posture_tokens_accepted, 0);
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
            f.core.handle_wg(f.from, junk, f.now, &mut io);
        }
        assert_eq!(
            f.core.stats().dropped_invalid_wireguard + f.core.stats().dropped_unknown_peer,
            4
        );
        // A malformed inner packet from an authenticated peer is dropped and counted: a valid
        // IPv4 header announcing TCP with only two bytes of TCP header.
        let mut short = tcp_syn([100, 118, 0, 2], 1, [10, 20, 0, 10], 80);
        short.truncate(22);
        short[2..4].copy_from_slice(&22u16.to_be_bytes());
        f.send(&short, &mut io);
        assert_eq!(f.core.stats().dropped_malformed, 1);
        assert!(io.site.is_empty());
    }
}
