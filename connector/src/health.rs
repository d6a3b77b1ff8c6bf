//! The connector's health as brokers and Prometheus see it: draining or not, the site's
//! applications it cannot reach (TCP connect checks), its links, flows and counters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use sekisho_proto::link::HealthCheck;
use sekisho_proto::metrics::{Readiness, Snapshot, Source};
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

/// Counters and state shared by the site loop, the link tasks, the checker and the metrics
/// endpoint.
#[derive(Default)]
pub struct State {
    pub draining: AtomicBool,
    /// Open flows through this connector (as of the last second).
    pub flows: AtomicUsize,
    pub packets_to_site: AtomicU64,
    pub packets_from_site: AtomicU64,
    pub bytes_to_site: AtomicU64,
    pub bytes_from_site: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_no_link: AtomicU64,
    pub dropped_name_queue: AtomicU64,
    pub link_attempts: AtomicU64,
    /// Broker endpoint → linked now.
    pub links: Mutex<BTreeMap<String, bool>>,
    /// Application → reachable by the latest checks.
    pub reachable: Mutex<BTreeMap<String, bool>>,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl State {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
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
    fn snapshot(&self) -> Snapshot {
        let mut m = Snapshot::new("sekisho_connector");
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
        for (dir, p, b) in [
            ("to_site", &self.packets_to_site, &self.bytes_to_site),
            ("from_site", &self.packets_from_site, &self.bytes_from_site),
        ] {
            m.counter_with(
                "packets",
                "IP packets by direction.",
                &[("direction", dir)],
                get(p),
            );
            m.counter_with(
                "bytes",
                "IP bytes by direction.",
                &[("direction", dir)],
                get(b),
            );
        }
        for (why, c) in [
            ("too_large", &self.dropped_too_large),
            ("no_link", &self.dropped_no_link),
            ("name_queue_full", &self.dropped_name_queue),
        ] {
            m.counter_with(
                "dropped_packets",
                "Packets dropped, by reason.",
                &[("reason", why)],
                get(c),
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

/// One TCP connect to the check's host and port.
async fn probe(check: &HealthCheck, resolver: Option<&TokioResolver>) -> Result<(), String> {
    let addr: IpAddr = match check.host.parse() {
        Ok(a) => a,
        Err(_) => match resolver {
            Some(r) => crate::names::resolve(r, &check.host).await?.into(),
            None => return Err("no resolver for names".into()),
        },
    };
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
    changed: impl Fn(),
) {
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let list = checks.borrow_and_update().clone();
        let mut results = Vec::with_capacity(list.len());
        for c in &list {
            results.push((c, probe(c, resolver.as_deref()).await));
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
