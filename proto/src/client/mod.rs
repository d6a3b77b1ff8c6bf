//! The client's data plane as a state machine without I/O: one WireGuard session to every
//! broker, one of them carrying the traffic. Which one is [`Selector`]'s decision, from
//! in-tunnel echo probes (RTT and liveness); switching is only a change of session, so a
//! failover costs no handshake. The posture token is presented on every session, so the next
//! broker already knows the device when traffic moves there, and flows (TCP included) carry
//! on.
//!
//! Inputs: packets from apps ([`ClientState::handle_tun`]), datagrams from brokers
//! ([`ClientState::handle_network`]), commands (brokers, token, broker addresses) and
//! [`ClientState::handle_timeout`]. Outputs: [`ClientState::poll_transmit`] (datagrams to
//! brokers as GSO trains, packets for the TUN device; encrypted and decrypted in place, never
//! copied) and [`ClientState::poll_timeout`].

mod meter;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::api::{BrokerInfo, STATUS_PORT, TunnelStatus};
use crate::counters;
use crate::counters::Traffic;
use crate::keys::{PrivateKey, PublicKeyBytes};
use crate::mtu;
use crate::packet;
use crate::posture::{POSTURE_PORT, TokenAnswer};
use crate::select::{BrokerId, Liveness, Selector, SelectorConfig, Switch};
use crate::timers::{TimerName, Timers};
use crate::transmit::{DatagramQueue, Datagrams};
use crate::wg::{Output, Session, WireGuardError};

/// Echo identifier of the client's probes (answers with another id go to the TUN device).
const PROBE_ID: u16 = 0x5e6b;
/// Source ports of the token and status requests the client writes into the tunnel itself;
/// no socket has them, so answers to them are taken out of the stream here.
const TOKEN_SPORT: u16 = 40743;
const STATUS_SPORT: u16 = 40744;
/// How often the broker in use is asked for this device's status (denials).
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// A token not acknowledged by a broker is sent again after this.
const TOKEN_RETRY: Duration = Duration::from_secs(1);
/// A broker whose session expired is asked for a new handshake this often.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(2);
/// A broker that stopped answering probes is asked for a new handshake this often: it may have
/// restarted and lost the session (WireGuard itself would wait for its rekey timers).
const DOWN_RETRY: Duration = Duration::from_secs(1);
/// How often sessions, probes and the broker choice are looked after.
const TICK: Duration = Duration::from_millis(50);
/// Broker switches kept for the status.
const SWITCHES_KEPT: usize = 10;
/// The latest small outbound packet of each recent TCP flow (an ACK, usually) is kept to be
/// sent again through the new broker after a switch: it opens the flow there and tells the
/// connector which broker the device uses now, so the app's next segment takes the new way.
/// Without it, a download whose app side waits for ACKs would stall until the old link timed
/// out (the laptop has nothing to send).
const RECENT_MAX_LEN: usize = 128;
const RECENT_FLOWS: usize = 4096;
const RECENT_FOR: Duration = Duration::from_secs(60);

counters! {
    /// Packets the client dropped, by reason.
    pub struct Drops {
        /// From an app while no broker answers (the kill switch holds traffic).
        no_broker,
        /// WireGuard could not encrypt (no session with the broker in use yet).
        no_session,
        /// A datagram WireGuard refused (bad MAC, replay, garbage).
        invalid_wireguard,
        /// A datagram from an address that is no broker's.
        unknown_sender,
        /// Multicast and link-local packets no overlay carries.
        not_routable,
        /// The TUN device refused the write.
        tun_write_failed,
        /// The UDP socket refused the send.
        udp_send_failed,
    }
}

/// The client's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Packets from apps into the tunnel.
    pub to_brokers: Traffic,
    /// Packets from the tunnel to apps.
    pub from_brokers: Traffic,
    pub drops: Drops,
    pub flows: meter::FlowRecords,
}

/// The client's named timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Tick,
}

impl TimerName for Timer {
    const ALL: &'static [Timer] = &[Timer::Tick];
    fn index(self) -> usize {
        self as usize
    }
}

/// One output.
#[derive(Debug)]
pub enum Transmit<'a> {
    /// WireGuard datagrams to a broker (a GSO train when `segment_size` is set).
    Network(Datagrams<'a>),
    /// A packet for the apps (the TUN device).
    Tun(&'a [u8]),
}

/// A flow's latest small outbound packet.
struct Recent {
    at: Instant,
    len: usize,
    buf: [u8; RECENT_MAX_LEN],
}

/// One broker as the status shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BrokerView {
    pub name: String,
    pub endpoint: String,
    pub address: Option<SocketAddr>,
    pub state: String,
    pub active: bool,
    pub rtt_ms: Option<f64>,
    pub last_answer_ago_ms: Option<f64>,
    /// The broker accepted the current posture token.
    pub posture_accepted: bool,
    pub seconds_since_handshake: Option<u64>,
}

/// A change of broker, for the status.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchView {
    /// RFC 3339.
    pub at: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
}

/// The data plane's state for `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Snapshot {
    pub connected: bool,
    pub active: Option<String>,
    pub brokers: Vec<BrokerView>,
    pub switches: VecDeque<SwitchView>,
    /// What the broker in use says: latest denials, posture it holds.
    pub broker_status: Option<TunnelStatus>,
    pub counters: Counters,
    /// Packets from apps dropped because no broker was up (also in `counters`).
    pub dropped_no_broker: u64,
    /// What the kernel dropped for this client: datagrams on the tunnel socket (receive buffer
    /// full), packets on the TUN device (not read in time). Filled in by the I/O shell.
    pub kernel: KernelDrops,
}

/// The kernel's drop counters the client reads.
#[derive(Debug, Clone, Serialize, Default)]
pub struct KernelDrops {
    pub socket: Option<u64>,
    pub tun: Option<u64>,
}

struct Link {
    info: BrokerInfo,
    key: PublicKeyBytes,
    id: BrokerId,
    addr: Option<SocketAddr>,
    session: Session,
    /// When the current session's handshake completed.
    handshake_at: Option<Instant>,
    next_retry: Instant,
    token_sent: Option<Instant>,
    token_accepted: Option<String>,
    status: Option<TunnelStatus>,
    retired: bool,
}

/// Decrypted packets for the TUN device, in one buffer.
#[derive(Default)]
struct TunQueue {
    buf: Vec<u8>,
    end: usize,
    packets: VecDeque<(usize, usize)>,
}

impl TunQueue {
    fn reserve(&mut self, n: usize) -> &mut [u8] {
        if self.packets.is_empty() {
            self.end = 0;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize((self.end + n).max(2 * self.buf.len()), 0);
        }
        &mut self.buf[self.end..self.end + n]
    }

    fn commit(&mut self, len: usize) {
        self.packets.push_back((self.end, self.end + len));
        self.end += len;
    }

    fn pop(&mut self) -> Option<&[u8]> {
        let (a, b) = self.packets.pop_front()?;
        Some(&self.buf[a..b])
    }
}

/// The client's data plane.
pub struct ClientState {
    key: PrivateKey,
    keepalive: u16,
    device: IpAddr,
    service: IpAddr,
    links: Vec<Link>,
    selector: Selector,
    token: Option<String>,
    next_status: Instant,
    recent: HashMap<packet::FlowKey, Recent>,
    next_expire: Instant,
    switches: VecDeque<SwitchView>,
    counters: Counters,
    net: DatagramQueue,
    tun: TunQueue,
    pkt: Vec<u8>,
    timers: Timers<Timer, 1>,
    /// Wall-clock Unix seconds, as of the last timeout (for the switch history).
    unix_now: u64,
    /// This laptop's flows, for its side of the flow records.
    metered: meter::FlowMeter,
}

impl ClientState {
    /// `device`: this device's overlay address; `service`: the brokers' in-tunnel service
    /// address; `keepalive`: WireGuard persistent keepalive (seconds).
    pub fn new(
        key: PrivateKey,
        keepalive: u16,
        device: IpAddr,
        service: IpAddr,
        now: Instant,
    ) -> Self {
        let mut timers = Timers::default();
        timers.set(Timer::Tick, now);
        ClientState {
            key,
            keepalive,
            device,
            service,
            links: Vec::new(),
            selector: Selector::new(SelectorConfig::default()),
            token: None,
            next_status: now,
            recent: HashMap::new(),
            next_expire: now,
            switches: VecDeque::new(),
            counters: Counters::default(),
            net: DatagramQueue::default(),
            tun: TunQueue::default(),
            pkt: vec![0u8; 4096],
            timers,
            unix_now: 0,
            metered: meter::FlowMeter::default(),
        }
    }

    /// Flow records of this laptop's side, oldest first.
    pub fn poll_flow_report(&mut self) -> Option<crate::flow::FlowReport> {
        let r = self.metered.poll();
        self.counters.flows = self.metered.counters.clone();
        r
    }

    /// Records of every flow still open (the client stops).
    pub fn report_all_flows(&mut self) {
        self.metered.finish(self.unix_now * 1000);
    }

    /// The most datagrams the shell sends in one GSO train.
    pub fn set_max_segments(&mut self, n: usize) {
        self.net.set_max_segments(n);
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts what the shell could not deliver.
    pub fn count_drops(&mut self, f: impl FnOnce(&mut Drops)) {
        f(&mut self.counters.drops);
    }

    /// Adds the brokers not known yet and retires those no longer listed.
    pub fn set_brokers(&mut self, brokers: &[BrokerInfo], now: Instant) {
        for b in brokers {
            let Ok(key) = PublicKeyBytes::parse(&b.public_key) else {
                warn!(broker = %b.endpoint, "broker with a malformed public key ignored");
                continue;
            };
            if let Some(l) = self.links.iter_mut().find(|l| l.key == key) {
                if l.info.endpoint != b.endpoint {
                    info!(broker = %b.name, endpoint = %b.endpoint, "broker endpoint changed");
                    l.addr = None;
                }
                l.info = b.clone();
                continue;
            }
            let id = self.selector.add(now);
            let index = self.links.len() as u32 + 1;
            info!(broker = %display_name(b), endpoint = %b.endpoint, "broker added");
            self.links.push(Link {
                info: b.clone(),
                key,
                id,
                addr: None,
                session: Session::new(&self.key, key, Some(self.keepalive), index, None),
                handshake_at: None,
                next_retry: now,
                token_sent: None,
                token_accepted: None,
                status: None,
                retired: false,
            });
        }
        let listed: Vec<PublicKeyBytes> = brokers
            .iter()
            .filter_map(|b| PublicKeyBytes::parse(&b.public_key).ok())
            .collect();
        for l in self.links.iter_mut() {
            if !l.retired && !listed.contains(&l.key) {
                l.retired = true;
                info!(broker = %display_name(&l.info), "broker no longer listed; retired");
                if let Some(s) = self.selector.retire(l.id, now) {
                    info!("broker switch: {s}");
                }
            }
        }
    }

    /// Endpoints (host:port) that have no address yet: the shell resolves them.
    pub fn unresolved(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|l| l.addr.is_none() && !l.retired)
            .map(|l| l.info.endpoint.clone())
            .collect()
    }

    /// The shell resolved `endpoint` to `addr`.
    pub fn set_address(&mut self, endpoint: &str, addr: SocketAddr) {
        for l in &mut self.links {
            if l.info.endpoint == endpoint && !l.retired {
                l.addr = Some(addr);
            }
        }
    }

    /// The brokers' endpoints (the kill switch lets these through).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.links.iter().filter_map(|l| l.addr).collect()
    }

    /// A new posture token: present it to every broker.
    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
        for l in &mut self.links {
            l.token_sent = None;
        }
    }

    /// A packet from an app, for the broker in use.
    pub fn handle_tun(&mut self, pkt: &[u8], now: Instant) {
        if !routable(pkt) {
            self.counters.drops.not_routable += 1;
            return;
        }
        if pkt.len() <= RECENT_MAX_LEN
            && let Ok(packet::PacketKind::Flow(k)) = packet::classify(pkt)
            && k.proto == packet::PROTO_TCP
            && (self.recent.len() < RECENT_FLOWS || self.recent.contains_key(&k))
        {
            let r = self.recent.entry(k).or_insert(Recent {
                at: now,
                len: 0,
                buf: [0; RECENT_MAX_LEN],
            });
            r.at = now;
            r.len = pkt.len();
            r.buf[..pkt.len()].copy_from_slice(pkt);
        }
        let Some(l) = self
            .selector
            .active()
            .and_then(|id| self.links.iter_mut().find(|l| l.id == id))
        else {
            self.counters.drops.no_broker += 1;
            return;
        };
        if encapsulate_to(l, pkt, &mut self.net) {
            self.counters.to_brokers.count(pkt.len());
            self.metered.packet(pkt, true, now, self.unix_now * 1000);
        } else {
            self.counters.drops.no_session += 1;
        }
    }

    /// A datagram from the network.
    pub fn handle_network(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        let Some(i) = self.links.iter().position(|l| l.addr == Some(from)) else {
            self.counters.drops.unknown_sender += 1;
            return;
        };
        let mut handshake_msg = false;
        let mut inner_len = None;
        let buf = self.tun.reserve(data.len().max(crate::wg::MIN_BUFFER));
        match self.links[i]
            .session
            .decapsulate(Some(from.ip()), data, buf)
        {
            Output::Network(d) => {
                self.net.push(from, d);
                handshake_msg = true;
                loop {
                    let out = self.net.reserve(crate::transmit::MAX_TRAIN_BYTES);
                    match self.links[i].session.flush(out) {
                        Output::Network(d) => {
                            let n = d.len();
                            self.net.commit(from, n);
                        }
                        _ => break,
                    }
                }
            }
            Output::Tunnel(p) => inner_len = Some(p.len()),
            Output::Done => handshake_msg = true,
            Output::Error(e) => {
                self.counters.drops.invalid_wireguard += 1;
                debug!(?e, "datagram rejected");
            }
        }
        if handshake_msg {
            self.check_handshake(i, now);
        }
        let Some(n) = inner_len else {
            return;
        };
        let start = self.tun.end;
        let p = &self.tun.buf[start..start + n];
        // Answers to the client's own requests come from the service address; rare, so the
        // copy does not matter.
        if packet::addresses(p).is_ok_and(|(s, d)| s == self.service && d == self.device) {
            let p = p.to_vec();
            if self.service_answer(i, &p, now) {
                return;
            }
        }
        self.counters.from_brokers.count(n);
        self.metered.packet(
            &self.tun.buf[start..start + n],
            false,
            now,
            self.unix_now * 1000,
        );
        self.tun.commit(n);
    }

    /// Takes the answers to the client's own probes, token and status requests; false for
    /// anything else (it goes to the TUN device).
    fn service_answer(&mut self, i: usize, p: &[u8], now: Instant) -> bool {
        if let Some(e) = packet::echo(p) {
            if !e.request && e.id == PROBE_ID {
                self.selector.on_probe_answer(self.links[i].id, e.seq, now);
                return true;
            }
            return false;
        }
        let Ok(packet::PacketKind::Flow(k)) = packet::classify(p) else {
            return false;
        };
        if k.proto != packet::PROTO_UDP {
            return false;
        }
        let body = packet::udp_payload(p).unwrap_or_default();
        match (k.sport, k.dport) {
            (POSTURE_PORT, TOKEN_SPORT) => {
                let l = &mut self.links[i];
                match serde_json::from_slice::<TokenAnswer>(body) {
                    Ok(a) if a.accepted => {
                        if l.token_accepted != self.token {
                            info!(broker = %display_name(&l.info), "posture token accepted");
                        }
                        l.token_accepted = self.token.clone();
                    }
                    Ok(a) => {
                        warn!(broker = %display_name(&l.info), error = %a.error, "the broker refused the posture token")
                    }
                    Err(_) => debug!("malformed token answer"),
                }
                true
            }
            (STATUS_PORT, STATUS_SPORT) => {
                self.links[i].status = serde_json::from_slice(body).ok();
                true
            }
            _ => false,
        }
    }

    /// After a handshake message: a new session is up (tell the selector, present the token).
    fn check_handshake(&mut self, i: usize, now: Instant) {
        let l = &mut self.links[i];
        let Some(at) = l
            .session
            .time_since_handshake()
            .and_then(|t| now.checked_sub(t))
        else {
            return;
        };
        if l.handshake_at
            .is_none_or(|prev| at > prev + Duration::from_millis(500))
        {
            if l.handshake_at.is_none() {
                info!(broker = %display_name(&l.info), "session to broker up");
            }
            l.handshake_at = Some(at);
            // A new session may be with a broker that lost this device's token (restarted).
            l.token_sent = None;
            l.token_accepted = None;
            self.selector.on_handshake(l.id, now);
            self.send_token(i, now);
        }
    }

    fn send_token(&mut self, i: usize, now: Instant) {
        let Some(token) = self.token.clone() else {
            return;
        };
        self.links[i].token_sent = Some(now);
        if let Some(n) = packet::build_udp(
            self.device,
            TOKEN_SPORT,
            self.service,
            POSTURE_PORT,
            token.as_bytes(),
            &mut self.pkt,
        ) {
            encapsulate_to(&mut self.links[i], &self.pkt[..n], &mut self.net);
        }
    }

    /// Runs the timers: WireGuard upkeep, handshake retries, probes, broker choice, token and
    /// status. `unix_now` dates the switch history.
    pub fn handle_timeout(&mut self, now: Instant, unix_now: u64) {
        self.unix_now = unix_now;
        if self.timers.take_due(now).contains(&Timer::Tick) {
            self.tick(now);
            self.timers.set(Timer::Tick, now + TICK);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next output: packets for the apps first, then datagrams.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        if !self.tun.packets.is_empty() {
            return self.tun.pop().map(Transmit::Tun);
        }
        self.net.pop().map(Transmit::Network)
    }

    fn tick(&mut self, now: Instant) {
        for i in 0..self.links.len() {
            if self.links[i].retired {
                continue;
            }
            let l = &mut self.links[i];
            let out = self.net.reserve(crate::wg::MIN_BUFFER * 2);
            match l.session.tick(out) {
                Output::Network(d) => {
                    let n = d.len();
                    if let Some(a) = l.addr {
                        self.net.commit(a, n);
                    }
                }
                Output::Error(WireGuardError::ConnectionExpired) => {
                    if l.handshake_at.take().is_some() {
                        warn!(broker = %display_name(&l.info), "session to broker expired; retrying");
                    }
                    if now >= l.next_retry {
                        l.next_retry = now + HANDSHAKE_RETRY;
                        let out = self.net.reserve(crate::wg::MIN_BUFFER * 2);
                        if let (Some(a), Output::Network(d)) =
                            (l.addr, l.session.initiate(out, true))
                        {
                            let n = d.len();
                            self.net.commit(a, n);
                        }
                    }
                }
                _ => {}
            }
            if self.selector.state(l.id) == Some(Liveness::Down)
                && l.handshake_at.is_some()
                && now >= l.next_retry
            {
                // Silent although the session looks fine: a restarted broker no longer knows
                // it. A new handshake gets the device back in one round trip.
                l.next_retry = now + DOWN_RETRY;
                let out = self.net.reserve(crate::wg::MIN_BUFFER * 2);
                if let (Some(a), Output::Network(d)) = (l.addr, l.session.initiate(out, true)) {
                    let n = d.len();
                    self.net.commit(a, n);
                    debug!(broker = %display_name(&l.info), "broker silent: new handshake");
                }
            }
            if l.session.time_since_handshake().is_none() && l.handshake_at.is_none() {
                // Never connected yet: keep asking (the engine gives up after a while).
                if now >= l.next_retry {
                    l.next_retry = now + HANDSHAKE_RETRY;
                    let out = self.net.reserve(crate::wg::MIN_BUFFER * 2);
                    if let (Some(a), Output::Network(d)) = (l.addr, l.session.initiate(out, false))
                    {
                        let n = d.len();
                        self.net.commit(a, n);
                    }
                }
            }
            self.check_handshake(i, now);
            let l = &self.links[i];
            if l.handshake_at.is_some()
                && self.token.is_some()
                && l.token_accepted != self.token
                && l.token_sent.is_none_or(|t| now >= t + TOKEN_RETRY)
            {
                self.send_token(i, now);
            }
        }
        for id in self.selector.due_probes(now) {
            let Some(i) = self.links.iter().position(|l| l.id == id) else {
                continue;
            };
            if self.links[i].handshake_at.is_none() {
                continue;
            }
            let seq = self.selector.probe_sent(id, now);
            if let Some(n) = packet::build_echo(
                self.device,
                self.service,
                true,
                PROBE_ID,
                seq,
                b"sekisho-probe",
                &mut self.pkt,
            ) {
                encapsulate_to(&mut self.links[i], &self.pkt[..n], &mut self.net);
            }
        }
        if let Some(sw) = self.selector.tick(now) {
            self.switched(sw, now);
        }
        if now >= self.next_expire {
            self.next_expire = now + Duration::from_secs(1);
            self.recent
                .retain(|_, r| now.saturating_duration_since(r.at) < RECENT_FOR);
            self.metered.tick(now, self.unix_now * 1000);
            self.counters.flows = self.metered.counters.clone();
        }
        if now >= self.next_status {
            self.next_status = now + STATUS_EVERY;
            if let Some(i) = self
                .selector
                .active()
                .and_then(|id| self.links.iter().position(|l| l.id == id))
                && let Some(n) = packet::build_udp(
                    self.device,
                    STATUS_SPORT,
                    self.service,
                    STATUS_PORT,
                    b"status",
                    &mut self.pkt,
                )
            {
                encapsulate_to(&mut self.links[i], &self.pkt[..n], &mut self.net);
            }
        }
    }

    /// The broker in use changed: note it, and replay the latest small packet of each recent
    /// TCP flow through the new one.
    fn switched(&mut self, sw: Switch, now: Instant) {
        let name = |id: Option<BrokerId>| {
            id.and_then(|id| self.links.iter().find(|l| l.id == id))
                .map(|l| display_name(&l.info))
        };
        let (from, to) = (name(sw.from), name(sw.to));
        match sw.to {
            Some(_) => info!(
                from = from.as_deref().unwrap_or("-"),
                to = to.as_deref().unwrap_or("-"),
                reason = %sw.reason,
                "broker switch"
            ),
            None => warn!(
                from = from.as_deref().unwrap_or("-"),
                reason = %sw.reason,
                "no broker answers: traffic is held until one does"
            ),
        }
        if self.switches.len() == SWITCHES_KEPT {
            self.switches.pop_front();
        }
        self.switches.push_back(SwitchView {
            at: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(self.unix_now),
            )
            .to_string(),
            from,
            to,
            reason: sw.reason.to_string(),
        });
        self.next_status = now;
        if let Some(i) = sw
            .to
            .and_then(|id| self.links.iter().position(|l| l.id == id))
        {
            let mut replayed = 0;
            for r in self.recent.values() {
                if now.saturating_duration_since(r.at) < RECENT_FOR {
                    encapsulate_to(&mut self.links[i], &r.buf[..r.len], &mut self.net);
                    replayed += 1;
                }
            }
            if replayed > 0 {
                debug!(
                    replayed,
                    "latest packets of recent flows sent through the new broker"
                );
            }
        }
    }

    /// The state for `status`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let sel = self.selector.snapshot(now);
        let active = self.selector.active();
        let brokers: Vec<BrokerView> = self
            .links
            .iter()
            .map(|l| {
                let st = sel.iter().find(|s| s.id == l.id);
                BrokerView {
                    name: display_name(&l.info),
                    endpoint: l.info.endpoint.clone(),
                    address: l.addr,
                    state: if l.retired {
                        "retired".into()
                    } else {
                        st.map(|s| s.state)
                            .unwrap_or(Liveness::Connecting)
                            .to_string()
                    },
                    active: active == Some(l.id),
                    rtt_ms: st.and_then(|s| s.rtt_ms),
                    last_answer_ago_ms: st.and_then(|s| s.last_answer_ago_ms),
                    posture_accepted: l.token_accepted.is_some() && l.token_accepted == self.token,
                    seconds_since_handshake: l.session.time_since_handshake().map(|d| d.as_secs()),
                }
            })
            .collect();
        let status = active
            .and_then(|id| self.links.iter().find(|l| l.id == id))
            .and_then(|l| l.status.clone());
        Snapshot {
            connected: active.is_some(),
            active: brokers.iter().find(|b| b.active).map(|b| b.name.clone()),
            brokers,
            switches: self.switches.clone(),
            broker_status: status,
            counters: self.counters.clone(),
            dropped_no_broker: self.counters.drops.no_broker,
            kernel: KernelDrops::default(),
        }
    }
}

/// Encrypts `pkt` for the broker of `l` into `net`; false when it could not.
fn encapsulate_to(l: &mut Link, pkt: &[u8], net: &mut DatagramQueue) -> bool {
    let Some(addr) = l.addr else { return false };
    let room = (pkt.len() + mtu::WIREGUARD_OVERHEAD as usize).max(crate::wg::MIN_BUFFER);
    match l.session.encapsulate(pkt, net.reserve(room)) {
        Output::Network(d) => {
            let n = d.len();
            net.commit(addr, n);
            true
        }
        _ => false,
    }
}

fn display_name(b: &BrokerInfo) -> String {
    if b.name.is_empty() {
        b.endpoint.clone()
    } else {
        b.name.clone()
    }
}

/// False for what the kernel sends on any interface but that no overlay can carry: multicast
/// and link-local traffic (IPv6 router solicitations, MLD reports).
fn routable(pkt: &[u8]) -> bool {
    match packet::addresses(pkt) {
        Ok((_, IpAddr::V4(d))) => !d.is_multicast() && !d.is_broadcast() && !d.is_link_local(),
        Ok((_, IpAddr::V6(d))) => !d.is_multicast() && !d.is_unicast_link_local(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{
        Assignment, BrokerState, Routed, Transmit as BrokerTransmit, WorkerConfig, WorkerId,
    };
    use crate::flow::IdleTimeouts;
    use crate::packet::testpkt::tcp4;
    use crate::policy::Policy;
    use std::sync::Arc;

    /// A client and one broker worker, connected by an in-memory "network".
    struct Pair {
        client: ClientState,
        broker: BrokerState,
        broker_key: PrivateKey,
        client_addr: SocketAddr,
        broker_addr: SocketAddr,
        now: Instant,
        /// Packets the broker sent to its link, and packets the client's apps got.
        to_site: Vec<Vec<u8>>,
        to_apps: Vec<Vec<u8>>,
        gso_trains: usize,
    }

    impl Pair {
        fn new() -> Pair {
            let ck = PrivateKey::generate();
            let bk = PrivateKey::generate();
            let policy = format!(
                "[[users]]\nname = \"a\"\n[[devices]]\nname = \"d\"\nuser = \"a\"\npublic_key = \"{}\"\naddress = \"100.118.0.2\"\n[[sites]]\nname = \"s\"\n[[applications]]\nname = \"app\"\nsite = \"s\"\naddresses = [\"10.20.0.10\"]\nprotocols = [\"tcp\"]\n[[rules]]\nname = \"r\"\naction = \"allow\"\nusers = [\"a\"]\napplications = [\"app\"]\n",
                ck.public()
            );
            let policy = Arc::new(Policy::parse(std::path::Path::new("p.toml"), &policy).unwrap());
            let assignment = Arc::new(Assignment::new(1).next(&policy));
            let now = Instant::now();
            let mut broker = BrokerState::new(
                bk.clone(),
                WorkerConfig {
                    worker: WorkerId(0),
                    name: "b".into(),
                    timeouts: IdleTimeouts::default(),
                    max_flows: 100,
                    max_flows_per_device: 100,
                    overlay_mtu: 1360,
                },
                policy,
                assignment,
                now,
            );
            broker.link_up(crate::broker::LinkId(1), "s", "c", 1400);
            let service: IpAddr = "100.118.0.1".parse().unwrap();
            let mut client = ClientState::new(ck, 25, "100.118.0.2".parse().unwrap(), service, now);
            let broker_addr: SocketAddr = "10.99.2.2:51820".parse().unwrap();
            client.set_brokers(
                &[BrokerInfo {
                    endpoint: "b:51820".into(),
                    public_key: bk.public().to_string(),
                    name: "b".into(),
                    api_url: String::new(),
                }],
                now,
            );
            assert_eq!(client.unresolved(), vec!["b:51820".to_string()]);
            client.set_address("b:51820", broker_addr);
            Pair {
                client,
                broker,
                broker_key: bk,
                client_addr: "10.99.1.2:40000".parse().unwrap(),
                broker_addr,
                now,
                to_site: Vec::new(),
                to_apps: Vec::new(),
                gso_trains: 0,
            }
        }

        /// Moves everything both sides want to send until neither has more.
        fn run(&mut self) {
            loop {
                let mut moved = false;
                let mut to_broker = Vec::new();
                while let Some(t) = self.client.poll_transmit() {
                    moved = true;
                    match t {
                        Transmit::Network(d) => {
                            assert_eq!(d.to, self.broker_addr);
                            if d.segment_size.is_some() {
                                self.gso_trains += 1;
                            }
                            let seg = d.segment_size.unwrap_or(d.contents.len());
                            to_broker.extend(d.contents.chunks(seg).map(<[u8]>::to_vec));
                        }
                        Transmit::Tun(p) => self.to_apps.push(p.to_vec()),
                    }
                }
                for d in to_broker {
                    assert_eq!(
                        self.broker.handle_wg(self.client_addr, &d, self.now),
                        Routed::Here
                    );
                }
                let mut to_client = Vec::new();
                while let Some(t) = self.broker.poll_transmit() {
                    moved = true;
                    match t {
                        BrokerTransmit::Peer(d) => {
                            let seg = d.segment_size.unwrap_or(d.contents.len());
                            to_client.extend(d.contents.chunks(seg).map(<[u8]>::to_vec));
                        }
                        BrokerTransmit::Link { packet, .. } => self.to_site.push(packet.to_vec()),
                        BrokerTransmit::Egress(_) => panic!("no egress here"),
                    }
                }
                while self.broker.poll_event().is_some() {}
                for d in to_client {
                    self.client.handle_network(self.broker_addr, &d, self.now);
                }
                if !moved {
                    break;
                }
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.client.handle_timeout(self.now, 1_000_000);
            self.broker.handle_timeout(self.now, 1_000_000);
            self.run();
        }
    }

    #[test]
    fn a_restarted_broker_gets_a_new_handshake_and_traffic_within_two_seconds() {
        let mut p = Pair::new();
        for _ in 0..10 {
            p.advance(Duration::from_millis(60));
        }
        assert!(p.client.snapshot(p.now).connected);
        // The broker restarts: same key, no sessions.
        let policy = p.broker.policy().clone();
        let assignment = Arc::new(Assignment::new(1).next(&policy));
        p.broker = BrokerState::new(
            p.broker_key.clone(),
            WorkerConfig {
                worker: WorkerId(0),
                name: "b".into(),
                timeouts: IdleTimeouts::default(),
                max_flows: 100,
                max_flows_per_device: 100,
                overlay_mtu: 1360,
            },
            policy,
            assignment,
            p.now,
        );
        p.broker.link_up(crate::broker::LinkId(1), "s", "c", 1400);
        let restarted = p.now;
        let mut seg = tcp4([100, 118, 0, 2], 4000, [10, 20, 0, 10], 80, 0x10, 1);
        let mut back = None;
        for _ in 0..60 {
            p.advance(Duration::from_millis(50));
            seg[24] = seg[24].wrapping_add(1);
            p.client.handle_tun(&seg, p.now);
            p.run();
            if !p.to_site.is_empty() {
                back = Some(p.now - restarted);
                break;
            }
        }
        let gap = back.expect("traffic came back");
        assert!(gap <= Duration::from_secs(2), "back after {gap:?}");
    }

    #[test]
    fn a_burst_goes_out_as_one_gso_train_and_replies_reach_the_apps() {
        let mut p = Pair::new();
        // Handshake, then the first probe makes the broker the active one.
        for _ in 0..10 {
            p.advance(Duration::from_millis(60));
        }
        assert!(
            p.client.snapshot(p.now).connected,
            "the broker answers probes"
        );
        // A burst of full-size segments: one GSO train, all at the site.
        let mut seg = tcp4([100, 118, 0, 2], 4000, [10, 20, 0, 10], 80, 0x10, 1);
        seg.resize(1360, 0);
        seg[2..4].copy_from_slice(&1360u16.to_be_bytes());
        for _ in 0..40 {
            p.client.handle_tun(&seg, p.now);
        }
        let trains_before = p.gso_trains;
        p.run();
        assert_eq!(p.gso_trains, trains_before + 1);
        assert_eq!(p.to_site.len(), 40);
        assert!(p.to_site.iter().all(|s| *s == seg));
        // A reply from the site comes out of the client's TUN side, byte for byte.
        let reply = tcp4([10, 20, 0, 10], 80, [100, 118, 0, 2], 4000, 0x10, 7);
        p.broker
            .handle_link_packet(crate::broker::LinkId(1), &reply, p.now);
        p.run();
        assert_eq!(p.to_apps, vec![reply]);
        let c = p.client.counters();
        assert_eq!((c.to_brokers.packets, c.from_brokers.packets), (40, 1));
        // The laptop's side of the flow: a reset from the app ends it, and its record says
        // what went each way, matching the broker's count.
        let rst = tcp4([10, 20, 0, 10], 80, [100, 118, 0, 2], 4000, 0x04, 8);
        p.broker
            .handle_link_packet(crate::broker::LinkId(1), &rst, p.now);
        p.run();
        let r = p
            .client
            .poll_flow_report()
            .expect("a record at the TCP end");
        assert_eq!(r.end, crate::flow::FlowEnd::Closed);
        assert_eq!(
            (
                r.traffic.packets_out,
                r.traffic.bytes_out,
                r.traffic.packets_in
            ),
            (40, 40 * 1360, 2)
        );
        assert_eq!(r.key.dport, 80);
        assert!(p.client.poll_flow_report().is_none());
        assert_eq!(p.client.counters().flows.records, 1);
        // Multicast is not carried, and counted.
        let mut mc = tcp4([100, 118, 0, 2], 1, [224, 0, 0, 1], 2, 0x02, 0);
        p.client.handle_tun(&mc, p.now);
        mc.clear();
        assert_eq!(p.client.counters().drops.not_routable, 1);
    }
}
