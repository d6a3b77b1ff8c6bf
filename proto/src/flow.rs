//! The flow table: one cached authorization decision per 5-tuple, expired when idle; and
//! the traffic meter each flow record is made from.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use crate::packet::{FlowKey, PROTO_TCP, PROTO_UDP};

/// Idle limits per kind of flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeouts {
    pub tcp: Duration,
    pub udp: Duration,
    pub other: Duration,
    /// Denied flows are kept only to answer retries without re-evaluating and re-logging.
    pub denied: Duration,
    /// Flows that ended (TCP reset, or FIN both ways) linger this long for late segments.
    pub closed: Duration,
}

impl Default for IdleTimeouts {
    fn default() -> Self {
        IdleTimeouts {
            tcp: Duration::from_secs(3600),
            udp: Duration::from_secs(120),
            other: Duration::from_secs(30),
            denied: Duration::from_secs(30),
            closed: Duration::from_secs(10),
        }
    }
}

impl IdleTimeouts {
    fn limit<V: FlowEntry>(&self, key: &FlowKey, entry: &V) -> Duration {
        if !entry.allowed() {
            return self.denied;
        }
        if entry.closed() {
            return self.closed;
        }
        match key.proto {
            PROTO_TCP => self.tcp,
            PROTO_UDP => self.udp,
            _ => self.other,
        }
    }
}

/// The end of a TCP flow as its segments show it: a FIN each way, or a reset. Other protocols
/// never end this way (they go idle).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpEnd(u8);

impl TcpEnd {
    const FIN_CLIENT: u8 = 1;
    const FIN_SERVER: u8 = 2;
    const RESET: u8 = 4;

    /// What the IP packet `pkt` (from the flow's client when `from_client`) says of the end.
    pub fn of(pkt: &[u8], from_client: bool) -> TcpEnd {
        match crate::packet::tcp_flags(pkt) {
            Some(f) if f & crate::packet::TCP_RST != 0 => TcpEnd(Self::RESET),
            Some(f) if f & crate::packet::TCP_FIN != 0 => TcpEnd(if from_client {
                Self::FIN_CLIENT
            } else {
                Self::FIN_SERVER
            }),
            _ => TcpEnd(0),
        }
    }

    /// Adds what a later (or earlier) segment said.
    pub fn merge(&mut self, other: TcpEnd) {
        self.0 |= other.0;
    }

    /// Reset, or closed from both sides.
    pub fn ended(self) -> bool {
        self.0 & Self::RESET != 0
            || self.0 & (Self::FIN_CLIENT | Self::FIN_SERVER) == Self::FIN_CLIENT | Self::FIN_SERVER
    }
}

/// What the table needs to know of a cached entry.
pub trait FlowEntry {
    fn allowed(&self) -> bool;
    /// Who opened the flow (a peer); each owner may hold at most `per_owner` flows.
    fn owner(&self) -> u32;
    /// The flow has ended (a TCP reset, or FIN both ways): it expires after `closed`.
    fn closed(&self) -> bool {
        false
    }
    /// An entry that goes (idle, or removed by `retain`) is kept for
    /// [`FlowTable::take_retired`] (its flow record is due).
    fn reports(&self) -> bool {
        false
    }
}

/// Bytes and packets of a flow each way: `out` from the device that opened it towards the
/// destination, `in` back to the device (OCSF's `traffic` with the device as source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

impl Traffic {
    /// `packets` packets of `bytes` bytes in all, one way.
    pub fn add(&mut self, outbound: bool, packets: u64, bytes: u64) {
        if outbound {
            self.packets_out += packets;
            self.bytes_out += bytes;
        } else {
            self.packets_in += packets;
            self.bytes_in += bytes;
        }
    }

    /// One packet of `bytes` bytes.
    pub fn count(&mut self, outbound: bool, bytes: usize) {
        self.add(outbound, 1, bytes as u64);
    }
}

/// How long flows run between two records of their progress.
pub const FLOW_REPORT_EVERY: Duration = Duration::from_secs(60);

/// A flow's traffic since it began and when it was last reported.
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    pub traffic: Traffic,
    pub started: Instant,
    /// Wall-clock start, Unix milliseconds.
    pub started_ms: u64,
    pub reported: Instant,
    /// The final record went already (at the TCP end): no other at expiry.
    pub final_sent: bool,
}

impl Meter {
    pub fn new(now: Instant, unix_ms: u64) -> Meter {
        Meter {
            traffic: Traffic::default(),
            started: now,
            started_ms: unix_ms,
            reported: now,
            final_sent: false,
        }
    }

    /// The final record when TCP just ended (FIN both ways, or a reset), once: SIEMs get it at
    /// the end, not after the linger for late segments.
    pub fn final_at_tcp_end(
        &mut self,
        key: FlowKey,
        was_ended: bool,
        ended: bool,
        now: Instant,
    ) -> Option<FlowReport> {
        if was_ended || !ended || self.final_sent {
            return None;
        }
        self.final_sent = true;
        Some(self.report(key, now, FlowEnd::Closed))
    }

    /// A record of this flow, last seen at `last_seen`: final when it `ended`.
    pub fn report(&self, key: FlowKey, last_seen: Instant, end: FlowEnd) -> FlowReport {
        let duration_ms = last_seen
            .saturating_duration_since(self.started)
            .as_millis() as u64;
        FlowReport {
            key,
            traffic: self.traffic,
            start_ms: self.started_ms,
            end_ms: self.started_ms + duration_ms,
            duration_ms,
            end,
        }
    }
}

/// Why a flow record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowEnd {
    /// Still running: a progress record (every [`FLOW_REPORT_EVERY`]).
    Ongoing,
    /// Went idle.
    Idle,
    /// TCP ended (FIN both ways or a reset).
    Closed,
    /// Cut: the device, its user or the policy changed, or its connector went away for good.
    Cut,
    /// The process stopped.
    Shutdown,
    /// Flows of one device to one application summed over a period, without destinations
    /// (`[risk] aggregate_below`).
    Aggregate,
}

/// One flow record: its 5-tuple as the device sent it, its traffic, when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowReport {
    pub key: FlowKey,
    pub traffic: Traffic,
    pub start_ms: u64,
    pub end_ms: u64,
    pub duration_ms: u64,
    pub end: FlowEnd,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    last_seen: Instant,
    /// The second (since the table's origin) its expiry check is scheduled for in the wheel.
    check_at: u64,
}

/// Seconds the expiry wheel spans; a later check is scheduled at the wheel's far end and
/// pushed on from there.
const WHEEL_SECONDS: u64 = 4096;

/// Flows keyed by their client-side 5-tuple, with a cap on their number in all and per owner,
/// so that one misbehaving client cannot fill the table for everyone.
///
/// Expiry costs nothing per packet and never scans the table: every flow has one entry in a
/// wheel of one-second slots, at the second it could go idle; when that second comes, the
/// flow either went idle (removed) or was seen since (scheduled again for its new deadline).
/// A table at its cap refuses a new flow after looking only at what is due now.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<FlowKey, Slot<V>>,
    timeouts: IdleTimeouts,
    capacity: usize,
    per_owner: usize,
    owned: HashMap<u32, usize>,
    wheel: Vec<Vec<(FlowKey, u64)>>,
    /// The time second 0 of the wheel stands for (the first time the table saw).
    origin: Option<Instant>,
    /// The next second of the wheel to look at.
    cursor: u64,
    /// Entries that went and report (see [`FlowEntry::reports`]), with when they were last
    /// seen and whether they ended (else idle or cut).
    retired: Vec<(FlowKey, V, Instant, FlowEnd)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableFull {
    #[error("flow table is full")]
    Total,
    #[error("this peer has too many flows")]
    Owner,
}

fn release(owned: &mut HashMap<u32, usize>, owner: u32) {
    if let Some(n) = owned.get_mut(&owner) {
        *n -= 1;
        if *n == 0 {
            owned.remove(&owner);
        }
    }
}

impl<V: FlowEntry> FlowTable<V> {
    pub fn new(timeouts: IdleTimeouts, capacity: usize, per_owner: usize) -> Self {
        FlowTable {
            flows: HashMap::new(),
            timeouts,
            capacity,
            per_owner,
            owned: HashMap::new(),
            wheel: (0..WHEEL_SECONDS).map(|_| Vec::new()).collect(),
            origin: None,
            cursor: 0,
            retired: Vec::new(),
        }
    }

    /// The entries that went since the last call (idle, or cut by `retain`), for their records.
    pub fn take_retired(&mut self) -> Vec<(FlowKey, V, Instant, FlowEnd)> {
        std::mem::take(&mut self.retired)
    }

    fn retire(&mut self, key: FlowKey, value: V, last_seen: Instant) {
        if value.reports() {
            let end = if value.closed() {
                FlowEnd::Closed
            } else {
                FlowEnd::Idle
            };
            self.retired.push((key, value, last_seen, end));
        }
    }

    /// `t` as whole seconds since the origin (rounded up: a check is never early). The
    /// origin is the first `now` the table is given.
    fn second(&self, t: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return 0;
        };
        let d = t.saturating_duration_since(origin);
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }

    /// Files the check of `key` at the second `at` (at most the wheel's span ahead).
    fn schedule(&mut self, key: FlowKey, at: u64) -> u64 {
        let at = at.clamp(self.cursor, self.cursor + WHEEL_SECONDS - 1);
        self.wheel[(at % WHEEL_SECONDS) as usize].push((key, at));
        at
    }

    /// Flows currently held by `owner`.
    pub fn owned_by(&self, owner: u32) -> usize {
        self.owned.get(&owner).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The live entry for `key`, marked as seen at `now`. An entry past its idle limit is gone.
    pub fn touch(&mut self, key: &FlowKey, now: Instant) -> Option<&mut V> {
        let timeouts = self.timeouts;
        let expired = match self.flows.get(key) {
            None => return None,
            Some(s) => now.saturating_duration_since(s.last_seen) > timeouts.limit(key, &s.value),
        };
        if expired {
            if let Some(s) = self.flows.remove(key) {
                release(&mut self.owned, s.value.owner());
                self.retire(*key, s.value, s.last_seen);
            }
            return None;
        }
        let slot = self.flows.get_mut(key)?;
        slot.last_seen = now;
        Some(&mut slot.value)
    }

    /// Like [`FlowTable::touch`], then runs `update` on the entry; when that shortened its idle
    /// limit (a TCP flow that ended), its expiry check moves earlier.
    pub fn touch_with<R>(
        &mut self,
        key: &FlowKey,
        now: Instant,
        update: impl FnOnce(&mut V) -> R,
    ) -> Option<R> {
        self.origin.get_or_insert(now);
        let timeouts = self.timeouts;
        let before = timeouts.limit(key, self.touch(key, now)?);
        let slot = self.flows.get_mut(key)?;
        let out = update(&mut slot.value);
        let after = timeouts.limit(key, &slot.value);
        if after < before {
            let due = self.second(now + after);
            if due < self.flows.get(key).map_or(u64::MAX, |s| s.check_at) {
                let at = self.schedule(*key, due);
                if let Some(s) = self.flows.get_mut(key) {
                    s.check_at = at;
                }
            }
        }
        Some(out)
    }

    /// The entry of `key` may have a shorter idle limit now (it ended, or was denied): its
    /// expiry check moves earlier if so.
    pub fn reschedule(&mut self, key: &FlowKey) {
        let Some(slot) = self.flows.get(key) else {
            return;
        };
        let due = self.second(slot.last_seen + self.timeouts.limit(key, &slot.value));
        if due < slot.check_at {
            let at = self.schedule(*key, due);
            if let Some(s) = self.flows.get_mut(key) {
                s.check_at = at;
            }
        }
    }

    /// Inserts or replaces the entry for `key`. At a cap, only what is due to expire now is
    /// looked at before the answer.
    pub fn insert(&mut self, key: FlowKey, value: V, now: Instant) -> Result<&mut V, TableFull> {
        self.origin.get_or_insert(now);
        let owner = value.owner();
        let same_owner = self
            .flows
            .get(&key)
            .is_some_and(|s| s.value.owner() == owner);
        if !same_owner && self.full(&key, owner).is_some() {
            self.expire(now);
            if let Some(e) = self.full(&key, owner) {
                return Err(e);
            }
        }
        let check_at = match self.flows.get(&key) {
            Some(old) => old.check_at,
            None => {
                let limit = self.timeouts.limit(&key, &value);
                let due = self.second(now + limit);
                self.schedule(key, due)
            }
        };
        let slot = Slot {
            value,
            last_seen: now,
            check_at,
        };
        let owned = &mut self.owned;
        let slot = match self.flows.entry(key) {
            Entry::Occupied(mut o) => {
                let old = std::mem::replace(o.get_mut(), slot);
                if old.value.owner() != owner {
                    release(owned, old.value.owner());
                    *owned.entry(owner).or_insert(0) += 1;
                }
                o.into_mut()
            }
            Entry::Vacant(v) => {
                *owned.entry(owner).or_insert(0) += 1;
                v.insert(slot)
            }
        };
        Ok(&mut slot.value)
    }

    /// Whether a new entry for `key` of `owner` would fit now (after expiring what is due): a
    /// constant-time answer, so a device at its cap costs no decision at all.
    pub fn room_for(&mut self, key: &FlowKey, owner: u32, now: Instant) -> Result<(), TableFull> {
        if self.full(key, owner).is_some() {
            self.expire(now);
        }
        match self.full(key, owner) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn full(&self, key: &FlowKey, owner: u32) -> Option<TableFull> {
        if self.flows.len() >= self.capacity && !self.flows.contains_key(key) {
            Some(TableFull::Total)
        } else if self.owned_by(owner) >= self.per_owner {
            Some(TableFull::Owner)
        } else {
            None
        }
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<V> {
        let slot = self.flows.remove(key)?;
        release(&mut self.owned, slot.value.owner());
        Some(slot.value)
    }

    /// Every entry with the time it was last seen.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &V, Instant)> {
        self.flows.iter().map(|(k, s)| (k, &s.value, s.last_seen))
    }

    /// Drops the flows that went idle by `now`, looking only at the wheel's seconds up to
    /// `now`; returns how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let origin = *self.origin.get_or_insert(now);
        let until = self.second(now);
        // `until` is rounded up: when `now` is inside that second, its slot is looked at but
        // not left behind (what is not due yet stays there for the next call).
        let partial = now.saturating_duration_since(origin).subsec_nanos() > 0;
        let timeouts = self.timeouts;
        let mut gone = 0;
        while self.cursor <= until {
            let i = (self.cursor % WHEEL_SECONDS) as usize;
            let due = std::mem::take(&mut self.wheel[i]);
            let mut later = Vec::new();
            for (key, at) in due {
                if at > self.cursor {
                    later.push((key, at)); // a lap further on
                    continue;
                }
                let Some(slot) = self.flows.get(&key) else {
                    continue; // removed meanwhile
                };
                if slot.check_at != at {
                    continue; // replaced and scheduled again
                }
                let deadline = slot.last_seen + timeouts.limit(&key, &slot.value);
                if deadline <= now {
                    if let Some(s) = self.flows.remove(&key) {
                        release(&mut self.owned, s.value.owner());
                        self.retire(key, s.value, s.last_seen);
                        gone += 1;
                    }
                } else {
                    let next = self.second(deadline).max(self.cursor);
                    if next == self.cursor {
                        // Due later in this very second: stays in its slot.
                        later.push((key, at));
                        continue;
                    }
                    let next = self.schedule(key, next);
                    if let Some(s) = self.flows.get_mut(&key) {
                        s.check_at = next;
                    }
                }
            }
            // Entries of a later lap (or later in this second) stay; the slot keeps its
            // memory for the next second.
            let slot = &mut self.wheel[i];
            slot.extend(later);
            if self.cursor == until && partial {
                break;
            }
            self.cursor += 1;
        }
        gone
    }

    /// Keeps the flows for which `keep(key, value, last_seen)` is true; returns how many went.
    /// (A whole pass: for policy changes and closed links, not for routine expiry.) What goes
    /// is retired as cut.
    pub fn retain(&mut self, mut keep: impl FnMut(&FlowKey, &mut V, Instant) -> bool) -> usize {
        let gone: Vec<(FlowKey, Slot<V>)> = self
            .flows
            .extract_if(|k, s| !keep(k, &mut s.value, s.last_seen))
            .collect();
        let n = gone.len();
        for (k, s) in gone {
            release(&mut self.owned, s.value.owner());
            if s.value.reports() {
                self.retired.push((k, s.value, s.last_seen, FlowEnd::Cut));
            }
        }
        n
    }

    /// Every entry, mutable, with when it was last seen (progress records).
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&FlowKey, &mut V, Instant)) {
        for (k, s) in self.flows.iter_mut() {
            f(k, &mut s.value, s.last_seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::PROTO_UDP;
    use std::net::IpAddr;

    struct E(bool, u32);
    impl FlowEntry for E {
        fn allowed(&self) -> bool {
            self.0
        }
        fn owner(&self) -> u32 {
            self.1
        }
    }

    /// An allowed TCP flow that may have ended.
    struct C(bool);
    impl FlowEntry for C {
        fn allowed(&self) -> bool {
            true
        }
        fn owner(&self) -> u32 {
            0
        }
        fn closed(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn tcp_ends_with_a_fin_each_way_or_a_reset() {
        use crate::packet::testpkt::tcp4;
        let (c, a) = ([100, 118, 0, 2], [10, 20, 0, 10]);
        let mut end = TcpEnd::of(&tcp4(c, 1000, a, 80, 0x11, 1), true);
        assert!(!end.ended(), "FIN from the client only");
        end.merge(TcpEnd::of(&tcp4(c, 1000, a, 80, 0x11, 2), true));
        assert!(!end.ended(), "the same side twice");
        end.merge(TcpEnd::of(&tcp4(a, 80, c, 1000, 0x11, 9), false));
        assert!(end.ended());
        assert!(TcpEnd::of(&tcp4(a, 80, c, 1000, 0x04, 9), false).ended());
        assert!(!TcpEnd::of(&tcp4(c, 1000, a, 80, 0x02, 1), true).ended());
    }

    #[test]
    fn ended_flows_go_after_the_closed_limit() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IdleTimeouts::default(), 10, 10);
        t.insert(key(1, PROTO_TCP), C(false), t0).unwrap();
        t.insert(key(2, PROTO_TCP), C(true), t0).unwrap();
        assert_eq!(t.iter().count(), 2);
        assert_eq!(t.expire(t0 + Duration::from_secs(11)), 1);
        assert!(
            t.touch(&key(1, PROTO_TCP), t0 + Duration::from_secs(11))
                .is_some()
        );
        assert!(
            t.touch(&key(2, PROTO_TCP), t0 + Duration::from_secs(11))
                .is_none()
        );
    }

    #[test]
    fn a_flow_that_ends_goes_after_the_closed_limit_not_its_idle_one() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IdleTimeouts::default(), 10, 10);
        t.insert(key(1, PROTO_TCP), C(false), t0).unwrap();
        t.touch_with(&key(1, PROTO_TCP), t0 + Duration::from_secs(1), |c| {
            c.0 = true
        })
        .unwrap();
        assert_eq!(t.expire(t0 + Duration::from_secs(5)), 0);
        assert_eq!(
            t.expire(t0 + Duration::from_secs(12)),
            1,
            "closed limit is 10 s"
        );
        assert_eq!(t.len(), 0);
    }

    proptest::proptest! {
        /// Expiry by the wheel removes exactly what a full scan would, at any time.
        #[test]
        fn the_wheel_expires_what_a_scan_would(
            ops in proptest::collection::vec((0u8..4, 0u16..40, 0u64..5000), 1..200)
        ) {
            let t0 = Instant::now();
            let timeouts = IdleTimeouts {
                tcp: Duration::from_secs(3600),
                udp: Duration::from_secs(120),
                other: Duration::from_secs(30),
                denied: Duration::from_secs(30),
                closed: Duration::from_secs(10),
            };
            let mut t = FlowTable::new(timeouts, 1000, 1000);
            // The model: key -> (last seen, closed).
            let mut model: HashMap<FlowKey, (Instant, bool)> = HashMap::new();
            let limit = |k: &FlowKey, closed: bool| timeouts.limit(k, &C(closed));
            let mut now = t0;
            for (op, port, ms) in ops {
                now += Duration::from_millis(ms * 7);
                let k = key(port, if port % 2 == 0 { PROTO_TCP } else { PROTO_UDP });
                let live = |m: &HashMap<FlowKey, (Instant, bool)>| {
                    m.get(&k).is_some_and(|&(seen, c)| now.saturating_duration_since(seen) <= limit(&k, c))
                };
                match op {
                    0 => {
                        let _ = t.insert(k, C(false), now);
                        model.insert(k, (now, false));
                    }
                    1 | 2 => {
                        let was = live(&model);
                        let got = if op == 1 {
                            t.touch(&k, now).is_some()
                        } else {
                            t.touch_with(&k, now, |c| c.0 = true).is_some()
                        };
                        proptest::prop_assert_eq!(got, was, "touch of {:?}", k);
                        if was {
                            let closed = model[&k].1 || op == 2;
                            model.insert(k, (now, closed));
                        } else {
                            model.remove(&k);
                        }
                    }
                    _ => {
                        t.expire(now);
                        model.retain(|k, &mut (seen, c)| seen + limit(k, c) > now);
                        let mut keys: Vec<FlowKey> = t.iter().map(|(k, _, _)| *k).collect();
                        let mut want: Vec<FlowKey> = model.keys().copied().collect();
                        keys.sort_by_key(|k| k.sport);
                        want.sort_by_key(|k| k.sport);
                        proptest::prop_assert_eq!(keys, want);
                    }
                }
            }
        }
    }

    fn key(sport: u16, proto: u8) -> FlowKey {
        FlowKey {
            proto,
            src: IpAddr::from([100, 118, 0, 2]),
            dst: IpAddr::from([10, 20, 0, 10]),
            sport,
            dport: 53,
        }
    }

    #[test]
    fn idle_expiry_per_kind() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IdleTimeouts::default(), 10, 10);
        t.insert(key(1, PROTO_UDP), E(true, 0), t0).unwrap();
        t.insert(key(2, PROTO_TCP), E(true, 0), t0).unwrap();
        t.insert(key(3, PROTO_TCP), E(false, 0), t0).unwrap();
        // Traffic keeps a flow alive.
        assert!(
            t.touch(&key(1, PROTO_UDP), t0 + Duration::from_secs(100))
                .is_some()
        );
        assert!(
            t.touch(&key(1, PROTO_UDP), t0 + Duration::from_secs(200))
                .is_some()
        );
        // A denied entry goes after 30 s, an allowed TCP one stays.
        assert!(
            t.touch(&key(3, PROTO_TCP), t0 + Duration::from_secs(31))
                .is_none()
        );
        assert_eq!(t.expire(t0 + Duration::from_secs(400)), 1);
        assert!(
            t.touch(&key(2, PROTO_TCP), t0 + Duration::from_secs(400))
                .is_some()
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn capacity_is_enforced_after_expiring() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IdleTimeouts::default(), 2, 2);
        t.insert(key(1, PROTO_UDP), E(true, 0), t0).unwrap();
        t.insert(key(2, PROTO_UDP), E(true, 0), t0).unwrap();
        assert_eq!(
            t.insert(key(3, PROTO_UDP), E(true, 0), t0).err(),
            Some(TableFull::Total)
        );
        // Once the old ones are idle long enough, room is made.
        assert!(
            t.insert(key(3, PROTO_UDP), E(true, 0), t0 + Duration::from_secs(121))
                .is_ok()
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn one_owner_cannot_take_the_whole_table() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IdleTimeouts::default(), 100, 3);
        for p in 0..3 {
            t.insert(key(p, PROTO_UDP), E(true, 7), t0).unwrap();
        }
        assert_eq!(
            t.insert(key(9, PROTO_UDP), E(true, 7), t0).err(),
            Some(TableFull::Owner)
        );
        // Another owner is unaffected; replacing an own entry is not a new flow.
        t.insert(key(10, PROTO_UDP), E(true, 8), t0).unwrap();
        t.insert(key(0, PROTO_UDP), E(false, 7), t0).unwrap();
        assert_eq!((t.owned_by(7), t.owned_by(8)), (3, 1));
        // Counts follow removal and expiry.
        t.remove(&key(1, PROTO_UDP));
        assert_eq!(t.owned_by(7), 2);
        assert_eq!(t.expire(t0 + Duration::from_secs(200)), 3);
        assert_eq!((t.owned_by(7), t.owned_by(8), t.len()), (0, 0, 0));
    }
}
