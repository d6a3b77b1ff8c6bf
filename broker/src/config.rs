//! The broker's own configuration file (`broker.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use sekisho_proto::config::{ConfigError, load_toml};
use sekisho_proto::flow::IdleTimeouts;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// File with the broker's WireGuard private key (base64, as `sekisho-broker genkey` writes).
    pub private_key_file: PathBuf,
    /// UDP address for WireGuard from clients.
    #[serde(default = "default_wg_listen")]
    pub listen_wireguard: SocketAddr,
    /// UDP address for QUIC from connectors.
    #[serde(default = "default_quic_listen")]
    pub listen_connectors: SocketAddr,
    /// The policy file (users, groups, devices, sites, applications, rules).
    pub policy: PathBuf,
    /// Where flow decisions go, one JSON object per line; "-" means standard output.
    #[serde(default = "default_decision_log")]
    pub decision_log: PathBuf,
    /// Unix socket that `sekisho-broker stats` reads counters and peers from.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    pub tls: TlsConfig,
    #[serde(default)]
    pub flows: FlowConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) that signs connector certificates.
    pub ca: PathBuf,
    /// The broker's certificate chain (PEM) shown to connectors.
    pub cert: PathBuf,
    /// The broker's private key (PEM).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    #[serde(default = "d_tcp")]
    pub tcp_idle_secs: u64,
    #[serde(default = "d_udp")]
    pub udp_idle_secs: u64,
    #[serde(default = "d_other")]
    pub other_idle_secs: u64,
    #[serde(default = "d_denied")]
    pub denied_idle_secs: u64,
    #[serde(default = "d_max")]
    pub max_flows: usize,
    #[serde(default = "d_max_device")]
    pub max_flows_per_device: usize,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            tcp_idle_secs: d_tcp(),
            udp_idle_secs: d_udp(),
            other_idle_secs: d_other(),
            denied_idle_secs: d_denied(),
            max_flows: d_max(),
            max_flows_per_device: d_max_device(),
        }
    }
}

impl FlowConfig {
    pub fn timeouts(&self) -> IdleTimeouts {
        IdleTimeouts {
            tcp: Duration::from_secs(self.tcp_idle_secs),
            udp: Duration::from_secs(self.udp_idle_secs),
            other: Duration::from_secs(self.other_idle_secs),
            denied: Duration::from_secs(self.denied_idle_secs),
        }
    }
}

fn d_tcp() -> u64 {
    IdleTimeouts::default().tcp.as_secs()
}
fn d_udp() -> u64 {
    IdleTimeouts::default().udp.as_secs()
}
fn d_other() -> u64 {
    IdleTimeouts::default().other.as_secs()
}
fn d_denied() -> u64 {
    IdleTimeouts::default().denied.as_secs()
}
fn d_max() -> usize {
    1_000_000
}
fn d_max_device() -> usize {
    20_000
}
fn default_wg_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 51820))
}
fn default_quic_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}
fn default_decision_log() -> PathBuf {
    PathBuf::from("-")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/sekisho/broker.sock")
}

impl BrokerConfig {
    /// Loads the file; relative paths inside it are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut c, _): (BrokerConfig, _) = load_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut c.private_key_file,
            &mut c.policy,
            &mut c.control_socket,
            &mut c.tls.ca,
            &mut c.tls.cert,
            &mut c.tls.key,
        ] {
            *p = base.join(&*p);
        }
        if c.decision_log != Path::new("-") {
            c.decision_log = base.join(&c.decision_log);
        }
        Ok(c)
    }
}
