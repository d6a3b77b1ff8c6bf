//! The client's data-plane loop: owns the pure [`ClientState`] and moves its packets between
//! the TUN device (offloads: up to 64 KiB per read and write) and one UDP socket (GSO trains
//! out, GRO batches in). Commands (token, brokers) arrive on a channel; the status reads the
//! snapshot this loop publishes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use sekisho_proto::api::BrokerInfo;
pub use sekisho_proto::client::Snapshot;
use sekisho_proto::client::{ClientState, Transmit};
use sekisho_sys::AsyncDevice;
use sekisho_sys::tun::{TunReader, TunWriter};
use sekisho_sys::udp::{BatchUdp, RecvBatch};

/// What the rest of the client tells the data plane.
pub enum Command {
    /// A new posture token: present it to every broker.
    Token(String),
    /// The brokers the control plane lists now.
    Brokers(Vec<BrokerInfo>),
}

pub type SnapshotRef = Arc<Mutex<Snapshot>>;

/// TUN reads taken at once before the output is flushed (so that, say, a run of ACKs leaves
/// as one GSO train).
const TUN_READS_PER_TURN: usize = 16;
/// How often the status snapshot is published.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resolves the endpoints of brokers that have no address yet.
async fn resolve(st: &mut ClientState) {
    for endpoint in st.unresolved() {
        match tokio::net::lookup_host(&endpoint).await {
            Ok(mut a) => {
                if let Some(a) = a.next() {
                    st.set_address(&endpoint, a);
                }
            }
            Err(e) => debug!(%endpoint, "cannot resolve broker: {e}"),
        }
    }
}

/// The I/O resources of the loop.
pub struct Io<'a> {
    pub tun: &'a AsyncDevice,
    /// The TUN device's name (its kernel drop counters are read by name).
    pub tun_name: &'a str,
    pub mtu: u16,
    pub udp: &'a BatchUdp,
}

/// What the loop talks to besides devices: commands in, endpoints and the status snapshot
/// out, the stop signal, and where flow records go.
pub struct Links {
    pub commands: mpsc::Receiver<Command>,
    pub endpoints: tokio::sync::watch::Sender<Vec<SocketAddr>>,
    pub view: SnapshotRef,
    /// Notified when the client stops: the loop writes every open flow's record and returns.
    pub stop: Arc<tokio::sync::Notify>,
    pub records: crate::records::Local,
}

/// Runs the data plane until an error or the stop signal.
pub async fn run(mut st: ClientState, io: Io<'_>, links: Links) -> anyhow::Result<()> {
    let Links {
        mut commands,
        endpoints,
        view,
        stop,
        records,
    } = links;
    let mut reader = TunReader::new(io.mtu);
    let mut writer = TunWriter::default();
    let mut batch = RecvBatch::default();
    st.set_max_segments(io.udp.max_segments());
    let mut resolve_tick = tokio::time::interval(Duration::from_secs(5));
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    resolve(&mut st).await;
    loop {
        let wake = st
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            r = reader.recv(io.tun) => match r {
                Ok(_) => {
                    let now = Instant::now();
                    for p in reader.packets() {
                        st.handle_tun(p, now);
                    }
                    for _ in 1..TUN_READS_PER_TURN {
                        if reader.try_recv(io.tun).is_err() {
                            break;
                        }
                        for p in reader.packets() {
                            st.handle_tun(p, now);
                        }
                    }
                }
                Err(e) => warn!("TUN read error: {e}"),
            },
            r = io.udp.recv(&mut batch) => match r {
                Ok(_) => {
                    let now = Instant::now();
                    for (from, d) in batch.datagrams() {
                        st.handle_network(from, d, now);
                    }
                }
                Err(e) => debug!("UDP receive error: {e}"),
            },
            _ = tokio::time::sleep_until(wake.into()) => {
                st.handle_timeout(Instant::now(), unix_now());
            }
            _ = publish.tick() => {
                let mut snap = st.snapshot(Instant::now());
                snap.kernel.socket = io.udp.drops();
                snap.kernel.tun = sekisho_sys::tun::interface_drops(io.tun_name)
                    .map(|d| d.rx_dropped + d.tx_dropped);
                *view.lock().unwrap_or_else(|e| e.into_inner()) = snap;
            }
            _ = resolve_tick.tick() => {
                resolve(&mut st).await;
                let eps = st.endpoints();
                endpoints.send_if_modified(|old| if *old != eps { *old = eps; true } else { false });
            }
            _ = stop.notified() => {
                st.report_all_flows();
                while let Some(r) = st.poll_flow_report() {
                    records.flow(&r);
                }
                return Ok(());
            }
            Some(c) = commands.recv() => match c {
                Command::Token(t) => st.set_token(t),
                Command::Brokers(b) => {
                    st.set_brokers(&b, Instant::now());
                    resolve(&mut st).await;
                    let eps = st.endpoints();
                    endpoints.send_if_modified(|old| if *old != eps { *old = eps; true } else { false });
                }
            },
        }
        flush(&mut st, &io, &mut writer).await;
        while let Some(r) = st.poll_flow_report() {
            records.flow(&r);
        }
    }
}

/// Sends everything the state wants sent.
async fn flush(st: &mut ClientState, io: &Io<'_>, writer: &mut TunWriter) {
    let (mut tun_failed, mut udp_failed) = (0u64, 0u64);
    while let Some(t) = st.poll_transmit() {
        match t {
            Transmit::Tun(p) => {
                writer.push(p);
                if writer.full() {
                    tun_failed += writer.flush(io.tun).await.failed as u64;
                }
            }
            Transmit::Network(d) => {
                let segments = d.segment_size.map_or(1, |s| d.contents.len().div_ceil(s));
                if let Err(e) = io.udp.send(d.to, d.contents, d.segment_size).await {
                    debug!("UDP send failed: {e}");
                    udp_failed += segments as u64;
                }
            }
        }
    }
    tun_failed += writer.flush(io.tun).await.failed as u64;
    if tun_failed + udp_failed > 0 {
        st.count_drops(|d| {
            d.tun_write_failed += tun_failed;
            d.udp_send_failed += udp_failed;
        });
    }
}
