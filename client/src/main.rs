//! `sekisho-client`: the laptop agent. Creates a TUN device with the device's overlay address,
//! routes the application ranges into it, and keeps a WireGuard session to the broker.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod dnsctl;
mod posture;
mod resolvconf;
mod stub;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use sekisho_proto::config::{ConfigError, load_toml};
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_proto::sys::{Netlink, create_tun};
use sekisho_proto::wg::{Output, Session, WireGuardError};

#[derive(Parser)]
#[command(
    name = "sekisho-client",
    version,
    about = "Sekisho client: the always-on tunnel from this device to a Sekisho broker",
    long_about = "Sekisho client: creates a TUN interface with this device's overlay address, routes \
the application ranges into it and keeps a WireGuard session to the broker (keepalive and \
re-handshake included). Every new flow is authorized by the broker; denied ones fail at once.\n\n\
Signals: SIGTERM/SIGINT remove the interface and its routes, then exit."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bring the tunnel up and keep it up (documented example: deploy/examples/client.toml).
    Run {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write a new WireGuard private key to FILE (mode 0600) and print its public key.
    Genkey {
        #[arg(value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of the private key in FILE.
    Pubkey {
        #[arg(value_name = "FILE")]
        key: PathBuf,
    },
    /// Run only the DNS stub with local blocklists (benchmarks, diagnosis): no tunnel, no
    /// control plane, the system's DNS setting untouched.
    Stub {
        /// Address and port to answer on (UDP and TCP).
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: SocketAddr,
        /// A blocklist file (domains, hosts or adblock format, detected); repeatable. Its
        /// category is the file name without extension.
        #[arg(long = "list", value_name = "FILE")]
        lists: Vec<PathBuf>,
        /// Never block this domain (and its subdomains); repeatable.
        #[arg(long = "allow", value_name = "DOMAIN")]
        allow: Vec<String>,
        /// Upstream resolver (udp://IP, tcp://IP, tls://IP#NAME, https://IP/PATH#NAME);
        /// repeatable. Default: the servers in /etc/resolv.conf.
        #[arg(long = "upstream", value_name = "URL")]
        upstreams: Vec<String>,
        /// nxdomain, null, or block-page addresses.
        #[arg(long, default_value = "nxdomain")]
        block_answer: String,
        /// CA certificates (PEM) that DoT/DoH upstreams are checked against, besides the
        /// system's.
        #[arg(long, value_name = "FILE")]
        upstream_ca: Option<PathBuf>,
    },
    /// Enroll this device with a one-time token from an admin: creates the WireGuard key here
    /// (never sent anywhere), registers its public key and writes DIR/client.toml.
    Enroll {
        /// Control API URL, like https://broker.example.com:8443.
        #[arg(long)]
        server: String,
        /// The enrollment token (SKE1.…); `-` reads it from standard input.
        #[arg(long)]
        token: String,
        /// Device name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Where the key, credential, CA certificate and client.toml go.
        #[arg(long, default_value = "/etc/sekisho")]
        dir: PathBuf,
        /// TUN interface name written into the config.
        #[arg(long, default_value = "sekisho0")]
        interface: String,
        /// How often the posture checks run (written into the config).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        check_interval: Duration,
    },
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    interface: InterfaceConfig,
    broker: BrokerPeer,
    /// The control plane this device enrolled with (posture refresh). Absent for devices
    /// configured by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    control: Option<ControlConfig>,
    /// The DNS stub (private application names, DNS filtering). Absent: no stub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns: Option<DnsConfig>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct DnsConfig {
    /// Where the stub answers (UDP and TCP). Default: this device's overlay address, port 53.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Point the system's DNS at the stub while running (and restore it afterwards).
    #[serde(default = "yes")]
    manage_system_dns: bool,
    /// The system's resolver file.
    #[serde(default = "default_resolv_conf")]
    resolv_conf: PathBuf,
    /// Where the previous resolver file is kept while the client runs (relative to this
    /// config file's folder).
    #[serde(default = "default_backup")]
    backup_file: PathBuf,
    /// Blocked queries, one JSON line each; "-" is standard output.
    #[serde(default = "default_dns_log")]
    log: PathBuf,
    /// Extra CA certificates (PEM) for DoT/DoH upstreams, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream_ca_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}
fn default_resolv_conf() -> PathBuf {
    PathBuf::from("/etc/resolv.conf")
}
fn default_backup() -> PathBuf {
    PathBuf::from("resolv.conf.sekisho-backup")
}
fn default_dns_log() -> PathBuf {
    PathBuf::from("-")
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ControlConfig {
    /// Control API URL.
    url: String,
    /// The cluster CA certificate (PEM), received at enrollment.
    ca_file: PathBuf,
    /// This device's credential (mode 0600), received at enrollment.
    credential_file: PathBuf,
    /// The overlay's device range; the broker's posture service is at its first address.
    device_range: IpNet,
    /// How often the posture checks run; a change is reported at once.
    #[serde(default = "default_check_interval")]
    check_interval: String,
}

fn default_check_interval() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct InterfaceConfig {
    /// TUN interface name.
    #[serde(default = "default_ifname")]
    name: String,
    /// This device's WireGuard private key (file written by `sekisho-client genkey`).
    private_key_file: PathBuf,
    /// This device's overlay address (as the policy lists it for the device).
    address: IpAddr,
    /// MTU of the TUN interface. The default leaves room for WireGuard here and QUIC between
    /// broker and connector on a 1500-byte path.
    #[serde(default = "default_mtu")]
    mtu: u16,
    /// Application ranges routed into the tunnel.
    #[serde(default)]
    routes: Vec<IpNet>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BrokerPeer {
    /// host:port of the broker's WireGuard socket.
    endpoint: String,
    /// The broker's WireGuard public key.
    public_key: String,
    /// Seconds between keepalives while idle (keeps NAT mappings and shows liveness).
    #[serde(default = "default_keepalive")]
    keepalive_secs: u16,
}

fn default_ifname() -> String {
    "sekisho0".into()
}
fn default_mtu() -> u16 {
    1360
}
fn default_keepalive() -> u16 {
    10
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run_blocking(&config),
        Command::Genkey { out } => genkey(&out),
        Command::Stub {
            listen,
            lists,
            allow,
            upstreams,
            block_answer,
            upstream_ca,
        } => dnsctl::run_stub(
            listen,
            &lists,
            &allow,
            upstreams,
            &block_answer,
            upstream_ca.as_deref(),
        ),
        Command::Pubkey { key } => PrivateKey::read_file(&key)
            .map(|k| println!("{}", k.public()))
            .map_err(Into::into),
        Command::Enroll {
            server,
            token,
            name,
            dir,
            interface,
            check_interval,
        } => enroll(&server, &token, name, &dir, &interface, check_interval),
    };
    if let Err(e) = result {
        eprintln!("sekisho-client: {e:#}");
        std::process::exit(2);
    }
}

/// Creates `path` with mode 0600; it must not exist yet.
fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(())
}

fn genkey(out: &Path) -> Result<()> {
    let key = PrivateKey::generate();
    write_secret(out, &key.to_base64())?;
    println!("{}", key.public());
    Ok(())
}

fn enroll(
    server: &str,
    token: &str,
    name: Option<String>,
    dir: &Path,
    ifname: &str,
    check_interval: Duration,
) -> Result<()> {
    use sekisho_proto::api::{EnrollDeviceRequest, EnrollDeviceResponse};
    let (token, ca_sha256) = sekisho_proto::http::enrollment_token(token)?;
    let name = match name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("cannot read the host name; pass --name")?,
    };
    let config_path = dir.join("client.toml");
    if config_path.exists() {
        anyhow::bail!(
            "{} exists: this device is already enrolled (remove the folder to enroll again)",
            config_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = PrivateKey::generate();
    let request = EnrollDeviceRequest {
        token,
        public_key: key.public().to_string(),
        name,
    };
    let resp: EnrollDeviceResponse =
        sekisho_proto::http::enroll(server, ca_sha256, "/v1/enroll/device", &request)?;
    // Written only after the control plane accepted the key: a refused enrollment leaves
    // nothing behind.
    let key_file = dir.join("private.key");
    write_secret(&key_file, &key.to_base64())?;
    write_secret(&dir.join("credential"), &resp.credential)?;
    std::fs::write(dir.join("ca.pem"), &resp.ca_pem)?;
    let c = &resp.config;
    let broker = c
        .brokers
        .first()
        .context("the control plane named no broker")?;
    let config = ClientConfig {
        interface: InterfaceConfig {
            name: ifname.to_string(),
            private_key_file: PathBuf::from("private.key"),
            address: c.address,
            mtu: default_mtu(),
            routes: c.routes.clone(),
        },
        broker: BrokerPeer {
            endpoint: broker.endpoint.clone(),
            public_key: broker.public_key.clone(),
            keepalive_secs: default_keepalive(),
        },
        control: Some(ControlConfig {
            url: server.to_string(),
            ca_file: PathBuf::from("ca.pem"),
            credential_file: PathBuf::from("credential"),
            device_range: c.device_range,
            check_interval: humantime::format_duration(check_interval).to_string(),
        }),
        dns: Some(DnsConfig {
            manage_system_dns: true,
            resolv_conf: default_resolv_conf(),
            backup_file: default_backup(),
            log: default_dns_log(),
            ..Default::default()
        }),
    };
    let text = format!(
        "# Written by `sekisho-client enroll` for device {:?} of user {:?}.\n{}",
        c.device,
        c.user,
        toml::to_string(&config)?
    );
    std::fs::write(&config_path, text)?;
    println!(
        "enrolled {:?} (user {:?}) with address {}; run: sekisho-client run -c {}",
        c.device,
        c.user,
        c.address,
        config_path.display()
    );
    Ok(())
}

fn load_config(path: &Path) -> Result<(ClientConfig, PublicKeyBytes), ConfigError> {
    let (mut c, text): (ClientConfig, String) = load_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    c.interface.private_key_file = base.join(&c.interface.private_key_file);
    if let Some(ctl) = c.control.as_mut() {
        ctl.ca_file = base.join(&ctl.ca_file);
        ctl.credential_file = base.join(&ctl.credential_file);
    }
    if let Some(d) = c.dns.as_mut() {
        d.backup_file = base.join(&d.backup_file);
        if d.log != Path::new("-") {
            d.log = base.join(&d.log);
        }
        if let Some(ca) = d.upstream_ca_file.as_mut() {
            *ca = base.join(&*ca);
        }
    }
    let src = sekisho_proto::config::Source {
        file: path,
        text: &text,
    };
    let key = PublicKeyBytes::parse(&c.broker.public_key).map_err(|e| {
        let at = text.find(&c.broker.public_key);
        src.error(at.map(|a| a..a), "broker.public_key", e.to_string())
    })?;
    if c.interface.mtu < 576 {
        return Err(src.error(None, "interface.mtu", "MTU must be at least 576"));
    }
    if let Some(ctl) = &c.control
        && humantime::parse_duration(&ctl.check_interval).is_err()
    {
        let at = text.find(&ctl.check_interval);
        return Err(src.error(
            at.map(|a| a..a),
            "control.check_interval",
            "a duration like \"10s\" or \"500ms\"",
        ));
    }
    Ok((c, key))
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn run_blocking(config: &Path) -> Result<()> {
    init_tracing();
    let (config, broker_key) = load_config(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(config, broker_key))
}

async fn resolve(endpoint: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(endpoint)
        .await
        .with_context(|| format!("cannot resolve broker endpoint {endpoint:?}"))?
        .next()
        .with_context(|| format!("broker endpoint {endpoint:?} has no address"))
}

async fn run(config: ClientConfig, broker_key: PublicKeyBytes) -> Result<()> {
    let key = PrivateKey::read_file(&config.interface.private_key_file)?;
    let iface = &config.interface;
    let tun = create_tun(&iface.name, iface.mtu)?;
    let netlink = Netlink::open()?;
    let index = netlink.link_index(&iface.name).await?;
    let prefix = if iface.address.is_ipv4() { 32 } else { 128 };
    netlink.add_address(index, iface.address, prefix).await?;
    let mut routes = iface.routes.clone();
    if let Some(ctl) = &config.control {
        // The broker's posture service lives at the device range's first address.
        let service = sekisho_proto::posture::service_address(&ctl.device_range);
        routes.push(IpNet::from(service));
    }
    for net in &routes {
        netlink
            .add_route(index, *net)
            .await
            .with_context(|| format!("cannot route {net}"))?;
    }
    info!(interface = %iface.name, mtu = iface.mtu, routes = iface.routes.len(), "tunnel interface up");

    let bind: SocketAddr = if resolve(&config.broker.endpoint)
        .await
        .map(|a| a.is_ipv6())
        .unwrap_or(false)
    {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let udp = UdpSocket::bind(bind)
        .await
        .context("cannot open UDP socket")?;
    let mut session = Session::new(
        &key,
        broker_key,
        Some(config.broker.keepalive_secs),
        SESSION_INDEX,
        None,
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let dns = match &config.dns {
        Some(d) => Some(dnsctl::start_dns(d, &config).await?),
        None => None,
    };
    let handshakes = Arc::new(AtomicU64::new(0));
    let posture_task = match &config.control {
        Some(ctl) => Some(tokio::spawn(posture_loop(
            PostureSetup::load(ctl)?,
            ctl.device_range,
            handshakes.clone(),
        ))),
        None => None,
    };
    let result = tokio::select! {
        r = data_loop(&tun, &udp, &mut session, &config.broker.endpoint, &handshakes) => r,
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    if let Some(t) = posture_task {
        t.abort();
    }
    if let Some(d) = dns {
        d.stop();
    }
    info!("stopping: removing routes and interface");
    for net in &routes {
        if let Err(e) = netlink.del_route(index, *net).await {
            debug!("route {net} already gone: {e}");
        }
    }
    drop(tun);
    result
}

/// What the posture loop needs: an API client with this device's credential.
struct PostureSetup {
    api: sekisho_proto::http::ApiClient,
    interval: Duration,
}

impl PostureSetup {
    fn load(ctl: &ControlConfig) -> Result<PostureSetup> {
        let ca = std::fs::read_to_string(&ctl.ca_file)
            .with_context(|| format!("cannot read {}", ctl.ca_file.display()))?;
        let credential = std::fs::read_to_string(&ctl.credential_file)
            .with_context(|| format!("cannot read {}", ctl.credential_file.display()))?;
        Ok(PostureSetup {
            api: sekisho_proto::http::ApiClient::new(
                &ctl.url,
                sekisho_proto::http::ca_tls(&ca)?,
                Some(credential.trim().to_string()),
            )?,
            interval: humantime::parse_duration(&ctl.check_interval)?,
        })
    }
}

/// Runs the posture checks every interval; when a result changes, or the token is due for
/// refresh, asks the control plane for a new token and presents it to the broker inside the
/// tunnel. Only pass/fail per check is sent.
async fn posture_loop(setup: PostureSetup, range: IpNet, handshakes: Arc<AtomicU64>) {
    use sekisho_proto::api::{PostureRequest, PostureResponse};
    use sekisho_proto::posture::{POSTURE_PORT, TokenAnswer};
    let service = SocketAddr::new(
        sekisho_proto::posture::service_address(&range),
        POSTURE_PORT,
    );
    let mut checks = Vec::new();
    let mut last: Option<std::collections::BTreeMap<String, bool>> = None;
    let mut refresh_at = Instant::now();
    let mut presented = false;
    let mut buf = vec![0u8; 4096];
    let mut seen_handshakes = 0;
    loop {
        // A new WireGuard session may be with a broker that never saw this device's token
        // (a restarted one, say): present it again.
        let hs = handshakes.load(Ordering::Relaxed);
        if hs != seen_handshakes {
            seen_handshakes = hs;
            presented = false;
        }
        let specs = checks.clone();
        let results = tokio::task::spawn_blocking(move || {
            posture::evaluate(&specs, &posture::gather(&specs))
        })
        .await
        .unwrap_or_default();
        let changed = last.as_ref() != Some(&results);
        if changed || !presented || Instant::now() >= refresh_at {
            let request = PostureRequest {
                checks: results.clone(),
            };
            match setup
                .api
                .post::<_, PostureResponse>("/v1/posture", &request)
                .await
            {
                Ok(resp) => {
                    let new_checks = resp.config.checks.clone();
                    if new_checks != checks {
                        // The policy's checks changed (or this is the first answer): evaluate
                        // them before presenting a token built on an older list.
                        checks = new_checks;
                        last = None;
                        continue;
                    }
                    let failing: Vec<&String> = results
                        .iter()
                        .filter(|(_, ok)| !**ok)
                        .map(|(n, _)| n)
                        .collect();
                    refresh_at = Instant::now() + Duration::from_secs(resp.refresh_after.max(5));
                    presented = present_token(&resp.token, service, &mut buf).await;
                    if presented {
                        info!(?failing, "posture token presented to the broker");
                    }
                    last = Some(results);
                }
                Err(e) => warn!("posture refresh failed: {e}"),
            }
        }
        tokio::time::sleep(setup.interval).await;
    }

    async fn present_token(token: &str, service: SocketAddr, buf: &mut [u8]) -> bool {
        let sock = match UdpSocket::bind("0.0.0.0:0").await {
            Ok(s) => s,
            Err(e) => {
                warn!("posture: cannot open a UDP socket: {e}");
                return false;
            }
        };
        for _ in 0..3 {
            if sock.send_to(token.as_bytes(), service).await.is_err() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(1), sock.recv_from(buf)).await {
                Ok(Ok((n, _))) => match serde_json::from_slice::<TokenAnswer>(&buf[..n]) {
                    Ok(a) if a.accepted => return true,
                    Ok(a) => {
                        warn!(error = %a.error, "the broker refused the posture token");
                        return false;
                    }
                    Err(_) => return false,
                },
                _ => continue,
            }
        }
        warn!("the broker's posture service did not answer (tunnel down?)");
        false
    }
}

/// Session index: it only tells this client's sessions apart, and it has one.
const SESSION_INDEX: u32 = 1;

/// False for what the kernel sends on any interface but that no overlay can carry: multicast
/// and link-local traffic (IPv6 router solicitations, MLD reports).
fn routable(pkt: &[u8]) -> bool {
    match sekisho_proto::packet::addresses(pkt) {
        Ok((_, IpAddr::V4(d))) => !d.is_multicast() && !d.is_broadcast() && !d.is_link_local(),
        Ok((_, IpAddr::V6(d))) => !d.is_multicast() && !d.is_unicast_link_local(),
        Err(_) => false,
    }
}

/// Moves packets between the TUN device and the broker until an unrecoverable error.
async fn data_loop(
    tun: &sekisho_proto::sys::AsyncDevice,
    udp: &UdpSocket,
    session: &mut Session,
    endpoint_name: &str,
    handshakes: &AtomicU64,
) -> Result<()> {
    // When the current session's handshake completed; a later one means a new session.
    let mut handshake_at: Option<Instant> = None;
    let mut broker = resolve(endpoint_name).await?;
    let mut tun_buf = vec![0u8; 65536];
    let mut net_buf = vec![0u8; 65536];
    let mut out = vec![0u8; 65536 + 64];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut connected = false;
    let mut next_retry = Instant::now();

    // Start the handshake at once rather than on the first packet.
    if let Output::Network(init) = session.initiate(&mut out, false) {
        let _ = udp.send_to(init, broker).await;
    }
    loop {
        tokio::select! {
            r = tun.recv(&mut tun_buf) => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => { warn!("TUN read error: {e}"); continue; }
                };
                if !routable(&tun_buf[..n]) {
                    continue;
                }
                match session.encapsulate(&tun_buf[..n], &mut out) {
                    Output::Network(data) => { let _ = udp.send_to(data, broker).await; }
                    Output::Error(e) => debug!(?e, "cannot encapsulate"),
                    _ => {}
                }
            }
            r = udp.recv_from(&mut net_buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => { debug!("UDP receive error: {e}"); continue; }
                };
                if from != broker {
                    continue;
                }
                let mut write_net = false;
                let mut data_packet = false;
                match session.decapsulate(Some(from.ip()), &net_buf[..n], &mut out) {
                    Output::Network(data) => { let _ = udp.send_to(data, broker).await; write_net = true; }
                    Output::Tunnel(pkt) => {
                        data_packet = true;
                        if let Err(e) = tun.send(pkt).await { debug!("TUN write error: {e}"); }
                    }
                    Output::Done => {}
                    Output::Error(e) => debug!(?e, "datagram rejected"),
                }
                if write_net {
                    while let Output::Network(data) = session.flush(&mut out) {
                        let _ = udp.send_to(data, broker).await;
                    }
                }
                // Sessions change on handshake messages, never on data packets: only look then.
                if !data_packet && !connected && session.time_since_handshake().is_some() {
                    connected = true;
                    info!(broker = %broker, "connected to broker");
                }
            }
            _ = tick.tick() => {
                match session.tick(&mut out) {
                    Output::Network(data) => { let _ = udp.send_to(data, broker).await; }
                    Output::Error(WireGuardError::ConnectionExpired) => {
                        if connected {
                            connected = false;
                            warn!("session to broker expired; retrying");
                        }
                        // Always-on: keep trying, whatever the engine gave up on.
                        if Instant::now() >= next_retry {
                            next_retry = Instant::now() + Duration::from_secs(5);
                            if let Ok(addr) = resolve(endpoint_name).await { broker = addr; }
                            if let Output::Network(init) = session.initiate(&mut out, true) {
                                let _ = udp.send_to(init, broker).await;
                            }
                        }
                    }
                    _ => {}
                }
                // After the engine's tick its clock is current. Handshakes are seconds apart at
                // the very least; the margin only absorbs jitter between readings.
                if let Some(at) = session.time_since_handshake().and_then(|t| Instant::now().checked_sub(t))
                    && handshake_at.is_none_or(|prev| at > prev + Duration::from_millis(500))
                {
                    handshake_at = Some(at);
                    handshakes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
