//! Load generator for the broker: many real WireGuard peers (boringtun) against one broker,
//! and floods of handshake initiations. `sekisho-load --help` and the README's "Load
//! generator" say how to run it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use sekisho_proto::api;
use sekisho_proto::keys::{PrivateKey, PublicKeyBytes};
use sekisho_proto::packet;
use sekisho_proto::posture::{POSTURE_PORT, TokenAnswer};
use sekisho_proto::wg::{Output, Session};

#[derive(Parser)]
#[command(
    name = "sekisho-load",
    about = "Load generator for the Sekisho broker: many real WireGuard peers, or a handshake flood",
    long_about = "Load generator for the Sekisho broker: many real WireGuard peers (boringtun) \
        registered through the control plane, or a flood of handshake initiations. Run it in a \
        network namespace that owns the source addresses (the quickstart's `load` host with \
        SK_LOAD=1). It prints a JSON report on standard output and its progress on standard error."
)]
enum Cli {
    /// Registers N devices in bulk, takes a posture token for each, brings up a WireGuard
    /// session per device, presents the tokens in the tunnels, opens M TCP flows per device to
    /// an app (SYN, SYN-ACK through broker and connector, RST), keeps the sessions alive, and
    /// reports handshakes/s, new flows/s, set-up latency p50/p99, broker CPU and memory per peer.
    Peers(Box<PeersArgs>),
    /// Sends handshake initiations with a valid mac1 (made-up keys) at a fixed rate from one or
    /// more source addresses for a while.
    Flood(FloodArgs),
}

#[derive(clap::Args)]
struct PeersArgs {
    /// The control API (https://HOST:PORT).
    #[arg(long)]
    api: String,
    /// The cluster CA certificate (PEM) the API's certificate is checked against.
    #[arg(long)]
    ca: PathBuf,
    /// File with an admin token (registers the devices).
    #[arg(long)]
    admin_token_file: PathBuf,
    /// The directory user the devices belong to (must exist).
    #[arg(long)]
    user: String,
    /// Device names are NAME-0, NAME-1, ...
    #[arg(long, default_value = "load")]
    name: String,
    /// The broker's WireGuard address.
    #[arg(long)]
    broker: SocketAddr,
    /// The broker's WireGuard public key (base64).
    #[arg(long)]
    broker_key: String,
    /// How many peers.
    #[arg(long, default_value_t = 100)]
    peers: usize,
    /// First source address; the peers share SOURCES addresses from it (skipping .0 and .255).
    #[arg(long)]
    source: Ipv4Addr,
    /// How many source addresses the peers share.
    #[arg(long, default_value_t = 16)]
    sources: u32,
    /// Handshake initiations sent per second at most.
    #[arg(long, default_value_t = 5000.0)]
    handshake_rate: f64,
    /// TCP flows each peer opens to --app.
    #[arg(long, default_value_t = 0)]
    flows: usize,
    /// The application the flows go to (IP:PORT, behind a connector).
    #[arg(long)]
    app: Option<SocketAddr>,
    /// After the flows: SYNs from the first peer to --scan-to, ports in turn, without waiting.
    #[arg(long, default_value_t = 0)]
    scan: usize,
    /// SYNs per second of the scan.
    #[arg(long, default_value_t = 100_000.0)]
    scan_rate: f64,
    /// The address the scan goes to.
    #[arg(long)]
    scan_to: Option<Ipv4Addr>,
    /// Keep every session alive this many seconds before reporting.
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Written when the load begins: the scan if there is one, else the hold (for a test to
    /// start its measurement).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// The broker's process id: its CPU time and resident memory go into the report.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Also write the report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(clap::Args)]
struct FloodArgs {
    /// The broker's WireGuard address.
    #[arg(long)]
    target: SocketAddr,
    /// The broker's WireGuard public key (base64): mac1 is computed from it.
    #[arg(long)]
    broker_key: String,
    /// Initiations per second.
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// How long the flood lasts.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// First source address; SOURCES addresses from it (skipping .0 and .255) take turns.
    #[arg(long)]
    source: Ipv4Addr,
    /// How many source addresses take turns.
    #[arg(long, default_value_t = 1)]
    sources: u32,
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match cli {
                    Cli::Peers(a) => peers(*a).await,
                    Cli::Flood(a) => flood(a).await,
                }
            })
        });
    if let Err(e) = result {
        eprintln!("sekisho-load: {e:#}");
        std::process::exit(2);
    }
}

/// `count` addresses from `first` on, skipping those ending in .0 and .255 (a /24's
/// network and broadcast addresses, which the load host does not carry).
fn source_addresses(first: Ipv4Addr, count: u32) -> impl Iterator<Item = Ipv4Addr> {
    (u32::from(first)..)
        .map(Ipv4Addr::from)
        .filter(|ip| !matches!(ip.octets()[3], 0 | 255))
        .take(count as usize)
}

/// Another handle on a tokio UDP socket, as a std socket (the same socket: a duplicated
/// descriptor).
trait TryIntoStdClone {
    fn try_into_std_clone(&self) -> Result<std::net::UdpSocket>;
}

impl TryIntoStdClone for UdpSocket {
    fn try_into_std_clone(&self) -> Result<std::net::UdpSocket> {
        use std::os::fd::AsFd;
        let fd = self.as_fd().try_clone_to_owned()?;
        Ok(std::net::UdpSocket::from(fd))
    }
}

/// `count` sockets bound to the source addresses from `first` (port chosen by the system).
fn bind_sources(first: Ipv4Addr, count: u32) -> Result<Vec<Arc<UdpSocket>>> {
    source_addresses(first, count)
        .map(|ip| {
            let s = std::net::UdpSocket::bind((ip, 0))
                .with_context(|| format!("cannot bind a source socket on {ip}"))?;
            s.set_nonblocking(true)?;
            sekisho_sys::udp::set_buffers(&s, 8 << 20);
            Ok(Arc::new(UdpSocket::from_std(s)?))
        })
        .collect()
}

fn session_index_of(datagram: &[u8]) -> Option<u32> {
    // Data (4) and cookie reply (3): receiver at 4..8; handshake response (2): at 8..12.
    let at = match datagram.first()? {
        2 => 8,
        3 | 4 => 4,
        _ => return None,
    };
    let b = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8)
}

/// A TCP SYN from `src`:`sport` to `dst`:`dport` with an MSS option, checksums set.
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> Vec<u8> {
    tcp(src, sport, dst, dport, seq, 0, 0x02, true)
}

#[allow(clippy::too_many_arguments)]
fn tcp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    mss: bool,
) -> Vec<u8> {
    let tcp_len = if mss { 24 } else { 20 };
    let total = 20 + tcp_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = packet::PROTO_TCP;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = |data: &[u8], mut s: u32| {
        for c in data.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    };
    let c = sum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((tcp_len / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    if mss {
        t[20..24].copy_from_slice(&[2, 4, 0x05, 0x28]);
    }
    let mut pseudo = 0u32;
    for c in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    pseudo += u32::from(packet::PROTO_TCP) + tcp_len as u32;
    let c = sum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

/// CPU seconds and resident KiB of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tck;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((cpu, rss))
}

struct Peer {
    session: Session,
    overlay: Ipv4Addr,
    sock: usize,
    token: String,
    started: Option<Instant>,
    handshaken: Option<Instant>,
    token_ok: bool,
    retry_at: Instant,
}

#[derive(Serialize, Default)]
struct Report {
    peers: usize,
    sources: u32,
    register_seconds: f64,
    tokens_seconds: f64,
    handshakes: usize,
    handshake_seconds: f64,
    handshakes_per_second: f64,
    tokens_accepted: usize,
    flows_opened: usize,
    flows_answered: usize,
    flow_seconds: f64,
    new_flows_per_second: f64,
    setup_p50_ms: f64,
    setup_p99_ms: f64,
    held_seconds: f64,
    scan_sent: usize,
    scan_per_second: f64,
    /// The broker's CPU time per handshake during the handshake phase (its whole process).
    broker_cpu_per_handshake_us: Option<f64>,
    broker_cpu_seconds: Option<f64>,
    broker_rss_before_kib: Option<u64>,
    /// After the devices were registered (in the policy, not connected).
    broker_rss_registered_kib: Option<u64>,
    /// After every device handshook.
    broker_rss_handshaken_kib: Option<u64>,
    broker_rss_after_kib: Option<u64>,
    broker_bytes_per_registered_device: Option<f64>,
    broker_bytes_per_connected_peer: Option<f64>,
    broker_bytes_per_peer: Option<f64>,
}

/// Datagrams received on any source socket: (socket, sender, bytes).
type Received = (usize, SocketAddr, Vec<u8>);

async fn peers(a: PeersArgs) -> Result<()> {
    let n = a.peers;
    let sources = a.sources;
    let flows = a.flows;
    let hold = a.hold;
    let handshake_rate = a.handshake_rate;
    let broker = a.broker;
    let broker_key = PublicKeyBytes::parse(&a.broker_key).context("--broker-key")?;
    let first = a.source;
    let broker_pid = a.broker_pid;
    let app = a.app;
    if flows > 0 && app.is_none() {
        bail!("--flows needs --app");
    }
    let ca = std::fs::read_to_string(&a.ca).with_context(|| format!("--ca {}", a.ca.display()))?;
    let admin = std::fs::read_to_string(&a.admin_token_file)
        .with_context(|| format!("--admin-token-file {}", a.admin_token_file.display()))?
        .trim()
        .to_string();
    let base = a.api.clone();
    let user = a.user.clone();
    let tag = a.name.clone();
    let mut report = Report {
        peers: n,
        sources,
        ..Default::default()
    };
    let usage0 = broker_pid.and_then(proc_usage);
    report.broker_rss_before_kib = usage0.map(|u| u.1);

    // Register in bulk (keys made here), then a posture token each through the device API.
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let tls = sekisho_sys::http::ca_tls(&ca)?;
    let admin_api = sekisho_sys::http::ApiClient::new(&base, tls.clone(), Some(admin))?;
    let t0 = Instant::now();
    let mut registered: Vec<api::RegisteredDevice> = Vec::with_capacity(n);
    for (c, chunk) in keys.chunks(5000).enumerate() {
        let req = api::RegisterDevices {
            user: user.clone(),
            devices: chunk
                .iter()
                .enumerate()
                .map(|(i, k)| api::NewDevice {
                    name: format!("{tag}-{}", c * 5000 + i),
                    public_key: k.public().to_string(),
                })
                .collect(),
        };
        let got: Vec<api::RegisteredDevice> = admin_api
            .post("/v1/admin/devices", &req)
            .await
            .map_err(|e| anyhow::anyhow!("bulk registration: {e}"))?;
        registered.extend(got);
    }
    report.register_seconds = t0.elapsed().as_secs_f64();
    eprintln!("registered {n} devices in {:.2} s", report.register_seconds);
    let t0 = Instant::now();
    let checks: std::collections::BTreeMap<String, bool> =
        [("client-current".to_string(), true)].into();
    let mut tokens = vec![String::new(); n];
    let (ttx, mut trx) = mpsc::channel::<(usize, Result<String>)>(256);
    let mut next = 0;
    let mut running = 0;
    let mut done = 0;
    while done < n {
        while running < 32 && next < n {
            let api = sekisho_sys::http::ApiClient::new(
                &base,
                tls.clone(),
                Some(registered[next].credential.clone()),
            )?;
            let (tx, checks, i) = (ttx.clone(), checks.clone(), next);
            tokio::spawn(async move {
                let r: Result<api::PostureResponse> = api
                    .post(
                        "/v1/posture",
                        &api::PostureRequest {
                            checks,
                            dns_blocks: Default::default(),
                        },
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("posture: {e}"));
                let _ = tx.send((i, r.map(|p| p.token))).await;
            });
            next += 1;
            running += 1;
        }
        let Some((i, r)) = trx.recv().await else {
            bail!("posture tasks ended");
        };
        tokens[i] = r?;
        running -= 1;
        done += 1;
    }
    report.tokens_seconds = t0.elapsed().as_secs_f64();
    eprintln!("{n} posture tokens in {:.2} s", report.tokens_seconds);

    // Sessions: one per device, spread over the source sockets; session index = device + 1.
    let socks = bind_sources(first, sources)?;
    let now = Instant::now();
    let mut peers: Vec<Peer> = keys
        .iter()
        .zip(&registered)
        .zip(tokens)
        .enumerate()
        .map(|(i, ((k, r), token))| Peer {
            session: Session::new(k, broker_key, Some(25), i as u32 + 1, None),
            overlay: match r.address {
                IpAddr::V4(v) => v,
                IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            },
            sock: i % sources as usize,
            token,
            started: None,
            handshaken: None,
            token_ok: false,
            retry_at: now,
        })
        .collect();
    let (rtx, mut rrx) = mpsc::channel::<Vec<Received>>(1024);
    for (i, s) in socks.iter().enumerate() {
        let (s, tx) = (s.clone(), rtx.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((len, from)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                let mut batch = vec![(i, from, buf[..len].to_vec())];
                while batch.len() < 256 {
                    match s.try_recv_from(&mut buf) {
                        Ok((len, from)) => batch.push((i, from, buf[..len].to_vec())),
                        Err(_) => break,
                    }
                }
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
        });
    }
    let service: Ipv4Addr =
        match sekisho_proto::posture::service_address(&"100.118.0.0/16".parse().unwrap()) {
            IpAddr::V4(v) => v,
            IpAddr::V6(_) => unreachable!(),
        };
    let mut out = vec![0u8; 65536];
    let mut pkt = vec![0u8; 4096];
    let send = |socks: &[Arc<UdpSocket>], sock: usize, d: &[u8]| {
        let _ = socks[sock].try_send_to(d, broker);
    };

    let registered_usage = broker_pid.and_then(proc_usage);
    report.broker_rss_registered_kib = registered_usage.map(|u| u.1);
    // Phase 1: handshakes (at most `handshake_rate` new initiations a second, retried every
    // 2 s).
    let t0 = Instant::now();
    let mut started = 0;
    let mut handshaken = 0;
    let deadline = t0 + Duration::from_secs(120);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while handshaken < n && Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let budget = ((now - t0).as_secs_f64() * handshake_rate) as usize;
                for p in peers.iter_mut() {
                    if p.handshaken.is_some() {
                        continue;
                    }
                    let fresh = p.started.is_none();
                    if (fresh && started < budget) || (!fresh && now >= p.retry_at) {
                        if let Output::Network(d) = p.session.initiate(&mut out, true) {
                            send(&socks, p.sock, d);
                        }
                        if fresh {
                            started += 1;
                            p.started = Some(now);
                        }
                        p.retry_at = now + Duration::from_secs(2);
                    }
                }
            }
            Some(batch) = rrx.recv() => {
                let now = Instant::now();
                for (sock, from, d) in batch {
                    let Some(i) = session_index_of(&d).and_then(|x| x.checked_sub(1)) else { continue };
                    let Some(p) = peers.get_mut(i as usize) else { continue };
                    let cookie = d.first() == Some(&3);
                    if let Output::Network(x) = p.session.decapsulate(Some(from.ip()), &d, &mut out) {
                        send(&socks, sock, x);
                    }
                    if cookie {
                        // Under load the broker asked for a cookie: the retry carries it.
                        if let Output::Network(x) = p.session.initiate(&mut out, true) {
                            send(&socks, sock, x);
                        }
                    }
                    if p.handshaken.is_none() && p.session.time_since_handshake().is_some() {
                        p.handshaken = Some(now);
                        handshaken += 1;
                    }
                }
            }
        }
    }
    report.handshakes = handshaken;
    report.handshake_seconds = t0.elapsed().as_secs_f64();
    if let (Some(u0), Some(u1)) = (registered_usage, broker_pid.and_then(proc_usage)) {
        report.broker_cpu_per_handshake_us = Some((u1.0 - u0.0) * 1e6 / handshaken.max(1) as f64);
        report.broker_rss_handshaken_kib = Some(u1.1);
    }
    report.handshakes_per_second = handshaken as f64 / report.handshake_seconds;
    eprintln!(
        "{handshaken} of {n} handshakes in {:.2} s: {:.0}/s",
        report.handshake_seconds, report.handshakes_per_second
    );

    // Phase 2: each device presents its token inside its tunnel.
    let t0 = Instant::now();
    let mut accepted = 0;
    let deadline = t0 + Duration::from_secs(60);
    while accepted < handshaken && Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let mut sent = 0;
                for p in peers.iter_mut() {
                    if p.handshaken.is_none() || p.token_ok || now < p.retry_at { continue; }
                    if let Some(k) = packet::build_udp(p.overlay.into(), 40743, service.into(), POSTURE_PORT, p.token.as_bytes(), &mut pkt)
                        && let Output::Network(d) = p.session.encapsulate(&pkt[..k], &mut out) {
                        send(&socks, p.sock, d);
                    }
                    p.retry_at = now + Duration::from_secs(2);
                    sent += 1;
                    if sent >= 200 { break; }
                }
            }
            Some(batch) = rrx.recv() => {
                for (sock, from, d) in batch {
                    let Some(i) = session_index_of(&d).and_then(|x| x.checked_sub(1)) else { continue };
                    let Some(p) = peers.get_mut(i as usize) else { continue };
                    match p.session.decapsulate(Some(from.ip()), &d, &mut out) {
                        Output::Tunnel(inner) => {
                            if let Some(body) = packet::udp_payload(inner)
                                && let Ok(ans) = serde_json::from_slice::<TokenAnswer>(body)
                                && ans.accepted && !p.token_ok {
                                p.token_ok = true;
                                accepted += 1;
                            }
                        }
                        Output::Network(x) => send(&socks, sock, x),
                        _ => {}
                    }
                }
            }
        }
    }
    report.tokens_accepted = accepted;
    eprintln!(
        "{accepted} tokens accepted in {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    // Phase 3: flows. At most 512 waiting for their SYN-ACK at once.
    if let (Some(SocketAddr::V4(app)), true) = (app, flows > 0) {
        let total = flows * handshaken;
        let mut pending: HashMap<(u32, u16), Instant> = HashMap::new();
        let mut latencies: Vec<f64> = Vec::with_capacity(total);
        let mut opened = 0;
        let up: Vec<usize> = peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.handshaken.is_some())
            .map(|(i, _)| i)
            .collect();
        let mut order = up.iter().copied().cycle();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(120);
        while (opened < total || !pending.is_empty()) && Instant::now() < deadline {
            while opened < total && pending.len() < 512 {
                let i = order.next().unwrap_or(0);
                let sport = 20000 + (opened / handshaken.max(1)) as u16;
                let p = &mut peers[i];
                let s = syn(p.overlay, sport, *app.ip(), app.port(), 1000);
                if let Output::Network(d) = p.session.encapsulate(&s, &mut out) {
                    send(&socks, p.sock, d);
                }
                pending.insert((i as u32, sport), Instant::now());
                opened += 1;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    // SYNs unanswered for 3 s are given up (counted as not answered).
                    let now = Instant::now();
                    pending.retain(|_, t| now - *t < Duration::from_secs(3));
                }
                Some(batch) = rrx.recv() => {
                    let now = Instant::now();
                    for (sock, from, d) in batch {
                        let Some(i) = session_index_of(&d).and_then(|x| x.checked_sub(1)) else { continue };
                        let Some(p) = peers.get_mut(i as usize) else { continue };
                        let mut reply = None;
                        match p.session.decapsulate(Some(from.ip()), &d, &mut out) {
                            Output::Tunnel(inner) => {
                                if let Ok(packet::PacketKind::Flow(k)) = packet::classify(inner)
                                    && packet::tcp_flags(inner) == Some(0x12)
                                    && let Some(t) = pending.remove(&(i, k.dport))
                                {
                                    latencies.push((now - t).as_secs_f64() * 1000.0);
                                    let their_seq = u32::from_be_bytes([inner[24], inner[25], inner[26], inner[27]]);
                                    reply = Some(tcp(p.overlay, k.dport, *app.ip(), app.port(), 1001, their_seq.wrapping_add(1), 0x14, false));
                                }
                            }
                            Output::Network(x) => send(&socks, sock, x),
                            _ => {}
                        }
                        if let Some(rst) = reply
                            && let Output::Network(x) = p.session.encapsulate(&rst, &mut out) {
                            send(&socks, sock, x);
                        }
                    }
                }
            }
        }
        report.flows_opened = opened;
        report.flows_answered = latencies.len();
        report.flow_seconds = t0.elapsed().as_secs_f64();
        report.new_flows_per_second = latencies.len() as f64 / report.flow_seconds;
        latencies.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        report.setup_p50_ms = pct(0.5);
        report.setup_p99_ms = pct(0.99);
        eprintln!(
            "{} of {opened} flows set up in {:.2} s: {:.0}/s, SYN to SYN-ACK p50 {:.2} ms p99 {:.2} ms",
            latencies.len(),
            report.flow_seconds,
            report.new_flows_per_second,
            report.setup_p50_ms,
            report.setup_p99_ms
        );
    }

    // Optional: a scan from the first device: `--scan N` SYNs to `--scan-to IP`, ports in
    // turn, at `--scan-rate` a second, without waiting for answers.
    let scan = a.scan;
    let ready = || {
        if let Some(f) = &a.ready_file {
            let _ = std::fs::write(f, "ready\n");
        }
    };
    if scan > 0 && handshaken > 0 {
        ready();
        let to = a.scan_to.context("--scan needs --scan-to")?;
        let rate = a.scan_rate;
        let p = &mut peers[0];
        // The SYNs leave in GSO trains (one system call per train), as a network card's GRO
        // hands a burst of one sender's datagrams to the broker: sent one by one through three
        // namespaces, the kernel's forwarding work in the sender's system calls took more than
        // half a core, which on two cores is what the test measured.
        let gso =
            sekisho_sys::udp::BatchUdp::from_std(socks[p.sock].as_ref().try_into_std_clone()?, 0)?;
        // quinn-udp turned on GRO for the (shared) socket; the peer's reader expects single
        // datagrams, so it goes off again.
        {
            use std::os::fd::AsRawFd;
            let off: libc::c_int = 0;
            // SAFETY: a valid descriptor and an int option.
            unsafe {
                libc::setsockopt(
                    socks[p.sock].as_raw_fd(),
                    libc::SOL_UDP,
                    libc::UDP_GRO,
                    (&off as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        let per_train = gso.max_segments().clamp(1, 32);
        let mut train: Vec<u8> = Vec::with_capacity(per_train * 128);
        let mut seg = 0usize;
        let t0 = Instant::now();
        let mut sent = 0usize;
        while sent < scan {
            let due = ((t0.elapsed().as_secs_f64() * rate) as usize).min(scan);
            while sent < due {
                let port = 1 + (sent % 60000) as u16;
                let sport = 1024 + (sent / 60000) as u16;
                let s = syn(p.overlay, sport, to, port, 7);
                if let Output::Network(d) = p.session.encapsulate(&s, &mut out) {
                    if seg != 0 && (d.len() != seg || train.len() / seg >= per_train) {
                        let _ = gso.send(broker, &train, Some(seg)).await;
                        train.clear();
                    }
                    seg = d.len();
                    train.extend_from_slice(d);
                }
                sent += 1;
            }
            if !train.is_empty() {
                let _ = gso.send(broker, &train, Some(seg)).await;
                train.clear();
            }
            // Answers (RSTs) are read and dropped so the socket never fills.
            while let Ok(batch) = rrx.try_recv() {
                drop(batch);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        report.scan_sent = sent;
        report.scan_per_second = sent as f64 / secs;
        eprintln!(
            "scan: {sent} new flows in {secs:.2} s: {:.0}/s",
            report.scan_per_second
        );
    }

    // Phase 4: hold every session (keepalives, rekeys) for a while.
    let t0 = Instant::now();
    if hold > 0 {
        eprintln!("holding {handshaken} sessions for {hold} s");
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let until = t0 + Duration::from_secs(hold);
        if scan == 0 {
            ready();
        }
        while Instant::now() < until {
            tokio::select! {
                _ = tick.tick() => {
                    for p in peers.iter_mut() {
                        if let Output::Network(d) = p.session.tick(&mut out) {
                            send(&socks, p.sock, d);
                        }
                    }
                }
                Some(batch) = rrx.recv() => {
                    for (sock, from, d) in batch {
                        let Some(i) = session_index_of(&d).and_then(|x| x.checked_sub(1)) else { continue };
                        let Some(p) = peers.get_mut(i as usize) else { continue };
                        if let Output::Network(x) = p.session.decapsulate(Some(from.ip()), &d, &mut out) {
                            send(&socks, sock, x);
                        }
                    }
                }
            }
        }
    }
    report.held_seconds = t0.elapsed().as_secs_f64();
    if let (Some(pid), Some(u0)) = (broker_pid, usage0) {
        let u1 = proc_usage(pid);
        report.broker_cpu_seconds = u1.map(|u| u.0 - u0.0);
        report.broker_rss_after_kib = u1.map(|u| u.1);
        report.broker_bytes_per_peer =
            u1.map(|u| (u.1 as f64 - u0.1 as f64) * 1024.0 / n.max(1) as f64);
        let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) * 1024.0 / n.max(1) as f64),
            _ => None,
        };
        report.broker_bytes_per_registered_device = per(
            report.broker_rss_before_kib,
            report.broker_rss_registered_kib,
        );
        report.broker_bytes_per_connected_peer = per(
            report.broker_rss_registered_kib,
            report.broker_rss_handshaken_kib,
        );
    }
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(f) = &a.report {
        std::fs::write(f, &text).with_context(|| format!("--report {}", f.display()))?;
    }
    Ok(())
}

/// CPU time (user + system) this process used so far.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

async fn flood(a: FloodArgs) -> Result<()> {
    let target = a.target;
    let key = PublicKeyBytes::parse(&a.broker_key).context("--broker-key")?;
    let (rate, seconds, first, sources) = (a.rate, a.seconds, a.source, a.sources);
    // Valid initiations (good mac1) from made-up keys, made once and sent in turn.
    let mut out = vec![0u8; 256];
    let messages: Vec<Vec<u8>> = (0..512)
        .map(|_| {
            let mut s = Session::new(&PrivateKey::generate(), key, None, 1, None);
            match s.initiate(&mut out, true) {
                Output::Network(d) => d.to_vec(),
                _ => Vec::new(),
            }
        })
        .collect();
    let socks: Vec<std::net::UdpSocket> = source_addresses(first, sources)
        .map(|ip| std::net::UdpSocket::bind((ip, 0)).with_context(|| format!("cannot bind {ip}")))
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    let mut failed: u64 = 0;
    while t0.elapsed().as_secs_f64() < seconds {
        let due = (t0.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let s = &socks[(sent % sources as u64) as usize];
            let m = &messages[(sent % messages.len() as u64) as usize];
            if s.send_to(m, target).is_err() {
                failed += 1;
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"sent\": {sent}, \"failed\": {failed}, \"seconds\": {secs:.2}, \"rate\": {:.0}, \
         \"cpu_seconds\": {:.2}}}",
        sent as f64 / secs,
        own_cpu_seconds()
    );
    Ok(())
}
