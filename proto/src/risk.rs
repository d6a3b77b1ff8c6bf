//! The risk engine's core: signals about a user (or device) in, a risk level with its reasons
//! out. Pure: every input carries its Unix time, nothing reads a clock.
//!
//! Each signal adds a score that halves every `half_life`; the risk is the sum of what is left,
//! graded by two thresholds (medium, high). Signals:
//! - **volume**: bytes moved in the current hour far above the user's own baseline for that hour
//!   of the week (learned: an exponentially weighted mean per hour of the week, once an hour
//!   ends), or above a floor while the baseline is still empty;
//! - **off hours**: activity in an hour of the week the user has not been active in before
//!   (once the baseline has seen enough weeks);
//! - **new destination**: an application the user never used;
//! - **denied burst**: many denied flows in a short window;
//! - **DNS blocks**: blocked names (counts per category, from the device);
//! - **failing posture** and **external** signals (another system's risk level) as given.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;

/// Risk levels, in order.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Low,
    Medium,
    High,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "low" => Some(Level::Low),
            "medium" => Some(Level::Medium),
            "high" => Some(Level::High),
            _ => None,
        }
    }
}

/// What raised the risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    Volume,
    OffHours,
    NewDestination,
    DeniedBurst,
    DnsBlocks,
    FailingPosture,
    External,
    /// Another system (an MDM, say) reports the device out of compliance.
    NonCompliant,
}

impl Signal {
    /// Its name in records and explanations (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Volume => "volume",
            Signal::OffHours => "off_hours",
            Signal::NewDestination => "new_destination",
            Signal::DeniedBurst => "denied_burst",
            Signal::DnsBlocks => "dns_blocks",
            Signal::FailingPosture => "failing_posture",
            Signal::External => "external",
            Signal::NonCompliant => "non_compliant",
        }
    }
}

/// Weights, decay and thresholds: `[risk_engine]` in broker.toml, every field optional. The
/// weights are points, the thresholds sums of points; durations are written like "20s".
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RiskConfig {
    /// Seconds after which a signal's score has halved.
    #[serde(deserialize_with = "duration_secs")]
    pub half_life: u64,
    /// Scores at which the risk is medium, high.
    pub medium: f64,
    pub high: f64,
    pub volume: f64,
    pub off_hours: f64,
    pub new_destination: f64,
    pub denied_burst: f64,
    pub dns_block: f64,
    pub failing_posture: f64,
    /// An external "high" adds this; "medium" half of it.
    pub external_high: f64,
    /// Volume: the hour's bytes beyond this many times the baseline for that hour.
    pub volume_factor: f64,
    /// Volume: never below this many MiB in an hour (a new user, a quiet hour).
    pub volume_floor_mib: u64,
    /// Off hours: only once the baseline has seen this many hours of activity.
    pub learned_hours: u32,
    /// Denied burst: this many denied flows within `burst_window` seconds.
    pub burst_count: usize,
    #[serde(deserialize_with = "duration_secs")]
    pub burst_window: u64,
    /// Weight of a new observation in an hour's mean (exponential weighting).
    pub baseline_alpha: f64,
    /// TEST ONLY, read by the broker, not the engine: a file holding seconds (may be
    /// negative) added to the engine's clock, read every 250 ms, so a test can put "now" at
    /// another hour of the week. Never set it in a deployment.
    pub test_clock_offset_file: Option<std::path::PathBuf>,
}

/// "20s", "1h" as whole seconds.
fn duration_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    humantime::parse_duration(&text)
        .map(|t| t.as_secs())
        .map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"20s\": {e}"))
        })
}

impl Default for RiskConfig {
    fn default() -> Self {
        RiskConfig {
            half_life: 3600,
            medium: 30.0,
            high: 60.0,
            volume: 45.0,
            off_hours: 20.0,
            new_destination: 5.0,
            denied_burst: 25.0,
            dns_block: 5.0,
            failing_posture: 20.0,
            external_high: 70.0,
            volume_factor: 5.0,
            volume_floor_mib: 500,
            learned_hours: 20,
            burst_count: 20,
            burst_window: 60,
            baseline_alpha: 0.3,
            test_clock_offset_file: None,
        }
    }
}

/// One reason the risk is what it is: a signal, what it saw, its score now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    pub signal: Signal,
    pub detail: String,
    /// Unix seconds it was seen.
    pub at: u64,
    /// Its score at the time asked (decayed).
    pub score: f64,
}

/// A device's risk changed, as written to the decision log (`"event": "risk"`) and shipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RiskRecord {
    pub event: &'static str,
    pub device: String,
    pub user: String,
    pub level: Level,
    /// The level before (None: the first assessment that was not low).
    pub previous: Option<Level>,
    pub score: f64,
    pub reasons: Vec<Reason>,
}

/// The risk of a subject now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub level: Level,
    pub score: f64,
    pub reasons: Vec<Reason>,
}

/// The hour of the week (0 = Monday 00:00–01:00 UTC shifted by `offset` seconds) of `unix`.
pub fn hour_of_week(unix: u64, offset: i64) -> usize {
    week_hour(local_hour(unix, offset))
}

/// Hours since the epoch in local time (`offset` seconds east of UTC): half-hour zones too.
fn local_hour(unix: u64, offset: i64) -> i64 {
    (unix as i64 + offset).div_euclid(3600)
}

/// The hour of the week of a local hour index.
fn week_hour(local_hour: i64) -> usize {
    // 1970-01-01 was a Thursday: day 0 is Thursday, so Monday is day 4.
    let weekday = (local_hour.div_euclid(24) + 3).rem_euclid(7); // 0 = Monday
    (weekday * 24 + local_hour.rem_euclid(24)) as usize
}

/// A user's usual traffic: a mean of bytes per hour for each hour of the week.
#[derive(Debug, Clone)]
pub struct Baseline {
    mean: [f64; 168],
    seen: [u32; 168],
}

impl Default for Baseline {
    fn default() -> Self {
        Baseline {
            mean: [0.0; 168],
            seen: [0; 168],
        }
    }
}

impl Baseline {
    /// An hour that ended with `bytes` moved.
    pub fn observe(&mut self, how: usize, bytes: u64, alpha: f64) {
        let h = how % 168;
        let b = bytes as f64;
        self.mean[h] = if self.seen[h] == 0 {
            b
        } else {
            alpha * b + (1.0 - alpha) * self.mean[h]
        };
        self.seen[h] = self.seen[h].saturating_add(1);
    }

    /// The usual bytes in that hour, if it was ever seen.
    pub fn expected(&self, how: usize) -> Option<f64> {
        let h = how % 168;
        (self.seen[h] > 0).then_some(self.mean[h])
    }

    /// Hours with activity seen, in all.
    pub fn learned(&self) -> u32 {
        self.seen.iter().filter(|&&n| n > 0).count() as u32
    }

    /// Whether the user was active in this hour of the week before.
    pub fn usual(&self, how: usize) -> bool {
        self.seen[how % 168] > 0
    }
}

#[derive(Debug, Clone)]
struct Contribution {
    signal: Signal,
    /// What repeats of the signal are merged by (a category, a check, an application).
    key: String,
    detail: String,
    at: u64,
    weight: f64,
    /// A lasting state reported by this source (it does not decay; the source replaces or
    /// withdraws it).
    standing: Option<String>,
}

/// One user's (or device's) state.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub baseline: Baseline,
    contributions: Vec<Contribution>,
    /// The hour being counted (local hour index) and its bytes.
    hour: Option<i64>,
    hour_bytes: u64,
    volume_flagged: bool,
    off_hours_flagged: bool,
    destinations: HashSet<String>,
    denied: VecDeque<u64>,
    burst_flagged_at: Option<u64>,
}

/// Risk per subject (user name, or device name for device signals).
#[derive(Debug, Clone, Default)]
pub struct RiskEngine {
    pub config: RiskConfig,
    /// Seconds added to Unix time for hours of the week (the policy's time zone).
    pub offset: i64,
    subjects: HashMap<String, Subject>,
}

/// Contributions this small are forgotten.
const NEGLIGIBLE: f64 = 0.01;
/// Contributions kept per subject: beyond, the smallest goes (a device reporting many DNS
/// categories, say, cannot grow the engine without bound).
pub const MAX_CONTRIBUTIONS: usize = 32;

impl RiskEngine {
    /// An engine with `config` (values that cannot work are brought into range: a half-life
    /// and a burst window of at least a second, a burst of at least one, a weight of 0 to 1).
    pub fn new(mut config: RiskConfig, offset: i64) -> Self {
        config.half_life = config.half_life.max(1);
        config.burst_window = config.burst_window.max(1);
        config.burst_count = config.burst_count.max(1);
        config.baseline_alpha = config.baseline_alpha.clamp(0.0, 1.0);
        RiskEngine {
            config,
            offset,
            subjects: HashMap::new(),
        }
    }

    fn subject(&mut self, who: &str) -> &mut Subject {
        self.subjects.entry(who.to_string()).or_default()
    }

    /// Adds a signal's points. A signal of the same kind and `key` (a category, a check, an
    /// application) that is still there is topped up instead (its points now plus these,
    /// at most twice the high threshold), so repeats do not grow the list.
    fn add(&mut self, who: &str, signal: Signal, key: &str, weight: f64, detail: String, at: u64) {
        if weight <= 0.0 {
            return;
        }
        let half = self.config.half_life.max(1) as f64;
        let cap = self.config.high * 2.0;
        let s = self.subjects.entry(who.to_string()).or_default();
        let decayed = |c: &Contribution| match c.standing {
            Some(_) => c.weight,
            None => c.weight * 0.5f64.powf(at.saturating_sub(c.at) as f64 / half),
        };
        if let Some(c) = s
            .contributions
            .iter_mut()
            .find(|c| c.standing.is_none() && c.signal == signal && c.key == key)
        {
            c.weight = (decayed(c) + weight).min(cap.max(weight));
            c.at = at;
            c.detail = detail;
            return;
        }
        if s.contributions.len() >= MAX_CONTRIBUTIONS
            && let Some((i, _)) = s
                .contributions
                .iter()
                .enumerate()
                .filter(|(_, c)| c.standing.is_none())
                .min_by(|a, b| decayed(a.1).total_cmp(&decayed(b.1)))
        {
            s.contributions.swap_remove(i);
        }
        s.contributions.push(Contribution {
            signal,
            key: key.to_string(),
            detail,
            at,
            weight,
            standing: None,
        });
    }

    /// A lasting state of `who` that `source` reports (a device out of compliance, an
    /// identity provider's risk level): it does not decay. A later report of the same signal
    /// from the same source replaces it; `None` withdraws it.
    pub fn standing(
        &mut self,
        who: &str,
        signal: Signal,
        source: &str,
        state: Option<(f64, String)>,
        at: u64,
    ) {
        let s = self.subject(who);
        s.contributions
            .retain(|c| !(c.signal == signal && c.standing.as_deref() == Some(source)));
        if let Some((weight, detail)) = state
            && weight > 0.0
        {
            s.contributions.push(Contribution {
                signal,
                key: source.to_string(),
                detail,
                at,
                weight,
                standing: Some(source.to_string()),
            });
        }
    }

    /// Subjects with something held against them now (others are low with no reasons).
    pub fn active(&self) -> impl Iterator<Item = &str> {
        self.subjects
            .iter()
            .filter(|(_, s)| !s.contributions.is_empty())
            .map(|(k, _)| k.as_str())
    }

    /// Forgets everything about `who` (a deleted user or device).
    pub fn forget(&mut self, who: &str) {
        self.subjects.remove(who);
    }

    /// Closes the hours that ended before `at` into the baseline.
    fn roll(&mut self, who: &str, at: u64) {
        let alpha = self.config.baseline_alpha;
        let offset = self.offset;
        let s = self.subject(who);
        let hour = local_hour(at, offset);
        let Some(current) = s.hour else {
            s.hour = Some(hour);
            return;
        };
        if hour > current {
            // An hour whose volume was flagged is not learned as usual (one exfiltration
            // must not raise the limit for that hour of every week).
            if s.hour_bytes > 0 && !s.volume_flagged {
                s.baseline.observe(week_hour(current), s.hour_bytes, alpha);
            }
            s.hour = Some(hour);
            s.hour_bytes = 0;
            s.volume_flagged = false;
            s.off_hours_flagged = false;
        }
    }

    /// Bytes a flow of `who` to `application` moved (a traffic record), at `at`.
    pub fn traffic(&mut self, who: &str, application: &str, bytes: u64, at: u64) {
        self.roll(who, at);
        let how = hour_of_week(at, self.offset);
        let c = self.config.clone();
        let s = self.subject(who);
        s.hour_bytes = s.hour_bytes.saturating_add(bytes);
        let usual = s.baseline.expected(how);
        let limit = usual.map_or((c.volume_floor_mib << 20) as f64, |e| {
            (e * c.volume_factor).max((c.volume_floor_mib << 20) as f64)
        });
        let (total, flag) = (
            s.hour_bytes,
            !s.volume_flagged && s.hour_bytes as f64 > limit,
        );
        if flag {
            s.volume_flagged = true;
            let usual = match usual {
                Some(e) => format!("usual for this hour: {} MB", e as u64 >> 20),
                None => "nothing usual for this hour yet".to_string(),
            };
            self.add(
                who,
                Signal::Volume,
                "",
                c.volume,
                format!(
                    "{} MB this hour ({usual}), last to {application}",
                    total >> 20
                ),
                at,
            );
        }
    }

    /// A new flow of `who` to `application` was allowed, at `at`.
    pub fn flow(&mut self, who: &str, application: &str, at: u64) {
        self.roll(who, at);
        let how = hour_of_week(at, self.offset);
        let c = self.config.clone();
        let s = self.subject(who);
        let off = s.baseline.learned() >= c.learned_hours
            && !s.baseline.usual(how)
            && !s.off_hours_flagged;
        if off {
            s.off_hours_flagged = true;
        }
        let new = s.destinations.insert(application.to_string()) && s.baseline.learned() > 0;
        if off {
            self.add(
                who,
                Signal::OffHours,
                "",
                c.off_hours,
                format!("active at an unusual hour (hour {how} of the week)"),
                at,
            );
        }
        if new {
            self.add(
                who,
                Signal::NewDestination,
                application,
                c.new_destination,
                format!("first use of {application}"),
                at,
            );
        }
    }

    /// A flow of `who` was denied, at `at`.
    pub fn denied(&mut self, who: &str, at: u64) {
        let c = self.config.clone();
        let s = self.subject(who);
        s.denied.push_back(at);
        while s.denied.front().is_some_and(|&t| t + c.burst_window < at) {
            s.denied.pop_front();
        }
        // Keep the window bounded whatever the rate.
        while s.denied.len() > c.burst_count * 4 {
            s.denied.pop_front();
        }
        let burst = s.denied.len() >= c.burst_count
            && s.burst_flagged_at.is_none_or(|t| t + c.burst_window < at);
        if burst {
            s.burst_flagged_at = Some(at);
            let n = s.denied.len();
            self.add(
                who,
                Signal::DeniedBurst,
                "",
                c.denied_burst,
                format!("{n} denied flows within {} s", c.burst_window),
                at,
            );
        }
    }

    /// The device reported `count` blocked names of `category`.
    pub fn dns_blocks(&mut self, who: &str, category: &str, count: u64, at: u64) {
        let w = self.config.dns_block * (count as f64).min(10.0);
        self.add(
            who,
            Signal::DnsBlocks,
            category,
            w,
            format!("{count} blocked names ({category})"),
            at,
        );
    }

    /// A posture check started failing.
    pub fn posture_failing(&mut self, who: &str, check: &str, at: u64) {
        let w = self.config.failing_posture;
        self.add(
            who,
            Signal::FailingPosture,
            check,
            w,
            format!("posture check {check} fails"),
            at,
        );
    }

    /// Another system's view (a Shared Signals risk-level-change, say).
    pub fn external(&mut self, who: &str, level: Level, source: &str, at: u64) {
        let w = match level {
            Level::High => self.config.external_high,
            Level::Medium => self.config.external_high / 2.0,
            Level::Low => 0.0,
        };
        if level == Level::Low {
            // The source says all is well again: its earlier signals end.
            if let Some(s) = self.subjects.get_mut(who) {
                s.contributions.retain(|c| {
                    !(c.signal == Signal::External && c.standing.is_none() && c.key == source)
                });
            }
            return;
        }
        self.add(
            who,
            Signal::External,
            source,
            w,
            format!("{} risk from {source}", level.as_str()),
            at,
        );
    }

    fn decayed(&self, c: &Contribution, now: u64) -> f64 {
        if c.standing.is_some() {
            return c.weight;
        }
        let (weight, since) = (c.weight, c.at);
        let age = now.saturating_sub(since) as f64;
        weight * 0.5f64.powf(age / self.config.half_life.max(1) as f64)
    }

    /// The risk of `who` at `now`, with its reasons (largest first).
    pub fn assess(&self, who: &str, now: u64) -> Assessment {
        let mut reasons: Vec<Reason> = self
            .subjects
            .get(who)
            .map(|s| {
                s.contributions
                    .iter()
                    .map(|c| Reason {
                        signal: c.signal,
                        detail: c.detail.clone(),
                        at: c.at,
                        score: self.decayed(c, now),
                    })
                    .filter(|r| r.score >= NEGLIGIBLE)
                    .collect()
            })
            .unwrap_or_default();
        reasons.sort_by(|a, b| b.score.total_cmp(&a.score));
        let score: f64 = reasons.iter().map(|r| r.score).sum();
        let level = if score >= self.config.high {
            Level::High
        } else if score >= self.config.medium {
            Level::Medium
        } else {
            Level::Low
        };
        Assessment {
            level,
            score,
            reasons,
        }
    }

    /// Forgets contributions that decayed to nothing (call now and then).
    pub fn prune(&mut self, now: u64) {
        let half = self.config.half_life.max(1) as f64;
        for s in self.subjects.values_mut() {
            s.contributions.retain(|c| {
                let age = now.saturating_sub(c.at) as f64;
                c.standing.is_some() || c.weight * 0.5f64.powf(age / half) >= NEGLIGIBLE
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Monday 2026-11-30 00:00 UTC.
    const MONDAY: u64 = 1_795_996_800;

    #[test]
    fn hours_of_the_week() {
        assert_eq!(hour_of_week(MONDAY, 0), 0);
        assert_eq!(hour_of_week(MONDAY + 9 * 3600 + 59, 0), 9);
        assert_eq!(hour_of_week(MONDAY + 6 * 86_400 + 23 * 3600, 0), 167);
        assert_eq!(hour_of_week(MONDAY + 7 * 86_400, 0), 0);
        // UTC+9: Monday 00:00 there is Sunday 15:00 UTC.
        assert_eq!(hour_of_week(MONDAY - 9 * 3600, 9 * 3600), 0);
    }

    /// Four weeks of 09:00–17:00 weekday work, 100 MB an hour, to learn the baseline.
    fn learned() -> (RiskEngine, u64) {
        let mut r = RiskEngine::new(RiskConfig::default(), 0);
        for week in 0..4 {
            for day in 0..5 {
                for hour in 9..17 {
                    let t = MONDAY + week * 7 * 86_400 + day * 86_400 + hour * 3600 + 60;
                    r.flow("alice", "wiki", t);
                    r.traffic("alice", "wiki", 100 << 20, t);
                }
            }
        }
        (r, MONDAY + 4 * 7 * 86_400)
    }

    #[test]
    fn a_bulk_download_at_an_unusual_hour_is_high_risk_and_decays() {
        let (mut r, week5) = learned();
        let quiet = r.assess("alice", week5 + 8 * 3600);
        assert_eq!(quiet.level, Level::Low, "{quiet:?}");
        // Usual hour, usual volume: nothing.
        let t = week5 + 10 * 3600;
        r.traffic("alice", "wiki", 120 << 20, t);
        assert_eq!(r.assess("alice", t).level, Level::Low);
        // Tuesday 02:00, 3 GB from the file share: off hours and volume.
        let night = week5 + 86_400 + 2 * 3600;
        r.flow("alice", "files", night);
        r.traffic("alice", "files", 3 << 30, night + 30);
        let a = r.assess("alice", night + 31);
        assert_eq!(a.level, Level::High, "{a:?}");
        let signals: Vec<Signal> = a.reasons.iter().map(|x| x.signal).collect();
        assert!(signals.contains(&Signal::Volume), "{signals:?}");
        assert!(signals.contains(&Signal::OffHours), "{signals:?}");
        assert!(signals.contains(&Signal::NewDestination), "{signals:?}");
        // An hour later medium at most, a few hours later low again: nobody acted.
        assert!(r.assess("alice", night + 3600 + 31).level < Level::High);
        assert_eq!(r.assess("alice", night + 4 * 3600).level, Level::Low);
        r.prune(night + 48 * 3600);
        assert!(r.assess("alice", night + 48 * 3600).reasons.is_empty());
        // Other users are not touched.
        assert_eq!(r.assess("bob", night + 31).level, Level::Low);
    }

    #[test]
    fn a_burst_of_denials_counts_once_per_window() {
        let mut r = RiskEngine::new(RiskConfig::default(), 0);
        for i in 0..100 {
            r.denied("mallory", MONDAY + i / 10);
        }
        let a = r.assess("mallory", MONDAY + 10);
        let bursts = a
            .reasons
            .iter()
            .filter(|x| x.signal == Signal::DeniedBurst)
            .count();
        assert_eq!(bursts, 1, "{a:?}");
        assert_eq!(a.level, Level::Low, "a burst alone is not medium: {a:?}");
        r.posture_failing("mallory", "edr", MONDAY + 11);
        assert_eq!(r.assess("mallory", MONDAY + 11).level, Level::Medium);
        r.external("mallory", Level::High, "idp.example", MONDAY + 12);
        assert_eq!(r.assess("mallory", MONDAY + 12).level, Level::High);
        // The source says low again: its signal ends at once.
        r.external("mallory", Level::Low, "idp.example", MONDAY + 13);
        assert_eq!(r.assess("mallory", MONDAY + 13).level, Level::Medium);
    }

    #[test]
    fn repeats_top_up_one_entry_and_a_subject_keeps_a_bounded_list() {
        let mut r = RiskEngine::new(RiskConfig::default(), 0);
        // The same category again and again: one entry, its points capped.
        for i in 0..1000 {
            r.dns_blocks("laptop", "malware", 10, MONDAY + i);
        }
        let a = r.assess("laptop", MONDAY + 1000);
        assert_eq!(a.reasons.len(), 1, "{a:?}");
        assert!(a.score <= 2.0 * r.config.high + 1e-9, "{}", a.score);
        // Many categories: the list stays bounded, the largest stay.
        for i in 0..10_000 {
            r.dns_blocks("laptop", &format!("c{i}"), 1, MONDAY + 1000 + i);
        }
        let a = r.assess("laptop", MONDAY + 20_000);
        assert!(a.reasons.len() <= MAX_CONTRIBUTIONS, "{}", a.reasons.len());
        assert!(a.reasons.iter().any(|x| x.detail.contains("malware")));
        // One source's "low" withdraws only its own signal.
        r.external("u", Level::High, "idp", MONDAY);
        r.external("u", Level::High, "corp-idp", MONDAY);
        r.external("u", Level::Low, "idp", MONDAY + 1);
        let a = r.assess("u", MONDAY + 1);
        assert_eq!(a.reasons.len(), 1, "{a:?}");
        assert!(a.reasons[0].detail.ends_with("corp-idp"));
    }

    #[test]
    fn signal_names_are_their_serialized_names() {
        use Signal::*;
        for s in [
            Volume,
            OffHours,
            NewDestination,
            DeniedBurst,
            DnsBlocks,
            FailingPosture,
            External,
            NonCompliant,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn half_hour_time_zones_count_local_hours() {
        // +05:30: 04:30 UTC on Monday is 10:00 local, hour 10 of the week.
        let off = 5 * 3600 + 1800;
        assert_eq!(hour_of_week(MONDAY + 4 * 3600 + 1800, off), 10);
        assert_eq!(hour_of_week(MONDAY + 4 * 3600 + 1799, off), 9);
        // Bytes of one local hour are learned as that hour, not split over two.
        let mut r = RiskEngine::new(RiskConfig::default(), off);
        let ten = MONDAY + 4 * 3600 + 1800; // 10:00 local
        r.traffic("u", "app", 100, ten + 60);
        r.traffic("u", "app", 100, ten + 3000); // 10:50 local, 05:20 UTC
        r.traffic("u", "app", 1, ten + 3600 + 60); // 11:01 local: 10 is learned
        let s = &r.subjects["u"];
        assert_eq!(s.baseline.expected(10), Some(200.0));
        assert_eq!(s.baseline.expected(9), None);
    }

    #[test]
    fn an_hour_flagged_for_volume_is_not_learned_as_usual() {
        let (mut r, t) = learned();
        let night = t + 3 * 3600; // an hour never seen
        r.traffic("alice", "files", 3 << 30, night);
        r.traffic("alice", "files", 1, night + 3600);
        let how = hour_of_week(night, 0);
        assert_eq!(r.subjects["alice"].baseline.expected(how), None);
    }

    #[test]
    fn standing_states_do_not_decay_until_withdrawn() {
        let mut r = RiskEngine::new(RiskConfig::default(), 0);
        let detail = || Some((70.0, "out of compliance (mdm.example)".to_string()));
        r.standing(
            "laptop",
            Signal::NonCompliant,
            "mdm.example",
            detail(),
            MONDAY,
        );
        let week = MONDAY + 7 * 86_400;
        let a = r.assess("laptop", week);
        assert_eq!((a.level, a.score), (Level::High, 70.0), "{a:?}");
        r.prune(week);
        assert_eq!(r.active().collect::<Vec<_>>(), ["laptop"]);
        // A second report replaces the first; another source's adds.
        r.standing(
            "laptop",
            Signal::NonCompliant,
            "mdm.example",
            detail(),
            week,
        );
        r.standing(
            "laptop",
            Signal::NonCompliant,
            "other",
            Some((10.0, "x".into())),
            week,
        );
        assert_eq!(r.assess("laptop", week).score, 80.0);
        r.standing(
            "laptop",
            Signal::NonCompliant,
            "mdm.example",
            None,
            week + 1,
        );
        let a = r.assess("laptop", week + 1);
        assert_eq!((a.level, a.score), (Level::Low, 10.0), "{a:?}");
        r.forget("laptop");
        assert_eq!(r.active().count(), 0);
    }

    proptest! {
        /// Without new signals, the score never rises; it halves every half-life.
        #[test]
        fn scores_only_decay(events in proptest::collection::vec((0u8..6, 0u64..7200, 0u64..(4u64 << 30)), 1..60),
                             later in 1u64..100_000) {
            let mut r = RiskEngine::new(RiskConfig::default(), 0);
            let mut t = MONDAY;
            for (kind, dt, bytes) in &events {
                t += dt;
                match kind {
                    0 => r.traffic("u", "app", *bytes, t),
                    1 => r.flow("u", &format!("app{}", bytes % 7), t),
                    2 => r.denied("u", t),
                    3 => r.dns_blocks("u", "malware", bytes % 5, t),
                    4 => r.posture_failing("u", "edr", t),
                    _ => r.external("u", Level::Medium, "x", t),
                }
            }
            let now = r.assess("u", t);
            let after = r.assess("u", t + later);
            prop_assert!(after.score <= now.score + 1e-9);
            prop_assert!(after.level <= now.level);
            let half = r.assess("u", t + r.config.half_life);
            prop_assert!((half.score - now.score / 2.0).abs() < 0.02 * now.score.max(1.0) + NEGLIGIBLE * 64.0);
        }

        /// The baseline's mean for an hour lies within what was observed in it.
        #[test]
        fn baselines_stay_within_what_was_seen(obs in proptest::collection::vec(0u64..(1u64 << 34), 1..50)) {
            let mut b = Baseline::default();
            for o in &obs {
                b.observe(5, *o, 0.3);
            }
            let (lo, hi) = (*obs.iter().min().unwrap() as f64, *obs.iter().max().unwrap() as f64);
            let e = b.expected(5).unwrap();
            prop_assert!(e >= lo - 1.0 && e <= hi + 1.0);
            prop_assert!(b.expected(6).is_none());
            prop_assert!(b.usual(5) && !b.usual(6));
        }
    }
}
