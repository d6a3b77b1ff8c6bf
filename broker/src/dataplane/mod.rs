//! The broker's data plane: one worker thread per core, each owning a [`BrokerState`] with its
//! shard of the devices and its own WireGuard socket (`SO_REUSEPORT`, steered by session
//! index, so a device's datagrams reach its worker without a hop). Connector links and
//! internet egress are read by tasks on the main runtime that hand each packet to the worker
//! of its device. Control changes reach the workers as commands; readers (stats, metrics, the
//! control plane) ask the workers for snapshots. No lock is shared with the packet path.

pub mod egress;
pub mod links;
pub mod shield;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use sekisho_proto::broker::{
    Assignment, Counters, LinkId, LinkInfo, PeerInfo, PeerSlot, Snapshot as WorkerSnapshot,
    WorkerConfig, WorkerId,
};
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_proto::policy::Policy;
use sekisho_proto::posture::{PostureClaims, TokenVerifier};
use sekisho_sys::link::LinkSender;
use sekisho_sys::udp::steer_by_session;

use crate::log::LogLine;

/// Input batches queued per worker before link and egress readers wait.
const INPUT_QUEUE: usize = 1024;
/// The WireGuard sockets' buffers.
const WG_SOCKET_BUFFER: usize = 16 << 20;

/// Packets for a worker, from the tasks that read links and egress, or from another worker.
pub enum WorkerInput {
    /// From the connector on `link`, for devices of this worker.
    Link { link: LinkId, packets: Vec<Bytes> },
    /// From the internet (egress interface), for devices of this worker.
    Egress(Vec<Bytes>),
    /// Datagrams that arrived at another worker's socket for a device (slot) of this one;
    /// that worker applied the handshake defence.
    Handover(Vec<(PeerSlot, SocketAddr, Bytes)>),
}

/// Changes and questions for a worker.
pub enum WorkerCommand {
    SetPolicy(Arc<Policy>, Arc<Assignment>),
    TokenKeys(TokenVerifier),
    /// A device's risk (None: nothing held against it).
    SetRisk(PublicKeyBytes, Option<Arc<sekisho_proto::api::RiskStatus>>),
    LinkUp {
        link: LinkId,
        site: String,
        connector: String,
        sender: LinkSender,
    },
    LinkDown(LinkId),
    LinkStale(LinkId, bool),
    LinkHealth(LinkId, bool, Vec<String>),
    /// The connectors an admin drained, by name.
    HoldConnectors(std::collections::BTreeSet<String>),
    LinkMtu(LinkId, usize),
    Snapshot(oneshot::Sender<WorkerView>),
    /// Counters, open flows and peers online, copying no peer (the console's sampler).
    Totals(Duration, oneshot::Sender<sekisho_proto::broker::Totals>),
}

/// One worker's answer to a snapshot request.
pub struct WorkerView {
    pub worker: WorkerId,
    pub state: WorkerSnapshot,
    /// Datagrams the kernel dropped on this worker's WireGuard socket (buffer full).
    pub socket_drops: Option<u64>,
}

#[derive(Clone)]
struct WorkerHandle {
    commands: mpsc::UnboundedSender<WorkerCommand>,
    inputs: mpsc::Sender<WorkerInput>,
}

/// A connector link as the control plane sees it.
#[derive(Clone)]
pub struct LinkEntry {
    pub site: String,
    pub connector: String,
    pub sender: LinkSender,
}

struct Registry {
    assignment: Arc<Assignment>,
    links: HashMap<LinkId, LinkEntry>,
}

/// Where the data plane's output goes besides the network.
pub struct Outputs {
    /// The decision log's writer.
    pub log: mpsc::Sender<LogLine>,
    /// Internet egress (full tunnel), when configured.
    pub egress: Option<mpsc::Sender<Vec<Bytes>>>,
    /// The main runtime (control messages to connectors are sent from there).
    pub runtime: tokio::runtime::Handle,
}

/// Settings of the data plane.
pub struct Settings {
    pub key: PrivateKey,
    pub listen: SocketAddr,
    pub workers: u16,
    pub worker: WorkerConfig,
}

/// The handle every other part of the broker uses: cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

struct Inner {
    workers: Vec<WorkerHandle>,
    registry: Mutex<Registry>,
    policy: watch::Sender<Arc<Policy>>,
    assignment: watch::Sender<Arc<Assignment>>,
    generation: std::sync::atomic::AtomicU64,
    public_key: PublicKeyBytes,
    overlay_mtu: u16,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The merged view of every worker.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub policy_generation: u64,
    pub flows: usize,
    pub counters: Counters,
    #[serde(skip)]
    pub decisions: BTreeMap<(&'static str, &'static str), u64>,
    pub peers: Vec<PeerInfo>,
    pub connectors: Vec<LinkInfo>,
    #[serde(skip)]
    pub postures: HashMap<PublicKeyBytes, PostureClaims>,
    pub workers: Vec<WorkerStats>,
}

/// One worker in the stats.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerStats {
    pub worker: u16,
    pub peers: usize,
    pub flows: usize,
    pub packets_from_clients: u64,
    /// The kernel's count of datagrams dropped on this worker's socket (buffer full).
    pub socket_drops: Option<u64>,
}

impl DataPlane {
    /// Binds the workers' sockets and starts the workers.
    pub fn start(settings: Settings, policy: Policy, outputs: Outputs) -> Result<DataPlane> {
        let workers = settings.workers.max(1);
        let policy = Arc::new(policy);
        let assignment = Arc::new(Assignment::new(workers).next(&policy));
        // Bound in worker order: the steering program names sockets by that order.
        let mut sockets = Vec::new();
        for _ in 0..workers {
            let s = bind_reuseport(settings.listen)
                .with_context(|| format!("cannot bind WireGuard UDP {}", settings.listen))?;
            sockets.push(s);
        }
        if workers > 1
            && let Err(e) = steer_by_session(&sockets[0], workers)
        {
            warn!(
                "cannot steer datagrams to their workers in the kernel ({e}); workers hand them over instead"
            );
        }
        let public_key = settings.key.public();
        let now = Instant::now();
        let mut handles = Vec::new();
        let mut parts = Vec::new();
        for _ in 0..workers {
            let (ctx, crx) = mpsc::unbounded_channel();
            let (itx, irx) = mpsc::channel(INPUT_QUEUE);
            handles.push(WorkerHandle {
                commands: ctx,
                inputs: itx,
            });
            parts.push((crx, irx));
        }
        let peers: Vec<mpsc::Sender<WorkerInput>> =
            handles.iter().map(|h| h.inputs.clone()).collect();
        for (w, ((crx, irx), socket)) in parts.into_iter().zip(sockets).enumerate() {
            let mut config = settings.worker.clone();
            config.worker = WorkerId(w as u16);
            config.max_flows = (config.max_flows / workers as usize).max(1);
            let state = sekisho_proto::broker::BrokerState::new(
                settings.key.clone(),
                config,
                policy.clone(),
                assignment.clone(),
                now,
            );
            let ctx = worker::Context {
                socket,
                commands: crx,
                inputs: irx,
                peers: peers.clone(),
                log: outputs.log.clone(),
                egress: outputs.egress.clone(),
                runtime: outputs.runtime.clone(),
            };
            std::thread::Builder::new()
                .name(format!("sekisho-dp{w}"))
                .spawn(move || worker::run(state, ctx))
                .context("cannot start a data-plane worker")?;
        }
        info!(workers, addr = %settings.listen, "WireGuard listening");
        Ok(DataPlane {
            inner: Arc::new(Inner {
                workers: handles,
                registry: Mutex::new(Registry {
                    assignment: assignment.clone(),
                    links: HashMap::new(),
                }),
                policy: watch::Sender::new(policy),
                assignment: watch::Sender::new(assignment),
                generation: std::sync::atomic::AtomicU64::new(1),
                public_key,
                overlay_mtu: settings.worker.overlay_mtu,
            }),
        })
    }

    pub fn public_key(&self) -> PublicKeyBytes {
        self.inner.public_key
    }

    /// The largest packet devices send.
    pub fn overlay_mtu(&self) -> u16 {
        self.inner.overlay_mtu
    }

    pub fn workers(&self) -> usize {
        self.inner.workers.len()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policy.borrow().clone()
    }

    /// Policy changes bump this.
    pub fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where devices live now (link and egress readers route by it).
    pub fn assignment(&self) -> watch::Receiver<Arc<Assignment>> {
        self.inner.assignment.subscribe()
    }

    fn broadcast(&self, make: impl Fn() -> WorkerCommand) {
        for w in &self.inner.workers {
            let _ = w.commands.send(make());
        }
    }

    /// Puts a policy in force: devices that stay keep their sessions, flows are decided anew
    /// on their next packet.
    pub fn set_policy(&self, policy: Policy) {
        let policy = Arc::new(policy);
        let assignment = {
            let mut r = lock(&self.inner.registry);
            r.assignment = Arc::new(r.assignment.next(&policy));
            r.assignment.clone()
        };
        self.broadcast(|| WorkerCommand::SetPolicy(policy.clone(), assignment.clone()));
        self.inner.policy.send_replace(policy);
        self.inner.assignment.send_replace(assignment);
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A device's risk from the risk engine: every worker keeps it (a policy change may move
    /// the device), the one holding the device re-decides its flows.
    pub fn set_risk(
        &self,
        key: PublicKeyBytes,
        status: Option<Arc<sekisho_proto::api::RiskStatus>>,
    ) {
        self.broadcast(|| WorkerCommand::SetRisk(key, status.clone()));
    }

    /// The keys posture tokens may be signed with.
    pub fn set_token_keys(&self, verifier: TokenVerifier) {
        self.broadcast(|| WorkerCommand::TokenKeys(verifier.clone()));
    }

    pub fn link_up(&self, link: LinkId, entry: LinkEntry) {
        self.broadcast(|| WorkerCommand::LinkUp {
            link,
            site: entry.site.clone(),
            connector: entry.connector.clone(),
            sender: entry.sender.clone(),
        });
        lock(&self.inner.registry).links.insert(link, entry);
    }

    pub fn link_down(&self, link: LinkId) {
        lock(&self.inner.registry).links.remove(&link);
        self.broadcast(|| WorkerCommand::LinkDown(link));
    }

    pub fn link_stale(&self, link: LinkId, stale: bool) {
        self.broadcast(|| WorkerCommand::LinkStale(link, stale));
    }

    pub fn link_health(&self, link: LinkId, draining: bool, unreachable: &[String]) {
        self.broadcast(|| WorkerCommand::LinkHealth(link, draining, unreachable.to_vec()));
    }

    /// The connectors an admin drained (all of them): their links get no new flows.
    pub fn hold_connectors(&self, names: std::collections::BTreeSet<String>) {
        self.broadcast(|| WorkerCommand::HoldConnectors(names.clone()));
    }

    pub fn link_mtu(&self, link: LinkId, max: usize) {
        self.broadcast(|| WorkerCommand::LinkMtu(link, max));
    }

    /// The live connector links.
    pub fn links(&self) -> Vec<(LinkId, LinkEntry)> {
        lock(&self.inner.registry)
            .links
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Hands packets to the worker of `worker`; waits while its queue is full.
    pub async fn input(&self, worker: WorkerId, input: WorkerInput) -> bool {
        match self.inner.workers.get(worker.0 as usize) {
            Some(w) => w.inputs.send(input).await.is_ok(),
            None => false,
        }
    }

    /// Asks every worker for its state and merges the answers.
    pub async fn view(&self) -> View {
        let mut answers = Vec::new();
        for w in &self.inner.workers {
            let (tx, rx) = oneshot::channel();
            if w.commands.send(WorkerCommand::Snapshot(tx)).is_ok() {
                answers.push(rx);
            }
        }
        let mut v = View {
            policy_generation: self.generation(),
            ..Default::default()
        };
        let mut links: BTreeMap<LinkId, LinkInfo> = BTreeMap::new();
        for rx in answers {
            let Ok(Ok(w)) = tokio::time::timeout(Duration::from_secs(2), rx).await else {
                warn!("a data-plane worker did not answer a snapshot request");
                continue;
            };
            let s = w.state;
            v.flows += s.flows;
            v.counters.merge(&s.counters);
            for (k, n) in s.decisions {
                *v.decisions.entry(k).or_insert(0) += n;
            }
            v.workers.push(WorkerStats {
                worker: w.worker.0,
                peers: s.peers.len(),
                flows: s.flows,
                packets_from_clients: s.counters.from_clients.packets,
                socket_drops: w.socket_drops,
            });
            v.peers.extend(s.peers);
            v.postures.extend(s.postures);
            for l in s.links {
                match links.get_mut(&l.id) {
                    Some(m) => m.flows += l.flows,
                    None => {
                        links.insert(l.id, l);
                    }
                }
            }
        }
        v.peers.sort_by(|a, b| a.device.cmp(&b.device));
        v.connectors = links.into_values().collect();
        v
    }

    /// Every worker's totals, summed: counters, open flows and peers whose last handshake is
    /// younger than `online`. Cheap for the workers (no peer copied), for periodic sampling.
    pub async fn totals(&self, online: Duration) -> sekisho_proto::broker::Totals {
        let mut answers = Vec::new();
        for w in &self.inner.workers {
            let (tx, rx) = oneshot::channel();
            if w.commands.send(WorkerCommand::Totals(online, tx)).is_ok() {
                answers.push(rx);
            }
        }
        let mut sum = sekisho_proto::broker::Totals::default();
        for rx in answers {
            if let Ok(Ok(t)) = tokio::time::timeout(Duration::from_secs(2), rx).await {
                sum.counters.merge(&t.counters);
                sum.flows += t.flows;
                sum.peers_online += t.peers_online;
            }
        }
        sum
    }

    /// The accepted posture claims of the device with this key, if it has a valid token.
    pub async fn posture_of(&self, key: &PublicKeyBytes) -> Option<PostureClaims> {
        self.view().await.postures.remove(key)
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    let s: std::net::UdpSocket = s.into();
    sekisho_sys::udp::set_buffers(&s, WG_SOCKET_BUFFER);
    Ok(s)
}
