//! `sekisho-connector`: sits beside a site's private applications, dials out to the broker over
//! QUIC (mutual TLS) and forwards the packets of authorized flows into the site's network
//! through a TUN device with source NAT. It listens on no port.

mod health;
mod link;
mod names;
mod site;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Deserialize;
use tracing::{info, warn};

use sekisho_proto::config::{ConfigError, load_toml};
use sekisho_proto::connector::Allowlist;

use crate::health::State;
use sekisho_sys::{Netlink, create_tun};

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
        /// What this connector may reach on the site, whatever a broker asks (repeat; at least
        /// one): a network (10.20.0.0/24, 10.20.0.10), a network with TCP/UDP ports
        /// (10.20.0.10:80,443 or [fd00::1]:443), or a DNS zone for name-based applications
        /// (corp.example). Kept as `allow` in connector.toml, where it can be edited.
        #[arg(long = "allow", value_name = "ENTRY", required = true)]
        allow: Vec<String>,
    },
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectorConfig {
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
    /// What this connector may reach on its site, whatever a broker asks: networks
    /// ("10.20.0.0/24"), networks with TCP/UDP ports ("10.20.0.10:80,443"), DNS zones for
    /// name-based applications ("corp.example"). Required: an empty list reaches nothing.
    #[serde(default)]
    allow: Allowlist,
    /// Turn on IPv4 forwarding at start, on the TUN device and the interfaces towards the
    /// allowed networks only (never host-wide); forwarding it turned on carries nothing but
    /// Sekisho's traffic.
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
    /// The largest packet devices send (their tunnel MTU). Links never carry less than this in
    /// one datagram.
    #[serde(
        default = "default_overlay_mtu",
        skip_serializing_if = "is_default_overlay_mtu"
    )]
    overlay_mtu: u16,
    tls: TlsConfig,
    /// Prometheus endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metrics: Option<MetricsConfig>,
    /// Where the connector's records go (refusals of its allowlist): syslog, OTLP, files
    /// (`[[log_sinks]]`, README "Logs to a SIEM").
    #[serde(default, skip_serializing)]
    log_sinks: Vec<sekisho_sys::logship::SinkConfig>,
    /// The folder of connector.toml (relative sink paths), set on load.
    #[serde(skip)]
    base_dir: PathBuf,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct MetricsConfig {
    /// TCP address; loopback unless set ("127.0.0.1:9465").
    #[serde(default = "default_metrics_listen")]
    listen: SocketAddr,
    /// A file holding a bearer token `GET /metrics` must carry; `/healthz` and `/readyz` stay
    /// open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bearer_token_file: Option<PathBuf>,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9465))
}

fn default_overlay_mtu() -> u16 {
    sekisho_proto::mtu::DEFAULT_OVERLAY_MTU
}
fn is_default_overlay_mtu(v: &u16) -> bool {
    *v == default_overlay_mtu()
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
pub(crate) struct TlsConfig {
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
                allow,
            }),
            _,
        ) => enroll(&server, &token, &dir, &dns_servers, &allow),
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
pub(crate) fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<()> {
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
pub(crate) fn new_key_and_csr() -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn enroll(
    server: &str,
    token: &str,
    dir: &Path,
    dns_servers: &[IpAddr],
    allow: &[String],
) -> Result<()> {
    use sekisho_proto::api::{EnrollConnectorRequest, EnrollConnectorResponse};
    let allow = Allowlist::parse(allow).map_err(|e| anyhow::anyhow!("--allow: {e}"))?;
    let (token, ca_sha256) = sekisho_sys::http::enrollment_token(token)?;
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
        sekisho_sys::http::enroll(server, ca_sha256, "/v1/enroll/connector", &request)?;
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
        allow,
        enable_forwarding: true,
        max_backoff_secs: default_backoff_max(),
        dns_servers: dns_servers.to_vec(),
        drain_timeout: default_drain_timeout(),
        overlay_mtu: default_overlay_mtu(),
        metrics: None,
        log_sinks: Vec::new(),
        base_dir: PathBuf::new(),
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

fn load_config(path: &Path) -> Result<ConnectorConfig, ConfigError> {
    let (mut c, _): (ConnectorConfig, String) = load_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key] {
        *p = base.join(&*p);
    }
    if let Some(p) = c
        .metrics
        .as_mut()
        .and_then(|m| m.bearer_token_file.as_mut())
    {
        *p = base.join(&*p);
    }
    c.base_dir = base.to_path_buf();
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
    // One thread: the links' QUIC, the site loop and the TUN device hand packets to each other
    // without waking other threads (that hand-off cost more than it gained).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(config))
}

/// Where a connector records the site interfaces whose forwarding it turned on (so a restart
/// after a crash still guards them, and a clean stop turns them off).
fn forwarding_record(tun: &str) -> PathBuf {
    PathBuf::from(format!("/run/sekisho/{}.forwarding", site::nft_table(tun)))
}

/// Turns on IPv4 forwarding on the TUN device and on the interfaces the allowed networks are
/// reached through, never host-wide. Returns the site interfaces whose forwarding was off
/// (the nftables table then forwards nothing from them but replies to the tunnel).
fn enable_forwarding(tun: &str, allow: &Allowlist) -> Result<Vec<String>> {
    use sekisho_proto::connector::allow::Item;
    if sekisho_sys::enable_ipv4_forwarding_on(tun)? {
        info!(interface = tun, "enabled IPv4 forwarding");
    }
    let mut site_interfaces: Vec<String> = Vec::new();
    for item in allow.items() {
        let Item::Net(n) = item else { continue };
        // An address of the network that is not the host's own (that one routes via lo).
        let ipnet::IpNet::V4(v4) = n.net else {
            continue;
        };
        let first = v4.hosts().next().unwrap_or(v4.addr());
        let last = std::net::Ipv4Addr::from(u32::from(v4.broadcast()).saturating_sub(1));
        let dev = [first, last, v4.addr()]
            .into_iter()
            .filter(|a| v4.contains(a))
            .filter_map(|a| sekisho_sys::route_interface(a.into()))
            .find(|d| d != "lo");
        match dev {
            Some(dev) if dev != tun && !site_interfaces.contains(&dev) => site_interfaces.push(dev),
            Some(_) => {}
            None => warn!(network = %n.net, "no route to an allowed network"),
        }
    }
    let mut guarded = Vec::new();
    for dev in site_interfaces {
        if sekisho_sys::enable_ipv4_forwarding_on(&dev)? {
            info!(interface = %dev, "enabled IPv4 forwarding (for replies to the tunnel only)");
            guarded.push(dev);
        }
    }
    Ok(guarded)
}

async fn run(config: ConnectorConfig) -> Result<()> {
    // Fails early on bad files; rebuilt on every connection attempt to pick up renewals.
    link::tls_client_config(&config.tls, config.overlay_mtu)?;
    if config.overlay_mtu < sekisho_proto::mtu::MIN_OVERLAY_MTU {
        bail!(
            "overlay_mtu {} is below the minimum of {}",
            config.overlay_mtu,
            sekisho_proto::mtu::MIN_OVERLAY_MTU
        );
    }
    if config.allow.is_empty() {
        bail!(
            "connector.toml has no `allow` list: the connector forwards only inside its own \
             allowlist, whatever a broker asks. Add the networks, ports and DNS zones of the \
             site's applications, e.g. allow = [\"10.20.0.0/24\", \"10.20.1.5:443\", \
             \"corp.example\"] (or enroll with --allow)"
        );
    }
    let tun = create_tun(&config.tun_name, site::TUN_MTU)?;
    let netlink = Netlink::open()?;
    let index = netlink.link_index(&config.tun_name).await?;
    // Interfaces whose forwarding a previous run turned on and could not turn off (it
    // crashed): still ours, still guarded.
    let record = forwarding_record(&config.tun_name);
    let mut guarded: Vec<String> = std::fs::read_to_string(&record)
        .map(|t| {
            t.lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if config.enable_forwarding {
        for dev in enable_forwarding(&config.tun_name, &config.allow)? {
            if !guarded.contains(&dev) {
                guarded.push(dev);
            }
        }
    }
    if !guarded.is_empty() {
        if let Some(dir) = record.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&record, guarded.join("\n")) {
            warn!(file = %record.display(), "cannot record the interfaces whose forwarding this connector turned on: {e}");
        }
    }
    site::install_nat(&config.tun_name, &config.allow, &guarded).await?;
    info!(
        site = %config.site,
        interface = %config.tun_name,
        allow = ?Vec::<String>::from(config.allow.clone()),
        "connector interface up; forwarding only inside the allowlist"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let drain_timeout = humantime::parse_duration(&config.drain_timeout)?;
    let config = Arc::new(config);
    let state = Arc::new(State::default());
    let shipper = sekisho_sys::logship::Shipper::start(
        &config.log_sinks,
        "sekisho-connector",
        &config.site,
        &config.base_dir,
    )
    .context("connector.toml: log_sinks")?;
    let _ = state.shipper.set(shipper.clone());
    {
        // The kernel's refusals, read every few seconds for the metrics.
        let (state, table) = (state.clone(), site::nft_table(&config.tun_name));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(2));
            loop {
                every.tick().await;
                if let Some(n) = sekisho_sys::counter_packets("inet", &table, "refused").await {
                    state
                        .kernel_refused
                        .store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    if let Some(m) = &config.metrics {
        let bearer = m
            .bearer_token_file
            .as_deref()
            .map(sekisho_sys::metrics::read_bearer_token)
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("cannot bind the metrics endpoint {}", m.listen))?;
        info!(addr = %m.listen, bearer_token = bearer.is_some(), "metrics endpoint listening (/metrics, /healthz, /readyz)");
        let router = sekisho_sys::metrics::router(state.clone(), bearer);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                warn!("metrics endpoint stopped: {e}");
            }
        });
    }
    let (events, rx) = tokio::sync::mpsc::channel::<site::LinkEvent>(4096);
    let site = site::site_loop(
        config.clone(),
        site::SiteIo {
            tun: &tun,
            tun_name: &config.tun_name,
            netlink: &netlink,
            index,
        },
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
        let _ = events.send(site::LinkEvent::HealthChanged).await;
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
    site::remove_nat(&config.tun_name).await;
    // Forwarding this connector turned on goes off again with its guards.
    for dev in &guarded {
        match sekisho_sys::disable_ipv4_forwarding_on(dev) {
            Ok(()) => info!(interface = %dev, "IPv4 forwarding turned off again"),
            Err(e) => warn!(interface = %dev, "cannot turn IPv4 forwarding off again: {e}"),
        }
    }
    let _ = std::fs::remove_file(&record);
    Ok(())
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

    #[test]
    fn a_bad_allowlist_entry_is_named_with_file_line_and_field() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/connector.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = load_config(&path).unwrap();
        assert_eq!(
            Vec::<String>::from(c.allow),
            vec!["10.20.0.0/24".to_string(), "corp.example".to_string()]
        );
        let dir = std::env::temp_dir().join(format!("sekisho-conn-allow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("connector.toml");
        let from = "allow = [\"10.20.0.0/24\", \"corp.example\"]";
        assert!(text.contains(from));
        std::fs::write(&bad, text.replace(from, "allow = [\"10.20.0.0/24:http\"]")).unwrap();
        let e = load_config(&bad).unwrap_err();
        std::fs::remove_dir_all(&dir).ok();
        let line = text
            .lines()
            .position(|l| l.starts_with("allow = "))
            .unwrap()
            + 1;
        assert_eq!((e.field.as_str(), e.line), ("allow", line), "{e}");
        assert!(e.to_string().contains("is no port"), "{e}");
    }
}
