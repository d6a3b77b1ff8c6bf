//! `sekisho-connector`: sits beside a site's private applications, dials out to the broker over
//! QUIC (mutual TLS) and forwards the packets of authorized flows into the site's network
//! through a TUN device with source NAT. It listens on no port.

mod names;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
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
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use sekisho_proto::config::{ConfigError, load_toml};
use sekisho_proto::link::{ALPN, BrokerWelcome, ConnectorHello, MAX_CONTROL_MESSAGE, SiteMessage};
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
backoff.\n\nSignals: SIGTERM/SIGINT remove the nftables table and the interface, then exit."
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
    tls: TlsConfig,
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
        broker_name: resp.broker_name.clone(),
        tun_name: default_tun(),
        enable_forwarding: true,
        max_backoff_secs: default_backoff_max(),
        dns_servers: dns_servers.to_vec(),
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
    use sekisho_proto::link::{LinkAnswer, LinkRequest};
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
            }
        };
        match attempt.await {
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
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(Duration::from_secs(8).try_into()?))
        .initial_mtu(1400)
        .datagram_receive_buffer_size(Some(8 << 20))
        .datagram_send_buffer_size(8 << 20);
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// nftables table name for this connector's TUN device.
fn nft_table(tun: &str) -> String {
    format!(
        "sekisho_{}",
        tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

async fn nft(script: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `nft` (install the nftables package)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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
    if let Err(e) = nft(&format!("table inet {t} {{}}\ndelete table inet {t}\n")).await {
        warn!("cannot remove nftables table {t}: {e:#}");
    }
}

fn enable_forwarding() -> Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, "1").context(
        "cannot enable IPv4 forwarding (in a container, set the sysctl net.ipv4.ip_forward=1)",
    )?;
    info!("enabled IPv4 forwarding");
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
    tokio::select! {
        _ = link_loop(&config, &tun, &netlink, index) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("stopping: removing nftables table and interface");
    remove_nat(&config.tun_name).await;
    drop(tun);
    Ok(())
}

/// Connects, serves, and reconnects with jittered exponential backoff, forever.
async fn link_loop(config: &ConnectorConfig, tun: &AsyncDevice, netlink: &Netlink, index: u32) {
    let max = Duration::from_secs(config.max_backoff_secs.max(1));
    let mut backoff = Duration::from_millis(250);
    let mut routes: Vec<IpNet> = Vec::new();
    let mut names = names::Translations::default();
    let resolver = match names::resolver(&config.dns_servers) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            warn!("no DNS resolver for name-based applications: {e:#}");
            None
        }
    };
    let table = nft_table(&config.tun_name);
    loop {
        let started = Instant::now();
        let attempt = async {
            let client_config = tls_client_config(&config.tls)?;
            connect(config, &client_config).await
        };
        match attempt.await {
            Ok((conn, ranges, app_ranges)) => {
                names.set_app_ranges(app_ranges.clone());
                let ranges: Vec<IpNet> = ranges.into_iter().chain(app_ranges).collect();
                backoff = Duration::from_millis(250);
                for net in &ranges {
                    if let Err(e) = netlink.add_route(index, *net).await {
                        warn!("cannot route {net} into the tunnel: {e}");
                    }
                }
                for old in routes.iter().filter(|r| !ranges.contains(r)) {
                    let _ = netlink.del_route(index, *old).await;
                }
                routes = ranges;
                info!(site = %config.site, broker = %conn.remote_address(), "linked to broker");
                let reason = tokio::select! {
                    r = forward(&conn, tun, &mut names, resolver.clone(), &table) => r,
                    _ = renew_loop(conn.clone(), &config.tls) => "renewal stopped".into(),
                };
                warn!(site = %config.site, "link to broker lost: {reason}");
            }
            Err(e) => warn!("cannot link to broker {}: {e:#}", config.broker),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        let wait = backoff.mul_f64(jitter);
        debug!(?wait, "reconnecting after backoff");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(max);
    }
}

/// One link attempt: a fresh UDP socket *connected* to the broker (so it accepts nothing from
/// anyone else and is not a listening socket), QUIC with mutual TLS, then the hello exchange.
async fn connect(
    config: &ConnectorConfig,
    client_config: &quinn::ClientConfig,
) -> Result<(quinn::Connection, Vec<IpNet>, Vec<IpNet>)> {
    let broker: SocketAddr = tokio::net::lookup_host(&config.broker)
        .await
        .with_context(|| format!("cannot resolve {:?}", config.broker))?
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
            ..
        } => Ok((conn, device_ranges, app_ranges)),
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

/// Moves packets between the link and the TUN device until the link ends; installs the name
/// translations the broker asks for.
async fn forward(
    conn: &quinn::Connection,
    tun: &AsyncDevice,
    names: &mut names::Translations,
    resolver: Option<Arc<hickory_resolver::TokioResolver>>,
    table: &str,
) -> String {
    let max = usize::from(TUN_MTU);
    let mut block = BytesMut::with_capacity(TUN_READ_BLOCK);
    let mut too_large = 0u64;
    let (events, mut event_rx) = tokio::sync::mpsc::unbounded_channel::<NameEvent>();
    let mut expire = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(pkt) => {
                    let admit = match sekisho_proto::packet::addresses(&pkt) {
                        Ok((src, dst)) => names.admit(src, dst, &pkt, Instant::now()),
                        Err(_) => names::Admit::Forward,
                    };
                    if admit == names::Admit::Forward
                        && let Err(e) = tun.send(&pkt).await
                    {
                        debug!("TUN write error: {e}");
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
                                let _ = events.send(NameEvent::Map { key: (device, synthetic), name });
                            }
                            Err(e) => warn!("malformed message from the broker: {e}"),
                        }
                    });
                }
                Err(e) => return e.to_string(),
            },
            Some(ev) = event_rx.recv() => match ev {
                NameEvent::Map { key, name } => {
                    if names.has(&key, &name) {
                        continue;
                    }
                    let Some(resolver) = resolver.clone() else {
                        names::log_failed(&name, "no resolver");
                        names.failed(&key);
                        continue;
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
                        let _ = events.send(NameEvent::Done { key, name, result });
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
            },
            _ = expire.tick() => names.expire(Instant::now()),
            r = async {
                if block.capacity() < max {
                    block = BytesMut::with_capacity(TUN_READ_BLOCK);
                }
                block.resize(max, 0);
                tun.recv(&mut block).await
            } => match r {
                Ok(n) => match conn.send_datagram(block.split_to(n).freeze()) {
                    Ok(()) => {}
                    Err(quinn::SendDatagramError::TooLarge) => {
                        too_large += 1;
                        if too_large.is_power_of_two() {
                            warn!(too_large, size = n, "reply packet larger than the link carries; dropped");
                        }
                    }
                    Err(e) => return e.to_string(),
                },
                Err(e) => debug!("TUN read error: {e}"),
            },
        }
    }
}
