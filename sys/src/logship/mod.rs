//! Log shipping: every Sekisho record (flow, dns, audit, posture, admin, risk, events) to the
//! security team's collectors as it happens.
//!
//! A daemon builds one [`Shipper`] from its `[[log_sinks]]` ([`SinkConfig`]) with
//! [`Shipper::start`]. Each sink gets a bounded queue and one task on the tokio runtime that
//! owns the queue's receiver and does all the I/O:
//!
//! - `syslog`: RFC 5424 messages with octet-counting framing (RFC 6587 / RFC 5425) over
//!   `tcp://` or `tls://` (TLS 1.2 and 1.3);
//! - `otlp`: OTLP/HTTP with protobuf (`ExportLogsServiceRequest`) to `http://` or `https://`;
//! - `file`: JSON lines, appended, rotated by size and age.
//!
//! The packet loops hand records over with [`Shipper::send`], which never waits: it puts the
//! record into each interested sink's queue or, when that queue is full, counts it as
//! `dropped_queue_full`. A record a sink took but could not deliver is counted as
//! `dropped_undeliverable`, so for each sink, at any moment,
//! `offered = accepted + dropped_queue_full` and
//! `accepted = delivered + dropped_undeliverable + queued`.

mod file;
mod otlp;
mod syslog;
mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

/// Which transport a sink uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Syslog,
    Otlp,
    File,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Syslog => "syslog",
            SinkKind::Otlp => "otlp",
            SinkKind::File => "file",
        }
    }
}

/// The kinds of records Sekisho produces, named as users write them in a sink's `records`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Flows,
    Dns,
    Audit,
    Posture,
    Admin,
    Risk,
    Events,
}

impl RecordKind {
    pub const ALL: [RecordKind; 7] = [
        RecordKind::Flows,
        RecordKind::Dns,
        RecordKind::Audit,
        RecordKind::Posture,
        RecordKind::Admin,
        RecordKind::Risk,
        RecordKind::Events,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Flows => "flows",
            RecordKind::Dns => "dns",
            RecordKind::Audit => "audit",
            RecordKind::Posture => "posture",
            RecordKind::Admin => "admin",
            RecordKind::Risk => "risk",
            RecordKind::Events => "events",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

fn mask_of(kinds: &[RecordKind]) -> u8 {
    kinds.iter().fold(0, |m, k| m | k.bit())
}

/// Syslog severities (RFC 5424 section 6.2.1), most severe first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Emergency = 0,
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    Notice = 5,
    #[default]
    Info = 6,
    Debug = 7,
}

impl Severity {
    /// The syslog severity code, 0 (emergency) to 7 (debug).
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Emergency => "emergency",
            Severity::Alert => "alert",
            Severity::Critical => "critical",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
            Severity::Info => "info",
            Severity::Debug => "debug",
        }
    }

    /// The OTLP `SeverityNumber` of this syslog severity, as the OpenTelemetry log data model
    /// maps them (appendix B): debug 5, info 9, notice 10, warning 13, error 17, critical 18,
    /// alert 19, emergency 21.
    pub fn otel_number(self) -> i32 {
        match self {
            Severity::Debug => 5,
            Severity::Info => 9,
            Severity::Notice => 10,
            Severity::Warning => 13,
            Severity::Error => 17,
            Severity::Critical => 18,
            Severity::Alert => 19,
            Severity::Emergency => 21,
        }
    }
}

/// One record to ship.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: RecordKind,
    /// Unix milliseconds of the event.
    pub time_ms: u64,
    pub severity: Severity,
    /// Short event name, e.g. "flow", "dns", "sign_in" (the RFC 5424 MSGID: syslog keeps its
    /// first 32 printable ASCII characters).
    pub msgid: String,
    /// The record itself, a JSON object (OCSF-shaped) made by the caller.
    pub body: serde_json::Value,
}

impl Record {
    /// A record of now, severity info.
    pub fn new(kind: RecordKind, msgid: impl Into<String>, body: serde_json::Value) -> Record {
        Record {
            kind,
            time_ms: now_ms(),
            severity: Severity::Info,
            msgid: msgid.into(),
            body,
        }
    }

    pub fn with_severity(mut self, severity: Severity) -> Record {
        self.severity = severity;
        self
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn all_kinds() -> Vec<RecordKind> {
    RecordKind::ALL.to_vec()
}

fn default_queue() -> usize {
    10_000
}

/// A `[[log_sinks]]` entry in broker.toml, client.toml or connector.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// "syslog", "otlp" or "file".
    pub kind: SinkKind,
    /// syslog: "tcp://host:port" or "tls://host:port" (RFC 5425; port 6514 when left out);
    /// otlp: "http://host:port/v1/logs" or "https://…"; file: a path (relative paths are
    /// resolved against the base directory given to [`Shipper::start`]).
    pub url: String,
    /// For stats and metrics; default: kind and url, e.g. "syslog tls://siem:6514".
    #[serde(default)]
    pub name: Option<String>,
    /// CA certificate(s) (PEM) that verify the server (tls:// and https:// only); default:
    /// the system's roots (/etc/ssl/certs/ca-certificates.crt).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Which kinds of records this sink takes; default all.
    #[serde(default = "all_kinds")]
    pub records: Vec<RecordKind>,
    /// Bounded queue length, in records (default 10000).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Syslog facility name (default "local0").
    #[serde(default)]
    pub facility: Option<String>,
    /// File: rotate before the file would grow past this many bytes (default 64 MiB).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// File: rotate when the file is older than this (humantime, e.g. "1d"; default never).
    #[serde(default)]
    pub max_age: Option<String>,
    /// File: rotated files kept, FILE.1 (newest) to FILE.<keep> (default 5).
    #[serde(default)]
    pub keep: Option<usize>,
}

impl SinkConfig {
    /// A sink of `kind` to `url` with every default.
    pub fn new(kind: SinkKind, url: impl Into<String>) -> SinkConfig {
        SinkConfig {
            kind,
            url: url.into(),
            name: None,
            ca: None,
            cert: None,
            key: None,
            records: all_kinds(),
            queue: default_queue(),
            facility: None,
            max_bytes: None,
            max_age: None,
            keep: None,
        }
    }

    /// The name in stats: `name`, or kind and url.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{} {}", self.kind.as_str(), self.url))
    }
}

/// The largest queue a sink may ask for: memory stays bounded by what the operator chose.
const MAX_QUEUE: usize = 10_000_000;

/// Retry delays after a failure: 100 ms doubling to 5 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Once every [`Shipper`] handle is gone, a sink keeps trying to deliver what it holds for this
/// long, then counts the rest as undeliverable and ends.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A configuration error in one field.
#[derive(Debug)]
pub(crate) struct FieldError {
    field: &'static str,
    message: String,
}

impl FieldError {
    fn new(field: &'static str, message: impl Into<String>) -> FieldError {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// What every sink knows about the process it ships for.
struct Origin<'a> {
    app_name: &'a str,
    hostname: &'a str,
    base_dir: &'a Path,
}

/// A checked sink, ready to run.
enum Plan {
    Syslog(syslog::Target),
    Otlp(otlp::Target),
    File(file::Target),
}

fn check(config: &SinkConfig, origin: &Origin<'_>) -> Result<Plan, FieldError> {
    if config.queue == 0 || config.queue > MAX_QUEUE {
        return Err(FieldError::new(
            "queue",
            format!("must be 1 to {MAX_QUEUE} records"),
        ));
    }
    if config.records.is_empty() {
        return Err(FieldError::new(
            "records",
            "is empty: leave it out to ship every kind",
        ));
    }
    let only = |field: &'static str, set: bool, kind: SinkKind| {
        if set && config.kind != kind {
            Err(FieldError::new(
                field,
                format!("applies to {} sinks only", kind.as_str()),
            ))
        } else {
            Ok(())
        }
    };
    only("facility", config.facility.is_some(), SinkKind::Syslog)?;
    only("max_bytes", config.max_bytes.is_some(), SinkKind::File)?;
    only("max_age", config.max_age.is_some(), SinkKind::File)?;
    only("keep", config.keep.is_some(), SinkKind::File)?;
    Ok(match config.kind {
        SinkKind::Syslog => Plan::Syslog(syslog::Target::new(config, origin)?),
        SinkKind::Otlp => Plan::Otlp(otlp::Target::new(config, origin)?),
        SinkKind::File => Plan::File(file::Target::new(config, origin)?),
    })
}

/// One sink's counters, shared by its task (which writes them) and [`Shipper::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    accepted: AtomicU64,
    delivered: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_undeliverable: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    fn delivered(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn undeliverable(&self, n: usize) {
        self.dropped_undeliverable
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the latest error; logs it as a warning when it differs from the one before
    /// (a sink retrying against the same failure logs it once).
    fn error(&self, message: impl Into<String>) {
        let message = message.into();
        if let Ok(mut e) = self.last_error.lock() {
            if e.as_deref() == Some(message.as_str()) {
                tracing::debug!("log sink: {message}");
            } else {
                tracing::warn!("log sink: {message}");
            }
            *e = Some(message);
        }
    }

    /// Records taken but not yet delivered or dropped.
    fn queued(&self) -> u64 {
        // Read the outcomes first: `accepted` only grows before a record can have one.
        let done = self.delivered.load(Ordering::Relaxed)
            + self.dropped_undeliverable.load(Ordering::Relaxed);
        self.accepted.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// Delays between retries: 100 ms doubling to 5 s, back to 100 ms after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        d
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Whether a sink whose senders are all gone since `closed_at` should stop retrying.
fn past_grace(closed_at: Option<Instant>) -> bool {
    closed_at.is_some_and(|t| t.elapsed() >= CLOSE_GRACE)
}

/// Counts everything a closing sink still holds as undeliverable.
fn give_up(
    pending: &mut std::collections::VecDeque<Arc<Record>>,
    rx: &mut mpsc::Receiver<Arc<Record>>,
    counters: &Counters,
) {
    let mut n = pending.len();
    pending.clear();
    while rx.try_recv().is_ok() {
        n += 1;
    }
    counters.undeliverable(n);
    counters.error(format!(
        "shut down with {n} record(s) undelivered after {} s of retries",
        CLOSE_GRACE.as_secs()
    ));
}

struct Sink {
    name: String,
    kind: SinkKind,
    mask: u8,
    tx: mpsc::Sender<Arc<Record>>,
    counters: Arc<Counters>,
    /// Asks the sink to send what it has now (an OTLP batch waiting to fill).
    wake: Arc<Notify>,
}

struct Inner {
    sinks: Vec<Sink>,
    wants: u8,
}

/// A counters snapshot of one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    pub name: String,
    /// "syslog", "otlp" or "file".
    pub kind: &'static str,
    /// Records in the sink's hands now (its queue and the batch being sent).
    pub queued: u64,
    /// Records the sink took into its queue since start
    /// (`accepted = delivered + dropped_undeliverable + queued`).
    pub accepted: u64,
    /// Records written to the connection or file (syslog: accepted by the socket; otlp:
    /// acknowledged with 2xx and not rejected in a partial success).
    pub delivered: u64,
    /// Records refused by `send` because the queue was full.
    pub dropped_queue_full: u64,
    /// Records taken but lost: a write that failed half-way, an HTTP 400, a file write error,
    /// or what was left when the sink shut down.
    pub dropped_undeliverable: u64,
    /// syslog: the connection is up; otlp: the last export got an HTTP answer; file: the file
    /// is open.
    pub connected: bool,
    /// syslog: connections made after the first; otlp: exports that succeeded after a failure;
    /// file: files reopened after a write error.
    pub reconnects: u64,
    /// The most recent error (kept after recovery; `connected` tells the current state).
    pub last_error: Option<String>,
}

/// The handle the daemons ship records through. Cheap to clone; the sinks run until the last
/// clone is dropped (then each keeps trying for 5 s to deliver what it holds) or the runtime
/// ends.
#[derive(Clone)]
pub struct Shipper {
    inner: Arc<Inner>,
}

impl fmt::Debug for Shipper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.inner.sinks.iter().map(|s| &s.name))
            .finish()
    }
}

impl Default for Shipper {
    fn default() -> Shipper {
        Shipper::none()
    }
}

impl Shipper {
    /// Checks every config (an error names the sink's index and name and the field: unknown
    /// scheme, missing file, unreadable CA, bad facility…), then spawns one task per sink on
    /// the current tokio runtime. Nothing runs unless every sink is valid. `app_name` is e.g.
    /// "sekisho-broker" and `hostname` the host's name.
    pub fn start(
        configs: &[SinkConfig],
        app_name: &str,
        hostname: &str,
        base_dir: &Path,
    ) -> anyhow::Result<Shipper> {
        let origin = Origin {
            app_name,
            hostname,
            base_dir,
        };
        let mut plans = Vec::with_capacity(configs.len());
        for (i, config) in configs.iter().enumerate() {
            let plan = check(config, &origin)
                .map_err(|e| anyhow::anyhow!("log_sinks[{i}] ({}): {e}", config.display_name()))?;
            plans.push(plan);
        }
        if configs.is_empty() {
            return Ok(Shipper::none());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("log sinks must be started inside a tokio runtime"))?;
        let mut sinks = Vec::with_capacity(configs.len());
        for (config, plan) in configs.iter().zip(plans) {
            let (tx, rx) = mpsc::channel(config.queue);
            let counters = Arc::new(Counters::default());
            let wake = Arc::new(Notify::new());
            match plan {
                Plan::Syslog(t) => runtime.spawn(syslog::run(t, rx, counters.clone())),
                Plan::Otlp(t) => runtime.spawn(otlp::run(t, rx, counters.clone(), wake.clone())),
                Plan::File(t) => runtime.spawn(file::run(t, rx, counters.clone())),
            };
            sinks.push(Sink {
                name: config.display_name(),
                kind: config.kind,
                mask: mask_of(&config.records),
                tx,
                counters,
                wake,
            });
        }
        let wants = sinks.iter().fold(0, |m, s| m | s.mask);
        Ok(Shipper {
            inner: Arc::new(Inner { sinks, wants }),
        })
    }

    /// A shipper without sinks: `send` does nothing and `wants` is always false.
    pub fn none() -> Shipper {
        Shipper {
            inner: Arc::new(Inner {
                sinks: Vec::new(),
                wants: 0,
            }),
        }
    }

    /// Hands `record` to every sink that takes its kind. Never blocks nor waits: a sink whose
    /// queue is full counts it as `dropped_queue_full`.
    pub fn send(&self, record: Arc<Record>) {
        let bit = record.kind.bit();
        if self.inner.wants & bit == 0 {
            return;
        }
        for sink in &self.inner.sinks {
            if sink.mask & bit == 0 {
                continue;
            }
            let c = &sink.counters;
            // Counted before the record can reach the task, so `queued` never goes below zero.
            c.accepted.fetch_add(1, Ordering::Relaxed);
            match sink.tx.try_send(record.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    c.accepted.fetch_sub(1, Ordering::Relaxed);
                    c.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The sink's task is gone (the runtime is shutting down): taken and lost,
                    // so `accepted = delivered + dropped_undeliverable + queued` still holds.
                    c.dropped_undeliverable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether any sink takes this kind: callers skip building records nobody wants.
    pub fn wants(&self, kind: RecordKind) -> bool {
        self.inner.wants & kind.bit() != 0
    }

    /// Whether there are no sinks at all.
    pub fn is_none(&self) -> bool {
        self.inner.sinks.is_empty()
    }

    /// A snapshot of every sink's counters, in configuration order.
    pub fn stats(&self) -> Vec<SinkStats> {
        self.inner
            .sinks
            .iter()
            .map(|s| {
                let c = &s.counters;
                let queued = c.queued();
                SinkStats {
                    name: s.name.clone(),
                    kind: s.kind.as_str(),
                    queued,
                    accepted: c.accepted.load(Ordering::Relaxed),
                    delivered: c.delivered.load(Ordering::Relaxed),
                    dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
                    dropped_undeliverable: c.dropped_undeliverable.load(Ordering::Relaxed),
                    connected: c.connected.load(Ordering::Relaxed),
                    reconnects: c.reconnects.load(Ordering::Relaxed),
                    last_error: c.last_error.lock().ok().and_then(|e| e.clone()),
                }
            })
            .collect()
    }

    /// Best-effort flush at shutdown: asks batching sinks to send now and waits up to `timeout`
    /// until every sink has delivered or dropped what it took. Records still queued after that
    /// stay with the sinks, which go on trying while the runtime lives.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for s in &self.inner.sinks {
                s.wake.notify_one();
            }
            if self.inner.sinks.iter().all(|s| s.counters.queued() == 0) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + FLUSH_POLL)).await;
        }
    }
}

const FLUSH_POLL: Duration = Duration::from_millis(10);
