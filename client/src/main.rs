//! `sekisho-client`: the laptop agent. Creates a TUN device with the device's overlay address,
//! routes the application ranges into it, and keeps a WireGuard session to the broker.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod dataplane;
mod dnsctl;
mod killswitch;
mod posture;
mod records;
mod resolvconf;
mod status;
mod stub;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use sekisho_proto::config::{ConfigError, load_toml};
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_sys::{Netlink, create_tun};

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
    /// Show the running client's state: broker in use and RTTs, tunnel mode and kill switch,
    /// posture, reachable applications, latest denials and why.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The client's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Use an override code from an admin: the kill switch (full tunnel) opens for the code's
    /// lifetime. Its use is logged and reported to the control plane.
    Override {
        code: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Open the kill switch for the admin's captive-portal grace period (full tunnel, tunnel
    /// down), to sign in to a hotel or airport network. Logged.
    CaptivePortal {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
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
    /// Sign in through the company's identity provider: enrolls this device the first time
    /// (the WireGuard key is made here and never sent), signs in again later (sensitive
    /// applications may want a recent sign-in; a running client picks it up at once).
    /// Uses the system browser ($BROWSER, or xdg-open in a desktop session) with a return to
    /// 127.0.0.1; without one, prints a code to enter on another device.
    Login {
        /// Control API URL, like https://broker.example.com:8443 (default: the enrolled
        /// device's).
        #[arg(long)]
        server: Option<String>,
        /// CA certificate (PEM) of the control API (default: the enrolled device's ca.pem,
        /// else the system's CAs).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// The control API CA certificate's SHA-256 (hex), instead of --ca.
        #[arg(long, value_name = "SHA256")]
        ca_pin: Option<String>,
        /// Use the device code (RFC 8628) even where a browser could open.
        #[arg(long)]
        device_code: bool,
        /// Device name for a first sign-in (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Where the key, credential, CA certificate and client.toml are (or go).
        #[arg(long, default_value = "/etc/sekisho")]
        dir: PathBuf,
        /// TUN interface name written into a new config.
        #[arg(long, default_value = "sekisho0")]
        interface: String,
        /// How often the posture checks run (written into a new config).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        check_interval: Duration,
        /// Control socket of a running client, told to refresh its posture token.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

const DEFAULT_SOCKET: &str = "/run/sekisho/client.sock";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    interface: InterfaceConfig,
    /// One broker (older configs); `brokers` lists several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    broker: Option<BrokerPeer>,
    /// The brokers this device may use; the nearest answering one carries the traffic. The
    /// control plane's list replaces this one once it is reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    brokers: Vec<BrokerPeer>,
    /// Unix socket for `status`, `override` and `captive-portal`.
    #[serde(default = "default_socket")]
    control_socket: PathBuf,
    /// The last tunnel settings from the policy (relative to this file's folder): a restart
    /// without network applies them at once.
    #[serde(default = "default_state_file")]
    state_file: PathBuf,
    /// The control plane this device enrolled with (posture refresh). Absent for devices
    /// configured by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    control: Option<ControlConfig>,
    /// The DNS stub (private application names, DNS filtering). Absent: no stub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns: Option<DnsConfig>,
    /// Where this laptop's records go (its side of its flows, blocked names): syslog, OTLP,
    /// files (`[[log_sinks]]`, README "Logs to a SIEM").
    #[serde(default, skip_serializing)]
    log_sinks: Vec<sekisho_sys::logship::SinkConfig>,
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
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_state_file() -> PathBuf {
    PathBuf::from("tunnel-state.json")
}
fn default_fwmark() -> u32 {
    0x534b
}
fn default_table() -> u32 {
    0x534b
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
    /// Longest time between two configuration refreshes (brokers, routes, tunnel settings).
    #[serde(default = "default_config_refresh")]
    config_refresh: String,
}

fn default_config_refresh() -> String {
    "30s".into()
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
    /// Firewall mark of packets that go direct (the tunnel's own, excluded destinations).
    #[serde(default = "default_fwmark")]
    fwmark: u32,
    /// Routing table of the full tunnel.
    #[serde(default = "default_table")]
    table: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BrokerPeer {
    /// The broker's name (region), for status and logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
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
        Command::Status { json, socket } => show_status(&socket, json),
        Command::Override { code, socket } => {
            one_request(&socket, &status::Request::Override { code })
        }
        Command::CaptivePortal { socket } => one_request(&socket, &status::Request::CaptivePortal),
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
        Command::Login {
            server,
            ca,
            ca_pin,
            device_code,
            name,
            dir,
            interface,
            check_interval,
            socket,
        } => login_command(LoginArgs {
            server,
            ca,
            ca_pin,
            device_code,
            name,
            dir,
            interface,
            check_interval,
            socket,
        }),
    };
    if let Err(e) = result {
        eprintln!("sekisho-client: {e:#}");
        std::process::exit(2);
    }
}

fn show_status(socket: &Path, json: bool) -> Result<()> {
    let a = status::ask(socket, &status::Request::Status)?;
    let s = a.status.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::human(&s));
    }
    Ok(())
}

fn one_request(socket: &Path, req: &status::Request) -> Result<()> {
    let a = status::ask(socket, req)?;
    if a.ok {
        println!("{}", a.message);
        Ok(())
    } else {
        anyhow::bail!("{}", a.message)
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
    let (token, ca_sha256) = sekisho_sys::http::enrollment_token(token)?;
    let name = device_name(name)?;
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
        sekisho_sys::http::enroll(server, ca_sha256, "/v1/enroll/device", &request)?;
    let c = write_enrollment(
        dir,
        &key,
        &resp.config,
        &resp.credential,
        &resp.ca_pem,
        server,
        ifname,
        check_interval,
        "enroll",
    )?;
    println!(
        "enrolled {:?} (user {:?}) with address {}; run: sekisho-client run -c {}",
        c.device,
        c.user,
        c.address,
        config_path.display()
    );
    Ok(())
}

fn device_name(name: Option<String>) -> Result<String> {
    match name {
        Some(n) => Ok(n),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("cannot read the host name; pass --name"),
    }
}

/// Writes an enrolled device's folder: key, credential, CA, client.toml. Called only after
/// the control plane accepted the key: a refused enrollment leaves nothing behind.
#[allow(clippy::too_many_arguments)]
fn write_enrollment<'c>(
    dir: &Path,
    key: &PrivateKey,
    c: &'c sekisho_proto::api::DeviceConfig,
    credential: &str,
    ca_pem: &str,
    server: &str,
    ifname: &str,
    check_interval: Duration,
    by: &str,
) -> Result<&'c sekisho_proto::api::DeviceConfig> {
    let config_path = dir.join("client.toml");
    let key_file = dir.join("private.key");
    write_secret(&key_file, &key.to_base64())?;
    write_secret(&dir.join("credential"), credential)?;
    std::fs::write(dir.join("ca.pem"), ca_pem)?;
    if c.brokers.is_empty() {
        anyhow::bail!("the control plane named no broker");
    }
    let config = ClientConfig {
        interface: InterfaceConfig {
            name: ifname.to_string(),
            private_key_file: PathBuf::from("private.key"),
            address: c.address,
            mtu: default_mtu(),
            routes: c.routes.clone(),
            fwmark: default_fwmark(),
            table: default_table(),
        },
        broker: None,
        brokers: c
            .brokers
            .iter()
            .map(|b| BrokerPeer {
                name: b.name.clone(),
                endpoint: b.endpoint.clone(),
                public_key: b.public_key.clone(),
                keepalive_secs: default_keepalive(),
            })
            .collect(),
        control_socket: default_socket(),
        state_file: default_state_file(),
        log_sinks: Vec::new(),
        control: Some(ControlConfig {
            url: server.to_string(),
            ca_file: PathBuf::from("ca.pem"),
            credential_file: PathBuf::from("credential"),
            device_range: c.device_range,
            check_interval: humantime::format_duration(check_interval).to_string(),
            config_refresh: default_config_refresh(),
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
        "# Written by `sekisho-client {by}` for device {:?} of user {:?}.\n{}",
        c.device,
        c.user,
        toml::to_string(&config)?
    );
    std::fs::write(&config_path, text)?;
    Ok(c)
}

struct LoginArgs {
    server: Option<String>,
    ca: Option<PathBuf>,
    ca_pin: Option<String>,
    device_code: bool,
    name: Option<String>,
    dir: PathBuf,
    interface: String,
    check_interval: Duration,
    socket: PathBuf,
}

/// `sekisho-client login`: a first sign-in enrolls the device; a later one refreshes the
/// sign-in of the enrolled device (its key identifies it) and tells a running client.
fn login_command(a: LoginArgs) -> Result<()> {
    let config_path = a.dir.join("client.toml");
    let enrolled = if config_path.exists() {
        Some(load_config(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    let server = match (&a.server, &enrolled) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c
            .control
            .as_ref()
            .map(|c| c.url.clone())
            .context("the enrolled config names no control API; pass --server")?,
        (None, None) => anyhow::bail!("pass --server (the control API URL) for a first sign-in"),
    };
    use sekisho_sys::login;
    let tls = login::api_tls(&a.dir, a.ca.as_deref(), a.ca_pin.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = sekisho_sys::http::ApiClient::new(&server, tls, None)?;
    let method = if a.device_code {
        login::Method::DeviceCode
    } else {
        login::Method::detect()
    };
    match enrolled {
        Some(c) => {
            let key = PrivateKey::read_file(&c.interface.private_key_file)?;
            let device = sekisho_proto::api::LoginDevice {
                public_key: key.public().to_string(),
                name: device_name(a.name)?,
            };
            let r = rt.block_on(login::sign_in(&api, "device", method, Some(device)))?;
            let dc = r
                .config
                .as_ref()
                .context("the control plane sent no device config")?;
            println!(
                "signed in again as {:?} on {:?} (groups: {})",
                r.user.as_deref().unwrap_or("?"),
                dc.device,
                r.groups.join(", ")
            );
            // A running client asks for a token with the new sign-in time now.
            match status::ask(&a.socket, &status::Request::Refresh) {
                Ok(_) => println!("the running client refreshes its posture token now"),
                Err(_) => println!("no running client at {}", a.socket.display()),
            }
            Ok(())
        }
        None => {
            std::fs::create_dir_all(&a.dir)
                .with_context(|| format!("cannot create {}", a.dir.display()))?;
            let key = PrivateKey::generate();
            let device = sekisho_proto::api::LoginDevice {
                public_key: key.public().to_string(),
                name: device_name(a.name)?,
            };
            let r = rt.block_on(login::sign_in(&api, "device", method, Some(device)))?;
            let (Some(dc), Some(cred), Some(ca)) = (&r.config, &r.credential, &r.ca_pem) else {
                anyhow::bail!(
                    "the control plane did not enroll this device (its key is known already?)"
                );
            };
            let c = write_enrollment(
                &a.dir,
                &key,
                dc,
                cred,
                ca,
                &server,
                &a.interface,
                a.check_interval,
                "login",
            )?;
            println!(
                "signed in as {:?} (groups: {}); enrolled {:?} with address {}; run: \
                 sekisho-client run -c {}",
                c.user,
                r.groups.join(", "),
                c.device,
                c.address,
                config_path.display()
            );
            Ok(())
        }
    }
}

fn load_config(path: &Path) -> Result<ClientConfig, ConfigError> {
    let (mut c, text): (ClientConfig, String) = load_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    c.interface.private_key_file = base.join(&c.interface.private_key_file);
    c.state_file = base.join(&c.state_file);
    // An older config's single `[broker]` is the first of the list (errors name it as written).
    let single = c.broker.is_some();
    if let Some(b) = c.broker.take() {
        c.brokers.insert(0, b);
    }
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
    if c.brokers.is_empty() {
        return Err(src.error(None, "brokers", "at least one broker is needed"));
    }
    for (i, b) in c.brokers.iter().enumerate() {
        PublicKeyBytes::parse(&b.public_key).map_err(|e| {
            let at = text.find(&b.public_key);
            let field = if single && i == 0 {
                "broker.public_key".to_string()
            } else {
                format!("brokers[{}].public_key", i - usize::from(single))
            };
            src.error(at.map(|a| a..a), field, e.to_string())
        })?;
    }
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
    Ok(c)
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn run_blocking(config_path: &Path) -> Result<()> {
    init_tracing();
    let config = load_config(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(config, config_path))
}

/// The tunnel socket's buffers: room for a few milliseconds of traffic at full speed.
const UDP_BUFFER: usize = 4 << 20;

/// The control API's address (host and port of its URL), which the full tunnel lets through
/// direct so the device can refresh its posture and settings while closed.
async fn api_addresses(config: &ClientConfig) -> Vec<SocketAddr> {
    let Some(ctl) = &config.control else {
        return Vec::new();
    };
    let Some(rest) = ctl.url.strip_prefix("https://") else {
        return Vec::new();
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:443")
    };
    match tokio::net::lookup_host(&hostport).await {
        Ok(a) => a.collect(),
        Err(e) => {
            warn!("cannot resolve the control API {hostport}: {e}");
            Vec::new()
        }
    }
}

fn broker_infos(peers: &[BrokerPeer]) -> Vec<sekisho_proto::api::BrokerInfo> {
    peers
        .iter()
        .map(|b| sekisho_proto::api::BrokerInfo {
            endpoint: b.endpoint.clone(),
            public_key: b.public_key.clone(),
            name: b.name.clone(),
            api_url: String::new(),
        })
        .collect()
}

async fn run(config: ClientConfig, config_path: &Path) -> Result<()> {
    let key = PrivateKey::read_file(&config.interface.private_key_file)?;
    let iface = &config.interface;
    let tun = create_tun(&iface.name, iface.mtu)?;
    let netlink = Arc::new(Netlink::open()?);
    let index = netlink.link_index(&iface.name).await?;
    let prefix = if iface.address.is_ipv4() { 32 } else { 128 };
    netlink.add_address(index, iface.address, prefix).await?;
    // The brokers and the control API are reached outside the tunnel: an application network
    // covering one of them is routed without it.
    let avoid = tunnel_hosts(
        config.brokers.iter().map(|b| b.endpoint.as_str()),
        config.control.as_ref().map(|c| c.url.as_str()),
    )
    .await;
    let mut routes = sekisho_proto::tunnel::routes_without(&iface.routes, &avoid);
    let service = config
        .control
        .as_ref()
        .map(|c| sekisho_proto::posture::service_address(&c.device_range));
    if let Some(s) = service {
        // The broker's in-tunnel services live at the device range's first address.
        routes.push(IpNet::from(s));
    }
    for net in &routes {
        netlink
            .add_route(index, *net)
            .await
            .with_context(|| format!("cannot route {net}"))?;
    }
    let routes = Arc::new(std::sync::Mutex::new(routes));
    info!(interface = %iface.name, mtu = iface.mtu, routes = iface.routes.len(), "tunnel interface up");

    let udp = sekisho_sys::udp::BatchUdp::bind(
        "0.0.0.0:0".parse()?,
        sekisho_sys::udp::UdpOptions {
            reuse_port: false,
            buffer: UDP_BUFFER,
            mark: Some(iface.fwmark),
        },
    )
    .context("cannot open the tunnel's UDP socket (marking it needs CAP_NET_ADMIN)")?;

    let views = status::Views {
        data: Default::default(),
        guard: Default::default(),
        posture: Default::default(),
        device: Default::default(),
        refresh: Default::default(),
    };
    {
        let mut d = views.device.lock().unwrap_or_else(|e| e.into_inner());
        d.address = Some(iface.address);
        d.routes = iface.routes.clone();
    }
    let mut dp = sekisho_proto::client::ClientState::new(
        key,
        config.brokers[0].keepalive_secs,
        iface.address,
        service.unwrap_or(iface.address),
        Instant::now(),
    );
    dp.set_brokers(&broker_infos(&config.brokers), Instant::now());

    // The kill switch and full tunnel.
    let direct = Arc::new(killswitch::DirectNames::default());
    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel();
    let guard = killswitch::Guard::new(
        killswitch::GuardConfig {
            tun: iface.name.clone(),
            tun_index: index,
            device: iface.address,
            api: api_addresses(&config).await,
            mark: iface.fwmark,
            table: iface.table,
            state_file: config.state_file.clone(),
        },
        Netlink::open()?,
        views.guard.clone(),
        direct.clone(),
        report_tx,
    );
    let (guard_tx, guard_rx) = tokio::sync::mpsc::channel(16);
    let (endpoints_tx, endpoints_rx) = tokio::sync::watch::channel(Vec::new());
    let (stop_guard, stop_guard_rx) = tokio::sync::oneshot::channel();
    let data_view = views.data.clone();
    let connected: Arc<dyn Fn() -> bool + Send + Sync> =
        Arc::new(move || data_view.lock().map(|d| d.connected).unwrap_or(false));
    let guard_task = tokio::spawn(guard.run(guard_rx, endpoints_rx, connected, stop_guard_rx));
    let control_socket = config.control_socket.clone();
    let status_task = {
        let views = views.clone();
        let guard_tx = guard_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = status::serve(&control_socket, views, guard_tx).await {
                warn!("control socket unavailable: {e:#}");
            }
        })
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let local = records::Local {
        shipper: sekisho_sys::logship::Shipper::start(
            &config.log_sinks,
            "sekisho-client",
            &host,
            config_path.parent().unwrap_or(Path::new(".")),
        )
        .with_context(|| format!("{}: log_sinks", config_path.display()))?,
        device: views.device.clone(),
    };
    let dns = match &config.dns {
        Some(d) => Some(dnsctl::start_dns(d, &config, direct.clone(), local.clone()).await?),
        None => None,
    };
    let (dp_tx, dp_rx) = tokio::sync::mpsc::channel(16);
    let mut tasks = Vec::new();
    if let Some(ctl) = &config.control {
        tasks.push(tokio::spawn(posture_loop(
            PostureSetup::load(ctl)?,
            PostureLinks {
                data: dp_tx.clone(),
                guard: guard_tx.clone(),
                views: views.clone(),
                netlink: netlink.clone(),
                index,
                routes: routes.clone(),
                avoid: Arc::new(std::sync::Mutex::new(avoid.clone())),
                service,
                local: posture::Local {
                    tunnel: iface.name.clone(),
                    resolv_conf: config
                        .dns
                        .as_ref()
                        .map_or_else(default_resolv_conf, |d| d.resolv_conf.clone()),
                    resolv_backup: config.dns.as_ref().map(|d| d.backup_file.clone()),
                },
                block_counts: dns.as_ref().map(|d| d.block_counts.clone()),
            },
        )));
        tasks.push(tokio::spawn(report_overrides(
            PostureSetup::load(ctl)?,
            report_rx,
        )));
    }
    let stop = Arc::new(tokio::sync::Notify::new());
    let result = {
        let data = dataplane::run(
            dp,
            dataplane::Io {
                tun: &tun,
                tun_name: &iface.name,
                mtu: iface.mtu,
                udp: &udp,
            },
            dataplane::Links {
                commands: dp_rx,
                endpoints: endpoints_tx,
                view: views.data.clone(),
                stop: stop.clone(),
                records: local.clone(),
            },
        );
        tokio::pin!(data);
        tokio::select! {
            r = &mut data => r,
            _ = term.recv() => {
                stop.notify_one();
                data.await
            }
            _ = tokio::signal::ctrl_c() => {
                stop.notify_one();
                data.await
            }
        }
    };
    // The last flow records (written at stop) get a moment to leave.
    local.shipper.flush(Duration::from_secs(2)).await;
    for t in tasks {
        t.abort();
    }
    status_task.abort();
    let _ = std::fs::remove_file(&config.control_socket);
    if let Some(d) = dns {
        d.stop();
    }
    let _ = stop_guard.send(());
    let _ = guard_task.await;
    info!("stopping: removing routes and interface");
    let routes = routes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for net in &routes {
        if let Err(e) = netlink.del_route(index, *net).await {
            debug!("route {net} already gone: {e}");
        }
    }
    drop(tun);
    result
}

/// What the posture loop needs: an API client with this device's credential, and the other
/// brokers' control APIs to fall back to.
struct PostureSetup {
    api: sekisho_sys::http::ApiClient,
    interval: Duration,
    config_refresh: Duration,
    ca: String,
    credential: String,
    urls: Vec<String>,
    current: usize,
}

impl PostureSetup {
    fn load(ctl: &ControlConfig) -> Result<PostureSetup> {
        let ca = std::fs::read_to_string(&ctl.ca_file)
            .with_context(|| format!("cannot read {}", ctl.ca_file.display()))?;
        let credential = std::fs::read_to_string(&ctl.credential_file)
            .with_context(|| format!("cannot read {}", ctl.credential_file.display()))?;
        Ok(PostureSetup {
            api: sekisho_sys::http::ApiClient::new(
                &ctl.url,
                sekisho_sys::http::ca_tls(&ca)?,
                Some(credential.trim().to_string()),
            )?,
            interval: humantime::parse_duration(&ctl.check_interval)?,
            config_refresh: humantime::parse_duration(&ctl.config_refresh)
                .context("control.config_refresh: a duration like \"30s\"")?,
            ca,
            credential: credential.trim().to_string(),
            urls: vec![ctl.url.clone()],
            current: 0,
        })
    }

    /// The brokers' control APIs, besides the configured one, to try when it fails.
    fn fallbacks(&mut self, brokers: &[sekisho_proto::api::BrokerInfo]) {
        for b in brokers {
            if !b.api_url.is_empty() && !self.urls.contains(&b.api_url) {
                self.urls.push(b.api_url.clone());
            }
        }
    }

    /// POSTs to the current control API; on failure moves to the next one for next time.
    async fn post<Q: Serialize, A: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        body: &Q,
    ) -> Result<A> {
        match self.api.post::<Q, A>(path, body).await {
            Ok(a) => Ok(a),
            Err(e) => {
                if self.urls.len() > 1 {
                    self.current = (self.current + 1) % self.urls.len();
                    let url = &self.urls[self.current];
                    match sekisho_sys::http::ca_tls(&self.ca).and_then(|tls| {
                        sekisho_sys::http::ApiClient::new(url, tls, Some(self.credential.clone()))
                    }) {
                        Ok(api) => {
                            info!(%url, "control API failed; trying another broker's next");
                            self.api = api;
                        }
                        Err(e) => warn!("cannot use control API {url}: {e:#}"),
                    }
                }
                Err(e.into())
            }
        }
    }
}

/// Where the posture loop's results go.
struct PostureLinks {
    data: tokio::sync::mpsc::Sender<dataplane::Command>,
    guard: tokio::sync::mpsc::Sender<killswitch::GuardCmd>,
    views: status::Views,
    netlink: Arc<Netlink>,
    index: u32,
    /// Routes into the TUN device now (application ranges follow the policy).
    routes: Arc<std::sync::Mutex<Vec<IpNet>>>,
    /// Addresses kept out of the routes (brokers, control API), as last resolved.
    avoid: Arc<std::sync::Mutex<Vec<IpAddr>>>,
    service: Option<IpAddr>,
    /// What the network facts of the posture checks depend on (tunnel, resolver files).
    local: posture::Local,
    /// Blocked DNS names per category (counts only) for the control plane's risk engine.
    block_counts: Option<Arc<stub::BlockCounts>>,
}

/// Runs the posture checks every interval; when a result changes, or the token is due for
/// refresh, asks the control plane for a new token and hands it to the data plane, which
/// presents it to every broker inside the tunnel. Only pass/fail per check is sent. Each
/// answer also carries the current device configuration: brokers, routes, tunnel settings.
async fn posture_loop(mut setup: PostureSetup, links: PostureLinks) {
    use sekisho_proto::api::{PostureRequest, PostureResponse};
    let mut checks = Vec::new();
    let mut last: Option<std::collections::BTreeMap<String, bool>> = None;
    let mut refresh_at = Instant::now();
    let mut last_brokers = Vec::new();
    loop {
        let specs = checks.clone();
        // The IPv6 neighbour table comes over netlink (async); the rest is read in `gather`.
        let neighbours6 = if posture::needs_gateways(&specs) {
            match links.netlink.neighbours6().await {
                Ok(n) => n.into_iter().map(posture::Neighbour::from).collect(),
                Err(e) => {
                    debug!("cannot read the IPv6 neighbour table: {e}");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let local = links.local.clone();
        let results = tokio::task::spawn_blocking(move || {
            posture::evaluate(&specs, &posture::gather(&specs, &local, neighbours6))
        })
        .await
        .unwrap_or_default();
        let changed = last.as_ref() != Some(&results);
        if changed || Instant::now() >= refresh_at {
            let request = PostureRequest {
                checks: results.clone(),
                dns_blocks: links
                    .block_counts
                    .as_ref()
                    .map(|b| b.take())
                    .unwrap_or_default(),
            };
            let answer = setup
                .post::<_, PostureResponse>("/v1/posture", &request)
                .await;
            if answer.is_err()
                && let Some(b) = &links.block_counts
            {
                b.restore(request.dns_blocks.clone());
            }
            match answer {
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
                    info!(
                        ?failing,
                        "posture token received; presenting it to the brokers"
                    );
                    // The answer also carries the configuration (brokers, routes, tunnel): ask
                    // at least every CONFIG_POLL even when the token is still fresh.
                    refresh_at = Instant::now()
                        + Duration::from_secs(resp.refresh_after.max(5)).min(setup.config_refresh);
                    let _ = links
                        .data
                        .send(dataplane::Command::Token(resp.token.clone()))
                        .await;
                    let c = &resp.config;
                    if c.brokers != last_brokers && !c.brokers.is_empty() {
                        last_brokers = c.brokers.clone();
                        setup.fallbacks(&c.brokers);
                        let _ = links
                            .data
                            .send(dataplane::Command::Brokers(c.brokers.clone()))
                            .await;
                    }
                    let _ = links
                        .guard
                        .send(killswitch::GuardCmd::Settings(killswitch::Settings {
                            tunnel: c.tunnel.clone(),
                            override_keys: c.override_keys.clone(),
                            revoked_overrides: c.revoked_overrides.clone(),
                            used_elsewhere: c.used_overrides.clone(),
                            used_overrides: Vec::new(),
                            device: c.device.clone(),
                        }))
                        .await;
                    let mut avoid = tunnel_hosts(
                        c.brokers.iter().map(|b| b.endpoint.as_str()),
                        c.brokers
                            .iter()
                            .map(|b| b.api_url.as_str())
                            .chain(setup.urls.iter().map(String::as_str))
                            .filter(|u| !u.is_empty()),
                    )
                    .await;
                    // A name that did not resolve this time keeps its last addresses out.
                    {
                        let mut known = links.avoid.lock().unwrap_or_else(|e| e.into_inner());
                        for a in known.iter() {
                            if !avoid.contains(a) {
                                avoid.push(*a);
                            }
                        }
                        *known = avoid.clone();
                    }
                    apply_routes(
                        &links,
                        &sekisho_proto::tunnel::routes_without(&c.routes, &avoid),
                    )
                    .await;
                    {
                        let mut d = links.views.device.lock().unwrap_or_else(|e| e.into_inner());
                        d.device = c.device.clone();
                        d.user = c.user.clone();
                        d.routes = c.routes.clone();
                        d.applications = c.applications.clone();
                    }
                    {
                        let mut p = links
                            .views
                            .posture
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        p.checks = results.clone();
                        p.token_expires = Some(resp.expires_at);
                        p.signed_in_at = resp.signed_in_at;
                        p.last_refresh = Some(
                            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                                .to_string(),
                        );
                        p.last_error = None;
                    }
                    last = Some(results);
                }
                Err(e) => {
                    warn!("posture refresh failed: {e:#}");
                    links
                        .views
                        .posture
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_error = Some(format!("{e:#}"));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(setup.interval) => {}
            // `sekisho-client login` signed in again: a token with the new sign-in time now.
            _ = links.views.refresh.notified() => refresh_at = Instant::now(),
        }
    }
}

/// Routes the user's application ranges (and the broker's services) into the TUN device,
/// following policy changes.
/// The addresses of the brokers' endpoints (`host:port`) and of the control API URLs: what
/// must be reached outside the tunnel. Names are resolved now; one that does not resolve is
/// left out (it is not reached at all then).
async fn tunnel_hosts<'a>(
    endpoints: impl Iterator<Item = &'a str>,
    urls: impl IntoIterator<Item = &'a str>,
) -> Vec<IpAddr> {
    let mut authorities: Vec<String> = endpoints.map(str::to_string).collect();
    for url in urls {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or(rest);
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.ends_with(']') || p.parse::<u16>().is_ok())
            && !authority.ends_with(']');
        authorities.push(if has_port {
            authority.to_string()
        } else {
            format!("{authority}:443")
        });
    }
    let mut out = Vec::new();
    for a in authorities {
        if let Ok(addrs) = tokio::net::lookup_host(a.as_str()).await {
            for sa in addrs {
                if !out.contains(&sa.ip()) {
                    out.push(sa.ip());
                }
            }
        }
    }
    out
}

async fn apply_routes(links: &PostureLinks, wanted: &[IpNet]) {
    let mut want: Vec<IpNet> = wanted.to_vec();
    if let Some(s) = links.service {
        want.push(IpNet::from(s));
    }
    let have = links
        .routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if have == want {
        return;
    }
    for net in want.iter().filter(|n| !have.contains(n)) {
        if let Err(e) = links.netlink.add_route(links.index, *net).await {
            warn!("cannot route {net}: {e}");
        }
    }
    for net in have.iter().filter(|n| !want.contains(n)) {
        let _ = links.netlink.del_route(links.index, *net).await;
    }
    info!(routes = want.len(), "application routes follow the policy");
    *links.routes.lock().unwrap_or_else(|e| e.into_inner()) = want;
}

/// Reports used override codes to the control plane (retrying until it is reachable).
async fn report_overrides(
    mut setup: PostureSetup,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<sekisho_proto::api::OverrideUsed>,
) {
    while let Some(used) = rx.recv().await {
        loop {
            match setup
                .post::<_, serde_json::Value>("/v1/device/override-used", &used)
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    debug!("cannot report the override yet: {e:#}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}
