//! The connector's health as brokers and Prometheus see it: draining or not, the site's
//! applications it cannot reach (TCP connect checks), its links, flows and counters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use sekisho_proto::connector::Allowlist;
use sekisho_proto::link::HealthCheck;
use sekisho_sys::metrics::{Readiness, Snapshot, Snapshotting, Source};
use tracing::{info, warn};

/// How often every application is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(3);
/// A check that takes longer fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Failures in a row before an application counts as unreachable from here.
const FAILURES_TO_DOWN: u32 = 2;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the site loop publishes (every 250 ms) for the metrics endpoint.
#[derive(Debug, Default, Clone)]
pub struct DataView {
    pub counters: sekisho_proto::connector::Counters,
    pub links: Vec<sekisho_proto::connector::LinkView>,
    /// The TUN device's drop counters (packets the kernel dropped for us).
    pub tun: Option<sekisho_sys::tun::InterfaceDrops>,
    /// Datagrams the kernel dropped on the link sockets (receive buffers full).
    pub socket_drops: u64,
}

/// State shared by the site loop (which publishes it), the link tasks, the checker, the drain
/// and the metrics endpoint. The packet path itself never takes these locks.
#[derive(Default)]
pub struct State {
    pub draining: AtomicBool,
    /// Open flows through this connector (updated after every batch).
    pub flows: AtomicUsize,
    pub link_attempts: AtomicU64,
    /// Broker endpoint → linked now.
    pub links: Mutex<BTreeMap<String, bool>>,
    /// Application → reachable by the latest checks.
    pub reachable: Mutex<BTreeMap<String, bool>>,
    /// Packets the nftables forward chain refused (read every few seconds).
    pub kernel_refused: AtomicU64,
    data: Mutex<DataView>,
    /// Where the connector's records go (`[[log_sinks]]`): refusals of its allowlist.
    pub shipper: std::sync::OnceLock<sekisho_sys::logship::Shipper>,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl State {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_flows(&self, n: usize) {
        self.flows.store(n, Ordering::Relaxed);
    }

    pub fn publish(&self, view: DataView) {
        *lock(&self.data) = view;
    }

    /// The applications the latest checks could not reach.
    pub fn unreachable(&self) -> Vec<String> {
        lock(&self.reachable)
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(a, _)| a.clone())
            .collect()
    }

    pub fn set_link(&self, broker: &str, up: bool) {
        lock(&self.links).insert(broker.to_string(), up);
    }

    pub fn forget_link(&self, broker: &str) {
        lock(&self.links).remove(broker);
    }
}

impl Source for State {
    fn snapshot(&self) -> Snapshotting<'_> {
        Box::pin(async move { self.metrics() })
    }

    fn ready(&self) -> Readiness<'_> {
        Box::pin(async move {
            if lock(&self.links).values().any(|up| *up) {
                Ok(())
            } else {
                Err("no broker linked".into())
            }
        })
    }
}

impl State {
    fn metrics(&self) -> Snapshot {
        let mut m = Snapshot::new("sekisho_connector");
        if let Some(s) = self.shipper.get() {
            sekisho_sys::metrics::log_sink_metrics(&mut m, &s.stats());
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (broker, up) in lock(&self.links).iter() {
            m.gauge_with(
                "link_up",
                "QUIC link to each broker (1 = linked).",
                &[("broker", broker)],
                if *up { 1.0 } else { 0.0 },
            );
        }
        m.counter(
            "link_attempts",
            "Link attempts to brokers (the first and every reconnection).",
            get(&self.link_attempts),
        );
        m.gauge(
            "flows",
            "Open flows through this connector.",
            self.flows.load(Ordering::Relaxed) as f64,
        );
        m.gauge(
            "draining",
            "1 while draining (no new flows; stops when its flows are done).",
            if self.draining() { 1.0 } else { 0.0 },
        );
        let data = lock(&self.data).clone();
        let c = &data.counters;
        for (dir, t) in [("to_site", &c.to_site), ("from_site", &c.from_site)] {
            m.counter_with(
                "packets",
                "IP packets by direction.",
                &[("direction", dir)],
                t.packets,
            );
            m.counter_with(
                "bytes",
                "IP bytes by direction.",
                &[("direction", dir)],
                t.bytes,
            );
        }
        for (why, n) in c.drops.fields() {
            m.counter_with(
                "dropped_packets",
                "Packets dropped, by reason.",
                &[("reason", why)],
                n,
            );
        }
        m.counter(
            "refused_names",
            "Name translations a broker asked for outside the allowlist (zone or resolved address).",
            c.refused_names,
        );
        m.counter(
            "refused_routes",
            "Routes a broker asked for over the allowed networks, or too wide.",
            c.refused_routes,
        );
        m.counter(
            "kernel_refused_packets",
            "Packets from the tunnel the kernel's copy of the allowlist (nftables forward chain) dropped.",
            self.kernel_refused.load(std::sync::atomic::Ordering::Relaxed),
        );
        m.counter(
            "too_big_replies",
            "ICMP fragmentation-needed / packet-too-big answers sent into the site.",
            c.too_big_replies,
        );
        m.counter(
            "socket_dropped_packets",
            "Datagrams the kernel dropped on the link sockets (receive buffer full).",
            data.socket_drops,
        );
        if let Some(t) = data.tun {
            m.counter(
                "tun_dropped_packets",
                "Packets the kernel dropped on the TUN device (not read in time).",
                t.tx_dropped + t.rx_dropped,
            );
        }
        for l in &data.links {
            m.gauge_with(
                "link_max_datagram_bytes",
                "The largest datagram each link carries now.",
                &[("broker", &l.broker)],
                l.max_datagram as f64,
            );
        }
        for (app, ok) in lock(&self.reachable).iter() {
            m.gauge_with(
                "application_reachable",
                "Whether the latest checks reached each application of the site.",
                &[("application", app)],
                if *ok { 1.0 } else { 0.0 },
            );
        }
        m
    }
}

/// One TCP connect to the check's host and port.
async fn probe(
    check: &HealthCheck,
    resolver: Option<&TokioResolver>,
    allow: &Allowlist,
) -> Result<(), String> {
    let addr: IpAddr = match check.host.parse() {
        Ok(a) => a,
        Err(_) => {
            allow
                .permits_name(&check.host)
                .map_err(|why| why.text().to_string())?;
            match resolver {
                Some(r) => crate::names::resolve(r, &check.host).await?.into(),
                None => return Err("no resolver for names".into()),
            }
        }
    };
    // Probes go where the connector may forward, nowhere else: a broker cannot use them to
    // scan the site.
    allow
        .permits_probe(addr, check.port)
        .map_err(|why| why.text().to_string())?;
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::net::TcpStream::connect(SocketAddr::new(addr, check.port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Checks the site's applications every [`CHECK_EVERY`] (the list comes from the brokers'
/// welcomes through `checks`); calls `changed` when the set of unreachable ones changes.
pub async fn check_loop(
    state: Arc<State>,
    mut checks: tokio::sync::watch::Receiver<Vec<HealthCheck>>,
    resolver: Option<Arc<TokioResolver>>,
    allow: Allowlist,
    changed: impl Fn(),
) {
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let list = checks.borrow_and_update().clone();
        let mut results = Vec::with_capacity(list.len());
        for c in &list {
            results.push((c, probe(c, resolver.as_deref(), &allow).await));
        }
        let before: BTreeSet<String> = state.unreachable().into_iter().collect();
        {
            let mut reachable = lock(&state.reachable);
            reachable.retain(|app, _| list.iter().any(|c| &c.application == app));
            failures.retain(|app, _| list.iter().any(|c| &c.application == app));
            for (c, r) in results {
                let n = failures.entry(c.application.clone()).or_insert(0);
                match r {
                    Ok(()) => {
                        *n = 0;
                        reachable.insert(c.application.clone(), true);
                    }
                    Err(e) => {
                        *n += 1;
                        if *n >= FAILURES_TO_DOWN {
                            if reachable.insert(c.application.clone(), false) != Some(false) {
                                warn!(application = %c.application, port = c.port, "application unreachable from this connector: {e}");
                            }
                        } else {
                            reachable.entry(c.application.clone()).or_insert(true);
                        }
                    }
                }
            }
        }
        let after: BTreeSet<String> = state.unreachable().into_iter().collect();
        if before != after {
            info!(unreachable = ?after, "application reachability changed");
            changed();
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            r = checks.changed() => if r.is_err() { return },
        }
    }
}
