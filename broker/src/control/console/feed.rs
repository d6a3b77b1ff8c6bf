//! What the console shows that no store table holds: the broker's recent history, kept in
//! memory by bounded rings fed as things happen (decisions from the decision log's writer,
//! audit lines from the control plane, samples of the data plane's counters every
//! [`SAMPLE_EVERY`], the last posture report of every device).
//!
//! Each broker keeps its own: after a restart the rings start empty, and in a cluster a
//! broker shows the decisions and audit lines it made (the decision and audit logs, and the
//! SIEM, have everything). Every ring is bounded; what falls off the end is counted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use sekisho_proto::broker::DecisionRecord;
use sekisho_proto::policy::Action;

/// How often the data plane's counters are sampled for the charts.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: one hour.
pub const SAMPLES: usize = 720;
/// Decisions kept for the live view.
pub const DECISIONS: usize = 5000;
/// Audit lines kept.
pub const AUDIT_LINES: usize = 2000;
/// The reason top denials give flows the decision log summed per device.
pub const SUMMARISED: &str = "denied, summarised per device (over its share of the log)";
/// Devices whose last posture report is kept (more than any test or fleet here; the oldest
/// report goes first).
pub const POSTURES: usize = 200_000;

/// One sample of the data plane's totals (counters only grow; rates are differences).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Unix seconds.
    pub at: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Bytes from devices and to them (overlay traffic in both directions).
    pub bytes: u64,
    pub peers: usize,
    pub flows: usize,
}

/// A series of per-second rates between consecutive samples: (time, value).
pub fn rates(samples: &[Sample], value: impl Fn(&Sample) -> u64) -> Vec<(u64, f64)> {
    samples
        .windows(2)
        .filter(|w| w[1].at > w[0].at)
        .map(|w| {
            // A counter that went down (a restart of the data plane's workers) counts from 0.
            let d = value(&w[1])
                .checked_sub(value(&w[0]))
                .unwrap_or(value(&w[1]));
            (w[1].at, d as f64 / (w[1].at - w[0].at) as f64)
        })
        .collect()
}

/// A decision as the live view lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    pub at: u64,
    pub allowed: bool,
    pub user: String,
    pub device: String,
    pub application: Option<String>,
    pub rule: Option<String>,
    pub reason: &'static str,
    pub check: Option<String>,
    pub proto: &'static str,
    pub dst: String,
    pub risk: Option<String>,
}

impl Decided {
    pub fn of(r: &DecisionRecord, at: u64) -> Decided {
        Decided {
            at,
            allowed: r.decision == Action::Allow,
            user: r.user.clone(),
            device: r.device.clone(),
            application: r.application.clone(),
            rule: r.rule.clone(),
            reason: r.reason,
            check: r.check.clone(),
            proto: r.proto,
            dst: match r.dst {
                std::net::IpAddr::V6(a) => format!("[{a}]:{}", r.dport),
                a => format!("{a}:{}", r.dport),
            },
            risk: r
                .risk
                .map(|m| format!("{} ({})", m.level.as_str(), m.response)),
        }
    }
}

/// Filters of the live decisions (all optional; text matches are exact, case-insensitive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecisionFilter {
    pub denied_only: bool,
    pub user: String,
    pub application: String,
    pub reason: String,
}

impl DecisionFilter {
    pub fn matches(&self, d: &Decided) -> bool {
        let same = |want: &str, have: Option<&str>| {
            want.is_empty() || have.is_some_and(|h| h.eq_ignore_ascii_case(want.trim()))
        };
        (!self.denied_only || !d.allowed)
            && same(&self.user, Some(&d.user))
            && same(&self.application, d.application.as_deref())
            && (self.reason.is_empty()
                || d.reason
                    .to_ascii_lowercase()
                    .contains(&self.reason.trim().to_ascii_lowercase()))
    }
}

/// A device's last posture report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostureSeen {
    pub at: u64,
    pub checks: BTreeMap<String, bool>,
    /// Names its DNS filter blocked, per category, summed over its reports since this broker
    /// started.
    pub dns_blocks: BTreeMap<String, u64>,
    /// When it last reported a block.
    pub last_block: Option<u64>,
}

/// What was lost off the ends of the rings.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Forgotten {
    pub decisions: u64,
    pub audit_lines: u64,
    pub postures: u64,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<Sample>,
    decisions: VecDeque<Decided>,
    /// Denials per reason since start (the overview's top reasons).
    denials: BTreeMap<&'static str, u64>,
    audit: VecDeque<serde_json::Value>,
    postures: HashMap<String, PostureSeen>,
    forgotten: Forgotten,
}

/// The console's rings; shared by the writers and the pages.
#[derive(Default)]
pub struct Feed {
    inner: Mutex<Inner>,
}

fn push<T>(ring: &mut VecDeque<T>, cap: usize, item: T) -> bool {
    let full = ring.len() >= cap;
    if full {
        ring.pop_front();
    }
    ring.push_back(item);
    full
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sample(&self, s: Sample) {
        push(&mut self.lock().samples, SAMPLES, s);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.iter().copied().collect()
    }

    pub fn decision(&self, r: &DecisionRecord, at: u64) {
        let d = Decided::of(r, at);
        let mut g = self.lock();
        if !d.allowed {
            *g.denials.entry(d.reason).or_insert(0) += 1;
        }
        if push(&mut g.decisions, DECISIONS, d) {
            g.forgotten.decisions += 1;
        }
    }

    /// Flows a device decided beyond its share of the decision log, summed there without their
    /// reasons: their denials count under a reason of their own.
    pub fn summary(&self, r: &sekisho_proto::broker::SummaryRecord) {
        if r.denied > 0 {
            *self.lock().denials.entry(SUMMARISED).or_insert(0) += r.denied;
        }
    }

    /// The newest decisions first that pass `filter`: `skip` of them left out, at most `take`;
    /// and how many passed in all.
    pub fn decisions(
        &self,
        filter: &DecisionFilter,
        skip: usize,
        take: usize,
    ) -> (Vec<Decided>, usize) {
        let g = self.lock();
        let mut total = 0;
        let mut out = Vec::new();
        for d in g.decisions.iter().rev().filter(|d| filter.matches(d)) {
            if total >= skip && out.len() < take {
                out.push(d.clone());
            }
            total += 1;
        }
        (out, total)
    }

    /// Denial reasons, most frequent first.
    pub fn top_denials(&self, n: usize) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.lock().denials.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }

    pub fn audit(&self, line: serde_json::Value) {
        let mut g = self.lock();
        if push(&mut g.audit, AUDIT_LINES, line) {
            g.forgotten.audit_lines += 1;
        }
    }

    /// Audit lines, newest first, whose text contains `q` (case-insensitive): a page of them
    /// and how many matched. Lines about admin and SCIM tokens only `with_tokens`.
    pub fn audit_lines(
        &self,
        q: &str,
        with_tokens: bool,
        skip: usize,
        take: usize,
    ) -> (Vec<serde_json::Value>, usize) {
        let q = q.trim().to_ascii_lowercase();
        let g = self.lock();
        let mut total = 0;
        let mut out = Vec::new();
        for l in g.audit.iter().rev() {
            let event = l["event"].as_str().unwrap_or("");
            if !with_tokens && (event.starts_with("admin_token") || event.starts_with("scim_token"))
            {
                continue;
            }
            if !q.is_empty() && !l.to_string().to_ascii_lowercase().contains(&q) {
                continue;
            }
            if total >= skip && out.len() < take {
                out.push(l.clone());
            }
            total += 1;
        }
        (out, total)
    }

    pub fn posture(
        &self,
        device: &str,
        checks: BTreeMap<String, bool>,
        blocks: &BTreeMap<String, u64>,
        at: u64,
    ) {
        let mut g = self.lock();
        if !g.postures.contains_key(device) && g.postures.len() >= POSTURES {
            let oldest = g
                .postures
                .iter()
                .min_by_key(|(_, p)| p.at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                g.postures.remove(&k);
                g.forgotten.postures += 1;
            }
        }
        let p = g.postures.entry(device.to_string()).or_default();
        p.at = at;
        p.checks = checks;
        for (category, n) in blocks {
            if *n > 0 {
                let c = p.dns_blocks.entry(category.clone()).or_insert(0);
                *c = c.saturating_add(*n);
                p.last_block = Some(at);
            }
        }
    }

    pub fn posture_of(&self, device: &str) -> Option<PostureSeen> {
        self.lock().postures.get(device).cloned()
    }

    /// Devices whose DNS filter blocked something, most blocks first.
    pub fn dns_blocks(&self) -> Vec<(String, PostureSeen)> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .postures
            .iter()
            .filter(|(_, p)| !p.dns_blocks.is_empty())
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let total = |p: &PostureSeen| p.dns_blocks.values().sum::<u64>();
        v.sort_by(|a, b| total(&b.1).cmp(&total(&a.1)).then(a.0.cmp(&b.0)));
        v
    }

    pub fn forgotten(&self) -> Forgotten {
        self.lock().forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: u64, allowed: u64, bytes: u64) -> Sample {
        Sample {
            at,
            allowed,
            bytes,
            ..Default::default()
        }
    }

    #[test]
    fn rates_are_per_second_differences_and_survive_a_counter_reset() {
        let s = [sample(0, 0, 0), sample(5, 50, 5000), sample(10, 10, 0)];
        assert_eq!(rates(&s, |s| s.allowed), vec![(5, 10.0), (10, 2.0)]);
        assert_eq!(rates(&s, |s| s.bytes), vec![(5, 1000.0), (10, 0.0)]);
        // Two samples at one second make no rate.
        assert!(rates(&[sample(3, 1, 1), sample(3, 2, 2)], |s| s.allowed).is_empty());
    }

    #[test]
    fn rings_are_bounded_and_count_what_they_forget() {
        let f = Feed::default();
        for i in 0..(AUDIT_LINES + 5) {
            f.audit(serde_json::json!({"event": "x", "n": i}));
        }
        assert_eq!(f.forgotten().audit_lines, 5);
        let (page, total) = f.audit_lines("", true, 0, 3);
        assert_eq!(total, AUDIT_LINES);
        assert_eq!(page[0]["n"], AUDIT_LINES + 4, "newest first");
        let (page, total) = f.audit_lines("\"n\":7", true, 0, 10);
        f.audit(serde_json::json!({"event": "admin_token_created", "n": -1}));
        assert_eq!(f.audit_lines("admin_token", true, 0, 10).1, 1);
        assert_eq!(f.audit_lines("admin_token", false, 0, 10).1, 0);
        assert!(total >= 1 && page.iter().all(|l| l.to_string().contains("\"n\":7")));
        for i in 0..(SAMPLES + 1) {
            f.sample(sample(i as u64, 0, 0));
        }
        assert_eq!(f.samples().len(), SAMPLES);
        assert_eq!(f.samples()[0].at, 1);
    }

    #[test]
    fn summarised_denials_count_under_their_own_reason() {
        let f = Feed::default();
        let r = sekisho_proto::broker::SummaryRecord {
            event: "flow_summary",
            device: "d".into(),
            user: "u".into(),
            allowed: 3,
            denied: 40_000,
            seconds: 1,
        };
        f.summary(&r);
        f.summary(&r);
        assert_eq!(f.top_denials(3), vec![(SUMMARISED, 80_000)]);
    }

    #[test]
    fn dns_blocks_add_up_per_category() {
        let f = Feed::default();
        let blocks = BTreeMap::from([("malware".to_string(), 2), ("ads".to_string(), 0)]);
        f.posture("a", BTreeMap::new(), &blocks, 10);
        f.posture("a", BTreeMap::new(), &blocks, 20);
        f.posture("b", BTreeMap::new(), &BTreeMap::new(), 20);
        let v = f.dns_blocks();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].1.dns_blocks, BTreeMap::from([("malware".into(), 4)]));
        assert_eq!(v[0].1.last_block, Some(20));
    }

    #[test]
    fn decision_filters() {
        let d = Decided {
            at: 1,
            allowed: false,
            user: "alice".into(),
            device: "alice-laptop".into(),
            application: Some("db".into()),
            rule: Some("no-db".into()),
            reason: "denied by rule",
            check: None,
            proto: "tcp",
            dst: "10.20.0.10:5432".into(),
            risk: None,
        };
        let all = DecisionFilter::default();
        assert!(all.matches(&d));
        let f = |denied_only, user: &str, app: &str, reason: &str| DecisionFilter {
            denied_only,
            user: user.into(),
            application: app.into(),
            reason: reason.into(),
        };
        assert!(f(true, "Alice", "db", "rule").matches(&d));
        assert!(!f(false, "bob", "", "").matches(&d));
        assert!(!f(false, "", "wiki", "").matches(&d));
        assert!(!f(false, "", "", "posture").matches(&d));
        let allowed = Decided {
            allowed: true,
            ..d.clone()
        };
        assert!(!f(true, "", "", "").matches(&allowed));
    }
}
