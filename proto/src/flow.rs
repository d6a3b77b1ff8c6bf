//! The flow table: one cached authorization decision per 5-tuple, expired when idle.

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
}

impl Default for IdleTimeouts {
    fn default() -> Self {
        IdleTimeouts {
            tcp: Duration::from_secs(3600),
            udp: Duration::from_secs(120),
            other: Duration::from_secs(30),
            denied: Duration::from_secs(30),
        }
    }
}

impl IdleTimeouts {
    fn limit(&self, key: &FlowKey, allowed: bool) -> Duration {
        if !allowed {
            return self.denied;
        }
        match key.proto {
            PROTO_TCP => self.tcp,
            PROTO_UDP => self.udp,
            _ => self.other,
        }
    }
}

/// What the table needs to know of a cached entry.
pub trait FlowEntry {
    fn allowed(&self) -> bool;
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    last_seen: Instant,
}

/// Flows keyed by their client-side 5-tuple, with a cap on their number.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<FlowKey, Slot<V>>,
    timeouts: IdleTimeouts,
    capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow table is full")]
pub struct TableFull;

impl<V: FlowEntry> FlowTable<V> {
    pub fn new(timeouts: IdleTimeouts, capacity: usize) -> Self {
        FlowTable {
            flows: HashMap::new(),
            timeouts,
            capacity,
        }
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
            Some(s) => {
                now.saturating_duration_since(s.last_seen) > timeouts.limit(key, s.value.allowed())
            }
        };
        if expired {
            self.flows.remove(key);
            return None;
        }
        let slot = self.flows.get_mut(key)?;
        slot.last_seen = now;
        Some(&mut slot.value)
    }

    /// Inserts or replaces the entry for `key`.
    pub fn insert(&mut self, key: FlowKey, value: V, now: Instant) -> Result<&mut V, TableFull> {
        if self.flows.len() >= self.capacity && !self.flows.contains_key(&key) {
            self.expire(now);
            if self.flows.len() >= self.capacity {
                return Err(TableFull);
            }
        }
        let slot = Slot {
            value,
            last_seen: now,
        };
        let slot = match self.flows.entry(key) {
            Entry::Occupied(mut o) => {
                *o.get_mut() = slot;
                o.into_mut()
            }
            Entry::Vacant(v) => v.insert(slot),
        };
        Ok(&mut slot.value)
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<V> {
        self.flows.remove(key).map(|s| s.value)
    }

    /// Drops idle flows; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.flows.len();
        let t = self.timeouts;
        self.flows.retain(|k, s| {
            now.saturating_duration_since(s.last_seen) <= t.limit(k, s.value.allowed())
        });
        before - self.flows.len()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&FlowKey, &mut V)> {
        self.flows.iter_mut().map(|(k, s)| (k, &mut s.value))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&FlowKey, &mut V) -> bool) {
        self.flows.retain(|k, s| keep(k, &mut s.value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::PROTO_UDP;
    use std::net::IpAddr;

    struct E(bool);
    impl FlowEntry for E {
        fn allowed(&self) -> bool {
            self.0
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
        let mut t = FlowTable::new(IdleTimeouts::default(), 10);
        t.insert(key(1, PROTO_UDP), E(true), t0).unwrap();
        t.insert(key(2, PROTO_TCP), E(true), t0).unwrap();
        t.insert(key(3, PROTO_TCP), E(false), t0).unwrap();
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
        let mut t = FlowTable::new(IdleTimeouts::default(), 2);
        t.insert(key(1, PROTO_UDP), E(true), t0).unwrap();
        t.insert(key(2, PROTO_UDP), E(true), t0).unwrap();
        assert_eq!(
            t.insert(key(3, PROTO_UDP), E(true), t0).err(),
            Some(TableFull)
        );
        // Once the old ones are idle long enough, room is made.
        assert!(
            t.insert(key(3, PROTO_UDP), E(true), t0 + Duration::from_secs(121))
                .is_ok()
        );
        assert_eq!(t.len(), 1);
    }
}
