//! The laptop's own side of its flows (two-sided flow logs): bytes and packets each way per
//! 5-tuple, a record when TCP ends, when a flow goes idle, and every minute while it runs.
//!
//! Packets of one flow come in runs (a 64 KiB TUN read is one flow's segments; a GRO batch
//! too), so consecutive packets of the same flow are summed before the table is touched: one
//! lookup per run, not per packet. A TCP FIN or reset goes to the table at once, so the
//! record at the end is not late.

use std::collections::VecDeque;
use std::time::Instant;

use crate::flow::{
    FLOW_REPORT_EVERY, FlowEnd, FlowEntry, FlowReport, FlowTable, IdleTimeouts, Meter, TcpEnd,
};
use crate::packet::{self, FlowKey};

/// Flows metered at most (a record each; beyond, packets pass unmetered and are counted).
const METERED_FLOWS: usize = 65_536;

/// A flow as the laptop sees it: its traffic each way and how TCP ended.
#[derive(Debug, Clone)]
struct LocalFlow {
    meter: Meter,
    tcp: TcpEnd,
}

impl FlowEntry for LocalFlow {
    fn allowed(&self) -> bool {
        true
    }
    fn owner(&self) -> u32 {
        0
    }
    fn closed(&self) -> bool {
        self.tcp.ended()
    }
    fn reports(&self) -> bool {
        true
    }
}

/// Packets of one flow, one way, not in the table yet.
#[derive(Debug, Clone, Copy)]
struct Run {
    key: FlowKey,
    outbound: bool,
    packets: u64,
    bytes: u64,
    last: Instant,
}

crate::counters! {
    /// The laptop's side of its flows.
    pub struct FlowRecords {
        /// Flow records made (a flow's end, and every minute while it runs).
        records,
        /// Flows not metered: the meter was full (their packets still passed).
        not_metered,
    }
}

pub struct FlowMeter {
    table: FlowTable<LocalFlow>,
    run: Option<Run>,
    reports: VecDeque<FlowReport>,
    pub counters: FlowRecords,
    /// When running flows are next looked at for their progress records.
    next_progress: Option<Instant>,
}

impl Default for FlowMeter {
    fn default() -> Self {
        FlowMeter {
            table: FlowTable::new(IdleTimeouts::default(), METERED_FLOWS, METERED_FLOWS),
            run: None,
            reports: VecDeque::new(),
            counters: FlowRecords::default(),
            next_progress: None,
        }
    }
}

impl FlowMeter {
    /// Counts the IP packet `pkt`: `outbound` from the device (key as sent), else towards it.
    pub fn packet(&mut self, pkt: &[u8], outbound: bool, now: Instant, unix_ms: u64) {
        let Ok(packet::PacketKind::Flow(k)) = packet::classify(pkt) else {
            return;
        };
        let key = if outbound { k } else { k.reversed() };
        let tcp = TcpEnd::of(pkt, outbound);
        let len = pkt.len() as u64;
        if tcp == TcpEnd::default()
            && let Some(r) = &mut self.run
            && r.key == key
            && r.outbound == outbound
        {
            r.packets += 1;
            r.bytes += len;
            r.last = now;
            return;
        }
        self.flush(unix_ms);
        let run = Run {
            key,
            outbound,
            packets: 1,
            bytes: len,
            last: now,
        };
        if tcp == TcpEnd::default() {
            self.run = Some(run);
        } else {
            self.count(run, tcp, unix_ms);
        }
    }

    /// Puts the run being summed into the table.
    fn flush(&mut self, unix_ms: u64) {
        if let Some(r) = self.run.take() {
            self.count(r, TcpEnd::default(), unix_ms);
        }
    }

    fn count(&mut self, r: Run, tcp: TcpEnd, unix_ms: u64) {
        let counted = self.table.touch_with(&r.key, r.last, |f| {
            let was_ended = f.tcp.ended();
            f.tcp.merge(tcp);
            f.meter.traffic.add(r.outbound, r.packets, r.bytes);
            f.meter
                .final_at_tcp_end(r.key, was_ended, f.tcp.ended(), r.last)
        });
        match counted {
            Some(Some(report)) => {
                self.counters.records += 1;
                self.reports.push_back(report);
            }
            Some(None) => {}
            // Only the device opens flows; an answer to nothing metered is not one.
            None if !r.outbound => {}
            None => {
                let mut f = LocalFlow {
                    meter: Meter::new(r.last, unix_ms),
                    tcp,
                };
                f.meter.traffic.add(true, r.packets, r.bytes);
                if self.table.insert(r.key, f, r.last).is_err() {
                    self.counters.not_metered += 1;
                }
            }
        }
    }

    /// Idle flows' records, and progress records of long ones (call every second or so).
    pub fn tick(&mut self, now: Instant, unix_ms: u64) {
        self.flush(unix_ms);
        self.table.expire(now);
        for (k, f, seen, end) in self.table.take_retired() {
            if !f.meter.final_sent {
                self.reports.push_back(f.meter.report(k, seen, end));
                self.counters.records += 1;
            }
        }
        if self.next_progress.is_some_and(|t| now < t) {
            return;
        }
        self.next_progress = Some(now + FLOW_REPORT_EVERY);
        let mut out = Vec::new();
        self.table.for_each_mut(|k, f, seen| {
            if !f.meter.final_sent
                && now.saturating_duration_since(f.meter.reported) >= FLOW_REPORT_EVERY
            {
                f.meter.reported = now;
                out.push(f.meter.report(*k, seen, FlowEnd::Ongoing));
            }
        });
        self.counters.records += out.len() as u64;
        self.reports.extend(out);
    }

    /// Records of every flow still open (the client stops).
    pub fn finish(&mut self, unix_ms: u64) {
        self.flush(unix_ms);
        let mut out = Vec::new();
        self.table.for_each_mut(|k, f, seen| {
            if !f.meter.final_sent {
                f.meter.final_sent = true;
                out.push(f.meter.report(*k, seen, FlowEnd::Shutdown));
            }
        });
        self.counters.records += out.len() as u64;
        self.reports.extend(out);
    }

    pub fn poll(&mut self) -> Option<FlowReport> {
        self.reports.pop_front()
    }
}
