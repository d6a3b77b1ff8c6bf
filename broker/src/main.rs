//! `sekisho-broker`: terminates clients' WireGuard tunnels, authorizes every new flow against
//! the policy, and forwards allowed packets to the connector of the application's site.

mod admin;
mod config;
mod control;
#[cfg(test)]
mod control_tests;
mod core;
mod metrics;
mod pki;
mod pool;
mod store;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UdpSocket, UnixListener};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use ipnet::IpNet;
use sekisho_proto::keys::PrivateKey;
use sekisho_proto::link::{
    ALPN, BrokerWelcome, ConnectorHello, MAX_CONTROL_MESSAGE, SiteMessage, connector_cert_name,
};
use sekisho_proto::policy::Policy;
use sekisho_proto::sys::AsyncDevice;

use crate::config::BrokerConfig;
use crate::core::{AppDnsRecord, BUF_SIZE, BrokerCore, DecisionRecord, Io, PostureRecord};
use crate::pool::LinkId;

#[derive(Parser)]
#[command(
    name = "sekisho-broker",
    version,
    about = "Sekisho broker: WireGuard termination, per-flow authorization and connector links",
    long_about = "Sekisho broker: terminates the WireGuard tunnels of clients on one UDP socket, \
decides every new flow against the policy (default deny; allow rules; deny rules win), answers \
denied flows at once (TCP RST or ICMP administratively prohibited) and forwards allowed packets \
over QUIC to the connector of the application's site. Every decision is one JSON line in the \
decision log.\n\nSignals: SIGHUP reloads the policy file (a file with errors is rejected and the \
running policy stays); SIGTERM/SIGINT stop the broker."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker with a config file (documented example: deploy/examples/broker.toml).
    Run {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a policy file and print a summary, or its first error as file:line:column.
    CheckPolicy { policy: PathBuf },
    /// Print the running broker's counters, peers and connector links as JSON.
    Stats {
        /// The broker's control socket (see `control_socket` in the config).
        #[arg(short, long, default_value = "/run/sekisho/broker.sock")]
        socket: PathBuf,
    },
    /// Print a new WireGuard private key (base64).
    Genkey,
    /// Read a private key on standard input and print its public key.
    Pubkey,
    /// The certificate authority for connector links.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Administer the control plane: users, groups, enrollment tokens, devices, connectors,
    /// policy, and "explain" a decision (talks to the control API with an admin token).
    Admin(admin::AdminArgs),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) and the broker's certificate (broker.pem, broker.key) in DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// DNS name(s) connectors use to reach this broker.
        #[arg(long = "name", default_value = "broker.sekisho.internal")]
        names: Vec<String>,
    },
    /// Issue the certificate of one site's connector (connector-SITE.pem/.key) in DIR.
    IssueConnector {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long)]
        site: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run_blocking(&config),
        Command::CheckPolicy { policy } => check_policy(&policy),
        Command::Stats { socket } => stats(&socket),
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => pubkey(),
        Command::Pki(PkiCommand::Init { dir, names }) => pki::init(&dir, &names),
        Command::Pki(PkiCommand::IssueConnector { dir, site }) => pki::issue_connector(&dir, &site),
        Command::Admin(args) => admin::run(args),
    };
    if let Err(e) = result {
        eprintln!("sekisho-broker: {e:#}");
        std::process::exit(2);
    }
}

fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
    println!("{}", PrivateKey::parse(&text)?.public());
    Ok(())
}

fn check_policy(path: &Path) -> Result<()> {
    let p = Policy::load(path)?;
    println!(
        "{}: ok: {} users, {} groups, {} devices, {} sites, {} applications, {} rules; device range {}",
        path.display(),
        p.users.len(),
        p.groups.len(),
        p.devices.len(),
        p.sites.len(),
        p.applications.len(),
        p.rules.len(),
        p.device_range
    );
    Ok(())
}

fn stats(socket: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("cannot reach the broker at {}", socket.display()))?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        println!("{out}");
        Ok(())
    })
}

fn run_blocking(config: &Path) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(config))
}

/// Decision records waiting for the log writer.
const DECISION_QUEUE: usize = 65536;

/// Everything the data path touches, behind one lock. Packets are processed under it in
/// batches; nothing awaits while it is held.
pub(crate) struct Shared {
    pub(crate) core: BrokerCore,
    /// Live connector links by id (the QUIC connection's stable id).
    pub(crate) links: HashMap<LinkId, quinn::Connection>,
    /// Internet egress (full tunnel), when configured.
    pub(crate) egress: Option<Arc<AsyncDevice>>,
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

pub(crate) fn lock(s: &SharedRef) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

enum LogLine {
    Decision(DecisionRecord),
    Posture(PostureRecord),
    AppDns(AppDnsRecord),
    Policy {
        result: &'static str,
        detail: String,
    },
}

struct ShellIo<'a> {
    udp: &'a UdpSocket,
    links: &'a HashMap<LinkId, quinn::Connection>,
    egress: Option<&'a AsyncDevice>,
    log: &'a mpsc::Sender<LogLine>,
}

impl Io for ShellIo<'_> {
    fn send_udp(&mut self, to: SocketAddr, data: &[u8]) {
        if let Err(e) = self.udp.try_send_to(data, to) {
            debug!(%e, "UDP send failed");
        }
    }

    fn send_to_link(&mut self, link: LinkId, packet: &[u8]) -> bool {
        match self.links.get(&link) {
            Some(conn) => conn.send_datagram(Bytes::copy_from_slice(packet)).is_ok(),
            None => false,
        }
    }

    fn decision(&mut self, record: DecisionRecord) -> bool {
        debug!(?record, "flow decision");
        self.log.try_send(LogLine::Decision(record)).is_ok()
    }

    fn posture(&mut self, record: PostureRecord) -> bool {
        debug!(?record, "posture event");
        self.log.try_send(LogLine::Posture(record)).is_ok()
    }

    fn map_name(&mut self, link: LinkId, device: IpAddr, synthetic: IpAddr, name: &str) {
        let Some(conn) = self.links.get(&link).cloned() else {
            return;
        };
        let message = SiteMessage::MapName {
            device,
            synthetic,
            name: name.to_string(),
        };
        tokio::spawn(send_site_message(conn, message));
    }

    fn app_dns(&mut self, record: AppDnsRecord) {
        debug!(?record, "application name query");
        let _ = self.log.try_send(LogLine::AppDns(record));
    }

    fn send_to_egress(&mut self, packet: &[u8]) -> bool {
        match self.egress {
            Some(tun) => tun.try_send(packet).is_ok(),
            None => false,
        }
    }
}

/// Sends `message` to a connector on a stream of its own.
async fn send_site_message(conn: quinn::Connection, message: SiteMessage) {
    let sent = async {
        let mut s = conn.open_uni().await?;
        s.write_all(&serde_json::to_vec(&message)?).await?;
        s.finish()?;
        anyhow::Ok(())
    };
    if let Err(e) = sent.await {
        debug!("cannot send a message to the connector: {e:#}");
    }
}

fn with_core(
    shared: &SharedRef,
    udp: &UdpSocket,
    log: &mpsc::Sender<LogLine>,
    f: impl FnOnce(&mut BrokerCore, &mut ShellIo),
) {
    let mut g = lock(shared);
    let Shared {
        core,
        links,
        egress,
    } = &mut *g;
    let mut io = ShellIo {
        udp,
        links,
        egress: egress.as_deref(),
        log,
    };
    f(core, &mut io);
}

async fn run(config_path: &Path) -> Result<()> {
    let config = BrokerConfig::load(config_path)?;
    let key = PrivateKey::read_file(&config.private_key_file)?;
    let (policy, opened) = match &config.control {
        Some(ctl) => {
            let (policy, opened) =
                control::Control::open(ctl, &config.policy, &config.tls.ca).await?;
            (policy, Some((ctl, opened)))
        }
        None => (Policy::load(&config.policy)?, None),
    };
    let mut core = BrokerCore::new(
        key,
        policy,
        config.flows.timeouts(),
        config.flows.max_flows,
        config.flows.max_flows_per_device,
    );
    core.set_name(&match &config.control {
        Some(c) => c
            .name
            .clone()
            .unwrap_or_else(|| c.wireguard_endpoint.clone()),
        None => config.listen_wireguard.to_string(),
    });
    info!(public_key = %core.public_key(), "broker identity");
    core.log_policy_summary();
    let broker_key = core.public_key().to_string();
    let egress = match &config.egress {
        Some(e) => Some(Arc::new(
            egress_up(e, core.policy().device_range)
                .await
                .context("cannot set up internet egress")?,
        )),
        None => None,
    };
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        core,
        links: HashMap::new(),
        egress: egress.clone(),
    }));
    let control = match opened {
        Some((ctl, opened)) => {
            let control = control::Control::new(opened, shared.clone(), ctl.clone(), broker_key)?;
            let tls = &config.tls;
            control::serve(control.clone(), ctl.listen, &tls.cert, &tls.ca, &tls.key).await?;
            tokio::spawn(control.clone().registry_loop(Duration::from_secs(2)));
            Some(control)
        }
        None => None,
    };

    let udp = Arc::new(
        UdpSocket::bind(config.listen_wireguard)
            .await
            .with_context(|| format!("cannot bind WireGuard UDP {}", config.listen_wireguard))?,
    );
    info!(addr = %config.listen_wireguard, "WireGuard listening");
    let endpoint = quic_endpoint(&config)?;
    if let Some(m) = &config.metrics {
        let source = Arc::new(metrics::BrokerMetrics {
            shared: shared.clone(),
            control: control.clone(),
        });
        let listener = tokio::net::TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("cannot bind the metrics endpoint {}", m.listen))?;
        info!(addr = %m.listen, "metrics endpoint listening (/metrics, /healthz, /readyz)");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, sekisho_proto::metrics::router(source)).await {
                error!("metrics endpoint stopped: {e}");
            }
        });
    }
    if let Some(c) = control.clone() {
        tokio::spawn(announce_brokers(shared.clone(), c));
    }
    info!(addr = %config.listen_connectors, "connector QUIC listening");

    // Bounded: a flood of new flows must not grow memory without end; what the writer cannot
    // take is counted (decisions_not_logged).
    let (log_tx, log_rx) = mpsc::channel(DECISION_QUEUE);
    tokio::spawn(decision_writer(config.decision_log.clone(), log_rx));

    tokio::spawn(wg_loop(shared.clone(), udp.clone(), log_tx.clone()));
    if let Some(tun) = egress.clone() {
        tokio::spawn(egress_loop(
            tun,
            shared.clone(),
            udp.clone(),
            log_tx.clone(),
        ));
    }
    tokio::spawn(timer_loop(shared.clone(), udp.clone(), log_tx.clone()));
    tokio::spawn(accept_connectors(
        endpoint.clone(),
        shared.clone(),
        udp.clone(),
        log_tx.clone(),
        control.clone(),
        config.connectors.stale_after,
    ));
    let control_socket = control_server(&config.control_socket, shared.clone())?;

    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match &control {
                Some(c) => apply_policy_file(c, &config.policy, &log_tx).await,
                None => reload_policy(&config.policy, &shared, &log_tx),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("stopping");
    if let Some(e) = &config.egress {
        let table = egress_table(&e.interface);
        if let Err(e) =
            sekisho_proto::sys::nft(&sekisho_proto::sys::nft_delete_table("ip", &table)).await
        {
            warn!("cannot remove nftables table {table}: {e}");
        }
    }
    endpoint.close(0u32.into(), b"broker stopping");
    control_socket.abort();
    let _ = std::fs::remove_file(&config.control_socket);
    Ok(())
}

fn reload_policy(path: &Path, shared: &SharedRef, log: &mpsc::Sender<LogLine>) {
    match Policy::load(path) {
        Ok(policy) => {
            let mut g = lock(shared);
            g.core.set_policy(policy);
            g.core.log_policy_summary();
            let generation = g.core.stats().policy_generation;
            let _ = log.try_send(LogLine::Policy {
                result: "applied",
                detail: format!("generation {generation}"),
            });
        }
        Err(e) => {
            error!("policy reload rejected, the running policy stays in force: {e}");
            let _ = log.try_send(LogLine::Policy {
                result: "rejected",
                detail: e.to_string(),
            });
        }
    }
}

/// SIGHUP with a control plane: the policy file goes through the same checks and tests as
/// `admin policy apply` and becomes the stored policy.
async fn apply_policy_file(c: &control::Control, path: &Path, log: &mpsc::Sender<LogLine>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            error!("policy reload: cannot read {}: {e}", path.display());
            return;
        }
    };
    match c.apply_policy(path, &text, "sighup").await {
        Ok(applied) => {
            let _ = log.try_send(LogLine::Policy {
                result: "applied",
                detail: format!("version {}", applied.version),
            });
        }
        Err((_, rejected)) => {
            let failed: Vec<String> = rejected
                .tests
                .iter()
                .filter(|t| !t.passed)
                .map(|t| format!("{}: {}", t.name, t.detail))
                .collect();
            error!(
                "policy reload rejected, the running policy stays in force: {} {}",
                rejected.error,
                failed.join("; ")
            );
            let _ = log.try_send(LogLine::Policy {
                result: "rejected",
                detail: format!("{} {}", rejected.error, failed.join("; ")),
            });
        }
    }
}

async fn wg_loop(shared: SharedRef, udp: Arc<UdpSocket>, log: mpsc::Sender<LogLine>) {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(%e, "WireGuard socket receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = Instant::now();
        with_core(&shared, &udp, &log, |core, io| {
            core.handle_wg(from, &buf[..n], now, io);
            // Drain what else is waiting under the same lock.
            for _ in 0..63 {
                match udp.try_recv_from(&mut buf) {
                    Ok((n, from)) => core.handle_wg(from, &buf[..n], now, io),
                    Err(_) => break,
                }
            }
        });
    }
}

/// nftables table of the egress interface `tun`.
fn egress_table(tun: &str) -> String {
    format!(
        "sekisho_{}",
        tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// Creates the egress TUN device, routes the device range into it (replies after the kernel
/// undid the NAT) and masquerades what leaves for the internet.
async fn egress_up(e: &crate::config::EgressConfig, device_range: IpNet) -> Result<AsyncDevice> {
    if sekisho_proto::sys::enable_ipv4_forwarding()? {
        info!("enabled IPv4 forwarding");
    }
    let tun = sekisho_proto::sys::create_tun(&e.interface, 1500)?;
    let netlink = sekisho_proto::sys::Netlink::open()?;
    let index = netlink.link_index(&e.interface).await?;
    netlink.add_route(index, device_range).await?;
    let t = egress_table(&e.interface);
    let tun_name = &e.interface;
    let out = match &e.uplink {
        Some(u) => format!("oifname \"{u}\""),
        None => format!("oifname != \"{tun_name}\""),
    };
    sekisho_proto::sys::nft(&format!(
        "{}table ip {t} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             iifname \"{tun_name}\" {out} masquerade\n\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             iifname \"{tun_name}\" {out} accept\n\
             oifname \"{tun_name}\" ct state established,related accept\n\
             oifname \"{tun_name}\" counter drop\n\
             iifname \"{tun_name}\" counter drop\n\
           }}\n\
         }}\n",
        sekisho_proto::sys::nft_delete_table("ip", &t)
    ))
    .await?;
    info!(interface = %tun_name, "internet egress up (source NAT)");
    Ok(tun)
}

/// Packets from the internet for full-tunnel devices.
async fn egress_loop(
    tun: Arc<AsyncDevice>,
    shared: SharedRef,
    udp: Arc<UdpSocket>,
    log: mpsc::Sender<LogLine>,
) {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                warn!(%e, "egress TUN read error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = Instant::now();
        with_core(&shared, &udp, &log, |core, io| {
            core.handle_egress_packet(&buf[..n], now, io);
            for _ in 0..63 {
                match tun.try_recv(&mut buf) {
                    Ok(n) => core.handle_egress_packet(&buf[..n], now, io),
                    Err(_) => break,
                }
            }
        });
    }
}

async fn timer_loop(shared: SharedRef, udp: Arc<UdpSocket>, log: mpsc::Sender<LogLine>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        with_core(&shared, &udp, &log, |core, io| core.tick(now, unix, io));
    }
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate found", path.display());
    }
    Ok(certs)
}

fn quic_endpoint(config: &BrokerConfig) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&config.tls.ca)? {
        roots.add(ca).context("bad CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("cannot build the connector certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(&config.tls.key)
        .with_context(|| format!("cannot read private key {}", config.tls.key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&config.tls.cert)?, key)
        .context("broker certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(config.connectors.idle_timeout.try_into()?))
        // Client packets (MTU 1360 by default) must fit in one datagram from the start.
        .initial_mtu(1400)
        .datagram_receive_buffer_size(Some(8 << 20))
        .datagram_send_buffer_size(8 << 20)
        .max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::server(server, config.listen_connectors)
        .with_context(|| format!("cannot bind connector QUIC {}", config.listen_connectors))
}

async fn accept_connectors(
    endpoint: quinn::Endpoint,
    shared: SharedRef,
    udp: Arc<UdpSocket>,
    log: mpsc::Sender<LogLine>,
    control: Option<Arc<control::Control>>,
    stale_after: Duration,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (shared, udp, log, control) =
            (shared.clone(), udp.clone(), log.clone(), control.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = serve_connector(incoming, shared, udp, log, control, stale_after).await
            {
                warn!(%remote, "connector link ended: {e:#}");
            }
        });
    }
}

/// Checks that the connector's certificate is valid for the site it claims and that the
/// policy knows the site.
fn check_connector(
    conn: &quinn::Connection,
    hello: &ConnectorHello,
    policy: &Policy,
) -> Result<(), String> {
    let leaf = peer_leaf(conn).ok_or("no client certificate")?;
    let leaf = CertificateDer::from(leaf);
    let cert =
        webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("bad certificate: {e}"))?;
    let name = ServerName::try_from(connector_cert_name(&hello.site))
        .map_err(|_| "bad site name".to_string())?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("certificate is not valid for site {:?}", hello.site))?;
    if !policy.sites.contains(&hello.site) {
        return Err(format!("site {:?} is not in the policy", hello.site));
    }
    Ok(())
}

/// The DER leaf certificate a connector presented.
pub(crate) fn peer_leaf(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// With a control plane, a connector's certificate must belong to an enrolled, unrevoked
/// connector of the site it claims. Returns the connector's name.
async fn check_enrolled(
    conn: &quinn::Connection,
    site: &str,
    control: &control::Control,
) -> Result<String, String> {
    let serial = peer_leaf(conn)
        .and_then(|der| pki::cert_serial(&der))
        .ok_or("cannot read the certificate serial")?;
    match control.store.connector_by_serial(&serial).await {
        Ok(Some((name, enrolled_site))) if enrolled_site == site => Ok(name),
        Ok(Some((name, other))) => Err(format!(
            "certificate of connector {name} is for site {other:?}, not {site:?}"
        )),
        Ok(None) => Err("certificate is not of an enrolled connector, or it was revoked".into()),
        Err(e) => Err(format!("store unavailable: {e:#}")),
    }
}

async fn serve_connector(
    incoming: quinn::Incoming,
    shared: SharedRef,
    udp: Arc<UdpSocket>,
    log: mpsc::Sender<LogLine>,
    control: Option<Arc<control::Control>>,
    stale_after: Duration,
) -> Result<()> {
    let conn = incoming.await.context("handshake failed")?;
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .context("no hello within 10 s")??;
    let hello_bytes = recv
        .read_to_end(MAX_CONTROL_MESSAGE)
        .await
        .context("reading hello")?;
    let hello: ConnectorHello = serde_json::from_slice(&hello_bytes).context("malformed hello")?;
    let (check, ranges, app_ranges, health_checks) = {
        let g = lock(&shared);
        let p = g.core.policy();
        (
            check_connector(&conn, &hello, p),
            vec![p.device_range],
            vec![IpNet::V4(p.dns.app_range)],
            health_checks(p, &hello.site),
        )
    };
    // The connector's name: the enrolled name, else (no control plane) its address.
    let check = match (check, &control) {
        (Ok(()), Some(c)) => check_enrolled(&conn, &hello.site, c).await,
        (Ok(()), None) => Ok(conn.remote_address().to_string()),
        (Err(e), _) => Err(e),
    };
    let welcome = match &check {
        Ok(_) => BrokerWelcome::Accepted {
            site: hello.site.clone(),
            device_ranges: ranges,
            app_ranges,
            brokers: control
                .as_ref()
                .map(|c| c.connector_endpoints())
                .unwrap_or_default(),
            health_checks,
        },
        Err(reason) => BrokerWelcome::Refused {
            reason: reason.clone(),
        },
    };
    send.write_all(&serde_json::to_vec(&welcome)?).await?;
    send.finish()?;
    let name = match check {
        Ok(name) => name,
        Err(reason) => {
            // Give the refusal time to arrive before closing.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(1u32.into(), reason.as_bytes());
            bail!("refused connector for site {:?}: {reason}", hello.site);
        }
    };
    let site = hello.site;
    let id = conn.stable_id() as LinkId;
    info!(site = %site, connector = %name, version = %hello.version, remote = %conn.remote_address(), "connector linked");
    {
        let mut g = lock(&shared);
        g.links.insert(id, conn.clone());
        g.core.link_up(id, &site, &name);
    }
    let requests = tokio::spawn(serve_link_requests(
        conn.clone(),
        site.clone(),
        shared.clone(),
        control,
    ));
    let watch = tokio::spawn(watch_link(conn.clone(), shared.clone(), stale_after));
    let result = loop {
        match conn.read_datagram().await {
            Ok(pkt) => {
                let now = Instant::now();
                with_core(&shared, &udp, &log, |core, io| {
                    core.handle_site_packet(id, &pkt, now, io)
                });
            }
            Err(e) => break e,
        }
    };
    requests.abort();
    watch.abort();
    {
        let mut g = lock(&shared);
        g.links.remove(&id);
        g.core.link_down(id);
    }
    info!(site = %site, connector = %name, "connector link closed: {result}");
    Ok(())
}

/// The applications of `site` a connector checks it can reach: one host (an address or a
/// plain name) and one TCP port each. Ranges and wildcard names have no single host to try.
fn health_checks(p: &Policy, site: &str) -> Vec<sekisho_proto::link::HealthCheck> {
    let Some(site_id) = p.sites.iter().position(|s| s == site) else {
        return Vec::new();
    };
    p.applications
        .iter()
        .filter(|a| a.site as usize == site_id)
        .filter(|a| {
            a.protocols.is_empty() || a.protocols.contains(&sekisho_proto::policy::Protocol::Tcp)
        })
        .filter_map(|a| {
            let port = a.ports.first().map(|r| r.0)?;
            let host = a
                .networks
                .iter()
                .find(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr().to_string())
                .or_else(|| a.names.iter().find(|n| !n.contains('*')).cloned())?;
            Some(sekisho_proto::link::HealthCheck {
                application: a.name.clone(),
                host,
                port,
            })
        })
        .collect()
}

/// Marks the link stale while nothing arrives from the connector (it sends a keepalive every
/// 300 ms), so new flows go to the site's other connectors well before the QUIC idle timeout
/// closes the link.
async fn watch_link(conn: quinn::Connection, shared: SharedRef, stale_after: Duration) {
    let id = conn.stable_id() as LinkId;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last = conn.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    let mut stale = false;
    loop {
        tick.tick().await;
        let now_count = conn.stats().udp_rx.datagrams;
        if now_count != last {
            last = now_count;
            heard = Instant::now();
        }
        let silent = heard.elapsed() > stale_after;
        if silent != stale {
            stale = silent;
            lock(&shared).core.link_stale(id, stale);
        }
    }
}

/// Tells every linked connector when the set of brokers changed, so connectors link to a
/// broker that joined and drop one that left.
async fn announce_brokers(shared: SharedRef, control: Arc<control::Control>) {
    let mut told = control.connector_endpoints();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = control.connector_endpoints();
        if now == told {
            continue;
        }
        info!(brokers = ?now, "the set of brokers changed; telling the connectors");
        let links: Vec<quinn::Connection> = lock(&shared).links.values().cloned().collect();
        for conn in links {
            tokio::spawn(send_site_message(
                conn,
                SiteMessage::Brokers {
                    brokers: now.clone(),
                },
            ));
        }
        told = now;
    }
}

/// Requests a linked connector sends on its own streams (certificate renewal, health).
async fn serve_link_requests(
    conn: quinn::Connection,
    site: String,
    shared: SharedRef,
    control: Option<Arc<control::Control>>,
) {
    use sekisho_proto::link::{LinkAnswer, LinkRequest};
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let Ok(bytes) = recv.read_to_end(MAX_CONTROL_MESSAGE).await else {
            continue;
        };
        let answer = match serde_json::from_slice::<LinkRequest>(&bytes) {
            Ok(LinkRequest::Renew { csr_pem }) => {
                let serial = peer_leaf(&conn).and_then(|der| pki::cert_serial(&der));
                match (serial, &control) {
                    (Some(serial), Some(control)) => {
                        control.renew_connector(&serial, &site, &csr_pem).await
                    }
                    (None, _) => Err("cannot read the link's certificate".to_string()),
                    (_, None) => Err("this broker has no control plane to renew".to_string()),
                }
                .map(Some)
            }
            Ok(LinkRequest::Health {
                draining,
                unreachable,
            }) => {
                lock(&shared)
                    .core
                    .link_health(conn.stable_id() as LinkId, draining, &unreachable);
                Ok(None)
            }
            Err(e) => Err(format!("malformed request: {e}")),
        };
        let answer = match answer {
            Ok(Some(certificate_pem)) => LinkAnswer::Renewed { certificate_pem },
            Ok(None) => LinkAnswer::Noted,
            Err(reason) => {
                warn!(site = %site, "connector renewal refused: {reason}");
                LinkAnswer::Refused { reason }
            }
        };
        if let Ok(bytes) = serde_json::to_vec(&answer) {
            let _ = send.write_all(&bytes).await;
            let _ = send.finish();
        }
    }
}

#[derive(Serialize)]
struct StatsReport<'a> {
    public_key: String,
    policy_generation: u64,
    flows: usize,
    counters: &'a core::Stats,
    peers: Vec<core::PeerInfo>,
    /// Sites with at least one linked connector.
    connector_links: Vec<String>,
    connectors: Vec<pool::LinkInfo>,
}

fn control_server(path: &Path, shared: SharedRef) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = {
                let g = lock(&shared);
                let connectors = g.core.connector_links();
                let mut links: Vec<String> = connectors.iter().map(|l| l.site.clone()).collect();
                links.sort();
                links.dedup();
                serde_json::to_string_pretty(&StatsReport {
                    public_key: g.core.public_key().to_string(),
                    policy_generation: g.core.stats().policy_generation,
                    flows: g.core.flow_count(),
                    counters: g.core.stats(),
                    peers: g.core.peers(),
                    connector_links: links,
                    connectors,
                })
            };
            if let Ok(body) = body {
                let _ = stream.write_all(body.as_bytes()).await;
            }
        }
    }))
}

#[derive(Serialize)]
struct Stamped<'a, T: Serialize> {
    ts: String,
    #[serde(flatten)]
    record: &'a T,
}

#[derive(Serialize)]
struct PolicyEvent<'a> {
    event: &'static str,
    result: &'static str,
    detail: &'a str,
}

async fn decision_writer(path: PathBuf, mut rx: mpsc::Receiver<LogLine>) {
    let mut out: Box<dyn std::io::Write + Send> = if path == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                error!(
                    "cannot open decision log {}: {e}; decisions go to standard output",
                    path.display()
                );
                Box::new(std::io::stdout())
            }
        }
    };
    while let Some(line) = rx.recv().await {
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let text = match &line {
            LogLine::Decision(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Posture(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::AppDns(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Policy { result, detail } => serde_json::to_string(&Stamped {
                ts,
                record: &PolicyEvent {
                    event: "policy",
                    result,
                    detail,
                },
            }),
        };
        if let Ok(mut text) = text {
            text.push('\n');
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                error!("cannot write decision log: {e}");
            }
        }
    }
}
