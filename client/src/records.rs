//! The laptop's records for the SIEM (`[[log_sinks]]` in client.toml): its own side of its
//! flows (two-sided flow logs: the broker writes the other) and the DNS stub's log lines
//! (blocked names), in OCSF's shape.

use std::sync::{Arc, Mutex};

use sekisho_proto::flow::{FlowEnd, FlowReport};
use sekisho_proto::ocsf;
use sekisho_sys::logship::{Record, RecordKind, Severity, Shipper, now_ms};

use crate::status::DeviceView;

/// Where the laptop's records go, and who it is (from the latest configuration).
#[derive(Clone)]
pub struct Local {
    pub shipper: Shipper,
    pub device: Arc<Mutex<DeviceView>>,
}

impl Local {
    fn who(&self) -> (String, String) {
        let d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        (d.device.clone(), d.user.clone())
    }

    /// One flow record of this laptop's side.
    pub fn flow(&self, r: &FlowReport) {
        if !self.shipper.wants(RecordKind::Flows) {
            return;
        }
        let (device, user) = self.who();
        let t = now_ms();
        let msgid = if r.end == FlowEnd::Ongoing {
            "traffic"
        } else {
            "traffic_end"
        };
        self.shipper.send(Arc::new(Record {
            kind: RecordKind::Flows,
            time_ms: t,
            severity: Severity::Info,
            msgid: msgid.into(),
            body: ocsf::client_flow(r, &device, &user, t),
        }));
    }

    /// One line of the DNS stub's log (a JSON object).
    pub fn dns_line(&self, line: &[u8]) {
        if !self.shipper.wants(RecordKind::Dns) {
            return;
        }
        let Ok(entry) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        let (device, user) = self.who();
        let t = now_ms();
        self.shipper.send(Arc::new(Record {
            kind: RecordKind::Dns,
            time_ms: t,
            severity: Severity::Notice,
            msgid: "dns".into(),
            body: ocsf::client_dns(&entry, &device, &user, t),
        }));
    }
}

/// The DNS log's writer, which also hands each complete line to the SIEM sinks.
pub struct TeeLines {
    pub inner: Box<dyn std::io::Write + Send>,
    pub local: Local,
    pub pending: Vec<u8>,
}

impl std::io::Write for TeeLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pending.extend_from_slice(&buf[..n]);
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            self.local.dns_line(&line[..line.len() - 1]);
        }
        // A line that never ends is not kept without bound.
        if self.pending.len() > 64 * 1024 {
            self.pending.clear();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
