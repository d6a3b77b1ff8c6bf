//! `sekisho-connector`: sits beside a site's private applications, dials out to the broker over
//! QUIC (mutual TLS) and forwards the packets of authorized flows into the site's network
//! through a TUN device with source NAT. It listens on no port.

mod health;
mod names;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use ipnet::IpNet;
use rand::Rng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tracing::{debug, info, warn};

use sekisho_proto::config::{ConfigError, load_toml};
use sekisho_proto::flow::{FlowEntry, FlowTable, IdleTimeouts, TcpEnd};
use sekisho_proto::link::{
    ALPN, BrokerWelcome, ConnectorHello, HealthCheck, LinkAnswer, LinkRequest, MAX_CONTROL_MESSAGE,
    SiteMessage,
};
use sekisho_proto::packet::{self, FlowKey, PacketKind};

use crate::health::{State, add};
use sekisho_proto::sys::{AsyncDevice, Netlink, create_tun};

#[derive(Parser)]
#[command(
    name = "sekisho-connector",
    version,
    about = "Sekisho connector: carries authorized flows from the broker into this site's network",
    long_about = "Sekisho connector: dials out to the broker over QUIC with mutual TLS (it listens on \
no port), receives the IP packets of flows the broker authorized as QUIC datagrams, writes them \
into a TUN device and lets the kernel route them, with source NAT (nftables), to the site's \
applications. Replies take the same way back. When the broker goes away it reconnects with \
backoff.\n\nSignals: SIGTERM drains: the brokers stop sending new flows here, the open ones \
finish (up to drain_timeout), then the connector removes its nftables table and interface and \
exits. A second SIGTERM, or SIGINT, stops at once."
)]
struct Cli {
    /// Config file (documented example: deploy/examples/connector.toml).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run with a config file (the same as `-c FILE` alone).
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Enroll this connector with a one-time site token from an admin: makes its key here,
    /// sends only a certificate request, and writes DIR/connector.toml with the certificate
    /// the cluster CA issued. The certificate renews itself over the link before it expires.
    Enroll {
        /// Control API URL, like https://broker.example.com:8443.
        #[arg(long)]
        server: String,
        /// The enrollment token (SKE1.…); `-` reads it from standard input.
        #[arg(long)]
        token: String,
        /// Where the key, certificates and connector.toml go.
        #[arg(long, default_value = "/etc/sekisho")]
        dir: PathBuf,
        /// The site's DNS server for name-based applications (repeat for several; default:
        /// the system's resolvers).
        #[arg(long = "dns-server", value_name = "IP")]
        dns_servers: Vec<IpAddr>,
    },
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct ConnectorConfig {
    /// The site this connector serves (as named in the policy and in its certificate).
    site: String,
    /// host:port of the broker's connector (QUIC) socket.
    broker: String,
    /// More brokers to link to (host:port). The connector also links to every broker the
    /// brokers announce, so one is enough.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    brokers: Vec<String>,
    /// Name on the broker's certificate.
    #[serde(default = "default_broker_name")]
    broker_name: String,
    /// TUN interface name.
    #[serde(default = "default_tun")]
    tun_name: String,
    /// Enable IPv4 forwarding in this network namespace at start (the connector routes).
    #[serde(default = "yes")]
    enable_forwarding: bool,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_backoff_max")]
    max_backoff_secs: u64,
    /// DNS servers of this site, for the names of name-based applications. Empty: the system's
    /// (/etc/resolv.conf).
    #[serde(default)]
    dns_servers: Vec<IpAddr>,
    /// On SIGTERM, how long open flows may take to finish before the connector stops anyway.
    #[serde(
        default = "default_drain_timeout",
        deserialize_with = "duration_text",
        skip_serializing_if = "is_default_drain"
    )]
    drain_timeout: String,
    tls: TlsConfig,
    /// Prometheus endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metrics: Option<MetricsConfig>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct MetricsConfig {
    /// TCP address, like "0.0.0.0:9465".
    listen: SocketAddr,
}

fn default_drain_timeout() -> String {
    "5m".into()
}
fn is_default_drain(v: &String) -> bool {
    *v == default_drain_timeout()
}
/// A duration written like "5m" or "90s", kept as written.
fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("{text:?} is not a duration like \"5m\": {e}"))
    })?;
    Ok(text)
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct TlsConfig {
    /// CA certificate that signed the broker's certificate.
    ca: PathBuf,
    /// This connector's certificate (from `sekisho-broker pki issue-connector`).
    cert: PathBuf,
    key: PathBuf,
}

fn default_broker_name() -> String {
    "broker.sekisho.internal".into()
}
fn default_tun() -> String {
    "sekisho-c0".into()
}
fn yes() -> bool {
    true
}
fn default_backoff_max() -> u64 {
    10
}

/// The TUN device's MTU: packets from clients are at most their own tunnel MTU.
const TUN_MTU: u16 = 1500;

fn main() {
    let cli = Cli::parse();
    let result = match (cli.command, cli.config) {
        (Some(Command::Run { config }), _) | (None, Some(config)) => run_blocking(&config),
        (
            Some(Command::Enroll {
                server,
                token,
                dir,
                dns_servers,
            }),
            _,
        ) => enroll(&server, &token, &dir, &dns_servers),
        (None, None) => Err(anyhow::anyhow!(
            "nothing to do: pass -c FILE to run, or `enroll` (see --help)"
        )),
    };
    if let Err(e) = result {
        eprintln!("sekisho-connector: {e:#}");
        std::process::exit(2);
    }
}

/// Writes `path` through a temporary file and a rename, so a reader never sees half of it.
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// A fresh key and a certificate request for it; the CA decides the names.
fn new_key_and_csr() -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn enroll(server: &str, token: &str, dir: &Path, dns_servers: &[IpAddr]) -> Result<()> {
    use sekisho_proto::api::{EnrollConnectorRequest, EnrollConnectorResponse};
    let (token, ca_sha256) = sekisho_proto::http::enrollment_token(token)?;
    let config_path = dir.join("connector.toml");
    if config_path.exists() {
        bail!(
            "{} exists: this connector is already enrolled (remove the folder to enroll again)",
            config_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (key_pem, csr_pem) = new_key_and_csr()?;
    let request = EnrollConnectorRequest { token, csr_pem };
    let resp: EnrollConnectorResponse =
        sekisho_proto::http::enroll(server, ca_sha256, "/v1/enroll/connector", &request)?;
    write_atomic(&dir.join("connector.key"), &key_pem, 0o600)?;
    write_atomic(&dir.join("connector.pem"), &resp.certificate_pem, 0o644)?;
    write_atomic(&dir.join("ca.pem"), &resp.ca_pem, 0o644)?;
    let config = ConnectorConfig {
        site: resp.site.clone(),
        broker: resp
            .brokers
            .first()
            .context("the control plane named no broker")?
            .clone(),
        brokers: resp.brokers.iter().skip(1).cloned().collect(),
        broker_name: resp.broker_name.clone(),
        tun_name: default_tun(),
        enable_forwarding: true,
        max_backoff_secs: default_backoff_max(),
        dns_servers: dns_servers.to_vec(),
        drain_timeout: default_drain_timeout(),
        metrics: None,
        tls: TlsConfig {
            ca: PathBuf::from("ca.pem"),
            cert: PathBuf::from("connector.pem"),
            key: PathBuf::from("connector.key"),
        },
    };
    let text = format!(
        "# Written by `sekisho-connector enroll` for {} of site {:?}.\n{}",
        resp.connector,
        resp.site,
        toml::to_string(&config)?
    );
    write_atomic(&config_path, &text, 0o644)?;
    println!(
        "enrolled {} for site {:?}; run: sekisho-connector run -c {}",
        resp.connector,
        resp.site,
        config_path.display()
    );
    Ok(())
}

/// Validity of the certificate in `path` (Unix seconds).
fn cert_validity(path: &Path) -> Result<(i64, i64)> {
    let der = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .next()
        .context("no certificate")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("bad certificate {}: {e}", path.display()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When the certificate should be renewed: two thirds into its lifetime.
fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Renews the certificate over the live link when it is due; the new key and certificate are
/// used from the next connection on (the running one stays).
async fn renew_loop(conn: quinn::Connection, tls: &TlsConfig) {
    // Every link runs this loop; one renewal at a time, so two links never write different
    // keys and certificates over each other.
    static RENEWING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    loop {
        let (nb, na) = match cert_validity(&tls.cert) {
            Ok(v) => v,
            Err(e) => {
                warn!("certificate renewal disabled: {e:#}");
                return std::future::pending().await;
            }
        };
        let wait = (renew_at(nb, na) - unix_now()).max(0) as u64;
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait.min(3600))).await;
            continue;
        }
        let guard = RENEWING.lock().await;
        // Another link may have renewed while this one waited.
        if cert_validity(&tls.cert).is_ok_and(|(nb2, na2)| (nb2, na2) != (nb, na)) {
            continue;
        }
        let attempt = async {
            let (key_pem, csr_pem) = new_key_and_csr()?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&serde_json::to_vec(&LinkRequest::Renew { csr_pem })?)
                .await?;
            send.finish()?;
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                recv.read_to_end(MAX_CONTROL_MESSAGE),
            )
            .await
            .context("no answer")??;
            match serde_json::from_slice::<LinkAnswer>(&answer)? {
                LinkAnswer::Renewed { certificate_pem } => {
                    write_atomic(&tls.key, &key_pem, 0o600)?;
                    write_atomic(&tls.cert, &certificate_pem, 0o644)?;
                    let (_, na) = cert_validity(&tls.cert)?;
                    info!(
                        valid_until = %humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(na.max(0) as u64)),
                        "connector certificate renewed"
                    );
                    anyhow::Ok(())
                }
                LinkAnswer::Refused { reason } => bail!("the broker refused: {reason}"),
                LinkAnswer::Noted => bail!("unexpected answer to a renewal"),
            }
        };
        let result = attempt.await;
        drop(guard);
        match result {
            // Never renew in a tight loop, whatever the certificate says.
            Ok(()) => tokio::time::sleep(Duration::from_secs(5)).await,
            Err(e) => {
                warn!("certificate renewal failed, retrying in 30 s: {e:#}");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

fn load_config(path: &Path) -> Result<ConnectorConfig, ConfigError> {
    let (mut c, _): (ConnectorConfig, String) = load_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key] {
        *p = base.join(&*p);
    }
    Ok(c)
}

fn run_blocking(config: &Path) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = load_config(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(config))
}

fn tls_client_config(c: &TlsConfig) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&c.ca)
        .with_context(|| format!("cannot read {}", c.ca.display()))?
    {
        roots
            .add(ca.context("bad PEM in CA file")?)
            .context("bad CA certificate")?;
    }
    let chain = CertificateDer::pem_file_iter(&c.cert)
        .with_context(|| format!("cannot read {}", c.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .context("bad PEM in certificate file")?;
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .with_context(|| format!("cannot read {}", c.key.display()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("connector certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        // Brokers take a link that stays silent for a second (default) as stale and send new
        // flows to the site's other connectors: keep it talking.
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(Duration::from_secs(8).try_into()?))
        .initial_mtu(1400)
        .datagram_receive_buffer_size(Some(8 << 20))
        .datagram_send_buffer_size(8 << 20);
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// QUIC keepalive on every link.
const KEEPALIVE: Duration = Duration::from_millis(300);

/// nftables table name for this connector's TUN device.
fn nft_table(tun: &str) -> String {
    format!(
        "sekisho_{}",
        tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

async fn nft(script: &str) -> Result<()> {
    Ok(sekisho_proto::sys::nft(script).await?)
}

/// Source NAT for packets from the tunnel into the site, and nothing from the site into the
/// tunnel that is not a reply.
async fn install_nat(tun: &str) -> Result<()> {
    let t = nft_table(tun);
    nft(&format!(
        "table inet {t} {{}}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
           map synth4 {{ type ipv4_addr . ipv4_addr : ipv4_addr; }}\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             iifname \"{tun}\" dnat ip to ip saddr . ip daddr map @synth4\n\
           }}\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             iifname \"{tun}\" oifname != \"{tun}\" masquerade\n\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             oifname \"{tun}\" ct state established,related accept\n\
             oifname \"{tun}\" counter drop\n\
           }}\n\
         }}\n"
    ))
    .await
}

async fn remove_nat(tun: &str) {
    let t = nft_table(tun);
    if let Err(e) = nft(&sekisho_proto::sys::nft_delete_table("inet", &t)).await {
        warn!("cannot remove nftables table {t}: {e:#}");
    }
}

fn enable_forwarding() -> Result<()> {
    if sekisho_proto::sys::enable_ipv4_forwarding()? {
        info!("enabled IPv4 forwarding");
    }
    Ok(())
}

async fn run(config: ConnectorConfig) -> Result<()> {
    // Fails early on bad files; rebuilt on every connection attempt to pick up renewals.
    tls_client_config(&config.tls)?;
    if config.enable_forwarding {
        enable_forwarding()?;
    }
    let tun = create_tun(&config.tun_name, TUN_MTU)?;
    let netlink = Netlink::open()?;
    let index = netlink.link_index(&config.tun_name).await?;
    install_nat(&config.tun_name).await?;
    info!(site = %config.site, interface = %config.tun_name, "connector interface up");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let drain_timeout = humantime::parse_duration(&config.drain_timeout)?;
    let config = Arc::new(config);
    let state = Arc::new(State::default());
    if let Some(m) = &config.metrics {
        let listener = tokio::net::TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("cannot bind the metrics endpoint {}", m.listen))?;
        info!(addr = %m.listen, "metrics endpoint listening (/metrics, /healthz, /readyz)");
        let router = sekisho_proto::metrics::router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                warn!("metrics endpoint stopped: {e}");
            }
        });
    }
    let (events, rx) = tokio::sync::mpsc::channel::<LinkEvent>(4096);
    let site = site_loop(
        config.clone(),
        &tun,
        &netlink,
        index,
        state.clone(),
        events.clone(),
        rx,
    );
    tokio::pin!(site);
    let stop_now = tokio::select! {
        _ = &mut site => true,
        _ = term.recv() => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if !stop_now {
        state
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = events.send(LinkEvent::HealthChanged).await;
        info!(
            open_flows = state.flows.load(std::sync::atomic::Ordering::Relaxed),
            timeout = ?drain_timeout,
            "draining: brokers send no new flows here; waiting for the open ones to finish \
             (SIGTERM again or SIGINT stops now)"
        );
        let deadline = Instant::now() + drain_timeout;
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        // Done only when no flow was open for longer than one recount (every second).
        let mut idle_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = &mut site => break,
                _ = term.recv() => { info!("second SIGTERM: stopping now"); break }
                _ = tokio::signal::ctrl_c() => break,
                _ = poll.tick() => {
                    let open = state.flows.load(std::sync::atomic::Ordering::Relaxed);
                    if open > 0 {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed()
                        > Duration::from_millis(1500)
                    {
                        info!("drained: no open flows left");
                        break;
                    }
                    if Instant::now() >= deadline {
                        warn!(open_flows = open, "drain timeout: stopping with flows open");
                        break;
                    }
                }
            }
        }
    }
    info!("stopping: removing nftables table and interface");
    remove_nat(&config.tun_name).await;
    Ok(())
}

/// What a link task (or the health checker) tells the site loop.
enum LinkEvent {
    Up {
        broker: String,
        linked: Linked,
    },
    Down {
        broker: String,
        reason: String,
    },
    Packet {
        broker: String,
        packet: Bytes,
    },
    Name(NameEvent),
    /// A broker's list of every broker now.
    Brokers(Vec<String>),
    /// Draining started or the set of unreachable applications changed: tell every broker.
    HealthChanged,
}

/// A flow through this connector, tracked to know when it ended (for draining and metrics).
struct Tracked(TcpEnd);

impl FlowEntry for Tracked {
    fn allowed(&self) -> bool {
        true
    }
    fn owner(&self) -> u32 {
        0
    }
    fn closed(&self) -> bool {
        self.0.ended()
    }
}

/// The client-side 5-tuple of a packet (from the client when `from_client`).
fn flow_key(pkt: &[u8], from_client: bool) -> Option<FlowKey> {
    match packet::classify(pkt) {
        Ok(PacketKind::Flow(k)) if from_client => Some(k),
        Ok(PacketKind::Flow(k)) => Some(k.reversed()),
        _ => None,
    }
}

/// Tells the broker on `conn` whether this connector drains and what it cannot reach.
async fn send_health(conn: quinn::Connection, draining: bool, unreachable: Vec<String>) {
    let sent = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = LinkRequest::Health {
            draining,
            unreachable,
        };
        send.write_all(&serde_json::to_vec(&req)?).await?;
        send.finish()?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            recv.read_to_end(MAX_CONTROL_MESSAGE),
        )
        .await
        .context("no answer")??;
        match serde_json::from_slice::<LinkAnswer>(&answer)? {
            LinkAnswer::Noted => Ok(()),
            other => bail!("unexpected answer {other:?}"),
        }
    };
    if let Err(e) = sent.await {
        warn!("cannot tell the broker this connector's health: {e:#}");
    }
}

/// An accepted link and what the broker said with it.
struct Linked {
    conn: quinn::Connection,
    device_ranges: Vec<IpNet>,
    app_ranges: Vec<IpNet>,
    /// Every broker of the deployment (connector endpoints).
    brokers: Vec<String>,
    /// The site's applications to check.
    health_checks: Vec<HealthCheck>,
}

/// Keeps one link to the broker at `broker` up: connects, reads, and reconnects with
/// jittered exponential backoff, forever. Packets and messages go to the site loop.
async fn link_task(
    config: Arc<ConnectorConfig>,
    broker: String,
    events: tokio::sync::mpsc::Sender<LinkEvent>,
    state: Arc<State>,
) {
    let max = Duration::from_secs(config.max_backoff_secs.max(1));
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = Instant::now();
        add(&state.link_attempts, 1);
        let attempt = async {
            let client_config = tls_client_config(&config.tls)?;
            connect(&config, &broker, &client_config).await
        };
        match attempt.await {
            Ok(linked) => {
                backoff = Duration::from_millis(250);
                let conn = linked.conn.clone();
                info!(site = %config.site, broker = %broker, remote = %conn.remote_address(), "linked to broker");
                if events
                    .send(LinkEvent::Up {
                        broker: broker.clone(),
                        linked,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                let reason = tokio::select! {
                    r = read_link(&conn, &broker, &events) => r,
                    _ = renew_loop(conn.clone(), &config.tls) => "renewal stopped".into(),
                };
                warn!(site = %config.site, broker = %broker, "link to broker lost: {reason}");
                let _ = events
                    .send(LinkEvent::Down {
                        broker: broker.clone(),
                        reason,
                    })
                    .await;
            }
            Err(e) => warn!("cannot link to broker {broker}: {e:#}"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        let wait = backoff.mul_f64(jitter);
        debug!(?wait, broker = %broker, "reconnecting after backoff");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(max);
    }
}

/// Reads datagrams and broker messages of one link until it ends.
async fn read_link(
    conn: &quinn::Connection,
    broker: &str,
    events: &tokio::sync::mpsc::Sender<LinkEvent>,
) -> String {
    loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(packet) => {
                    let ev = LinkEvent::Packet { broker: broker.to_string(), packet };
                    if events.send(ev).await.is_err() {
                        return "connector stopping".into();
                    }
                }
                Err(e) => return e.to_string(),
            },
            s = conn.accept_uni() => match s {
                Ok(mut recv) => {
                    let events = events.clone();
                    tokio::spawn(async move {
                        let Ok(bytes) = recv.read_to_end(MAX_CONTROL_MESSAGE).await else { return };
                        match serde_json::from_slice::<SiteMessage>(&bytes) {
                            Ok(SiteMessage::MapName { device, synthetic, name }) => {
                                let ev = NameEvent::Map { key: (device, synthetic), name };
                                let _ = events.send(LinkEvent::Name(ev)).await;
                            }
                            Ok(SiteMessage::Brokers { brokers }) => {
                                let _ = events.send(LinkEvent::Brokers(brokers)).await;
                            }
                            Err(e) => warn!("malformed message from the broker: {e}"),
                        }
                    });
                }
                Err(e) => return e.to_string(),
            },
        }
    }
}

/// The site side: one TUN device for every link. Packets from any broker go into the site;
/// a reply goes back over the link its device's packets last came from, so a device that
/// moved to another broker gets its replies there (its TCP connections survive). Starts a
/// link task for every broker configured or announced by a broker.
async fn site_loop(
    config: Arc<ConnectorConfig>,
    tun: &AsyncDevice,
    netlink: &Netlink,
    index: u32,
    state: Arc<State>,
    events: tokio::sync::mpsc::Sender<LinkEvent>,
    mut rx: tokio::sync::mpsc::Receiver<LinkEvent>,
) {
    // Brokers from the config are always linked; brokers announced by brokers come and go
    // with the deployment's registry.
    let configured: Vec<String> = std::iter::once(&config.broker)
        .chain(config.brokers.iter())
        .cloned()
        .collect();
    let mut tasks: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
        std::collections::HashMap::new();
    let start_link = |b: &str, tasks: &mut std::collections::HashMap<_, _>| {
        tasks.insert(
            b.to_string(),
            tokio::spawn(link_task(
                config.clone(),
                b.to_string(),
                events.clone(),
                state.clone(),
            )),
        );
    };
    for b in &configured {
        if !tasks.contains_key(b) {
            start_link(b, &mut tasks);
        }
    }
    let (checks_tx, checks_rx) = tokio::sync::watch::channel(Vec::<HealthCheck>::new());
    let mut flows: FlowTable<Tracked> = FlowTable::new(
        IdleTimeouts {
            udp: Duration::from_secs(30),
            other: Duration::from_secs(30),
            closed: Duration::from_secs(2),
            ..IdleTimeouts::default()
        },
        1_000_000,
        1_000_000,
    );
    let mut links: Vec<(String, quinn::Connection)> = Vec::new();
    let mut via: std::collections::HashMap<IpAddr, String> = std::collections::HashMap::new();
    let mut routes: Vec<IpNet> = Vec::new();
    let mut names = names::Translations::default();
    let resolver = match names::resolver(&config.dns_servers) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            warn!("no DNS resolver for name-based applications: {e:#}");
            None
        }
    };
    {
        let events = events.clone();
        tokio::spawn(health::check_loop(
            state.clone(),
            checks_rx,
            resolver.clone(),
            move || {
                let _ = events.try_send(LinkEvent::HealthChanged);
            },
        ));
    }
    let table = nft_table(&config.tun_name);
    let max = usize::from(TUN_MTU);
    let mut block = BytesMut::with_capacity(TUN_READ_BLOCK);
    let mut too_large = 0u64;
    let mut no_link = 0u64;
    let mut expire = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(ev) = rx.recv() => match ev {
                LinkEvent::Packet { broker, packet } => {
                    add(&state.packets_to_site, 1);
                    add(&state.bytes_to_site, packet.len() as u64);
                    if let Some(key) = flow_key(&packet, true) {
                        let now = Instant::now();
                        let end = TcpEnd::of(&packet, true);
                        match flows.touch(&key, now) {
                            Some(f) => f.0.merge(end),
                            None => {
                                if flows.insert(key, Tracked(end), now).is_ok() {
                                    // Counted at once (a drain must see it); recounted every second.
                                    state.flows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    let admit = match sekisho_proto::packet::addresses(&packet) {
                        Ok((src, dst)) => {
                            if via.get(&src) != Some(&broker) {
                                via.insert(src, broker);
                            }
                            names.admit(src, dst, &packet, Instant::now())
                        }
                        Err(_) => names::Admit::Forward,
                    };
                    if admit == names::Admit::Forward
                        && let Err(e) = tun.send(&packet).await
                    {
                        debug!("TUN write error: {e}");
                    }
                }
                LinkEvent::Up { broker, linked } => {
                    state.set_link(&broker, true);
                    if *checks_tx.borrow() != linked.health_checks {
                        let _ = checks_tx.send(linked.health_checks.clone());
                    }
                    let (draining, unreachable) = (state.draining(), state.unreachable());
                    if draining || !unreachable.is_empty() {
                        tokio::spawn(send_health(linked.conn.clone(), draining, unreachable));
                    }
                    names.set_app_ranges(linked.app_ranges.clone());
                    let ranges: Vec<IpNet> =
                        linked.device_ranges.iter().chain(&linked.app_ranges).copied().collect();
                    for net in &ranges {
                        if !routes.contains(net) {
                            if let Err(e) = netlink.add_route(index, *net).await {
                                warn!("cannot route {net} into the tunnel: {e}");
                            }
                            routes.push(*net);
                        }
                    }
                    for b in linked.brokers {
                        if !tasks.contains_key(&b) {
                            info!(broker = %b, "a broker announced another broker; linking to it too");
                            start_link(&b, &mut tasks);
                        }
                    }
                    links.retain(|(b, _)| *b != broker);
                    links.push((broker, linked.conn));
                }
                LinkEvent::Down { broker, reason } => {
                    debug!(broker = %broker, %reason, "link down");
                    state.set_link(&broker, false);
                    links.retain(|(b, _)| *b != broker);
                    via.retain(|_, b| *b != broker);
                }
                LinkEvent::Brokers(list) => {
                    for b in &list {
                        if !tasks.contains_key(b) {
                            info!(broker = %b, "a broker joined; linking to it");
                            start_link(b, &mut tasks);
                        }
                    }
                    let gone: Vec<String> = tasks
                        .keys()
                        .filter(|b| !list.contains(b) && !configured.contains(b))
                        .cloned()
                        .collect();
                    for b in gone {
                        info!(broker = %b, "a broker left the deployment; dropping its link");
                        if let Some(t) = tasks.remove(&b) {
                            t.abort();
                        }
                        if let Some((_, c)) = links.iter().find(|(l, _)| *l == b) {
                            c.close(0u32.into(), b"broker left");
                        }
                        links.retain(|(l, _)| *l != b);
                        via.retain(|_, l| *l != b);
                        state.forget_link(&b);
                    }
                }
                LinkEvent::HealthChanged => {
                    let (draining, unreachable) = (state.draining(), state.unreachable());
                    for (_, c) in &links {
                        tokio::spawn(send_health(c.clone(), draining, unreachable.clone()));
                    }
                }
                LinkEvent::Name(ev) => handle_name_event(ev, &mut names, resolver.as_ref(), &table, &events, tun).await,
            },
            _ = expire.tick() => {
                let now = Instant::now();
                names.expire(now);
                flows.expire(now);
                let open = flows.iter().filter(|(_, f, _)| !f.closed()).count();
                state.flows.store(open, std::sync::atomic::Ordering::Relaxed);
                state.dropped_name_queue.store(names.dropped, std::sync::atomic::Ordering::Relaxed);
            }
            r = async {
                if block.capacity() < max {
                    block = BytesMut::with_capacity(TUN_READ_BLOCK);
                }
                block.resize(max, 0);
                tun.recv(&mut block).await
            } => match r {
                Ok(n) => {
                    let pkt = block.split_to(n).freeze();
                    add(&state.packets_from_site, 1);
                    add(&state.bytes_from_site, n as u64);
                    if let Some(key) = flow_key(&pkt, false)
                        && let Some(f) = flows.touch(&key, Instant::now())
                    {
                        f.0.merge(TcpEnd::of(&pkt, false));
                    }
                    let dst = sekisho_proto::packet::addresses(&pkt).ok().map(|(_, d)| d);
                    let conn = dst
                        .and_then(|d| via.get(&d))
                        .and_then(|b| links.iter().find(|(l, _)| l == b))
                        .or_else(|| links.first())
                        .map(|(_, c)| c);
                    let Some(conn) = conn else {
                        add(&state.dropped_no_link, 1);
                        no_link += 1;
                        if no_link.is_power_of_two() {
                            warn!(no_link, "reply packet while no broker is linked; dropped");
                        }
                        continue;
                    };
                    match conn.send_datagram(pkt) {
                        Ok(()) => {}
                        Err(quinn::SendDatagramError::TooLarge) => {
                            add(&state.dropped_too_large, 1);
                            too_large += 1;
                            if too_large.is_power_of_two() {
                                warn!(too_large, size = n, "reply packet larger than the link carries; dropped");
                            }
                        }
                        Err(e) => debug!("cannot send on the link: {e}"),
                    }
                }
                Err(e) => debug!("TUN read error: {e}"),
            },
        }
    }
}

/// Resolves a name the broker asked for and installs its translation; packets waiting for
/// it are written out once it is in.
async fn handle_name_event(
    ev: NameEvent,
    names: &mut names::Translations,
    resolver: Option<&Arc<hickory_resolver::TokioResolver>>,
    table: &str,
    events: &tokio::sync::mpsc::Sender<LinkEvent>,
    tun: &AsyncDevice,
) {
    match ev {
        NameEvent::Map { key, name } => {
            if names.has(&key, &name) {
                return;
            }
            let Some(resolver) = resolver.cloned() else {
                names::log_failed(&name, "no resolver");
                names.failed(&key);
                return;
            };
            let previous = names.previous(&key);
            let events = events.clone();
            let table = table.to_string();
            tokio::spawn(async move {
                let result = match names::resolve(&resolver, &name).await {
                    Ok(real) => nft(&names::map_script(&table, &key, real, previous))
                        .await
                        .map(|()| real)
                        .map_err(|e| format!("{e:#}")),
                    Err(e) => Err(e),
                };
                let _ = events
                    .send(LinkEvent::Name(NameEvent::Done { key, name, result }))
                    .await;
            });
        }
        NameEvent::Done { key, name, result } => match result {
            Ok(real) => {
                let waited: Vec<Bytes> = names.installed(key, name.clone(), real);
                names::log_installed(&name, &key, real, waited.len());
                for pkt in waited {
                    if let Err(e) = tun.send(&pkt).await {
                        debug!("TUN write error: {e}");
                    }
                }
            }
            Err(e) => {
                names::log_failed(&name, &e);
                names.failed(&key);
            }
        },
    }
}

/// One link attempt: a fresh UDP socket *connected* to the broker (so it accepts nothing from
/// anyone else and is not a listening socket), QUIC with mutual TLS, then the hello exchange.
async fn connect(
    config: &ConnectorConfig,
    endpoint_name: &str,
    client_config: &quinn::ClientConfig,
) -> Result<Linked> {
    let broker: SocketAddr = tokio::net::lookup_host(endpoint_name)
        .await
        .with_context(|| format!("cannot resolve {endpoint_name:?}"))?
        .next()
        .context("broker name has no address")?;
    let bind: SocketAddr = if broker.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let socket = StdUdpSocket::bind(bind)?;
    socket.connect(broker)?;
    socket.set_nonblocking(true)?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint.connect_with(client_config.clone(), broker, &config.broker_name)?,
    )
    .await
    .context("QUIC handshake timed out")?
    .context("QUIC handshake failed")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = ConnectorHello {
        site: config.site.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    send.write_all(&serde_json::to_vec(&hello)?).await?;
    send.finish()?;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        recv.read_to_end(MAX_CONTROL_MESSAGE),
    )
    .await
    .context("no answer from broker")??;
    match serde_json::from_slice::<BrokerWelcome>(&answer)
        .context("malformed answer from broker")?
    {
        BrokerWelcome::Accepted {
            device_ranges,
            app_ranges,
            brokers,
            health_checks,
            ..
        } => Ok(Linked {
            conn,
            device_ranges,
            app_ranges,
            brokers,
            health_checks,
        }),
        BrokerWelcome::Refused { reason } => bail!("broker refused this connector: {reason}"),
    }
}

/// Packets read from the TUN device are carved out of blocks this large: each becomes a
/// `Bytes` for QUIC without a copy, and a new block is allocated only when one is used up.
const TUN_READ_BLOCK: usize = 256 * 1024;

/// Name-translation events, from the tasks that read the broker's messages and resolve names.
enum NameEvent {
    Map {
        key: names::Key,
        name: String,
    },
    Done {
        key: names::Key,
        name: String,
        result: Result<Ipv4Addr, String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_loads_and_a_bad_duration_is_named() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/connector.toml");
        let c = load_config(&path).unwrap();
        assert_eq!(c.drain_timeout, "5m");
        assert!(c.metrics.is_some());
        let dir = std::env::temp_dir().join(format!("sekisho-conn-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("connector.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("drain_timeout = \"5m\"", "drain_timeout = \"soon\"");
        std::fs::write(&bad, text).unwrap();
        let e = load_config(&bad).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(e.contains("drain_timeout") && e.contains("soon"), "{e}");
    }
}
