//! The broker's control socket: `sekisho-broker stats` reads counters, peers, connector links
//! and the kernel's own drop counters as JSON, from snapshots the workers answer with.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use crate::dataplane::{DataPlane, View};

/// What the kernel dropped outside Sekisho's own counters.
#[derive(Debug, Default, Clone, Serialize)]
pub struct KernelDrops {
    /// Datagrams dropped on the workers' WireGuard sockets (receive buffers full).
    pub wireguard_socket: u64,
    /// Datagrams dropped on the connector link socket.
    pub link_socket: Option<u64>,
    /// Packets the egress TUN device dropped (not read in time), and egress writes that failed.
    pub egress_tun: Option<u64>,
    pub egress_write_failed: u64,
    /// Handshake initiations the kernel dropped over their source's limit (the shield).
    pub handshake_shield: Option<u64>,
}

/// Where the kernel's counters are read.
#[derive(Clone, Default)]
pub struct KernelSources {
    pub link_socket: Option<Arc<std::net::UdpSocket>>,
    pub egress_interface: Option<String>,
    pub egress_write_failed: Arc<AtomicU64>,
    pub handshake_shield: Option<Arc<AtomicU64>>,
    /// QUIC connection attempts on the connector port answered with a Retry (address
    /// validation) before any TLS work.
    pub quic_retries: Arc<AtomicU64>,
}

impl KernelSources {
    pub fn read(&self, view: &View) -> KernelDrops {
        KernelDrops {
            wireguard_socket: view.workers.iter().filter_map(|w| w.socket_drops).sum(),
            link_socket: self
                .link_socket
                .as_deref()
                .and_then(sekisho_sys::udp::socket_drops),
            egress_tun: self
                .egress_interface
                .as_deref()
                .and_then(sekisho_sys::tun::interface_drops)
                .map(|d| d.tx_dropped + d.rx_dropped),
            egress_write_failed: self.egress_write_failed.load(Ordering::Relaxed),
            handshake_shield: self
                .handshake_shield
                .as_ref()
                .map(|n| n.load(Ordering::Relaxed)),
        }
    }
}

#[derive(Serialize)]
struct StatsReport<'a> {
    public_key: String,
    policy_generation: u64,
    flows: usize,
    counters: &'a sekisho_proto::broker::Counters,
    kernel: KernelDrops,
    /// Connection attempts on the connector port answered with a QUIC Retry.
    quic_retries: u64,
    peers: &'a [sekisho_proto::broker::PeerInfo],
    /// Sites with at least one linked connector.
    connector_links: Vec<String>,
    connectors: &'a [sekisho_proto::broker::LinkInfo],
    workers: &'a [crate::dataplane::WorkerStats],
    /// The SIEM sinks: delivered, lost and why, queued, connected.
    log_sinks: Vec<sekisho_sys::logship::SinkStats>,
    /// The risk engine: inputs taken and dropped, level changes, devices at risk.
    risk: crate::risk::RiskStats,
    /// Shared Signals receivers Sekisho pushes to: sent, refused, failed, dropped.
    ssf_receivers: Vec<crate::ssf::transmit::ReceiverStats>,
    /// What the console's in-memory views let go (the logs keep it).
    console_forgotten: Option<crate::control::console::feed::Forgotten>,
}

/// The stats as JSON.
pub async fn report(
    dp: &DataPlane,
    kernel: &KernelSources,
    shipper: &sekisho_sys::logship::Shipper,
    risk: &crate::risk::RiskService,
    control: Option<&crate::control::Control>,
) -> Result<String> {
    let v = dp.view().await;
    let mut sites: Vec<String> = v.connectors.iter().map(|l| l.site.clone()).collect();
    sites.sort();
    sites.dedup();
    Ok(serde_json::to_string_pretty(&StatsReport {
        public_key: dp.public_key().to_string(),
        policy_generation: v.policy_generation,
        flows: v.flows,
        counters: &v.counters,
        kernel: kernel.read(&v),
        quic_retries: kernel.quic_retries.load(Ordering::Relaxed),
        peers: &v.peers,
        connector_links: sites,
        connectors: &v.connectors,
        workers: &v.workers,
        log_sinks: shipper.stats(),
        risk: risk.stats(),
        ssf_receivers: control.map(|c| c.ssf_stats()).unwrap_or_default(),
        console_forgotten: control.map(|c| c.console_forgotten()),
    })?)
}

/// Serves the control socket at `path` (mode 0600).
pub fn serve(
    path: &Path,
    dp: DataPlane,
    kernel: KernelSources,
    shipper: sekisho_sys::logship::Shipper,
    risk: std::sync::Arc<crate::risk::RiskService>,
    control: Option<std::sync::Arc<crate::control::Control>>,
) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (dp, kernel, shipper, risk, control) = (
                dp.clone(),
                kernel.clone(),
                shipper.clone(),
                risk.clone(),
                control.clone(),
            );
            tokio::spawn(async move {
                if let Ok(body) = report(&dp, &kernel, &shipper, &risk, control.as_deref()).await {
                    let _ = stream.write_all(body.as_bytes()).await;
                }
            });
        }
    }))
}
