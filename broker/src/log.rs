//! The decision log: one JSON line per flow decision, posture event, application name and
//! policy change, written by one task so the data plane never waits on the file.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::error;

use sekisho_proto::broker::{
    AppDnsRecord, DecisionRecord, FlowRecord, PostureRecord, SummaryRecord,
};
use sekisho_proto::ocsf;
use sekisho_sys::logship::{Record, RecordKind, Severity, Shipper};

/// Records waiting for the writer. Bounded: a flood of new flows must not grow memory
/// without end; what the writer cannot take is counted (`drops.decisions_not_logged`).
pub const QUEUE: usize = 65536;

pub enum LogLine {
    Decision(DecisionRecord),
    Posture(PostureRecord),
    AppDns(AppDnsRecord),
    Summary(SummaryRecord),
    Flow(FlowRecord),
    /// A device's risk level changed.
    Risk(sekisho_proto::risk::RiskRecord),
    Policy {
        result: &'static str,
        detail: String,
    },
}

#[derive(Serialize)]
struct Stamped<'a, T: Serialize> {
    ts: String,
    #[serde(flatten)]
    record: &'a T,
}

#[derive(Serialize)]
struct PolicyEvent<'a> {
    event: &'static str,
    result: &'static str,
    detail: &'a str,
}

/// The line for the SIEM: its kind, name, severity and OCSF body (None: not shipped).
fn shipped(line: &LogLine, time_ms: u64) -> Option<Record> {
    let (kind, msgid, severity, body) = match line {
        LogLine::Decision(r) => (
            RecordKind::Flows,
            "flow_decision",
            if r.decision == sekisho_proto::policy::Action::Allow {
                Severity::Info
            } else {
                Severity::Notice
            },
            ocsf::decision(r, time_ms),
        ),
        LogLine::Flow(r) => (
            RecordKind::Flows,
            "traffic",
            Severity::Info,
            ocsf::flow(r, time_ms, ocsf::Observer::Broker),
        ),
        LogLine::Summary(r) => (
            RecordKind::Flows,
            "flow_summary",
            Severity::Notice,
            ocsf::summary(r, time_ms),
        ),
        LogLine::Posture(r) => (
            RecordKind::Posture,
            "posture",
            if r.result == "refused" {
                Severity::Warning
            } else {
                Severity::Info
            },
            ocsf::posture(r, time_ms),
        ),
        LogLine::AppDns(r) => (
            RecordKind::Dns,
            "dns",
            Severity::Info,
            ocsf::app_dns(r, time_ms),
        ),
        LogLine::Risk(r) => (
            RecordKind::Risk,
            "risk",
            match r.level {
                sekisho_proto::risk::Level::Low => Severity::Info,
                sekisho_proto::risk::Level::Medium => Severity::Notice,
                sekisho_proto::risk::Level::High => Severity::Warning,
            },
            ocsf::risk(r, time_ms),
        ),
        LogLine::Policy { .. } => return None,
    };
    Some(Record {
        kind,
        time_ms,
        severity,
        msgid: msgid.to_string(),
        body,
    })
}

fn kind_of(line: &LogLine) -> RecordKind {
    match line {
        LogLine::Posture(_) => RecordKind::Posture,
        LogLine::AppDns(_) => RecordKind::Dns,
        LogLine::Risk(_) => RecordKind::Risk,
        _ => RecordKind::Flows,
    }
}

/// Writes the decision log and hands records to the SIEM sinks and the risk engine.
pub async fn decision_writer(
    path: PathBuf,
    mut rx: mpsc::Receiver<LogLine>,
    shipper: Shipper,
    risk: crate::risk::RiskFeed,
    console: std::sync::Arc<crate::control::console::feed::Feed>,
) {
    let mut out: Box<dyn std::io::Write + Send> = if path == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                error!(
                    "cannot open decision log {}: {e}; decisions go to standard output",
                    path.display()
                );
                Box::new(std::io::stdout())
            }
        }
    };
    while let Some(line) = rx.recv().await {
        risk.observe(&line);
        let now = SystemTime::now();
        match &line {
            LogLine::Decision(r) => {
                let secs = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                console.decision(r, secs);
            }
            LogLine::Summary(r) => console.summary(r),
            _ => {}
        }
        if shipper.wants(kind_of(&line)) {
            let ms = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if let Some(r) = shipped(&line, ms) {
                shipper.send(std::sync::Arc::new(r));
            }
        }
        let ts = humantime::format_rfc3339_millis(now).to_string();
        let text = match &line {
            LogLine::Decision(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Posture(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::AppDns(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Summary(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Flow(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Risk(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Policy { result, detail } => serde_json::to_string(&Stamped {
                ts,
                record: &PolicyEvent {
                    event: "policy",
                    result,
                    detail,
                },
            }),
        };
        if let Ok(mut text) = text {
            text.push('\n');
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                error!("cannot write decision log: {e}");
            }
        }
    }
}
