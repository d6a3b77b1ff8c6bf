//! The decision log: one JSON line per flow decision, posture event, application name and
//! policy change, written by one task so the data plane never waits on the file.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::error;

use sekisho_proto::broker::{AppDnsRecord, DecisionRecord, PostureRecord, SummaryRecord};

/// Records waiting for the writer. Bounded: a flood of new flows must not grow memory
/// without end; what the writer cannot take is counted (`drops.decisions_not_logged`).
pub const QUEUE: usize = 65536;

pub enum LogLine {
    Decision(DecisionRecord),
    Posture(PostureRecord),
    AppDns(AppDnsRecord),
    Summary(SummaryRecord),
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

pub async fn decision_writer(path: PathBuf, mut rx: mpsc::Receiver<LogLine>) {
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
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let text = match &line {
            LogLine::Decision(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Posture(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::AppDns(r) => serde_json::to_string(&Stamped { ts, record: r }),
            LogLine::Summary(r) => serde_json::to_string(&Stamped { ts, record: r }),
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
