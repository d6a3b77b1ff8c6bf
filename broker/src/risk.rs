//! The risk engine at work in the broker: behaviour from the decision log's records and
//! signals from other systems go in over a bounded channel; one task owns the engine
//! ([`sekisho_proto::risk::RiskEngine`], pure) and, whenever a device's level or reasons
//! change, tells the data plane's workers (a level per device: the per-flow cost is one
//! comparison), writes a `risk` record and tells the Shared Signals receivers.
//!
//! Subjects are `user:NAME` (behaviour, the identity provider's signals) and `device:NAME`
//! (compliance, posture, DNS blocks); a device's level is the higher of its own and its
//! user's. Behaviour counts only for applications at or above the policy's
//! `[risk] monitor_from`; denied flows count for the burst signal whatever they aimed at.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use sekisho_proto::api::RiskStatus;
use sekisho_proto::keys::PublicKeyBytes;
use sekisho_proto::policy::{Action, Policy};
use sekisho_proto::risk::{Assessment, Level, Reason, RiskEngine, RiskRecord, Signal};

use crate::dataplane::DataPlane;
use crate::log::LogLine;

/// Inputs waiting for the engine; beyond this they are counted (`risk.inputs_dropped`).
pub const QUEUE: usize = 16384;
/// How often decay is looked at (levels fall without new input).
const TICK: Duration = Duration::from_millis(250);
/// Reasons a device's status carries (it travels in one datagram).
const STATUS_REASONS: usize = 4;
/// Flows whose bytes so far are remembered between progress records.
const OPEN_FLOWS: usize = 200_000;
/// A remembered flow without a record for this long is forgotten (progress records come
/// every minute).
const OPEN_FLOW_STALE: u64 = 180;

/// A flow among the open ones: protocol, source, source port, destination, its port, start.
type FlowId = (&'static str, IpAddr, u16, IpAddr, u16, u64);

/// Something the engine should know.
#[derive(Debug, Clone)]
pub enum Input {
    /// A flow decided (allowed or denied) for `user` to `application`.
    Decision {
        user: String,
        application: Option<String>,
        allowed: bool,
        /// A denial by a rule or by default (not one the risk, the class or the posture
        /// caused: those must not raise the risk that caused them).
        probing: bool,
    },
    /// Flows denied but summed up in the log.
    DeniedMany { user: String, count: u64 },
    /// A flow's bytes so far (a traffic record), `flow` naming it among the open ones.
    Traffic {
        user: String,
        application: Option<String>,
        flow: FlowId,
        bytes: u64,
        last: bool,
    },
    /// Posture checks failing on a device now (empty: all pass).
    Posture {
        device: String,
        failing: Vec<String>,
    },
    /// Blocked DNS names the device counted, per category.
    DnsBlocks {
        device: String,
        category: String,
        count: u64,
    },
    /// A lasting state another system reports (compliance, a risk level) for a subject
    /// (`user:NAME` or `device:NAME`); None withdraws the source's earlier report.
    Standing {
        subject: String,
        signal: Signal,
        source: String,
        state: Option<(f64, String)>,
    },
    /// A one-time signal from another system (decays like behaviour).
    External {
        subject: String,
        level: Level,
        source: String,
    },
}

impl Input {
    /// The engine's subject this input is about.
    fn subject(&self) -> String {
        match self {
            Input::Decision { user, .. }
            | Input::DeniedMany { user, .. }
            | Input::Traffic { user, .. } => user_subject(user),
            Input::Posture { device, .. } | Input::DnsBlocks { device, .. } => {
                device_subject(device)
            }
            Input::Standing { subject, .. } | Input::External { subject, .. } => subject.clone(),
        }
    }
}

/// The devices of the policy in force and their subjects, both ways.
struct SubjectIndex {
    /// Per device (by index): its user's subject and its own.
    of_device: Vec<(String, String)>,
    /// Per subject: the devices it counts for.
    devices_of: HashMap<String, Vec<usize>>,
}

impl SubjectIndex {
    fn of(policy: &Policy) -> SubjectIndex {
        let mut devices_of: HashMap<String, Vec<usize>> = HashMap::new();
        let of_device = policy
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let u = user_subject(&policy.users[d.user as usize].name);
                let ds = device_subject(&d.name);
                devices_of.entry(u.clone()).or_default().push(i);
                devices_of.entry(ds.clone()).or_default().push(i);
                (u, ds)
            })
            .collect();
        SubjectIndex {
            of_device,
            devices_of,
        }
    }
}

/// The sending side, handed to the decision log's writer and the control plane.
#[derive(Clone)]
pub struct RiskFeed {
    tx: mpsc::Sender<Input>,
    dropped: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl RiskFeed {
    pub fn channel() -> (RiskFeed, mpsc::Receiver<Input>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            RiskFeed {
                tx,
                dropped: Arc::default(),
                accepted: Arc::default(),
            },
            rx,
        )
    }

    /// Waits for room: for signals another system was told were taken (Shared Signals).
    pub async fn send_reliably(&self, input: Input) -> bool {
        let ok = self.tx.send(input).await.is_ok();
        if ok {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Never waits: a full queue drops and counts.
    pub fn send(&self, input: Input) {
        if self.tx.try_send(input).is_ok() {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What a decision log line tells the engine.
    pub fn observe(&self, line: &LogLine) {
        match line {
            LogLine::Decision(r) => self.send(Input::Decision {
                user: r.user.clone(),
                application: r.application.clone(),
                allowed: r.decision == Action::Allow,
                probing: r.reason.starts_with("denied by rule")
                    || r.reason.starts_with("default deny"),
            }),
            LogLine::Summary(r) if r.denied > 0 => self.send(Input::DeniedMany {
                user: r.user.clone(),
                count: r.denied,
            }),
            LogLine::Flow(r) => self.send(Input::Traffic {
                user: r.meta.user.clone(),
                application: r.meta.application.clone(),
                flow: (r.proto, r.src, r.sport, r.dst, r.dport, r.start_ms),
                bytes: r.traffic.bytes_in + r.traffic.bytes_out,
                last: r.end != sekisho_proto::flow::FlowEnd::Ongoing,
            }),
            LogLine::Posture(r) if r.result == "accepted" => self.send(Input::Posture {
                device: r.device.clone(),
                failing: r.failing_checks.clone(),
            }),
            _ => {}
        }
    }
}

/// Counters and the devices at risk, for `stats` and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RiskStats {
    pub inputs: u64,
    pub inputs_dropped: u64,
    pub changes: u64,
    pub devices_medium: u64,
    pub devices_high: u64,
    /// Traffic records of flows not remembered (more than `OPEN_FLOWS` open at once): their
    /// bytes are not counted.
    pub flows_forgotten: u64,
    /// Risk records the decision log's queue had no room for.
    pub records_dropped: u64,
}

/// A device's level changed: what the Shared Signals transmitter and others are told.
#[derive(Debug, Clone)]
pub struct Change {
    pub device: String,
    pub user: String,
    pub level: Level,
    pub previous: Level,
    pub reasons: Vec<Reason>,
}

struct State {
    engine: RiskEngine,
    /// What the workers were told last, by device name: key, level, reason texts.
    pushed: HashMap<String, (PublicKeyBytes, Level, Vec<String>)>,
    /// Open flows' bytes so far (traffic records are cumulative) and when last reported.
    open: HashMap<FlowId, (u64, u64)>,
    /// Each device of the policy in force with its subjects (rebuilt when the policy changes).
    subjects: Option<(Arc<Policy>, SubjectIndex)>,
    /// Subjects inputs touched since the last publication.
    dirty: HashSet<String>,
    records_dropped: u64,
    /// Posture checks failing per device, as last reported.
    failing: HashMap<String, Vec<String>>,
    changes: u64,
    flows_forgotten: u64,
}

impl State {
    fn new(engine: RiskEngine) -> State {
        State {
            engine,
            pushed: HashMap::new(),
            open: HashMap::new(),
            subjects: None,
            dirty: HashSet::new(),
            records_dropped: 0,
            failing: HashMap::new(),
            changes: 0,
            flows_forgotten: 0,
        }
    }
}

pub struct RiskService {
    config: sekisho_proto::risk::RiskConfig,
    state: Mutex<State>,
    feed: RiskFeed,
    dp: DataPlane,
    log: mpsc::Sender<LogLine>,
    clock_file: Option<PathBuf>,
    offset: AtomicI64,
    on_change: OnceLock<ChangeHook>,
}

/// Told of every change of a device's level.
type ChangeHook = Box<dyn Fn(&Change) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The engine's subject for a user.
pub fn user_subject(name: &str) -> String {
    format!("user:{name}")
}

/// The engine's subject for a device.
pub fn device_subject(name: &str) -> String {
    format!("device:{name}")
}

impl RiskService {
    /// Starts the engine's task.
    pub fn start(
        config: &sekisho_proto::risk::RiskConfig,
        feed: RiskFeed,
        rx: mpsc::Receiver<Input>,
        dp: DataPlane,
        log: mpsc::Sender<LogLine>,
    ) -> Arc<RiskService> {
        let offset = dp.policy().utc_offset;
        let state = State::new(RiskEngine::new(config.clone(), offset));
        let svc = Arc::new(RiskService {
            config: state.engine.config.clone(),
            state: Mutex::new(state),
            feed,
            dp,
            log,
            clock_file: config.test_clock_offset_file.clone(),
            offset: AtomicI64::new(0),
            on_change: OnceLock::new(),
        });
        if let Some(f) = &svc.clock_file {
            warn!(file = %f.display(), "risk engine: TEST-ONLY clock offset file in use");
        }
        tokio::spawn(svc.clone().run(rx));
        svc
    }

    /// The engine's weights and thresholds.
    pub fn config(&self) -> &sekisho_proto::risk::RiskConfig {
        &self.config
    }

    pub fn feed(&self) -> &RiskFeed {
        &self.feed
    }

    /// Called for every change of a device's level (the Shared Signals transmitter).
    pub fn on_change(&self, f: impl Fn(&Change) + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(f));
    }

    /// The engine's clock: Unix seconds (plus the test-only offset).
    pub fn now(&self) -> u64 {
        unix_now().saturating_add_signed(self.offset.load(Ordering::Relaxed))
    }

    fn read_clock(&self) {
        if let Some(f) = &self.clock_file {
            let v = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .unwrap_or(0);
            self.offset.store(v, Ordering::Relaxed);
        }
    }

    /// The risk of a device of `user` now: the higher of the two, reasons of both.
    pub fn assess(&self, device: &str, user: &str) -> Assessment {
        let now = self.now();
        let st = lock(&self.state);
        combine(
            st.engine.assess(&user_subject(user), now),
            st.engine.assess(&device_subject(device), now),
        )
    }

    pub fn stats(&self) -> RiskStats {
        let st = lock(&self.state);
        let count = |l: Level| st.pushed.values().filter(|(_, x, _)| *x == l).count() as u64;
        RiskStats {
            inputs: self.feed.accepted.load(Ordering::Relaxed),
            inputs_dropped: self.feed.dropped.load(Ordering::Relaxed),
            changes: st.changes,
            devices_medium: count(Level::Medium),
            devices_high: count(Level::High),
            flows_forgotten: st.flows_forgotten,
            records_dropped: st.records_dropped,
        }
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Input>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = 0u32;
        loop {
            tokio::select! {
                input = rx.recv() => {
                    let Some(input) = input else { return };
                    let policy = self.dp.policy();
                    let now = self.now();
                    {
                        let mut st = lock(&self.state);
                        st.engine.offset = policy.utc_offset;
                        apply(&mut st, &policy, input, now);
                        // Take what else is waiting, in one go.
                        let mut more = 0;
                        while more < 1024 {
                            match rx.try_recv() {
                                Ok(i) => apply(&mut st, &policy, i, now),
                                Err(_) => break,
                            }
                            more += 1;
                        }
                    }
                    self.publish(&policy, false);
                }
                _ = tick.tick() => {
                    self.read_clock();
                    let policy = self.dp.policy();
                    prune += 1;
                    if prune.is_multiple_of(240) {
                        let now = self.now();
                        let mut st = lock(&self.state);
                        st.engine.prune(now);
                        // Flows that ended without a final record (cut, or its record lost).
                        st.open.retain(|_, (_, seen)| seen.saturating_add(OPEN_FLOW_STALE) >= now);
                    }
                    // Decay is slow: every device something is held against is looked at
                    // once a second (inputs are published at once).
                    if prune.is_multiple_of(4) {
                        self.publish(&policy, true);
                    }
                }
            }
        }
    }

    /// Tells the workers about every device whose level or reasons changed: after inputs,
    /// the devices of the subjects they touched (`dirty`); on the tick (`full`), every device
    /// something is held against, and those nothing is held against any more (decay).
    fn publish(&self, policy: &Arc<Policy>, full: bool) {
        let now = self.now();
        let collected = collected(policy);
        let mut changes = Vec::new();
        let mut records = Vec::new();
        {
            let mut st = lock(&self.state);
            let st = &mut *st;
            // (The cache holds the policy it was made for, so its address is not reused.)
            if st
                .subjects
                .as_ref()
                .is_none_or(|(p, _)| !Arc::ptr_eq(p, policy))
            {
                st.subjects = Some((policy.clone(), SubjectIndex::of(policy)));
            }
            let index = &st.subjects.as_ref().expect("just made").1;
            let dirty = std::mem::take(&mut st.dirty);
            let mut candidates: Vec<usize> = Vec::new();
            let add = |subject: &str, out: &mut Vec<usize>| {
                if let Some(ds) = index.devices_of.get(subject) {
                    out.extend(ds.iter().copied());
                }
            };
            if full {
                for subject in st.engine.active() {
                    add(subject, &mut candidates);
                }
                for name in st.pushed.keys() {
                    add(&device_subject(name), &mut candidates);
                }
            } else {
                for subject in &dirty {
                    add(subject, &mut candidates);
                }
            }
            candidates.sort_unstable();
            candidates.dedup();
            // A user's assessment is made once for all their devices.
            let mut users: HashMap<u32, Assessment> = HashMap::new();
            let mut changed_here = 0u64;
            for i in candidates {
                let d = &policy.devices[i];
                let user = &policy.users[d.user as usize].name;
                let (us, ds) = &index.of_device[i];
                let ua = users
                    .entry(d.user)
                    .or_insert_with(|| st.engine.assess(us, now))
                    .clone();
                let a = combine(ua, st.engine.assess(ds, now));
                let before = st.pushed.get(&d.name).map(|b| (b.0, b.1, b.2.clone()));
                let previous = before.as_ref().map_or(Level::Low, |b| b.1);
                if a.level == Level::Low && a.reasons.is_empty() {
                    // Nothing held against it any more.
                    if let Some((key, _, _)) = st.pushed.remove(&d.name) {
                        self.dp.set_risk(key, None);
                    }
                } else {
                    let texts: Vec<String> = a
                        .reasons
                        .iter()
                        .take(STATUS_REASONS)
                        .map(|r| r.detail.clone())
                        .collect();
                    if before
                        .as_ref()
                        .is_some_and(|b| b.0 == d.public_key && b.1 == a.level && b.2 == texts)
                    {
                        continue;
                    }
                    if let Some((old, _, _)) = before
                        && old != d.public_key
                    {
                        // The device has a new key: its old one holds nothing any more.
                        self.dp.set_risk(old, None);
                    }
                    self.dp.set_risk(
                        d.public_key,
                        Some(Arc::new(RiskStatus {
                            level: a.level,
                            reasons: texts.clone(),
                            collected: collected.clone(),
                        })),
                    );
                    st.pushed
                        .insert(d.name.clone(), (d.public_key, a.level, texts));
                }
                if previous != a.level {
                    st.changes += 1;
                    changed_here += 1;
                    debug!(device = %d.name, user = %user, from = previous.as_str(), to = a.level.as_str(), score = a.score, "risk level changed");
                    if changed_here <= 10 {
                        info!(device = %d.name, user = %user, from = previous.as_str(), to = a.level.as_str(), score = a.score, "risk level changed");
                    }
                    records.push(RiskRecord {
                        event: "risk",
                        device: d.name.clone(),
                        user: user.clone(),
                        level: a.level,
                        previous: (previous != Level::Low || a.level == Level::Low)
                            .then_some(previous),
                        score: (a.score * 10.0).round() / 10.0,
                        reasons: a.reasons.clone(),
                    });
                    changes.push(Change {
                        device: d.name.clone(),
                        user: user.clone(),
                        level: a.level,
                        previous,
                        reasons: a.reasons,
                    });
                }
            }
            if changed_here > 10 {
                info!(
                    devices = changed_here,
                    "risk level changed (the first 10 logged one by one; every one has its risk record)"
                );
            }
            if full {
                // Devices gone from the policy (revoked, deleted): nothing is said of them,
                // their key holds nothing any more.
                let gone: Vec<String> = st
                    .pushed
                    .keys()
                    .filter(|k| !index.devices_of.contains_key(&device_subject(k)))
                    .cloned()
                    .collect();
                for name in gone {
                    if let Some((key, _, _)) = st.pushed.remove(&name) {
                        self.dp.set_risk(key, None);
                    }
                }
            }
        }
        let mut dropped = 0;
        for r in records {
            if self.log.try_send(LogLine::Risk(r)).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            lock(&self.state).records_dropped += dropped;
        }
        if let Some(f) = self.on_change.get() {
            for c in &changes {
                f(c);
            }
        }
    }
}

/// A device's view: the higher level of its user's and its own assessment, all reasons.
fn combine(user: Assessment, device: Assessment) -> Assessment {
    let mut reasons = user.reasons;
    reasons.extend(device.reasons);
    reasons.sort_by(|a, b| b.score.total_cmp(&a.score));
    Assessment {
        level: user.level.max(device.level),
        score: user.score.max(device.score),
        reasons,
    }
}

/// What the engine collects, in words a user reads in `sekisho-client status`.
fn collected(policy: &Policy) -> Vec<String> {
    let from = policy.risk.monitor_from;
    vec![
        format!(
            "for applications of sensitivity {from} and above: which ones you use, when, and how many bytes"
        ),
        "denied flows (counts)".into(),
        "blocked DNS names: a count per category, not the names".into(),
        "posture check results (pass/fail only)".into(),
        "signals from your organisation's identity provider or device management".into(),
    ]
}

/// Gives `input` to the engine and notes its subject for the next publication.
fn apply(st: &mut State, policy: &Policy, input: Input, now: u64) {
    let who = input.subject();
    st.dirty.insert(who.clone());
    let monitored = |app: &Option<String>| {
        app.as_deref()
            .and_then(|a| policy.app_by_name(a))
            .is_some_and(|a| {
                policy
                    .risk
                    .monitored(policy.applications[a as usize].sensitivity)
            })
    };
    match input {
        Input::Decision {
            user: _,
            application,
            allowed,
            probing,
        } => {
            if allowed {
                if monitored(&application) {
                    let app = application.unwrap_or_default();
                    st.engine.flow(&who, &app, now);
                }
            } else if probing {
                st.engine.denied(&who, now);
            }
        }
        Input::DeniedMany { user: _, count } => {
            for _ in 0..count.min(1000) {
                st.engine.denied(&who, now);
            }
        }
        Input::Traffic {
            user: _,
            application,
            flow,
            bytes,
            last,
        } => {
            if !monitored(&application) {
                return;
            }
            let before = if last {
                st.open.remove(&flow).map(|b| b.0)
            } else if st.open.len() < OPEN_FLOWS || st.open.contains_key(&flow) {
                st.open.insert(flow, (bytes, now)).map(|b| b.0)
            } else {
                // Not remembered: its running total would be counted again at every record.
                st.flows_forgotten += 1;
                return;
            };
            let delta = bytes.saturating_sub(before.unwrap_or(0));
            if delta > 0 {
                let app = application.unwrap_or_default();
                st.engine.traffic(&who, &app, delta, now);
            }
        }
        Input::Posture { device, failing } => {
            let before = st.failing.get(&device).cloned().unwrap_or_default();
            for check in failing.iter().filter(|c| !before.contains(c)) {
                st.engine.posture_failing(&who, check, now);
            }
            if failing.is_empty() {
                st.failing.remove(&device);
            } else {
                st.failing.insert(device, failing);
            }
        }
        Input::DnsBlocks {
            device: _,
            category,
            count,
        } => st.engine.dns_blocks(&who, &category, count, now),
        Input::Standing {
            subject,
            signal,
            source,
            state,
        } => st.engine.standing(&subject, signal, &source, state, now),
        Input::External {
            subject,
            level,
            source,
        } => st.engine.external(&subject, level, &source, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[users]]
name = "alice"
[[sites]]
name = "dc1"
[[applications]]
name = "files"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
sensitivity = 2
[[applications]]
name = "intranet"
site = "dc1"
addresses = ["10.20.0.11"]
protocols = ["tcp"]
"#;

    fn state() -> (State, Policy) {
        let policy = Policy::parse(std::path::Path::new("p.toml"), POLICY).unwrap();
        let config = sekisho_proto::risk::RiskConfig {
            volume_floor_mib: 1,
            ..Default::default()
        };
        (State::new(RiskEngine::new(config, 0)), policy)
    }

    fn traffic(app: &str, port: u16, bytes: u64, last: bool) -> Input {
        let a: IpAddr = [100, 118, 0, 2].into();
        Input::Traffic {
            user: "alice".into(),
            application: Some(app.into()),
            flow: ("tcp", a, port, a, 80, 0),
            bytes,
            last,
        }
    }

    const T: u64 = 1_800_000_000;

    #[test]
    fn cumulative_traffic_records_count_their_increase_once() {
        let (mut st, p) = state();
        // Progress records of one flow: 400, then 900 in all, then the final 1,200.
        apply(&mut st, &p, traffic("files", 1, 400 << 10, false), T);
        apply(&mut st, &p, traffic("files", 1, 900 << 10, false), T + 60);
        assert_eq!(st.engine.assess("user:alice", T + 60).reasons.len(), 0);
        apply(&mut st, &p, traffic("files", 1, 1200 << 10, true), T + 61);
        // 1,200 bytes in the hour, over the 1,000 floor: flagged once, the flow forgotten.
        let a = st.engine.assess("user:alice", T + 61);
        assert_eq!(a.reasons.len(), 1, "{a:?}");
        assert!(a.reasons[0].detail.starts_with("1 MB this hour"), "{a:?}");
        assert!(st.open.is_empty());
        // Below the monitored level: nothing counts.
        apply(&mut st, &p, traffic("intranet", 3, 1 << 30, true), T + 62);
        assert!(st.open.is_empty());
    }

    #[test]
    fn flows_beyond_the_remembered_are_not_counted_again_and_again() {
        let (mut st, p) = state();
        for i in 0..OPEN_FLOWS {
            let a: IpAddr = [10, 0, 0, 1].into();
            st.open
                .insert(("tcp", a, i as u16, a, 80, i as u64), (1, T));
        }
        for _ in 0..5 {
            apply(&mut st, &p, traffic("files", 2, 800 << 10, false), T + 1);
        }
        assert_eq!(st.flows_forgotten, 5);
        assert_eq!(st.engine.assess("user:alice", T + 1).reasons.len(), 0);
    }

    #[test]
    fn only_probing_denials_feed_the_burst_signal() {
        let (mut st, p) = state();
        let denied = |probing| Input::Decision {
            user: "alice".into(),
            application: Some("files".into()),
            allowed: false,
            probing,
        };
        for i in 0..100 {
            apply(&mut st, &p, denied(false), T + i / 10);
        }
        assert!(st.engine.assess("user:alice", T + 10).reasons.is_empty());
        for i in 0..100 {
            apply(&mut st, &p, denied(true), T + i / 10);
        }
        let a = st.engine.assess("user:alice", T + 10);
        assert_eq!(a.reasons[0].signal, Signal::DeniedBurst, "{a:?}");
    }
}
