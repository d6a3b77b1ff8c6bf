//! The broker's data plane as a state machine without I/O: one [`BrokerState`] per worker,
//! owning the devices of its shard (see [`Assignment`]).
//!
//! Inputs: datagrams from devices ([`BrokerState::handle_wg`]), packets from connector links
//! ([`BrokerState::handle_link_packet`]) and from internet egress
//! ([`BrokerState::handle_egress_packet`]), commands (policy, keys, link changes) and
//! [`BrokerState::handle_timeout`]. Outputs: [`BrokerState::poll_transmit`] (WireGuard
//! datagrams to devices as GSO trains, packets for links and egress, all without copies),
//! [`BrokerState::poll_event`] (decisions, posture, names) and
//! [`BrokerState::poll_timeout`] (named timers). Time comes in as `now`.
//!
//! Call order for the shell: feed inputs, then drain `poll_transmit` and `poll_event`, then
//! sleep until `poll_timeout` or the next input.

pub mod counters;
pub mod events;
mod flows;
pub mod links;
#[doc(hidden)]
pub mod oracle;
pub mod peers;
mod services;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tracing::{debug, info, trace, warn};

use crate::dns::SyntheticMap;
use crate::flow::{FlowTable, IdleTimeouts};
use crate::keys::{PrivateKey, PublicKeyBytes};
use crate::mtu;
use crate::packet::{self, PacketKind};
use crate::policy::{Policy, SiteId};
use crate::posture::{PostureClaims, TokenVerifier, service_address};
use crate::timers::{TimerName, Timers};
use crate::transmit::{DatagramQueue, Datagrams};
use crate::wg::{Limit, Output, Responder, Route, Session};

pub use counters::Counters;
pub use events::{
    AppDnsRecord, DecisionRecord, Event, FlowMeta, FlowRecord, PostureRecord, RiskMark,
    SummaryRecord,
};
pub use flows::Flow;
use flows::{FlowLink, FlowRoute, Verdict};
pub use links::{ConnectorPool, LinkId, LinkInfo, LinkState};
pub use peers::{Assignment, Peer, PeerSlot, WorkerId, owner_of_index};

/// Names one device may bind to synthetic addresses at once.
const SYNTHETIC_NAMES_PER_DEVICE: usize = 4096;
/// How often WireGuard's timers run (keepalives, rekeys, handshake retries).
const WIREGUARD_TICK: Duration = Duration::from_millis(250);
/// How often flows expire, posture tokens are checked and rate limits reset.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often connector loads are recounted (a pass over the flow table).
const LINK_LOAD: Duration = Duration::from_secs(5);
/// Fresh memory for decrypted packets comes in blocks this large; each packet for a link or
/// egress leaves as a slice of one.
const RX_BLOCK: usize = 256 * 1024;
/// Room for a deny reply, an ICMP error or a service answer.
const SCRATCH: usize = 4096;

/// The broker's named timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    WireGuard,
    Housekeeping,
    /// Recounting each connector's open flows (a correction: counts follow picks as they
    /// happen; ended and expired flows are taken off here).
    LinkLoad,
}

impl TimerName for Timer {
    const ALL: &'static [Timer] = &[Timer::WireGuard, Timer::Housekeeping, Timer::LinkLoad];
    fn index(self) -> usize {
        self as usize
    }
}

/// What a worker is given at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker: WorkerId,
    /// The broker's name, told to devices in their status.
    pub name: String,
    pub timeouts: IdleTimeouts,
    /// Flows this worker may hold in all, and per device.
    pub max_flows: usize,
    pub max_flows_per_device: usize,
    /// The largest packet devices send (their tunnel MTU): SYNs towards connectors are
    /// clamped to it.
    pub overlay_mtu: u16,
}

/// One output of the data plane.
#[derive(Debug)]
pub enum Transmit<'a> {
    /// WireGuard datagrams to a device (a GSO train when `segment_size` is set).
    Peer(Datagrams<'a>),
    /// An IP packet for the connector on `link`.
    Link { link: LinkId, packet: Bytes },
    /// An IP packet for the internet (the egress interface, with source NAT).
    Egress(Bytes),
}

/// Where an input datagram belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Handled here.
    Here,
    /// Its peer (in `slot`) lives on that worker: hand the datagram over unchanged, for
    /// [`BrokerState::handle_handover`]. The handshake defence was applied here, once.
    Worker(WorkerId, PeerSlot),
}

/// A device as the stats show it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub device: String,
    pub user: String,
    pub address: IpAddr,
    pub endpoint: Option<SocketAddr>,
    pub worker: WorkerId,
    pub seconds_since_handshake: Option<u64>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    /// Expiry of the accepted posture token (Unix seconds), if any.
    pub posture_expires: Option<u64>,
    pub failing_checks: Vec<String>,
}

/// A worker's totals (see [`BrokerState::totals`]).
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub counters: Counters,
    pub flows: usize,
    pub peers_online: usize,
}

/// What a worker publishes for readers (stats, metrics, the control plane).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counters: Counters,
    /// Flow decisions by (result, reason).
    pub decisions: BTreeMap<(&'static str, &'static str), u64>,
    pub flows: usize,
    pub peers: Vec<PeerInfo>,
    pub links: Vec<LinkInfo>,
    pub postures: HashMap<PublicKeyBytes, PostureClaims>,
    pub policy_generation: u64,
}

/// One worker's shard of the data plane.
pub struct BrokerState {
    config: WorkerConfig,
    responder: Responder,
    policy: Arc<Policy>,
    assignment: Arc<Assignment>,
    generation: u64,
    tokens: TokenVerifier,
    /// Wall-clock Unix seconds, as of the last timeout (token expiry is wall-clock time).
    unix_now: u64,
    /// When running flows are next looked at for their progress records.
    next_progress_report: Instant,
    service: IpAddr,
    peers: HashMap<PeerSlot, Peer>,
    flows: FlowTable<Flow>,
    pool: ConnectorPool,
    /// The site of each connector link, as an index into the current policy's sites.
    link_sites: HashMap<LinkId, SiteId>,
    counters: Counters,
    decisions: BTreeMap<(&'static str, &'static str), u64>,
    /// Decrypted packets from devices; those for links and egress leave as slices of it.
    rx: BytesMut,
    /// Deny replies, ICMP errors and service answers before encryption.
    scratch: Vec<u8>,
    /// Encrypted datagrams to devices.
    out: DatagramQueue,
    /// Packets for links and egress.
    packets: VecDeque<Transmit<'static>>,
    events: VecDeque<Event>,
    timers: Timers<Timer, 3>,
    /// Devices whose risk is above low, by key (kept for devices this worker does not hold
    /// yet: a policy change may bring them here).
    risks: HashMap<PublicKeyBytes, Arc<crate::api::RiskStatus>>,
    /// Traffic of flows below the monitored level, summed per device and application until
    /// the next report period (`[risk] aggregate_below`).
    aggregates: HashMap<(String, Option<String>), FlowRecord>,
}

impl BrokerState {
    pub fn new(
        key: PrivateKey,
        config: WorkerConfig,
        policy: Arc<Policy>,
        assignment: Arc<Assignment>,
        now: Instant,
    ) -> Self {
        let flows = FlowTable::new(
            config.timeouts,
            config.max_flows,
            config.max_flows_per_device,
        );
        let mut timers = Timers::default();
        timers.set(Timer::WireGuard, now + WIREGUARD_TICK);
        timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
        timers.set(Timer::LinkLoad, now + LINK_LOAD);
        let mut state = BrokerState {
            responder: Responder::new(key),
            service: service_address(&policy.device_range),
            policy: policy.clone(),
            assignment: Arc::new(Assignment::new(assignment.workers())),
            generation: 0,
            tokens: TokenVerifier::new(),
            unix_now: 0,
            next_progress_report: now,
            peers: HashMap::new(),
            flows,
            pool: ConnectorPool::default(),
            link_sites: HashMap::new(),
            counters: Counters::default(),
            decisions: BTreeMap::new(),
            rx: BytesMut::zeroed(RX_BLOCK),
            scratch: vec![0; SCRATCH],
            out: DatagramQueue::default(),
            packets: VecDeque::new(),
            events: VecDeque::new(),
            timers,
            risks: HashMap::new(),
            aggregates: HashMap::new(),
            config,
        };
        state.set_policy(policy, assignment);
        state
    }

    pub fn worker(&self) -> WorkerId {
        self.config.worker
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts what the shell could not deliver (links full or closed, egress missing, the log
    /// behind, another worker's queue full).
    pub fn count_drops(&mut self, f: impl FnOnce(&mut counters::Drops)) {
        f(&mut self.counters.drops);
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn public_key(&self) -> PublicKeyBytes {
        self.responder.private_key().public()
    }

    /// The most datagrams the shell sends in one GSO train.
    pub fn set_max_segments(&mut self, n: usize) {
        self.out.set_max_segments(n);
    }

    /// Replaces the policy and where devices live. Devices of this worker that stay keep their
    /// WireGuard sessions; removed devices lose theirs and their flows. Cached flows are
    /// decided anew on their next packet.
    pub fn set_policy(&mut self, policy: Arc<Policy>, assignment: Arc<Assignment>) {
        let me = self.config.worker;
        let mut keep: HashMap<PeerSlot, PublicKeyBytes> = assignment.owned_by(me).collect();
        self.peers
            .retain(|slot, peer| keep.get(slot).is_some_and(|k| *k == peer.key));
        for (id, dev) in policy.devices.iter().enumerate() {
            let Some(slot) = assignment.slot_of_key(&dev.public_key) else {
                continue;
            };
            if keep.remove(&slot).is_none() {
                continue; // another worker's device
            }
            match self.peers.get_mut(&slot) {
                Some(peer) => {
                    peer.device = id as u32;
                    peer.address = dev.address;
                    if !peer
                        .names
                        .contains(IpAddr::V4(policy.dns.app_range.network()))
                    {
                        peer.names =
                            SyntheticMap::new(policy.dns.app_range, SYNTHETIC_NAMES_PER_DEVICE);
                    }
                }
                None => {
                    let mut peer = Peer::new(
                        id as u32,
                        dev.public_key,
                        dev.address,
                        SyntheticMap::new(policy.dns.app_range, SYNTHETIC_NAMES_PER_DEVICE),
                    );
                    if let Some(r) = self.risks.get(&dev.public_key) {
                        peer.risk = r.level;
                        peer.risk_status = Some(r.clone());
                    }
                    self.peers.insert(slot, peer);
                }
            }
        }
        let peers = &self.peers;
        self.flows.retain(|_, f, _| peers.contains_key(&f.peer));
        self.service = service_address(&policy.device_range);
        self.policy = policy;
        self.assignment = assignment;
        self.index_link_sites();
        self.generation += 1;
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

    /// The risk of the device with `key`, from the control plane's risk engine. When it
    /// changes, the device's cached flows are decided anew on their next packet (a flow to an
    /// application that no longer tolerates it is cut there).
    /// `status` None: nothing is held against it.
    pub fn set_risk(&mut self, key: PublicKeyBytes, status: Option<Arc<crate::api::RiskStatus>>) {
        let level = status.as_ref().map(|s| s.level).unwrap_or_default();
        match &status {
            Some(s) => self.risks.insert(key, s.clone()),
            None => self.risks.remove(&key),
        };
        if let Some(slot) = self.assignment.slot_of_key(&key)
            && let Some(peer) = self.peers.get_mut(&slot)
            && peer.key == key
        {
            peer.risk_status = status;
            if peer.risk != level {
                peer.risk = level;
                peer.generation += 1;
            }
        }
    }

    /// The keys posture tokens may be signed with (several during a rotation). Until the
    /// control plane sets them no token is accepted.
    pub fn set_token_keys(&mut self, verifier: TokenVerifier) {
        self.tokens = verifier;
    }

    /// A connector of `site` linked (`connector` names it in logs and metrics); its link
    /// carries datagrams of at most `max_datagram` bytes.
    pub fn link_up(&mut self, link: LinkId, site: &str, connector: &str, max_datagram: usize) {
        self.pool.up(link, site, connector);
        self.pool.set_max_datagram(link, max_datagram);
        self.index_link_sites();
    }

    /// The largest datagram the link carries changed.
    pub fn link_mtu(&mut self, link: LinkId, max_datagram: usize) {
        self.pool.set_max_datagram(link, max_datagram);
    }

    /// A connector link closed: its flows get another connector of their site on their next
    /// packet.
    pub fn link_down(&mut self, link: LinkId) {
        if let Some(name) = self.pool.down(link) {
            // Marked here, once, so the packet path needs no lookup to notice.
            let mut moving = 0;
            self.flows.retain(|_, f, _| {
                if f.link == FlowLink::Via(link) {
                    f.link = FlowLink::Gone;
                    moving += 1;
                }
                true
            });
            if self.config.worker.0 == 0 {
                info!(connector = %name, "connector link gone; its flows go to another connector of the site");
            }
            debug!(connector = %name, flows = moving, worker = self.config.worker.0, "flows marked to move");
        }
        self.link_sites.remove(&link);
    }

    /// The connector's report: draining (no new flows) and the applications it cannot reach.
    pub fn link_health(&mut self, link: LinkId, draining: bool, unreachable: &[String]) {
        if self.pool.set_health(link, draining, unreachable) && self.config.worker.0 == 0 {
            let name = self.pool.describe(link).map(|(n, _)| n.to_string());
            info!(connector = ?name, draining, ?unreachable, "connector health");
        }
    }

    /// The connectors an admin drained (by name; all of them): no new flows to their links.
    pub fn hold_connectors(&mut self, names: std::collections::BTreeSet<String>) {
        if self.pool.set_held(names) && self.config.worker.0 == 0 {
            info!("connectors drained by an admin changed");
        }
    }

    /// Whether the link is silent (stale links get new flows only when nothing else can).
    pub fn link_stale(&mut self, link: LinkId, stale: bool) {
        if self.pool.set_stale(link, stale) {
            let name = self.pool.describe(link).map(|(n, _)| n.to_string());
            if stale {
                self.counters.links.stale_events += 1;
                if self.config.worker.0 == 0 {
                    warn!(connector = ?name, "connector link silent; no new flows to it");
                }
            } else if self.config.worker.0 == 0 {
                info!(connector = ?name, "connector link answers again");
            }
        }
    }

    /// A datagram arrived on the WireGuard socket.
    pub fn handle_wg(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Routed {
        let slot = match self
            .responder
            .route(from.ip(), datagram, &mut self.scratch, now)
        {
            Route::Limited(Limit::PerSource) => {
                self.counters.drops.handshake_per_source += 1;
                return Routed::Here;
            }
            Route::Limited(Limit::Budget) => {
                self.counters.drops.handshake_budget += 1;
                return Routed::Here;
            }
            Route::Limited(Limit::Cookies) => {
                self.counters.drops.cookie_per_source += 1;
                return Routed::Here;
            }
            Route::Cookie(cookie) => {
                self.counters.handshakes.cookie_replies += 1;
                self.out.push(from, cookie);
                return Routed::Here;
            }
            Route::Invalid(e) => {
                self.counters.drops.invalid_wireguard += 1;
                trace!(?e, "invalid WireGuard datagram");
                return Routed::Here;
            }
            Route::Initiation(key) => match self.assignment.slot_of_key(&key) {
                Some(slot) => slot,
                None => {
                    self.counters.drops.unknown_peer += 1;
                    debug!("handshake from a key not in the policy");
                    return Routed::Here;
                }
            },
            Route::Session(index) => match PeerSlot::from_session_index(index) {
                Some(slot) => slot,
                None => {
                    self.counters.drops.unknown_peer += 1;
                    return Routed::Here;
                }
            },
        };
        let owner = self.assignment.owner(slot);
        if owner != self.config.worker {
            if datagram.first() == Some(&1) {
                self.counters.handshakes.handed_over += 1;
            }
            return Routed::Worker(owner, slot);
        }
        self.handle_for(slot, from, datagram, now);
        Routed::Here
    }

    /// A datagram another worker received for peer `slot` of this one (it applied the
    /// handshake defence and found the peer: nothing of that is done again, so a cookie of
    /// that worker's is never checked against this one's).
    pub fn handle_handover(
        &mut self,
        slot: PeerSlot,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) {
        if self.assignment.owner(slot) != self.config.worker {
            self.counters.drops.unknown_peer += 1;
            return;
        }
        self.handle_for(slot, from, datagram, now);
    }

    /// A datagram for peer `slot` of this worker.
    fn handle_for(&mut self, slot: PeerSlot, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Some(peer) = self.peers.get_mut(&slot) else {
            self.counters.drops.unknown_peer += 1;
            return;
        };
        if self.rx.len() < datagram.len().max(mtu::WIREGUARD_OVERHEAD as usize * 8) {
            self.rx = BytesMut::zeroed(RX_BLOCK.max(datagram.len()));
        }
        // The endpoint moves only on input that authenticated as this device: a data message
        // (type 4, keepalives included) that decrypted, an initiation whose handshake verified
        // (answered with a response), or a response to the broker's own initiation (answered
        // with a keepalive). A cookie reply in either direction (type 3) proves nothing, so it
        // never moves it.
        let authenticating = datagram.first() == Some(&4);
        if peer.session.is_none() {
            if datagram.first() != Some(&1) {
                // Nothing but an initiation can be for a device that never handshook here.
                self.counters.drops.unknown_peer += 1;
                return;
            }
            peer.session = Some(Box::new(Session::new(
                self.responder.private_key(),
                peer.key,
                None,
                slot.session_index(),
                Some(self.responder.limiter()),
            )));
        }
        let Some(session) = peer.session.as_deref_mut() else {
            return;
        };
        match session.decapsulate(Some(from.ip()), datagram, &mut self.rx) {
            Output::Network(reply) if reply.first() == Some(&3) => {
                // A cookie reply comes out without a verified handshake: it goes to the asker
                // and nothing else changes.
                self.counters.handshakes.cookie_replies += 1;
                self.out.push(from, reply);
            }
            Output::Network(reply) => {
                peer.endpoint = Some(from);
                self.counters.handshakes.completed += 1;
                self.out.push(from, reply);
                loop {
                    let buf = self.out.reserve(crate::transmit::MAX_TRAIN_BYTES);
                    match session.flush(buf) {
                        Output::Network(d) => {
                            let n = d.len();
                            self.out.commit(from, n);
                        }
                        _ => break,
                    }
                }
            }
            Output::Tunnel(inner) => {
                let len = inner.len();
                peer.endpoint = Some(from);
                self.counters.from_clients.count(len);
                self.client_packet(slot, len, now);
            }
            Output::Done => {
                if authenticating {
                    peer.endpoint = Some(from);
                }
            }
            Output::Error(e) => {
                self.counters.drops.invalid_wireguard += 1;
                trace!(?e, "WireGuard rejected a datagram");
            }
        }
    }

    /// A decrypted packet from peer `slot` is in `self.rx[..len]`.
    fn client_packet(&mut self, slot: PeerSlot, len: usize, now: Instant) {
        let Some(address) = self.peers.get(&slot).map(|p| p.address) else {
            return;
        };
        let mut rx = std::mem::take(&mut self.rx);
        let pkt = &rx[..len];
        let (key, src, error_to) = match packet::classify(pkt) {
            Ok(PacketKind::Flow(k)) => (k, k.src, None),
            // The device reports an error about a packet it got from an app: it belongs to the
            // device's flow towards that app, and may go only to that app.
            Ok(PacketKind::IcmpError { outer, about }) => {
                (about.reversed(), outer.src, Some(outer.dst))
            }
            Err(e) => {
                self.counters.drops.malformed += 1;
                trace!(%e, "malformed packet from a device");
                self.rx = rx;
                return;
            }
        };
        if src != address || key.src != address {
            self.counters.drops.spoofed_source += 1;
            debug!("dropped a packet with a source address that is not the device's own");
            self.rx = rx;
            return;
        }
        if key.dst == self.service {
            self.handle_service(slot, &key, pkt, now);
            self.rx = rx;
            return;
        }
        if error_to.is_some_and(|to| to != key.dst) {
            // Its quoted header names an allowed flow, its outer header another host: that
            // would carry arbitrary bytes anywhere.
            self.counters.drops.icmp_mismatch += 1;
            self.rx = rx;
            return;
        }
        // An error is part of a flow that exists; it never opens one.
        let may_create = error_to.is_none();
        let verdict = self.authorize(
            slot,
            &key,
            now,
            may_create,
            crate::flow::TcpEnd::of(pkt, true),
            len,
        );
        match verdict {
            Verdict::Allow(FlowRoute::Internet, _) => {
                self.counters.to_internet.count(len);
                let packet = rx.split_to(len).freeze();
                self.packets.push_back(Transmit::Egress(packet));
            }
            Verdict::Allow(_, FlowLink::Via(link)) => {
                let max = self.pool.max_datagram(link).unwrap_or(usize::MAX);
                if len > max {
                    self.too_large(slot, &rx[..len], max);
                } else {
                    let mss = (self.config.overlay_mtu as usize).min(max) as u16;
                    if packet::clamp_mss(&mut rx[..len], mtu::mss_for(mss, key.src.is_ipv6())) {
                        self.counters.flows.mss_clamped += 1;
                    }
                    self.counters.to_sites.count(len);
                    let packet = rx.split_to(len).freeze();
                    self.packets.push_back(Transmit::Link { link, packet });
                }
            }
            Verdict::Allow(..) => self.counters.drops.no_connector += 1,
            Verdict::Deny => {
                self.counters.drops.denied += 1;
                if let Some(n) = packet::deny_reply(pkt, &mut self.scratch) {
                    self.counters.flows.deny_replies += 1;
                    self.send_scratch(slot, n);
                }
            }
            Verdict::Drop => {}
        }
        if rx.len() < 2048 {
            rx = BytesMut::zeroed(RX_BLOCK);
        }
        self.rx = rx;
    }

    /// A packet larger than its link carries: dropped, counted, and answered so that the
    /// sender's stack lowers its path MTU.
    fn too_large(&mut self, slot: PeerSlot, pkt: &[u8], max: usize) {
        self.counters.drops.too_large += 1;
        let mtu = max.min(u16::MAX as usize) as u16;
        if let Some(n) = packet::too_big_reply(pkt, mtu, &mut self.scratch) {
            self.counters.flows.too_big_replies += 1;
            self.send_scratch(slot, n);
        }
    }

    /// Encrypts `self.scratch[..n]` for peer `slot`.
    fn send_scratch(&mut self, slot: PeerSlot, n: usize) {
        let scratch = std::mem::take(&mut self.scratch);
        self.send_to_peer(slot, &scratch[..n]);
        self.scratch = scratch;
    }

    /// Encrypts `pkt` for peer `slot` and queues it to the peer's last known endpoint.
    fn send_to_peer(&mut self, slot: PeerSlot, pkt: &[u8]) -> bool {
        let Some(peer) = self.peers.get_mut(&slot) else {
            return false;
        };
        let Some(endpoint) = peer.endpoint else {
            self.counters.drops.no_endpoint += 1;
            return false;
        };
        let room = (pkt.len() + mtu::WIREGUARD_OVERHEAD as usize).max(crate::wg::MIN_BUFFER);
        let Some(session) = peer.session.as_deref_mut() else {
            self.counters.drops.no_session += 1;
            return false;
        };
        match session.encapsulate(pkt, self.out.reserve(room)) {
            Output::Network(d) => {
                let n = d.len();
                self.out.commit(endpoint, n);
                self.counters.to_clients.count(pkt.len());
                true
            }
            Output::Error(e) => {
                self.counters.drops.no_session += 1;
                debug!(?e, "cannot encrypt for a device");
                false
            }
            _ => {
                // Queued inside the engine until a handshake completes.
                self.counters.drops.no_session += 1;
                false
            }
        }
    }

    /// An IP packet arrived from the internet (egress interface, after the kernel undid the
    /// source NAT). Delivered only as part of a flow a full-tunnel device opened.
    pub fn handle_egress_packet(&mut self, pkt: &[u8], now: Instant) {
        self.counters.from_internet.count(pkt.len());
        if !self.deliver_reply(pkt, now, |route, _| route == FlowRoute::Internet) {
            self.counters.drops.unsolicited_from_internet += 1;
        }
    }

    /// An IP packet arrived from the connector on `link`. It is delivered only as part of a
    /// flow a device opened and the policy allows to that connector's site: a connector
    /// cannot start flows to devices.
    pub fn handle_link_packet(&mut self, link: LinkId, pkt: &[u8], now: Instant) {
        self.counters.from_sites.count(pkt.len());
        let site = self.link_sites.get(&link).copied();
        let ok = self.deliver_reply(pkt, now, |route, l| match route {
            FlowRoute::Site { site: s, .. } => l == FlowLink::Via(link) || Some(s) == site,
            _ => false,
        });
        if !ok {
            self.counters.drops.unsolicited_from_site += 1;
        }
    }

    /// Delivers a packet coming back towards a device when it belongs to an allowed flow the
    /// device opened whose way out `from_ok` accepts; false when it is unsolicited (malformed
    /// packets are counted here).
    fn deliver_reply(
        &mut self,
        pkt: &[u8],
        now: Instant,
        from_ok: impl Fn(FlowRoute, FlowLink) -> bool,
    ) -> bool {
        let key = match packet::classify(pkt) {
            Ok(PacketKind::Flow(k)) => k.reversed(),
            // An error about a packet the device sent (from the app or a router on its way):
            // only to the device that sent it.
            Ok(PacketKind::IcmpError { outer, about }) if outer.dst == about.src => about,
            Ok(PacketKind::IcmpError { .. }) => return false,
            Err(_) => {
                self.counters.drops.malformed += 1;
                return true;
            }
        };
        let Some(slot) = self.assignment.slot_of_address(key.src) else {
            return false;
        };
        if !self.peers.contains_key(&slot) {
            return false;
        }
        match self.authorize(
            slot,
            &key,
            now,
            false,
            crate::flow::TcpEnd::of(pkt, false),
            pkt.len(),
        ) {
            Verdict::Allow(route, link) if from_ok(route, link) => {
                self.send_to_peer(slot, pkt);
                true
            }
            _ => false,
        }
    }

    /// Runs the timers that are due: WireGuard's (keepalives, rekeys), and every second flow
    /// expiry, posture token expiry (against `unix_now`, wall-clock seconds), rate-limit
    /// windows and connector load counts.
    pub fn handle_timeout(&mut self, now: Instant, unix_now: u64) {
        self.unix_now = unix_now;
        for t in self.timers.take_due(now) {
            match t {
                Timer::WireGuard => {
                    self.wireguard_timers();
                    self.timers.set(Timer::WireGuard, now + WIREGUARD_TICK);
                }
                Timer::Housekeeping => {
                    self.housekeeping(now, unix_now);
                    self.timers.set(Timer::Housekeeping, now + HOUSEKEEPING);
                }
                Timer::LinkLoad => {
                    self.pool.recount(
                        self.flows
                            .iter()
                            .filter(|(_, f, _)| f.open())
                            .filter_map(|(_, f, _)| f.link.id()),
                    );
                    self.timers.set(Timer::LinkLoad, now + LINK_LOAD);
                }
            }
        }
    }

    fn wireguard_timers(&mut self) {
        for peer in self.peers.values_mut() {
            let buf = self.out.reserve(256);
            let Some(session) = peer.session.as_deref_mut() else {
                continue;
            };
            if let Output::Network(d) = session.tick(buf) {
                let n = d.len();
                if let Some(ep) = peer.endpoint {
                    self.out.commit(ep, n);
                }
            }
        }
    }

    fn housekeeping(&mut self, now: Instant, unix_now: u64) {
        let policy = &self.policy;
        for peer in self.peers.values_mut() {
            if peer.posture.as_ref().is_some_and(|c| c.exp <= unix_now) {
                peer.posture = None;
                peer.generation += 1;
                self.counters.posture.expired += 1;
                self.events.push_back(Event::Posture(PostureRecord {
                    event: "posture",
                    result: "expired",
                    device: policy.device(peer.device).name.clone(),
                    user: policy.user_of(peer.device).name.clone(),
                    reason: Some("token expired".into()),
                    failing_checks: Vec::new(),
                    exp: None,
                }));
            }
        }
        for peer in self.peers.values_mut() {
            let (allowed, denied) = std::mem::take(&mut peer.unlogged);
            if allowed + denied > 0 {
                self.events.push_back(Event::Summary(SummaryRecord {
                    event: "flow-summary",
                    device: policy.device(peer.device).name.clone(),
                    user: policy.user_of(peer.device).name.clone(),
                    allowed,
                    denied,
                    seconds: HOUSEKEEPING.as_secs(),
                }));
            }
        }
        self.responder.reset_rate_limit();
        self.responder.forget_quiet_sources(now);
        let expired = self.flows.expire(now);
        if expired > 0 {
            trace!(expired, "idle flows expired");
        }
        self.report_flows(now);
    }

    /// The next output, oldest first: packets for links and egress, then datagrams.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        if let Some(t) = self.packets.pop_front() {
            return Some(t);
        }
        self.out.pop().map(Transmit::Peer)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`BrokerState::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The worker's state for readers.
    /// What a periodic sampler needs, without copying any peer: the counters, open flows, and
    /// peers whose last handshake is younger than `online`.
    pub fn totals(&self, online: Duration) -> Totals {
        Totals {
            counters: self.counters.clone(),
            flows: self.flows.len(),
            peers_online: self
                .peers
                .values()
                .filter(|p| {
                    p.session
                        .as_ref()
                        .and_then(|s| s.time_since_handshake())
                        .is_some_and(|t| t < online)
                })
                .count(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let p = &self.policy;
        Snapshot {
            counters: self.counters.clone(),
            decisions: self.decisions.clone(),
            flows: self.flows.len(),
            peers: self
                .peers
                .values()
                .map(|peer| {
                    let (tx, rx) = peer.session.as_ref().map_or((0, 0), |s| s.traffic());
                    PeerInfo {
                        device: p.device(peer.device).name.clone(),
                        user: p.user_of(peer.device).name.clone(),
                        address: peer.address,
                        endpoint: peer.endpoint,
                        worker: self.config.worker,
                        seconds_since_handshake: peer
                            .session
                            .as_ref()
                            .and_then(|s| s.time_since_handshake())
                            .map(|d| d.as_secs()),
                        tx_bytes: tx,
                        rx_bytes: rx,
                        posture_expires: peer.posture.as_ref().map(|c| c.exp),
                        failing_checks: peer.failing_checks(),
                    }
                })
                .collect(),
            links: self.pool.links(),
            postures: self
                .peers
                .values()
                .filter_map(|peer| Some((peer.key, peer.posture.clone()?)))
                .collect(),
            policy_generation: self.generation,
        }
    }
}

#[cfg(test)]
mod tests;
