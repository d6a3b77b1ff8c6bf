//! `sekisho-client`: the laptop agent. Creates a TUN device with the device's overlay address,
//! routes the application ranges into it, and keeps a WireGuard session to the broker.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use serde::Deserialize;
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    interface: InterfaceConfig,
    broker: BrokerPeer,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
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
        Command::Pubkey { key } => PrivateKey::read_file(&key)
            .map(|k| println!("{}", k.public()))
            .map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("sekisho-client: {e:#}");
        std::process::exit(2);
    }
}

fn genkey(out: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = PrivateKey::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    writeln!(f, "{}", key.to_base64())?;
    println!("{}", key.public());
    Ok(())
}

fn load_config(path: &Path) -> Result<(ClientConfig, PublicKeyBytes), ConfigError> {
    let (mut c, text): (ClientConfig, String) = load_toml(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    c.interface.private_key_file = base.join(&c.interface.private_key_file);
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
    Ok((c, key))
}

fn run_blocking(config: &Path) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
    for net in &iface.routes {
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
    let result = tokio::select! {
        r = data_loop(&tun, &udp, &mut session, &config.broker.endpoint) => r,
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    info!("stopping: removing routes and interface");
    for net in &iface.routes {
        if let Err(e) = netlink.del_route(index, *net).await {
            debug!("route {net} already gone: {e}");
        }
    }
    drop(tun);
    result
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
) -> Result<()> {
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
                match session.decapsulate(Some(from.ip()), &net_buf[..n], &mut out) {
                    Output::Network(data) => { let _ = udp.send_to(data, broker).await; write_net = true; }
                    Output::Tunnel(pkt) => {
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
                if !connected && session.time_since_handshake().is_some() {
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
            }
        }
    }
}
