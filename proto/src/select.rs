//! Broker selection: which broker a client sends its traffic to.
//!
//! A client keeps a WireGuard session to every broker it knows, so that a switch costs nothing but
//! a routing decision: no handshake, no new session, no lost packets beyond those in flight. This
//! module decides which of those sessions carries the traffic. It is a pure state machine: the
//! I/O shell tells it what happened (handshakes, probes sent, probe answers) and when, asks it
//! which probes are due, and calls [`Selector::tick`] to learn whether the broker in use changed.
//!
//! # Why probes inside the tunnel
//!
//! The probe is an ICMP echo sent *through* each broker's WireGuard session to the broker's tunnel
//! address, not a ping to the broker's public address. It therefore measures exactly the path the
//! traffic would take: the UDP path (NAT, firewalls that drop UDP but not ICMP, middleboxes that
//! rate-limit), the WireGuard session (keys that a broker restart invalidated, a broker that
//! handshakes but whose data plane is stuck) and the broker's packet processing. A WireGuard
//! handshake alone only proves that the broker's key exchange works, so it makes a broker `Up`
//! but does not give it an RTT: a broker is chosen for its measured round trip.
//!
//! # Why hysteresis
//!
//! Round trips jitter. Picking the lowest RTT at every tick would move the traffic between two
//! brokers of similar distance back and forth, and every move is costly for the traffic: flows are
//! re-authorized on the new broker, NAT state on the way is new, TCP sees reordering and a fresh
//! RTT estimate. So a standby broker must be clearly better — below `switch_ratio` times the
//! current RTT *and* at least `switch_margin` faster (the ratio alone would let 1 ms vs 2 ms win)
//! — and must stay so continuously for `switch_hold` before the traffic moves. Because of the
//! ratio, the reverse move needs the RTTs to change; two brokers of equal RTT never flap. A
//! broker that stops answering is a different matter: then the traffic moves at once, to the
//! alive broker with the lowest smoothed RTT.
//!
//! # Rules in short
//!
//! - A broker is `Connecting` until its first handshake (or probe answer), then `Up`. Only brokers
//!   with a session are probed; retrying handshakes is the shell's business.
//! - It becomes `Down` when probes were sent and none answered for `dead_after`, measured from the
//!   oldest probe sent after the last answer. Its RTT is forgotten: the path may have changed.
//! - It returns to `Up` on a probe answer or a new handshake, and needs answers again before it
//!   can win on RTT.
//! - Without an active broker, the lowest measured RTT wins at the next tick (reason `First`); if
//!   no `Up` broker has been measured for `dead_after` after it came up, the one up longest is
//!   taken anyway so that traffic can flow.
//! - An active broker that goes down is replaced at once by the best alive one (`ActiveDown`), or
//!   by none (`AllDown`).
//!
//! No input sequence panics: unknown broker ids are ignored, time may even go backwards (all
//! differences saturate), nonsensical configuration values only make the choice worse.

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use tracing::{debug, info};

/// How many outstanding probes are remembered per broker; answers to older ones are ignored.
pub const PROBE_WINDOW: usize = 8;

const DEFAULT_RTT_ALPHA: f64 = 0.25;

/// Tuning of the selection. The defaults suit a laptop on ordinary networks.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectorConfig {
    /// Probe the broker in use this often (also every broker while none is in use).
    pub probe_interval_active: Duration,
    /// Probe the other brokers this often.
    pub probe_interval_standby: Duration,
    /// A broker that was sent probes and answered none of them for this long is down.
    pub dead_after: Duration,
    /// A standby must have an RTT below `switch_ratio` times the current broker's RTT ...
    pub switch_ratio: f64,
    /// ... and be at least this much faster ...
    pub switch_margin: Duration,
    /// ... continuously for this long before the traffic moves to it.
    pub switch_hold: Duration,
    /// Weight of a new sample in the smoothed RTT (exponentially weighted moving average); a value
    /// outside 0..=1 is replaced by the default, 0.25.
    pub rtt_alpha: f64,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        SelectorConfig {
            probe_interval_active: Duration::from_millis(250),
            probe_interval_standby: Duration::from_secs(2),
            dead_after: Duration::from_secs(1),
            switch_ratio: 0.7,
            switch_margin: Duration::from_millis(10),
            switch_hold: Duration::from_secs(10),
            rtt_alpha: DEFAULT_RTT_ALPHA,
        }
    }
}

/// A broker, by the order in which it was added to the [`Selector`].
pub type BrokerId = usize;

/// What the selector knows of one broker's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// No handshake yet.
    Connecting,
    /// Reachable: a handshake completed or probes are answered.
    Up,
    /// Probes stopped being answered.
    Down,
    /// Removed by an administrator; never selected again.
    Retired,
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Liveness::Connecting => "connecting",
            Liveness::Up => "up",
            Liveness::Down => "down",
            Liveness::Retired => "retired",
        })
    }
}

/// Why the active broker changed. Serialized with a `reason` tag and RTTs in milliseconds, e.g.
/// `{"reason":"better","from_rtt_ms":40.0,"to_rtt_ms":20.0}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SwitchReason {
    /// No broker was in use.
    First,
    /// The broker in use stopped answering.
    ActiveDown,
    /// A standby broker was clearly faster for `switch_hold`.
    Better {
        #[serde(rename = "from_rtt_ms", serialize_with = "serialize_ms")]
        from_rtt: Duration,
        #[serde(rename = "to_rtt_ms", serialize_with = "serialize_ms")]
        to_rtt: Duration,
    },
    /// The broker in use was retired.
    Retired,
    /// The broker in use stopped answering and no other broker is up.
    AllDown,
}

impl fmt::Display for SwitchReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchReason::First => {
                f.write_str("no broker was in use; this is the best reachable one")
            }
            SwitchReason::ActiveDown => f.write_str("the broker in use stopped answering probes"),
            SwitchReason::Better { from_rtt, to_rtt } => write!(
                f,
                "another broker has been clearly faster for a while ({:.1} ms instead of {:.1} ms)",
                ms(*to_rtt),
                ms(*from_rtt)
            ),
            SwitchReason::Retired => {
                f.write_str("the broker in use was removed by an administrator")
            }
            SwitchReason::AllDown => f.write_str(
                "the broker in use stopped answering probes and no other broker is reachable",
            ),
        }
    }
}

/// The active broker changed from `from` to `to` (`None`: no broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Switch {
    pub from: Option<BrokerId>,
    pub to: Option<BrokerId>,
    #[serde(flatten)]
    pub reason: SwitchReason,
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name =
            |id: Option<BrokerId>| id.map_or_else(|| "none".to_owned(), |i| format!("broker {i}"));
        write!(
            f,
            "{} -> {}: {}",
            name(self.from),
            name(self.to),
            self.reason
        )
    }
}

/// One broker as shown by a status command.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerStatus {
    pub id: BrokerId,
    pub state: Liveness,
    /// Whether the traffic goes to this broker.
    pub active: bool,
    /// Smoothed round trip of in-tunnel probes (none before the first answer, or since down).
    pub rtt_ms: Option<f64>,
    /// How long ago the last probe answer came (none if never).
    pub last_answer_ago_ms: Option<f64>,
    /// How long the broker has been in its current state.
    pub state_for_ms: f64,
}

#[derive(Debug, Clone)]
struct Broker {
    state: Liveness,
    state_since: Instant,
    /// Smoothed RTT; `None` until the first answer and again from going down.
    rtt: Option<Duration>,
    last_answer: Option<Instant>,
    last_probe: Option<Instant>,
    /// Send time of the oldest probe sent after the last answer.
    unanswered_since: Option<Instant>,
    next_seq: u16,
    /// Outstanding probes (sequence number, send time), a ring of the last few.
    inflight: [Option<(u16, Instant)>; PROBE_WINDOW],
    inflight_next: usize,
    /// Since when this (standby) broker has been clearly better than the active one.
    better_since: Option<Instant>,
}

impl Broker {
    fn new(now: Instant) -> Self {
        Broker {
            state: Liveness::Connecting,
            state_since: now,
            rtt: None,
            last_answer: None,
            last_probe: None,
            unanswered_since: None,
            next_seq: 0,
            inflight: [None; PROBE_WINDOW],
            inflight_next: 0,
            better_since: None,
        }
    }

    fn set_state(&mut self, state: Liveness, now: Instant) {
        self.state = state;
        self.state_since = now;
        self.better_since = None;
    }

    fn take_inflight(&mut self, seq: u16) -> Option<Instant> {
        self.inflight
            .iter_mut()
            .find(|slot| matches!(slot, Some((s, _)) if *s == seq))
            .and_then(Option::take)
            .map(|(_, sent)| sent)
    }

    fn is_up(&self) -> bool {
        self.state == Liveness::Up
    }
}

/// Picks the broker that carries a client's traffic. See the module documentation.
#[derive(Debug, Clone)]
pub struct Selector {
    config: SelectorConfig,
    brokers: Vec<Broker>,
    active: Option<BrokerId>,
}

impl Selector {
    pub fn new(config: SelectorConfig) -> Self {
        Selector {
            config,
            brokers: Vec::new(),
            active: None,
        }
    }

    pub fn config(&self) -> &SelectorConfig {
        &self.config
    }

    /// Number of brokers ever added (retired ones included); ids are `0..len()`.
    pub fn len(&self) -> usize {
        self.brokers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.brokers.is_empty()
    }

    /// Adds a broker (returns its id). Brokers are never removed, only retired.
    pub fn add(&mut self, now: Instant) -> BrokerId {
        self.brokers.push(Broker::new(now));
        let id = self.brokers.len() - 1;
        debug!(broker = id, "broker added");
        id
    }

    /// The broker is no longer selectable (an administrator removed it). If it was in use, the
    /// best alive broker takes over at once and the switch is returned (reason `Retired`; `to`
    /// is `None` if no other broker is up — then the next tick picks one as soon as possible).
    pub fn retire(&mut self, id: BrokerId, now: Instant) -> Option<Switch> {
        let b = self.brokers.get_mut(id)?;
        if b.state == Liveness::Retired {
            return None;
        }
        b.set_state(Liveness::Retired, now);
        b.unanswered_since = None;
        debug!(broker = id, "broker retired");
        if self.active != Some(id) {
            return None;
        }
        let to = self.best_alive();
        Some(self.switch_to(to, SwitchReason::Retired))
    }

    /// The session to broker `id` completed a handshake: it is reachable. A broker that was
    /// connecting or down becomes up (and is probed at once); its RTT must be measured again.
    pub fn on_handshake(&mut self, id: BrokerId, now: Instant) {
        let Some(b) = self.brokers.get_mut(id) else {
            return;
        };
        match b.state {
            Liveness::Connecting | Liveness::Down => {
                debug!(broker = id, was = %b.state, "broker up after handshake");
                b.set_state(Liveness::Up, now);
                b.unanswered_since = None;
                b.last_probe = None;
            }
            Liveness::Up | Liveness::Retired => {}
        }
    }

    /// Records a probe to broker `id` and returns the sequence number to put in the echo. The
    /// shell calls it for each broker [`due_probes`](Self::due_probes) returns. An unknown id
    /// gets 0 and changes nothing (an answer to it will be ignored).
    pub fn probe_sent(&mut self, id: BrokerId, now: Instant) -> u16 {
        let Some(b) = self.brokers.get_mut(id) else {
            return 0;
        };
        let seq = b.next_seq;
        b.next_seq = seq.wrapping_add(1);
        b.inflight[b.inflight_next] = Some((seq, now));
        b.inflight_next = (b.inflight_next + 1) % PROBE_WINDOW;
        b.last_probe = Some(now);
        b.unanswered_since.get_or_insert(now);
        seq
    }

    /// An echo answer with sequence `seq` came back on broker `id`'s session. Returns whether it
    /// was taken as an RTT sample; answers with an unknown, already answered or too old sequence
    /// number, to unknown or retired brokers, are ignored.
    pub fn on_probe_answer(&mut self, id: BrokerId, seq: u16, now: Instant) -> bool {
        let alpha = self.config.rtt_alpha;
        let Some(b) = self.brokers.get_mut(id) else {
            return false;
        };
        if b.state == Liveness::Retired {
            return false;
        }
        let Some(sent) = b.take_inflight(seq) else {
            return false;
        };
        let sample = now.saturating_duration_since(sent);
        b.rtt = Some(match b.rtt {
            None => sample,
            Some(old) => ewma(old, sample, alpha),
        });
        b.last_answer = Some(now);
        b.unanswered_since = None;
        if b.state != Liveness::Up {
            debug!(broker = id, was = %b.state, rtt_ms = ms(sample), "broker answers");
            b.set_state(Liveness::Up, now);
        }
        true
    }

    /// The brokers that need a probe now, in id order. Only brokers with a session (up or down)
    /// are probed: the active one every `probe_interval_active`, the others every
    /// `probe_interval_standby`, all of them at the active rate while no broker is in use.
    pub fn due_probes(&self, now: Instant) -> Vec<BrokerId> {
        let searching = self.active.is_none();
        self.brokers
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b.state, Liveness::Up | Liveness::Down))
            .filter(|(id, b)| {
                let interval = if searching || self.active == Some(*id) {
                    self.config.probe_interval_active
                } else {
                    self.config.probe_interval_standby
                };
                b.last_probe
                    .is_none_or(|t| now.saturating_duration_since(t) >= interval)
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Advances time: marks brokers down whose answers stopped, replaces a dead active broker at
    /// once, picks one when none is in use, and moves to a clearly better one after the hold.
    /// Returns the switch when the active broker changed.
    pub fn tick(&mut self, now: Instant) -> Option<Switch> {
        let dead_after = self.config.dead_after;
        for (id, b) in self.brokers.iter_mut().enumerate() {
            let Some(since) = b.unanswered_since else {
                continue;
            };
            if b.is_up() && now.saturating_duration_since(since) >= dead_after {
                debug!(broker = id, "broker down: probes unanswered");
                b.set_state(Liveness::Down, now);
                b.rtt = None;
            }
        }

        match self.active {
            None => {
                let to = self
                    .best_measured()
                    .or_else(|| self.longest_up_unmeasured(now))?;
                Some(self.switch_to(Some(to), SwitchReason::First))
            }
            Some(a) => match self.brokers.get(a).map(|b| b.state) {
                Some(Liveness::Up) => self.hysteresis(a, now),
                state => {
                    let to = self.best_alive();
                    let reason = match (state, to) {
                        (Some(Liveness::Retired), _) => SwitchReason::Retired,
                        (_, Some(_)) => SwitchReason::ActiveDown,
                        (_, None) => SwitchReason::AllDown,
                    };
                    Some(self.switch_to(to, reason))
                }
            },
        }
    }

    /// The broker the traffic goes to.
    pub fn active(&self) -> Option<BrokerId> {
        self.active
    }

    /// Smoothed RTT of broker `id` (none before its first answer and from going down until its
    /// next answer).
    pub fn rtt(&self, id: BrokerId) -> Option<Duration> {
        self.brokers.get(id)?.rtt
    }

    /// State of broker `id`; `None` for an unknown id.
    pub fn state(&self, id: BrokerId) -> Option<Liveness> {
        self.brokers.get(id).map(|b| b.state)
    }

    /// All brokers, for a status command.
    pub fn snapshot(&self, now: Instant) -> Vec<BrokerStatus> {
        self.brokers
            .iter()
            .enumerate()
            .map(|(id, b)| BrokerStatus {
                id,
                state: b.state,
                active: self.active == Some(id),
                rtt_ms: b.rtt.map(ms),
                last_answer_ago_ms: b.last_answer.map(|t| ms(now.saturating_duration_since(t))),
                state_for_ms: ms(now.saturating_duration_since(b.state_since)),
            })
            .collect()
    }

    /// The up broker with the lowest smoothed RTT (ties: lowest id).
    fn best_measured(&self) -> Option<BrokerId> {
        self.brokers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_up())
            .filter_map(|(id, b)| Some((b.rtt?, id)))
            .min()
            .map(|(_, id)| id)
    }

    /// The up broker that has been up longest without an RTT, once that is at least
    /// `dead_after`: with nothing measured, traffic should still flow somewhere.
    fn longest_up_unmeasured(&self, now: Instant) -> Option<BrokerId> {
        self.brokers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_up() && b.rtt.is_none())
            .filter(|(_, b)| now.saturating_duration_since(b.state_since) >= self.config.dead_after)
            .min_by_key(|(id, b)| (b.state_since, *id))
            .map(|(id, _)| id)
    }

    /// Replacement for a broker that can no longer be used: the best measured up broker, else
    /// the one up longest (being up, it answers handshakes; its probes will tell soon).
    fn best_alive(&self) -> Option<BrokerId> {
        self.best_measured().or_else(|| {
            self.brokers
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_up())
                .min_by_key(|(id, b)| (b.state_since, *id))
                .map(|(id, _)| id)
        })
    }

    fn hysteresis(&mut self, active: BrokerId, now: Instant) -> Option<Switch> {
        let cfg = &self.config;
        let active_rtt = self.brokers.get(active).and_then(|b| b.rtt);
        let mut best: Option<(Duration, BrokerId)> = None;
        for (id, b) in self.brokers.iter_mut().enumerate() {
            let rtt = match (b.rtt, active_rtt) {
                (Some(rtt), Some(current))
                    if id != active && b.is_up() && clearly_better(rtt, current, cfg) =>
                {
                    rtt
                }
                _ => {
                    b.better_since = None;
                    continue;
                }
            };
            let since = *b.better_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= cfg.switch_hold
                && best.is_none_or(|(r, _)| rtt < r)
            {
                best = Some((rtt, id));
            }
        }
        let ((to_rtt, to), Some(from_rtt)) = (best?, active_rtt) else {
            return None;
        };
        Some(self.switch_to(Some(to), SwitchReason::Better { from_rtt, to_rtt }))
    }

    fn switch_to(&mut self, to: Option<BrokerId>, reason: SwitchReason) -> Switch {
        let switch = Switch {
            from: self.active,
            to,
            reason,
        };
        self.active = to;
        for b in &mut self.brokers {
            b.better_since = None;
        }
        info!(from = ?switch.from, to = ?switch.to, reason = %switch.reason, "active broker changed");
        switch
    }
}

/// Whether a standby RTT is enough better than the current one to be worth moving for.
fn clearly_better(standby: Duration, current: Duration, cfg: &SelectorConfig) -> bool {
    standby.as_secs_f64() < cfg.switch_ratio * current.as_secs_f64()
        && current
            .checked_sub(standby)
            .is_some_and(|d| d >= cfg.switch_margin)
}

fn ewma(old: Duration, sample: Duration, alpha: f64) -> Duration {
    let alpha = if (0.0..=1.0).contains(&alpha) {
        alpha
    } else {
        DEFAULT_RTT_ALPHA
    };
    let old_s = old.as_secs_f64();
    Duration::try_from_secs_f64(old_s + alpha * (sample.as_secs_f64() - old_s)).unwrap_or(sample)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn serialize_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(ms(*d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STEP: Duration = Duration::from_millis(5);

    fn millis(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A client with brokers at fixed RTTs, probes answered (or not) like a network would,
    /// ticked every `STEP`.
    struct Sim {
        sel: Selector,
        start: Instant,
        now: Instant,
        /// `None`: the broker does not answer.
        rtts: Vec<Option<Duration>>,
        inflight: Vec<(Instant, BrokerId, u16)>,
        switches: Vec<(Duration, Switch)>,
    }

    impl Sim {
        fn new() -> Self {
            let start = Instant::now();
            Sim {
                sel: Selector::new(SelectorConfig::default()),
                start,
                now: start,
                rtts: Vec::new(),
                inflight: Vec::new(),
                switches: Vec::new(),
            }
        }

        fn elapsed(&self) -> Duration {
            self.now - self.start
        }

        /// Adds a broker and completes its handshake.
        fn broker(&mut self, rtt_ms: Option<u64>) -> BrokerId {
            let id = self.sel.add(self.now);
            self.sel.on_handshake(id, self.now);
            self.rtts.push(rtt_ms.map(millis));
            id
        }

        /// The broker stops answering, including answers already on their way.
        fn silence(&mut self, id: BrokerId) {
            self.rtts[id] = None;
            self.inflight.retain(|&(_, b, _)| b != id);
        }

        /// Retires a broker; answers on their way to it are lost with its session.
        fn retire(&mut self, id: BrokerId) -> Option<Switch> {
            self.silence(id);
            self.sel.retire(id, self.now)
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += STEP;
                self.inflight.sort();
                let due = self.inflight.partition_point(|&(at, _, _)| at <= self.now);
                for (at, id, seq) in self.inflight.drain(..due) {
                    assert!(self.sel.on_probe_answer(id, seq, at));
                }
                if let Some(s) = self.sel.tick(self.now) {
                    self.switches.push((self.now - self.start, s));
                }
                for id in self.sel.due_probes(self.now) {
                    let seq = self.sel.probe_sent(id, self.now);
                    if let Some(rtt) = self.rtts[id] {
                        self.inflight.push((self.now + rtt, id, seq));
                    }
                }
            }
        }

        fn reasons(&self) -> Vec<SwitchReason> {
            self.switches.iter().map(|(_, s)| s.reason).collect()
        }
    }

    #[test]
    fn picks_nearer_of_two() {
        let mut sim = Sim::new();
        let far = sim.broker(Some(40));
        let near = sim.broker(Some(10));
        sim.run(millis(100));
        assert_eq!(sim.sel.active(), Some(near));
        assert_eq!(
            sim.switches.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            vec![Switch {
                from: None,
                to: Some(near),
                reason: SwitchReason::First
            }]
        );
        assert_eq!(sim.sel.rtt(near), Some(millis(10)));
        assert_eq!(sim.sel.rtt(far), Some(millis(40)));
    }

    #[test]
    fn lowest_rtt_wins_among_answers_before_the_tick() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        let (a, b) = (sel.add(t0), sel.add(t0));
        sel.on_handshake(a, t0);
        sel.on_handshake(b, t0);
        let (sa, sb) = (sel.probe_sent(a, t0), sel.probe_sent(b, t0));
        assert!(sel.on_probe_answer(a, sa, t0 + millis(10)));
        assert!(sel.on_probe_answer(b, sb, t0 + millis(8)));
        let s = sel.tick(t0 + millis(12)).expect("switch");
        assert_eq!(
            s,
            Switch {
                from: None,
                to: Some(b),
                reason: SwitchReason::First
            }
        );
    }

    #[test]
    fn handshake_alone_does_not_win_over_a_measured_broker() {
        let mut sim = Sim::new();
        let silent = sim.broker(None);
        sim.run(millis(300));
        assert_eq!(sim.sel.active(), None, "up but never measured: wait");
        let answering = sim.broker(Some(30));
        sim.run(millis(100));
        assert_eq!(sim.sel.active(), Some(answering));
        assert_eq!(sim.sel.state(silent), Some(Liveness::Up));
    }

    #[test]
    fn unmeasured_up_broker_is_taken_after_dead_after() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        let a = sel.add(t0);
        let b = sel.add(t0);
        sel.on_handshake(a, t0 + millis(100));
        sel.on_handshake(b, t0 + millis(50));
        assert_eq!(sel.tick(t0 + millis(1049)), None);
        let s = sel.tick(t0 + millis(1050)).expect("switch");
        assert_eq!(
            s,
            Switch {
                from: None,
                to: Some(b),
                reason: SwitchReason::First
            }
        );
    }

    #[test]
    fn switches_within_dead_after_plus_one_interval_when_active_stops_answering() {
        let cfg = SelectorConfig::default();
        let mut sim = Sim::new();
        let a = sim.broker(Some(10));
        let b = sim.broker(Some(30));
        sim.run(Duration::from_secs(3));
        assert_eq!(sim.sel.active(), Some(a));
        let stopped = sim.elapsed();
        sim.silence(a);
        sim.run(Duration::from_secs(3));
        let &(at, s) = sim.switches.last().expect("switch");
        assert_eq!(
            s,
            Switch {
                from: Some(a),
                to: Some(b),
                reason: SwitchReason::ActiveDown
            }
        );
        let took = at - stopped;
        assert!(
            took <= cfg.dead_after + cfg.probe_interval_active + STEP,
            "took {took:?}"
        );
        assert!(
            took >= cfg.dead_after - cfg.probe_interval_active,
            "took {took:?}"
        );
        assert_eq!(sim.sel.state(a), Some(Liveness::Down));
        assert_eq!(sim.sel.rtt(a), None);
        assert_eq!(sim.switches.len(), 2);
    }

    #[test]
    fn no_switch_for_a_slightly_better_broker() {
        // 15 % better (15 ms faster): fails only the ratio.
        let mut sim = Sim::new();
        let a = sim.broker(Some(100));
        sim.run(Duration::from_secs(2));
        sim.broker(Some(85));
        sim.run(Duration::from_secs(60));
        assert_eq!(sim.sel.active(), Some(a));
        assert_eq!(sim.reasons(), vec![SwitchReason::First]);

        // 40 % better but only 8 ms faster: fails only the margin.
        let mut sim = Sim::new();
        let a = sim.broker(Some(20));
        sim.run(Duration::from_secs(2));
        sim.broker(Some(12));
        sim.run(Duration::from_secs(60));
        assert_eq!(sim.sel.active(), Some(a));
        assert_eq!(sim.reasons(), vec![SwitchReason::First]);
    }

    #[test]
    fn switches_to_a_much_better_broker_after_the_hold_not_before() {
        let hold = SelectorConfig::default().switch_hold;
        let mut sim = Sim::new();
        let a = sim.broker(Some(40));
        sim.run(Duration::from_secs(2));
        let b = sim.broker(Some(20));
        let added = sim.elapsed();
        sim.run(hold - millis(50));
        assert_eq!(sim.sel.active(), Some(a), "not before the hold");
        sim.run(millis(500));
        assert_eq!(sim.sel.active(), Some(b));
        let &(at, s) = sim.switches.last().expect("switch");
        assert_eq!(
            s,
            Switch {
                from: Some(a),
                to: Some(b),
                reason: SwitchReason::Better {
                    from_rtt: millis(40),
                    to_rtt: millis(20)
                }
            }
        );
        // First answer after one step and 20 ms, hold counted from the next tick.
        assert!(
            at >= added + hold && at <= added + hold + millis(50),
            "at {at:?}"
        );
        // And it stays there.
        sim.run(Duration::from_secs(60));
        assert_eq!(sim.switches.len(), 2);
    }

    #[test]
    fn hold_timer_resets_when_the_condition_breaks() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + millis(ms);
        let mut sel = Selector::new(SelectorConfig::default());
        let (a, b) = (sel.add(t0), sel.add(t0));
        sel.on_handshake(a, t0);
        let s = sel.probe_sent(a, at(0));
        sel.on_probe_answer(a, s, at(40));
        assert_eq!(sel.tick(at(40)).map(|s| s.to), Some(Some(a)));

        sel.on_handshake(b, at(100));
        let s = sel.probe_sent(b, at(100));
        sel.on_probe_answer(b, s, at(110)); // 10 ms: clearly better than 40 ms
        assert_eq!(sel.tick(at(110)), None); // timer starts
        assert_eq!(sel.tick(at(5000)), None);
        let s = sel.probe_sent(b, at(6000));
        sel.on_probe_answer(b, s, at(6100)); // 100 ms sample: smoothed 32.5 ms, not better
        assert_eq!(sel.rtt(b), Some(Duration::from_micros(32_500)));
        assert_eq!(sel.tick(at(6100)), None); // timer reset
        let s = sel.probe_sent(b, at(7000));
        sel.on_probe_answer(b, s, at(7010)); // smoothed ~26.9 ms: better again
        assert_eq!(sel.tick(at(7010)), None); // timer restarts here
        assert_eq!(sel.tick(at(10_110)), None, "old timer would have fired");
        assert_eq!(sel.tick(at(17_009)), None);
        let s = sel.tick(at(17_010)).expect("switch after a full hold");
        assert_eq!(s.to, Some(b));
        assert!(matches!(s.reason, SwitchReason::Better { .. }));
    }

    #[test]
    fn equal_rtts_never_flap() {
        let mut sim = Sim::new();
        sim.broker(Some(20));
        sim.broker(Some(20));
        sim.run(Duration::from_secs(120));
        assert_eq!(sim.reasons(), vec![SwitchReason::First]);
    }

    #[test]
    fn recovers_from_all_down() {
        let mut sim = Sim::new();
        let a = sim.broker(Some(10));
        let b = sim.broker(Some(30));
        sim.run(Duration::from_secs(3));
        sim.silence(a);
        sim.silence(b);
        sim.run(Duration::from_secs(6));
        assert_eq!(sim.sel.active(), None);
        assert_eq!(sim.sel.state(a), Some(Liveness::Down));
        assert_eq!(sim.sel.state(b), Some(Liveness::Down));
        // Down brokers are still probed, at the active rate while nothing is in use.
        sim.rtts[b] = Some(millis(30));
        let back = sim.elapsed();
        sim.run(Duration::from_secs(1));
        assert_eq!(sim.sel.active(), Some(b));
        let (at, _) = sim.switches.last().expect("switch");
        assert!(*at - back <= millis(250) + millis(30) + STEP);
        assert_eq!(
            sim.reasons(),
            vec![
                SwitchReason::First,
                SwitchReason::ActiveDown,
                SwitchReason::AllDown,
                SwitchReason::First
            ]
        );
        assert_eq!(
            sim.switches[2].1,
            Switch {
                from: Some(b),
                to: None,
                reason: SwitchReason::AllDown
            }
        );
    }

    #[test]
    fn single_broker_down_and_back() {
        let mut sim = Sim::new();
        let a = sim.broker(Some(10));
        sim.run(Duration::from_secs(1));
        sim.silence(a);
        sim.run(Duration::from_secs(2));
        assert_eq!(sim.sel.active(), None);
        sim.rtts[a] = Some(millis(10));
        sim.run(Duration::from_secs(1));
        assert_eq!(sim.sel.active(), Some(a));
        assert_eq!(
            sim.reasons(),
            vec![
                SwitchReason::First,
                SwitchReason::AllDown,
                SwitchReason::First
            ]
        );
    }

    #[test]
    fn retiring_the_active_broker_moves_traffic() {
        let mut sim = Sim::new();
        let a = sim.broker(Some(10));
        let b = sim.broker(Some(30));
        sim.run(Duration::from_secs(3));
        assert_eq!(sim.sel.active(), Some(a));
        let s = sim.retire(a);
        assert_eq!(
            s,
            Some(Switch {
                from: Some(a),
                to: Some(b),
                reason: SwitchReason::Retired
            })
        );
        assert_eq!(sim.sel.state(a), Some(Liveness::Retired));
        assert_eq!(sim.retire(a), None, "twice");
        sim.run(Duration::from_secs(30));
        assert_eq!(sim.sel.active(), Some(b));
        assert!(
            !sim.sel
                .due_probes(sim.now + Duration::from_secs(60))
                .contains(&a)
        );
        let seq = sim.sel.probe_sent(a, sim.now);
        assert!(
            !sim.sel.on_probe_answer(a, seq, sim.now),
            "retired brokers take no samples"
        );
        sim.sel.on_handshake(a, sim.now);
        assert_eq!(sim.sel.state(a), Some(Liveness::Retired));

        // Retiring the last one leaves none; a standby retire changes nothing.
        assert_eq!(
            sim.retire(b),
            Some(Switch {
                from: Some(b),
                to: None,
                reason: SwitchReason::Retired
            })
        );
        assert_eq!(sim.sel.tick(sim.now), None);
        let c = sim.broker(Some(5));
        let d = sim.broker(Some(50));
        sim.run(millis(100));
        assert_eq!(sim.sel.active(), Some(c));
        assert_eq!(sim.retire(d), None);
    }

    #[test]
    fn down_broker_back_on_handshake_needs_answers() {
        let mut sim = Sim::new();
        let a = sim.broker(Some(40));
        let b = sim.broker(Some(60));
        sim.run(Duration::from_secs(3));
        sim.silence(b);
        sim.run(Duration::from_secs(4));
        assert_eq!(sim.sel.active(), Some(a));
        assert_eq!(sim.sel.state(b), Some(Liveness::Down));
        // New handshake: up, probed at once, but no RTT until answered.
        sim.sel.on_handshake(b, sim.now);
        assert_eq!(sim.sel.state(b), Some(Liveness::Up));
        assert_eq!(sim.sel.rtt(b), None);
        assert!(sim.sel.due_probes(sim.now).contains(&b));
        sim.rtts[b] = Some(millis(10));
        sim.run(Duration::from_secs(20));
        // Its first new sample initializes the RTT (no mixing with the old 60 ms).
        assert_eq!(sim.sel.rtt(b), Some(millis(10)));
        assert_eq!(sim.sel.active(), Some(b));
        assert_eq!(
            sim.reasons(),
            vec![
                SwitchReason::First,
                SwitchReason::Better {
                    from_rtt: millis(40),
                    to_rtt: millis(10)
                }
            ]
        );
    }

    #[test]
    fn probes_only_sessions_at_their_rates() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        let (a, b, c) = (sel.add(t0), sel.add(t0), sel.add(t0));
        sel.on_handshake(a, t0);
        sel.on_handshake(b, t0);
        assert_eq!(sel.due_probes(t0), vec![a, b], "c has no session");
        for id in [a, b] {
            let s = sel.probe_sent(id, t0);
            sel.on_probe_answer(id, s, t0 + millis(10 + 10 * id as u64));
        }
        assert_eq!(sel.tick(t0 + millis(30)).and_then(|s| s.to), Some(a));
        assert_eq!(sel.due_probes(t0 + millis(249)), Vec::<BrokerId>::new());
        assert_eq!(sel.due_probes(t0 + millis(250)), vec![a]);
        assert_eq!(sel.due_probes(t0 + millis(2000)), vec![a, b]);
        assert!(!sel.due_probes(t0 + millis(5000)).contains(&c));
    }

    #[test]
    fn rtt_is_an_ewma_initialized_by_the_first_sample() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        let a = sel.add(t0);
        sel.on_handshake(a, t0);
        assert_eq!(sel.rtt(a), None);
        let s = sel.probe_sent(a, t0);
        assert!(sel.on_probe_answer(a, s, t0 + millis(40)));
        assert_eq!(sel.rtt(a), Some(millis(40)));
        let s = sel.probe_sent(a, t0 + millis(100));
        assert!(sel.on_probe_answer(a, s, t0 + millis(120)));
        assert_eq!(sel.rtt(a), Some(millis(35)));
    }

    #[test]
    fn unknown_duplicate_and_old_sequences_are_ignored() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        let a = sel.add(t0);
        sel.on_handshake(a, t0);
        // One probe more than the window: the first is forgotten, the second still known.
        let seqs: Vec<u16> = (0..=PROBE_WINDOW as u64)
            .map(|i| sel.probe_sent(a, t0 + millis(i)))
            .collect();
        let (first, second, last) = (seqs[0], seqs[1], seqs[PROBE_WINDOW]);
        assert!(
            !sel.on_probe_answer(a, last.wrapping_add(100), t0 + millis(20)),
            "never sent"
        );
        assert!(!sel.on_probe_answer(a, first, t0 + millis(20)), "too old");
        assert!(
            sel.on_probe_answer(a, second, t0 + millis(20)),
            "oldest in the window"
        );
        assert_eq!(sel.rtt(a), Some(millis(19)));
        assert!(sel.on_probe_answer(a, last, t0 + millis(20)));
        assert!(!sel.on_probe_answer(a, last, t0 + millis(21)), "duplicate");
        assert_eq!(sel.rtt(a), Some(Duration::from_micros(17_250)));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        let a = sel.add(t0);
        sel.on_handshake(a, t0);
        let seqs: Vec<u16> = (0..70_000).map(|_| sel.probe_sent(a, t0)).collect();
        assert_eq!(seqs[65_535], u16::MAX);
        assert_eq!(seqs[65_536], 0);
        let last = *seqs.last().expect("seqs");
        assert!(sel.on_probe_answer(a, last, t0 + millis(7)));
        assert_eq!(sel.rtt(a), Some(millis(7)));
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let t0 = Instant::now();
        let mut sel = Selector::new(SelectorConfig::default());
        sel.on_handshake(3, t0);
        assert_eq!(sel.probe_sent(3, t0), 0);
        assert!(!sel.on_probe_answer(3, 0, t0));
        assert_eq!(sel.retire(3, t0), None);
        assert_eq!(sel.state(3), None);
        assert_eq!(sel.rtt(3), None);
        assert_eq!(sel.tick(t0), None);
        assert!(sel.due_probes(t0).is_empty() && sel.snapshot(t0).is_empty() && sel.is_empty());
    }

    #[test]
    fn snapshot_and_switch_serialize_in_milliseconds() {
        let mut sim = Sim::new();
        let a = sim.broker(Some(40));
        sim.run(millis(100));
        sim.broker(None);
        let snap = serde_json::to_value(sim.sel.snapshot(sim.now)).expect("json");
        assert_eq!(snap[a]["state"], "up");
        assert_eq!(snap[a]["active"], true);
        assert_eq!(snap[a]["rtt_ms"], 40.0);
        assert_eq!(snap[a]["last_answer_ago_ms"], 55.0);
        assert_eq!(snap[a]["state_for_ms"], 100.0);
        assert_eq!(snap[1]["state"], "up");
        assert_eq!(snap[1]["rtt_ms"], serde_json::Value::Null);

        let s = Switch {
            from: Some(0),
            to: Some(1),
            reason: SwitchReason::Better {
                from_rtt: millis(40),
                to_rtt: millis(20),
            },
        };
        assert_eq!(
            serde_json::to_value(s).expect("json"),
            serde_json::json!({"from": 0, "to": 1, "reason": "better", "from_rtt_ms": 40.0, "to_rtt_ms": 20.0})
        );
        assert_eq!(
            s.to_string(),
            "broker 0 -> broker 1: another broker has been clearly faster for a while (20.0 ms instead of 40.0 ms)"
        );
        let down = Switch {
            from: Some(1),
            to: None,
            reason: SwitchReason::AllDown,
        };
        assert_eq!(
            serde_json::to_value(down).expect("json"),
            serde_json::json!({"from": 1, "to": null, "reason": "all_down"})
        );
        assert!(down.to_string().starts_with("broker 1 -> none: "));
    }

    #[test]
    fn nonsense_config_does_not_panic() {
        let cfg = SelectorConfig {
            probe_interval_active: Duration::ZERO,
            probe_interval_standby: Duration::MAX,
            dead_after: Duration::ZERO,
            switch_ratio: f64::NAN,
            switch_margin: Duration::MAX,
            switch_hold: Duration::ZERO,
            rtt_alpha: f64::INFINITY,
        };
        let t0 = Instant::now();
        let mut sel = Selector::new(cfg);
        let a = sel.add(t0);
        sel.on_handshake(a, t0);
        for i in 0..20 {
            let now = t0 + millis(i);
            for id in sel.due_probes(now) {
                let s = sel.probe_sent(id, now);
                sel.on_probe_answer(id, s, now + millis(3));
            }
            sel.tick(now);
        }
        assert_eq!(sel.rtt(a), Some(millis(3)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add,
        Retire(usize),
        Handshake(usize),
        Probe(usize),
        Answer(usize, u16),
        /// Answers the last probe sent to that broker.
        AnswerLast(usize),
        Tick,
        Advance(u16),
        Rewind(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        let id = 0usize..6;
        prop_oneof![
            2 => Just(Op::Add),
            1 => id.clone().prop_map(Op::Retire),
            3 => id.clone().prop_map(Op::Handshake),
            4 => id.clone().prop_map(Op::Probe),
            1 => (id.clone(), any::<u16>()).prop_map(|(i, s)| Op::Answer(i, s)),
            4 => id.prop_map(Op::AnswerLast),
            5 => Just(Op::Tick),
            5 => (0u16..3000).prop_map(Op::Advance),
            1 => (0u16..500).prop_map(Op::Rewind),
        ]
    }

    proptest! {
        #[test]
        fn random_events_keep_invariants(ops in prop::collection::vec(op(), 0..300)) {
            let base = Instant::now();
            let mut offset_ms: u64 = 0;
            let mut sel = Selector::new(SelectorConfig::default());
            let mut last_seq = std::collections::HashMap::new();
            for op in ops {
                let now = base + millis(offset_ms);
                match op {
                    Op::Add => { sel.add(now); }
                    Op::Retire(id) => {
                        let was_active = sel.active() == Some(id);
                        let s = sel.retire(id, now);
                        prop_assert_eq!(s.is_some(), was_active);
                    }
                    Op::Handshake(id) => sel.on_handshake(id, now),
                    Op::Probe(id) => { last_seq.insert(id, sel.probe_sent(id, now)); }
                    Op::Answer(id, seq) => { sel.on_probe_answer(id, seq, now); }
                    Op::AnswerLast(id) => {
                        if let Some(&seq) = last_seq.get(&id) {
                            sel.on_probe_answer(id, seq, now);
                        }
                    }
                    Op::Tick => {
                        let before = sel.active();
                        let s = sel.tick(now);
                        prop_assert_eq!(s.map(|s| s.from), s.map(|_| before));
                        prop_assert_eq!(s.map(|s| s.to).unwrap_or(before), sel.active());
                        let measured_up = (0..sel.len())
                            .any(|i| sel.state(i) == Some(Liveness::Up) && sel.rtt(i).is_some());
                        prop_assert!(!measured_up || sel.active().is_some(), "a measured broker is up but none is active");
                    }
                    Op::Advance(ms) => offset_ms += u64::from(ms),
                    Op::Rewind(ms) => offset_ms = offset_ms.saturating_sub(u64::from(ms)),
                }
                // Ticks mark brokers down and switch at once; retire switches at once: the active
                // broker is always up.
                if let Some(a) = sel.active() {
                    prop_assert_eq!(sel.state(a), Some(Liveness::Up));
                }
                for id in sel.due_probes(now) {
                    prop_assert!(matches!(sel.state(id), Some(Liveness::Up | Liveness::Down)));
                }
                let snap = sel.snapshot(now);
                prop_assert_eq!(snap.iter().filter(|s| s.active).count(), usize::from(sel.active().is_some()));
            }
        }

        #[test]
        fn near_equal_brokers_switch_at_most_once(
            base_ms in 5u64..200,
            offset_ms in 0u64..6,
            jitters in prop::collection::vec(0u64..3, 1..50),
            b_joins_after_ms in 0u64..5000,
            steps in prop::collection::vec(1u64..300, 50..400),
        ) {
            // All samples of both brokers lie within 5 + 2 ms < switch_margin.
            let start = Instant::now();
            let mut sel = Selector::new(SelectorConfig::default());
            let rtts = [millis(base_ms), millis(base_ms + offset_ms)];
            let a = sel.add(start);
            sel.on_handshake(a, start);
            let mut b_joined = false;
            let mut inflight: Vec<(Instant, BrokerId, u16)> = Vec::new();
            let mut switches = 0;
            let mut now = start;
            let mut n = 0usize;
            for step in steps {
                now += millis(step);
                inflight.sort();
                let due = inflight.partition_point(|&(at, _, _)| at <= now);
                for (at, id, seq) in inflight.drain(..due) {
                    prop_assert!(sel.on_probe_answer(id, seq, at));
                    switches += usize::from(sel.tick(at).is_some());
                }
                if !b_joined && now >= start + millis(b_joins_after_ms) {
                    let b = sel.add(now);
                    sel.on_handshake(b, now);
                    b_joined = true;
                }
                switches += usize::from(sel.tick(now).is_some());
                for id in sel.due_probes(now) {
                    let seq = sel.probe_sent(id, now);
                    n += 1;
                    inflight.push((now + rtts[id] + millis(jitters[n % jitters.len()]), id, seq));
                }
            }
            prop_assert!(switches <= 1, "{} switches", switches);
            for id in 0..sel.len() {
                prop_assert_eq!(sel.state(id), Some(Liveness::Up));
            }
        }
    }
}
