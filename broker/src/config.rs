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
    /// The control plane (enrollment, posture tokens, admin API). Without this section the
    /// broker runs from the policy file alone.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// Internet egress for full-tunnel devices. Without this section full-tunnel traffic that
    /// is no application is dropped (and counted) here.
    #[serde(default)]
    pub egress: Option<EgressConfig>,
    /// Connector links: liveness and timeouts.
    #[serde(default)]
    pub connectors: ConnectorLinkConfig,
    /// Prometheus endpoint (`/metrics`, `/healthz`, `/readyz`). Without this section there is
    /// none.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// The largest packet devices send (their tunnel MTU, 1360 by default). Connector links
    /// never carry less than this in one datagram; TCP SYNs are clamped to it.
    #[serde(default = "default_overlay_mtu")]
    pub overlay_mtu: u16,
    /// The data plane's workers.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// Where records go besides the local logs: syslog (TCP, TLS), OTLP/HTTP, files
    /// (`[[log_sinks]]`, see the README "Logs to a SIEM").
    #[serde(default)]
    pub log_sinks: Vec<sekisho_sys::logship::SinkConfig>,
    /// The risk engine's weights, decay and thresholds (`[risk_engine]`; what each level
    /// tolerates is the policy's `[risk]`).
    #[serde(default)]
    pub risk_engine: sekisho_proto::risk::RiskConfig,
}

fn default_overlay_mtu() -> u16 {
    sekisho_proto::mtu::DEFAULT_OVERLAY_MTU
}

/// `[dataplane]`: how the packet work is spread.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Worker threads, each owning a share of the devices with its own socket. Default: one
    /// per core.
    #[serde(default)]
    pub workers: Option<u16>,
    /// Drop handshake initiations over a source address's limit in the kernel (nftables)
    /// before they reach the workers. Default: on.
    #[serde(default = "yes")]
    pub handshake_shield: bool,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            workers: None,
            handshake_shield: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// `[metrics]`: where the Prometheus endpoint listens, and who may read it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address; loopback unless set ("127.0.0.1:9464"): the endpoint tells a reader the
    /// broker's load, peers and drops, so it is not for the internet side.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
    /// A file holding a bearer token that `GET /metrics` must carry
    /// (`Authorization: Bearer …`); `/healthz` and `/readyz` stay open.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// `[connectors]`: how quickly a silent connector stops getting new flows, and when its link
/// is given up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorLinkConfig {
    /// No packet from a connector for this long (connectors send a keepalive every 300 ms):
    /// new flows go to the site's other connectors until it answers again.
    #[serde(default = "default_stale_after", with = "humantime_serde_secs")]
    pub stale_after: Duration,
    /// No packet for this long closes the link; its flows move to another connector.
    #[serde(default = "default_link_idle", with = "humantime_serde_secs")]
    pub idle_timeout: Duration,
}

impl Default for ConnectorLinkConfig {
    fn default() -> Self {
        ConnectorLinkConfig {
            stale_after: default_stale_after(),
            idle_timeout: default_link_idle(),
        }
    }
}

fn default_stale_after() -> Duration {
    Duration::from_secs(1)
}
fn default_link_idle() -> Duration {
    Duration::from_secs(8)
}

/// `[egress]`: a TUN device the kernel routes to the internet with source NAT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// TUN interface name.
    #[serde(default = "default_egress_tun")]
    pub interface: String,
    /// Leave through this interface only (source NAT to its address). Default: any but the
    /// TUN device.
    #[serde(default)]
    pub uplink: Option<String>,
}

fn default_egress_tun() -> String {
    "sekisho-egress".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// TCP address of the HTTPS control API.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// The API's URL as devices, connectors and the admin CLI reach it. The broker certificate
    /// must be valid for its host (name or address).
    pub url: String,
    /// The admin console's URL (`https://HOST:PORT`, no path), when admins reach it elsewhere
    /// than `url`: with `admin_listen`, the console is served on that listener. The identity
    /// provider sends admins back to it + `/console/callback`. Default: `url`.
    #[serde(default)]
    pub console_url: Option<String>,
    /// `sqlite://PATH` (created and migrated on first start) or `postgres://…`.
    #[serde(default = "default_database")]
    pub database: String,
    /// The CA's private key, to sign connector certificates.
    pub ca_key: PathBuf,
    /// A separate address for the admin API (`/v1/admin/…`), like a management network or
    /// loopback; the public listener then serves devices and enrollment only. Default: the
    /// admin API is on `listen` too.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The key-encryption key that seals the posture signing keys in the store (32 bytes,
    /// base64url). Default: `signing-keys.kek` beside `ca_key`, made on first start; every
    /// broker of a cluster needs the same one. The environment variable
    /// SEKISHO_KEY_ENCRYPTION_KEY wins over the file (for a KMS or a secret store).
    #[serde(default)]
    pub key_encryption_key_file: Option<PathBuf>,
    /// This broker's name in status output and logs (a region, say). Default: the WireGuard
    /// endpoint.
    #[serde(default)]
    pub name: Option<String>,
    /// WireGuard endpoint (`host:port`) given to devices.
    pub wireguard_endpoint: String,
    /// QUIC endpoint (`host:port`) given to connectors.
    pub connector_endpoint: String,
    /// The name in the broker's certificate that connectors check.
    #[serde(default = "default_broker_name")]
    pub broker_name: String,
    /// Lifetime of posture tokens; devices refresh them at half-life.
    #[serde(default = "default_token_lifetime", with = "humantime_serde_secs")]
    pub posture_token_lifetime: Duration,
    /// Lifetime of connector certificates; connectors renew them after two thirds.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde_secs")]
    pub connector_cert_lifetime: Duration,
    /// Where `admin init` writes the first admin token and the admin CLI reads it by default.
    #[serde(default = "default_admin_token_file")]
    pub admin_token_file: PathBuf,
    /// Audit log of admin changes, enrollments and posture refreshes (JSON lines; "-" = stdout).
    #[serde(default = "default_audit_log")]
    pub audit_log: PathBuf,
    /// Most connections the API holds at once, and from one source address. A connection has
    /// 5 s for its TLS handshake and 5 s for its request headers, carries one request, and
    /// lasts 2 minutes at most.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Sign-in through the company's OpenID Connect provider (`[control.oidc]`): devices
    /// enroll and re-authenticate with `sekisho-client login`, admins with `admin login`.
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// OpenID Shared Signals: transmitters whose Security Event Tokens Sekisho receives, and
    /// receivers Sekisho tells of its own risk and compliance changes (`[control.ssf]`).
    #[serde(default)]
    pub ssf: Option<SsfConfig>,
}

/// `[control.ssf]`: Shared Signals Framework (CAEP events as RFC 8417 SETs, RFC 8935 push).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfConfig {
    /// The `iss` of the SETs Sekisho sends (default: `[control] url`).
    #[serde(default)]
    pub issuer: Option<String>,
    /// The `aud` received SETs must name (default: `[control] url`).
    #[serde(default)]
    pub audience: Option<String>,
    /// A received SET older than this (its `iat`) is refused as stale.
    #[serde(default = "default_ssf_max_age", with = "humantime_serde_secs")]
    pub max_age: Duration,
    #[serde(default)]
    pub transmitters: Vec<SsfTransmitter>,
    #[serde(default)]
    pub receivers: Vec<SsfReceiver>,
    /// SETs waiting per receiver, at most (beyond: dropped and counted).
    #[serde(default = "default_ssf_queue")]
    pub queue: usize,
}

/// A system that pushes SETs to Sekisho (`POST /v1/ssf/events`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfTransmitter {
    pub issuer: String,
    /// Its JWK set, over HTTPS (`jwks_uri` from its SSF configuration), or a file.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A file with the bearer token its pushes must carry (RFC 8935 §2.1); none: any.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// The events it may send (`device-compliance-change`, `risk-level-change`,
    /// `session-revoked`, `credential-change`, `assurance-level-change`); default all.
    #[serde(default)]
    pub events: Option<Vec<String>>,
}

/// A system Sekisho pushes its SETs to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfReceiver {
    pub url: String,
    pub audience: String,
    /// A file with the token for its `Authorization` header.
    #[serde(default)]
    pub authorization_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_ssf_max_age() -> Duration {
    Duration::from_secs(300)
}

fn default_ssf_queue() -> usize {
    1000
}

/// `[control.oidc]`: the control plane as an OpenID Connect relying party (a confidential
/// client of the provider).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL (discovery is `ISSUER/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    /// File holding the client secret (mode 0600; trailing whitespace ignored).
    pub client_secret_file: PathBuf,
    /// Scopes asked for.
    #[serde(default = "default_oidc_scopes")]
    pub scopes: Vec<String>,
    /// The ID token claim that lists the user's groups (mapped by the policy's `[identity]`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The ID token claim that becomes the Sekisho user name (SCIM's `userName`).
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Extra CA certificates (PEM) the provider's TLS certificate may chain to, besides the
    /// system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether a first sign-in creates the user; when false, users must exist already
    /// (created by an admin or provisioned through SCIM).
    #[serde(default = "default_true")]
    pub create_users: bool,
    /// Link an existing user who has no externalId (made by an admin, or provisioned without
    /// one) to the first sign-in whose user name matches. Off by default: providers may let
    /// users choose that name. Users provisioned through SCIM with the provider's id as
    /// externalId are linked by that id either way.
    #[serde(default)]
    pub link_by_name: bool,
    /// The class of devices a first sign-in enrolls: `personal` (the default: a sign-in
    /// proves the person, not that the organisation manages the laptop) or `managed`.
    /// An MDM or an admin changes it later (`admin device class`).
    #[serde(default = "default_signin_class")]
    pub device_class: sekisho_proto::policy::DeviceClass,
    /// Lifetime of the admin token `admin login` gets.
    #[serde(default = "default_admin_session", with = "humantime_serde_secs")]
    pub admin_session: Duration,
    /// How long discovery and the provider's keys are cached (keys are fetched again at once
    /// when a token names an unknown key).
    #[serde(default = "default_oidc_refresh", with = "humantime_serde_secs")]
    pub metadata_refresh: Duration,
}

fn default_signin_class() -> sekisho_proto::policy::DeviceClass {
    sekisho_proto::policy::DeviceClass::Personal
}

fn default_oidc_scopes() -> Vec<String> {
    ["openid", "profile", "email", "groups"]
        .map(String::from)
        .to_vec()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}
fn default_true() -> bool {
    true
}
fn default_admin_session() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_oidc_refresh() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_address() -> usize {
    64
}

/// Durations written like "5m", "30d", "90s".
mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"5m\": {e}"))
        })
    }
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_database() -> String {
    "sqlite:///var/lib/sekisho/broker.db".into()
}
fn default_broker_name() -> String {
    "broker.sekisho.internal".into()
}
fn default_token_lifetime() -> Duration {
    Duration::from_secs(300)
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(30 * 86400)
}
fn default_admin_token_file() -> PathBuf {
    PathBuf::from("/etc/sekisho/admin.token")
}
fn default_audit_log() -> PathBuf {
    PathBuf::from("/var/log/sekisho/audit.log")
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
            ..IdleTimeouts::default()
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
        let (mut c, text): (BrokerConfig, String) = load_toml(path)?;
        let src = sekisho_proto::config::Source {
            file: path,
            text: &text,
        };
        // Where `key` is set: the first line that starts with it.
        let at = |key: &str| {
            let mut offset = 0;
            for line in text.split_inclusive('\n') {
                if line.trim_start().starts_with(key) {
                    return Some(offset..offset);
                }
                offset += line.len();
            }
            None
        };
        if c.overlay_mtu < sekisho_proto::mtu::MIN_OVERLAY_MTU || c.overlay_mtu > 9000 {
            return Err(src.error(
                at("overlay_mtu"),
                "overlay_mtu",
                "must be between 576 and 9000 (the devices' tunnel MTU)",
            ));
        }
        if c.dataplane.workers == Some(0) {
            return Err(src.error(at("workers"), "dataplane.workers", "must be at least 1"));
        }
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
        if let Some(p) = c
            .metrics
            .as_mut()
            .and_then(|m| m.bearer_token_file.as_mut())
        {
            *p = base.join(&*p);
        }
        if let Some(ctl) = c.control.as_mut() {
            ctl.ca_key = base.join(&ctl.ca_key);
            let kek = ctl
                .key_encryption_key_file
                .clone()
                .unwrap_or_else(|| ctl.ca_key.with_file_name("signing-keys.kek"));
            ctl.key_encryption_key_file = Some(base.join(kek));
            ctl.admin_token_file = base.join(&ctl.admin_token_file);
            if ctl.audit_log != Path::new("-") {
                ctl.audit_log = base.join(&ctl.audit_log);
            }
            // A relative SQLite path is relative to the config file, like every other path.
            if let Some(p) = ctl.database.strip_prefix("sqlite://")
                && !p.starts_with('/')
            {
                ctl.database = format!("sqlite://{}", base.join(p).display());
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/broker.toml");
        let c = BrokerConfig::load(&path).unwrap();
        assert_eq!(c.connectors.stale_after, Duration::from_secs(1));
        assert_eq!(
            c.metrics.map(|m| m.listen),
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert!(c.control.is_some() && c.egress.is_some());
        assert_eq!((c.overlay_mtu, c.dataplane.workers), (1360, Some(2)));
    }

    #[test]
    fn a_bad_overlay_mtu_or_no_workers_is_named_with_its_line() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/broker.toml");
        let text = std::fs::read_to_string(&example).unwrap();
        let dir = std::env::temp_dir().join(format!("sekisho-brk-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("broker.toml");
        for (from, to, field) in [
            ("overlay_mtu = 1360", "overlay_mtu = 100", "overlay_mtu"),
            ("workers = 2", "workers = 0", "dataplane.workers"),
        ] {
            std::fs::write(&bad, text.replace(from, to)).unwrap();
            let e = BrokerConfig::load(&bad).unwrap_err();
            let line = text.lines().position(|l| l.starts_with(from)).unwrap() + 1;
            assert_eq!((e.field.as_str(), e.line), (field, line), "{e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
