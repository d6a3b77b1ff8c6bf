//! The client's data plane: one WireGuard session to every broker, one of them carrying the
//! traffic. Which one is [`Selector`]'s decision, from in-tunnel echo probes (RTT and
//! liveness); switching is only a change of session, so a failover costs no handshake. The
//! posture token is presented on every session, so the next broker already knows the device
//! when traffic moves there, and flows (TCP included) carry on.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use sekisho_proto::api::{BrokerInfo, STATUS_PORT, TunnelStatus};
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_proto::packet;
use sekisho_proto::posture::{POSTURE_PORT, TokenAnswer};
use sekisho_proto::select::{BrokerId, BrokerState, Selector, SelectorConfig};
use sekisho_proto::wg::{Output, Session, WireGuardError};

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

/// A flow's latest small outbound packet.
struct Recent {
    at: Instant,
    len: usize,
    buf: [u8; RECENT_MAX_LEN],
}

/// What the rest of the client tells the data plane.
pub enum Command {
    /// A new posture token: present it to every broker.
    Token(String),
    /// The brokers the control plane lists now.
    Brokers(Vec<BrokerInfo>),
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

/// The data plane's state for `status`, updated every tick.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Snapshot {
    pub connected: bool,
    pub active: Option<String>,
    pub brokers: Vec<BrokerView>,
    pub switches: VecDeque<SwitchView>,
    /// What the broker in use says: latest denials, posture it holds.
    pub broker_status: Option<TunnelStatus>,
    pub packets_in: u64,
    /// Packets from apps dropped because no broker was up.
    pub dropped_no_broker: u64,
}

pub type SnapshotRef = Arc<Mutex<Snapshot>>;

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

pub struct DataPlane {
    key: PrivateKey,
    keepalive: u16,
    device: IpAddr,
    service: IpAddr,
    links: Vec<Link>,
    selector: Selector,
    token: Option<String>,
    snapshot: SnapshotRef,
    next_status: Instant,
    packets_in: u64,
    dropped_no_broker: u64,
    recent: std::collections::HashMap<packet::FlowKey, Recent>,
    next_expire: Instant,
    out: Vec<u8>,
    pkt: Vec<u8>,
}

/// A UDP datagram to send.
type Send = (SocketAddr, Vec<u8>);

impl DataPlane {
    pub fn new(
        key: PrivateKey,
        keepalive: u16,
        device: IpAddr,
        service: IpAddr,
        snapshot: SnapshotRef,
    ) -> Self {
        DataPlane {
            key,
            keepalive,
            device,
            service,
            links: Vec::new(),
            selector: Selector::new(SelectorConfig::default()),
            token: None,
            snapshot,
            next_status: Instant::now(),
            packets_in: 0,
            dropped_no_broker: 0,
            recent: std::collections::HashMap::new(),
            next_expire: Instant::now(),
            out: vec![0u8; 65536 + 64],
            pkt: vec![0u8; 4096],
        }
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

    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
        for l in &mut self.links {
            l.token_sent = None;
        }
    }

    /// Resolves endpoints that have no address yet (or again, after `retry`).
    pub async fn resolve(&mut self) {
        for l in &mut self.links {
            if l.addr.is_none() && !l.retired {
                match tokio::net::lookup_host(&l.info.endpoint).await {
                    Ok(mut a) => l.addr = a.next(),
                    Err(e) => debug!(endpoint = %l.info.endpoint, "cannot resolve broker: {e}"),
                }
            }
        }
    }

    /// A packet from an app: the datagram to send through the broker in use (no copy).
    pub fn handle_tun(&mut self, pkt: &[u8], now: Instant) -> Option<(SocketAddr, &[u8])> {
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
            self.dropped_no_broker += 1;
            return None;
        };
        let addr = l.addr?;
        match l.session.encapsulate(pkt, &mut self.out) {
            Output::Network(d) => Some((addr, d)),
            Output::Error(e) => {
                debug!(?e, "cannot encapsulate");
                None
            }
            _ => None,
        }
    }

    /// A datagram from the network. Returns the inner packet for the TUN device, if any (no
    /// copy); handshake answers go to `sends`.
    pub fn handle_network(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
        sends: &mut Vec<Send>,
    ) -> Option<&[u8]> {
        let i = self.links.iter().position(|l| l.addr == Some(from))?;
        let mut handshake_msg = false;
        let mut inner_len = None;
        match self.links[i]
            .session
            .decapsulate(Some(from.ip()), data, &mut self.out)
        {
            Output::Network(d) => {
                sends.push((from, d.to_vec()));
                handshake_msg = true;
                while let Output::Network(d) = self.links[i].session.flush(&mut self.out) {
                    sends.push((from, d.to_vec()));
                }
            }
            Output::Tunnel(p) => inner_len = Some(p.len()),
            Output::Done => handshake_msg = true,
            Output::Error(e) => debug!(?e, "datagram rejected"),
        }
        if handshake_msg {
            self.check_handshake(i, now, sends);
        }
        let n = inner_len?;
        self.packets_in += 1;
        // Answers to the client's own requests come from the service address; rare, so the
        // copy does not matter.
        if packet::addresses(&self.out[..n])
            .is_ok_and(|(s, d)| s == self.service && d == self.device)
        {
            let p = self.out[..n].to_vec();
            if self.service_answer(i, &p, now) {
                return None;
            }
        }
        Some(&self.out[..n])
    }

    /// Takes the answers to the client's own probes, token and status requests; false for
    /// anything else (it goes to the TUN device).
    fn service_answer(&mut self, i: usize, p: &[u8], now: Instant) -> bool {
        let Ok((src, dst)) = packet::addresses(p) else {
            return false;
        };
        if src != self.service || dst != self.device {
            return false;
        }
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
    fn check_handshake(&mut self, i: usize, now: Instant, sends: &mut Vec<Send>) {
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
            self.send_token(i, now, sends);
        }
    }

    fn send_token(&mut self, i: usize, now: Instant, sends: &mut Vec<Send>) {
        let Some(token) = self.token.clone() else {
            return;
        };
        let l = &mut self.links[i];
        l.token_sent = Some(now);
        if let Some(n) = packet::build_udp(
            self.device,
            TOKEN_SPORT,
            self.service,
            POSTURE_PORT,
            token.as_bytes(),
            &mut self.pkt,
        ) {
            encapsulate_to(l, &self.pkt[..n], &mut self.out, sends);
        }
    }

    /// Timers: WireGuard upkeep, handshake retries, probes, broker choice, token and status.
    pub fn tick(&mut self, now: Instant, sends: &mut Vec<Send>) {
        for i in 0..self.links.len() {
            if self.links[i].retired {
                continue;
            }
            let mut out = std::mem::take(&mut self.out);
            let l = &mut self.links[i];
            match l.session.tick(&mut out) {
                Output::Network(d) => {
                    if let Some(a) = l.addr {
                        sends.push((a, d.to_vec()));
                    }
                }
                Output::Error(WireGuardError::ConnectionExpired) => {
                    if l.handshake_at.take().is_some() {
                        warn!(broker = %display_name(&l.info), "session to broker expired; retrying");
                    }
                    if now >= l.next_retry {
                        l.next_retry = now + HANDSHAKE_RETRY;
                        if let (Some(a), Output::Network(d)) =
                            (l.addr, l.session.initiate(&mut out, true))
                        {
                            sends.push((a, d.to_vec()));
                        }
                    }
                }
                _ => {}
            }
            if l.session.time_since_handshake().is_none() && l.handshake_at.is_none() {
                // Never connected yet: keep asking (the engine gives up after a while).
                if now >= l.next_retry {
                    l.next_retry = now + HANDSHAKE_RETRY;
                    if let (Some(a), Output::Network(d)) =
                        (l.addr, l.session.initiate(&mut out, false))
                    {
                        sends.push((a, d.to_vec()));
                    }
                }
            }
            self.out = out;
            self.check_handshake(i, now, sends);
            let l = &self.links[i];
            if l.handshake_at.is_some()
                && self.token.is_some()
                && l.token_accepted != self.token
                && l.token_sent.is_none_or(|t| now >= t + TOKEN_RETRY)
            {
                self.send_token(i, now, sends);
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
                encapsulate_to(&mut self.links[i], &self.pkt[..n], &mut self.out, sends);
            }
        }
        if let Some(sw) = self.selector.tick(now) {
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
            let view = SwitchView {
                at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                from,
                to,
                reason: sw.reason.to_string(),
            };
            self.snapshot_mut(|s| {
                if s.switches.len() == SWITCHES_KEPT {
                    s.switches.pop_front();
                }
                s.switches.push_back(view);
            });
            self.next_status = now;
            if let Some(i) = sw
                .to
                .and_then(|id| self.links.iter().position(|l| l.id == id))
            {
                let mut replayed = 0;
                for r in self.recent.values() {
                    if now.saturating_duration_since(r.at) < RECENT_FOR {
                        encapsulate_to(&mut self.links[i], &r.buf[..r.len], &mut self.out, sends);
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
        if now >= self.next_expire {
            self.next_expire = now + Duration::from_secs(5);
            self.recent
                .retain(|_, r| now.saturating_duration_since(r.at) < RECENT_FOR);
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
                encapsulate_to(&mut self.links[i], &self.pkt[..n], &mut self.out, sends);
            }
        }
        self.publish(now);
    }

    /// The brokers' endpoints (the kill switch lets these through).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.links.iter().filter_map(|l| l.addr).collect()
    }

    fn snapshot_mut(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.snapshot.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn publish(&self, now: Instant) {
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
                            .unwrap_or(BrokerState::Connecting)
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
        let (packets_in, dropped) = (self.packets_in, self.dropped_no_broker);
        self.snapshot_mut(|s| {
            s.packets_in = packets_in;
            s.dropped_no_broker = dropped;
            s.connected = active.is_some();
            s.active = brokers.iter().find(|b| b.active).map(|b| b.name.clone());
            s.brokers = brokers;
            s.broker_status = status;
        });
    }
}

fn encapsulate_to(l: &mut Link, pkt: &[u8], out: &mut [u8], sends: &mut Vec<Send>) {
    let Some(addr) = l.addr else { return };
    if let Output::Network(d) = l.session.encapsulate(pkt, out) {
        sends.push((addr, d.to_vec()));
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

/// Runs the data plane: TUN device, the UDP socket, timers and commands, until an error.
pub async fn run(
    mut dp: DataPlane,
    tun: &sekisho_proto::sys::AsyncDevice,
    udp: &UdpSocket,
    mut commands: mpsc::Receiver<Command>,
    endpoints: tokio::sync::watch::Sender<Vec<SocketAddr>>,
) -> anyhow::Result<()> {
    let mut tun_buf = vec![0u8; 65536];
    let mut net_buf = vec![0u8; 65536];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut resolve_tick = tokio::time::interval(Duration::from_secs(5));
    let mut sends: Vec<Send> = Vec::new();
    dp.resolve().await;
    loop {
        tokio::select! {
            r = tun.recv(&mut tun_buf) => match r {
                Ok(n) if routable(&tun_buf[..n]) => {
                    if let Some((to, d)) = dp.handle_tun(&tun_buf[..n], Instant::now()) {
                        let _ = udp.send_to(d, to).await;
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("TUN read error: {e}"),
            },
            r = udp.recv_from(&mut net_buf) => match r {
                Ok((n, from)) => {
                    if let Some(p) = dp.handle_network(from, &net_buf[..n], Instant::now(), &mut sends)
                        && let Err(e) = tun.send(p).await
                    {
                        debug!("TUN write error: {e}");
                    }
                }
                Err(e) => debug!("UDP receive error: {e}"),
            },
            _ = tick.tick() => dp.tick(Instant::now(), &mut sends),
            _ = resolve_tick.tick() => {
                dp.resolve().await;
                let eps = dp.endpoints();
                endpoints.send_if_modified(|old| if *old != eps { *old = eps; true } else { false });
            }
            Some(c) = commands.recv() => match c {
                Command::Token(t) => dp.set_token(t),
                Command::Brokers(b) => {
                    dp.set_brokers(&b, Instant::now());
                    dp.resolve().await;
                    let eps = dp.endpoints();
                    endpoints.send_if_modified(|old| if *old != eps { *old = eps; true } else { false });
                }
            },
        }
        for (to, d) in sends.drain(..) {
            let _ = udp.send_to(&d, to).await;
        }
    }
}
