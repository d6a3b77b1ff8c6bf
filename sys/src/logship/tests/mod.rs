//! Tests of log shipping: formatting against RFC 5424, and every sink against a loopback
//! receiver (no external programs, no network beyond 127.0.0.1).

mod abnf;
mod config;
mod file;
mod format;
mod otlp;
mod syslog;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Record, RecordKind, Severity, Shipper, SinkStats};

/// Record number `seq`, with the sequence number in its body.
fn rec(kind: RecordKind, seq: u64) -> Arc<Record> {
    Arc::new(Record {
        kind,
        time_ms: 1_700_000_000_000 + seq,
        severity: if seq.is_multiple_of(2) {
            Severity::Info
        } else {
            Severity::Warning
        },
        msgid: "flow".into(),
        body: json!({"seq": seq, "text": "hello \"world\" ]"}),
    })
}

/// The first sink's stats.
fn stats(s: &Shipper) -> SinkStats {
    s.stats().remove(0)
}

/// Waits (up to `limit`) until `cond` holds on the first sink's stats; returns them.
async fn wait_for(s: &Shipper, limit: Duration, cond: impl Fn(&SinkStats) -> bool) -> SinkStats {
    let start = Instant::now();
    loop {
        let st = stats(s);
        if cond(&st) {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting; stats: {st:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free loopback port (bound then released).
async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}
