//! One data-plane worker: a thread with its own single-threaded runtime that owns its
//! [`BrokerState`] outright and `select!`s over its WireGuard socket, its input queue (link,
//! egress, handover), its commands and its timer. After every turn it drains the state's
//! transmits (GSO trains to devices, packets to links and egress) and events (decision log,
//! name mappings).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, error};

use sekisho_proto::broker::{BrokerState, Event, LinkId, PeerSlot, Routed, Transmit};
use sekisho_proto::link::SiteMessage;
use sekisho_sys::link::{LinkSender, Sent};
use sekisho_sys::udp::{BatchUdp, RecvBatch};

use super::{WorkerCommand, WorkerInput, WorkerView};
use crate::log::LogLine;

/// Input batches taken at once before the output is flushed.
const INPUTS_PER_TURN: usize = 32;

/// What a worker runs with.
pub(super) struct Context {
    pub socket: std::net::UdpSocket,
    pub commands: mpsc::UnboundedReceiver<WorkerCommand>,
    pub inputs: mpsc::Receiver<WorkerInput>,
    /// Every worker's input queue (this one's included), for handovers.
    pub peers: Vec<mpsc::Sender<WorkerInput>>,
    pub log: mpsc::Sender<LogLine>,
    pub egress: Option<mpsc::Sender<Vec<Bytes>>>,
    pub runtime: tokio::runtime::Handle,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The worker thread's body.
pub(super) fn run(state: BrokerState, ctx: Context) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start a data-plane worker's runtime: {e}");
            return;
        }
    };
    rt.block_on(worker(state, ctx));
}

async fn worker(mut state: BrokerState, ctx: Context) {
    let Context {
        socket,
        mut commands,
        mut inputs,
        peers,
        log,
        egress,
        runtime,
    } = ctx;
    let sinks = Sinks {
        peers,
        log,
        egress,
        runtime,
    };
    let udp = match BatchUdp::from_std(socket, 0) {
        Ok(u) => u,
        Err(e) => {
            error!("data-plane worker cannot use its socket: {e}");
            return;
        }
    };
    state.set_max_segments(udp.max_segments());
    let mut batch = RecvBatch::default();
    let mut links: HashMap<LinkId, LinkSender> = HashMap::new();
    let mut out = Output::new(sinks.peers.len());
    loop {
        let wake = state
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            biased;
            c = commands.recv() => match c {
                Some(c) => command(&mut state, &mut links, &udp, c),
                None => return,
            },
            r = udp.recv(&mut batch) => match r {
                Ok(_) => {
                    let now = Instant::now();
                    for (from, d) in batch.datagrams() {
                        if let Routed::Worker(w, slot) = state.handle_wg(from, d, now) {
                            out.handover[w.0 as usize].push((slot, from, Bytes::copy_from_slice(d)));
                        }
                    }
                }
                Err(e) => debug!("WireGuard socket receive error: {e}"),
            },
            i = inputs.recv() => {
                let mut next = i;
                let mut taken = 0;
                let now = Instant::now();
                while let Some(input) = next.take() {
                    match input {
                        WorkerInput::Link { link, packets } => {
                            for p in &packets {
                                state.handle_link_packet(link, p, now);
                            }
                        }
                        WorkerInput::Egress(packets) => {
                            for p in &packets {
                                state.handle_egress_packet(p, now);
                            }
                        }
                        WorkerInput::Handover(datagrams) => {
                            for (slot, from, d) in &datagrams {
                                state.handle_handover(*slot, *from, d, now);
                            }
                        }
                    }
                    taken += 1;
                    if taken < INPUTS_PER_TURN {
                        next = inputs.try_recv().ok();
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                state.handle_timeout(Instant::now(), unix_now());
            }
        }
        out.flush(&mut state, &udp, &links, &sinks).await;
    }
}

/// Applies a command from the control side.
fn command(
    state: &mut BrokerState,
    links: &mut HashMap<LinkId, LinkSender>,
    udp: &BatchUdp,
    c: WorkerCommand,
) {
    match c {
        WorkerCommand::SetPolicy(p, a) => state.set_policy(p, a),
        WorkerCommand::TokenKeys(v) => state.set_token_keys(v),
        WorkerCommand::SetRisk(key, status) => state.set_risk(key, status),
        WorkerCommand::LinkUp {
            link,
            site,
            connector,
            sender,
        } => {
            state.link_up(link, &site, &connector, sender.max_datagram());
            links.insert(link, sender);
        }
        WorkerCommand::LinkDown(link) => {
            links.remove(&link);
            state.link_down(link);
        }
        WorkerCommand::LinkStale(link, stale) => state.link_stale(link, stale),
        WorkerCommand::LinkHealth(link, draining, unreachable) => {
            state.link_health(link, draining, &unreachable)
        }
        WorkerCommand::HoldConnectors(names) => state.hold_connectors(names),
        WorkerCommand::LinkMtu(link, max) => state.link_mtu(link, max),
        WorkerCommand::Totals(online, tx) => {
            let _ = tx.send(state.totals(online));
        }
        WorkerCommand::Snapshot(tx) => {
            let _ = tx.send(WorkerView {
                worker: state.worker(),
                state: state.snapshot(),
                socket_drops: udp.drops(),
            });
        }
    }
}

/// Where a worker's output goes besides its socket and the links.
struct Sinks {
    peers: Vec<mpsc::Sender<WorkerInput>>,
    log: mpsc::Sender<LogLine>,
    egress: Option<mpsc::Sender<Vec<Bytes>>>,
    runtime: tokio::runtime::Handle,
}

/// Output gathered over a turn.
struct Output {
    handover: Vec<Vec<(PeerSlot, SocketAddr, Bytes)>>,
    egress: Vec<Bytes>,
}

impl Output {
    fn new(workers: usize) -> Output {
        Output {
            handover: vec![Vec::new(); workers],
            egress: Vec::new(),
        }
    }

    async fn flush(
        &mut self,
        state: &mut BrokerState,
        udp: &BatchUdp,
        links: &HashMap<LinkId, LinkSender>,
        ctx: &Sinks,
    ) {
        let (mut congested, mut too_large, mut closed, mut no_egress) = (0u64, 0, 0, 0);
        let mut send_failed = 0u64;
        while let Some(t) = state.poll_transmit() {
            match t {
                Transmit::Peer(d) => {
                    if let Err(e) = udp.send(d.to, d.contents, d.segment_size).await {
                        debug!("WireGuard send failed: {e}");
                        send_failed +=
                            d.segment_size.map_or(1, |s| d.contents.len().div_ceil(s)) as u64;
                    }
                }
                Transmit::Link { link, packet } => match links.get(&link) {
                    Some(l) => match l.send(packet) {
                        Sent::Queued => {}
                        Sent::Congested => congested += 1,
                        Sent::TooLarge => too_large += 1,
                        Sent::Closed => closed += 1,
                    },
                    None => closed += 1,
                },
                Transmit::Egress(p) => self.egress.push(p),
            }
        }
        if !self.egress.is_empty() {
            let batch = std::mem::take(&mut self.egress);
            let n = batch.len() as u64;
            match &ctx.egress {
                Some(tx) => {
                    if tx.try_send(batch).is_err() {
                        no_egress += n;
                    }
                }
                None => no_egress += n,
            }
        }
        let mut unlogged = 0u64;
        while let Some(e) = state.poll_event() {
            match e {
                Event::MapName {
                    link,
                    device,
                    synthetic,
                    name,
                    deny,
                } => {
                    if let Some(l) = links.get(&link).cloned() {
                        let msg = SiteMessage::MapName {
                            device,
                            synthetic,
                            name,
                            deny,
                        };
                        ctx.runtime.spawn(async move {
                            let bytes = serde_json::to_vec(&msg).unwrap_or_default();
                            if let Err(e) = l.send_message(&bytes).await {
                                debug!("cannot send a name mapping to the connector: {e}");
                            }
                        });
                    }
                }
                Event::Decision(r) => {
                    debug!(?r, "flow decision");
                    if ctx.log.try_send(LogLine::Decision(r)).is_err() {
                        unlogged += 1;
                    }
                }
                Event::Posture(r) => {
                    debug!(?r, "posture event");
                    if ctx.log.try_send(LogLine::Posture(r)).is_err() {
                        unlogged += 1;
                    }
                }
                Event::AppDns(r) => {
                    debug!(?r, "application name query");
                    if ctx.log.try_send(LogLine::AppDns(r)).is_err() {
                        unlogged += 1;
                    }
                }
                Event::Summary(r) => {
                    if ctx.log.try_send(LogLine::Summary(r)).is_err() {
                        unlogged += 1;
                    }
                }
                Event::Flow(r) => {
                    if ctx.log.try_send(LogLine::Flow(r)).is_err() {
                        unlogged += 1;
                    }
                }
            }
        }
        let mut queue_full = 0u64;
        for (w, items) in self.handover.iter_mut().enumerate() {
            if items.is_empty() {
                continue;
            }
            let batch = std::mem::take(items);
            let n = batch.len() as u64;
            if ctx.peers[w].try_send(WorkerInput::Handover(batch)).is_err() {
                queue_full += n;
            }
        }
        if congested + too_large + closed + no_egress + unlogged + queue_full + send_failed > 0 {
            state.count_drops(|d| {
                d.send_failed += send_failed;
                d.link_congested += congested;
                d.too_large += too_large;
                d.link_closed += closed;
                d.no_egress += no_egress;
                d.decisions_not_logged += unlogged;
                d.worker_queue_full += queue_full;
            });
        }
    }
}
