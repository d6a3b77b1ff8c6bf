//! Token buckets, alone and per key (source address, device), with time as an argument.
//!
//! [`Buckets`] keeps at most a fixed number of keys: when full, a new key takes the place of
//! the bucket that has been full (idle) longest, or, if none is, is refused like an empty
//! bucket. Memory stays bounded whatever a flood of distinct keys does, and an idle key costs
//! nothing after it refilled.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Rate and burst of a bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held (the burst allowed after idling).
    pub burst: f64,
}

impl Rate {
    pub const fn new(per_second: f64, burst: f64) -> Rate {
        Rate { per_second, burst }
    }

    /// Time for a bucket to fill from empty.
    pub fn fill_time(&self) -> Duration {
        if self.per_second <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(self.burst / self.per_second)
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now` (its key has been idle long enough to forget).
    pub fn full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.tokens >= rate.burst
    }
}

/// A bucket per key, at most `capacity` keys.
#[derive(Debug, Clone)]
pub struct Buckets<K> {
    rate: Rate,
    capacity: usize,
    map: HashMap<K, Bucket>,
    /// When idle keys were last looked for (at most every [`SWEEP_EVERY`], so that a flood of
    /// new keys costs no scan per packet).
    swept: Option<Instant>,
}

/// The least time between two looks for idle keys when the table is full.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: Rate, capacity: usize) -> Buckets<K> {
        Buckets {
            rate,
            capacity: capacity.max(1),
            map: HashMap::new(),
            swept: None,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token from `key`'s bucket; false when it is empty (or when every slot is held
    /// by a busy key).
    pub fn take(&mut self, key: &K, now: Instant) -> bool {
        let rate = self.rate;
        if let Some(b) = self.map.get_mut(key) {
            return b.take(rate, now);
        }
        if self.map.len() >= self.capacity {
            if self
                .swept
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY)
            {
                self.swept = Some(now);
                self.forget_idle(now);
            }
            if self.map.len() >= self.capacity {
                return false;
            }
        }
        let mut b = Bucket::new(rate, now);
        let ok = b.take(rate, now);
        self.map.insert(key.clone(), b);
        ok
    }

    /// Drops the buckets that are full again (their keys were idle); returns how many.
    pub fn forget_idle(&mut self, now: Instant) -> usize {
        let rate = self.rate;
        let before = self.map.len();
        self.map.retain(|_, b| !b.full(rate, now));
        before - self.map.len()
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate::new(10.0, 5.0);
        let t0 = Instant::now();
        let mut b = Bucket::new(rate, t0);
        assert_eq!((0..20).filter(|_| b.take(rate, t0)).count(), 5);
        // 100 ms later: one more token.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(rate, t1));
        assert!(!b.take(rate, t1));
        // Long idle: back to the burst, never more.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.take(rate, t2)).count(), 5);
        assert_eq!(rate.fill_time(), Duration::from_millis(500));
    }

    #[test]
    fn keys_are_limited_apart_and_memory_stays_bounded() {
        let rate = Rate::new(1.0, 2.0);
        let t0 = Instant::now();
        let mut m: Buckets<u32> = Buckets::new(rate, 3);
        assert!(m.take(&1, t0) && m.take(&1, t0));
        assert!(!m.take(&1, t0), "key 1 is out");
        assert!(m.take(&2, t0), "key 2 has its own");
        assert!(m.take(&3, t0));
        // Full of busy keys: a new key is refused, nothing grows.
        assert!(!m.take(&4, t0));
        assert_eq!(m.len(), 3);
        // Once the others idled back to full, the new key gets a slot.
        let t1 = t0 + Duration::from_secs(5);
        assert!(m.take(&4, t1));
        assert!(m.len() <= 3);
    }

    proptest::proptest! {
        /// Over any window, a key never gets more than burst + rate x window tokens.
        #[test]
        fn never_more_than_burst_plus_rate(steps in proptest::collection::vec(0u64..300, 1..300)) {
            let rate = Rate::new(20.0, 5.0);
            let t0 = Instant::now();
            let mut m: Buckets<u8> = Buckets::new(rate, 4);
            let mut t = t0;
            let mut got = 0u32;
            for ms in &steps {
                t += Duration::from_millis(*ms);
                if m.take(&7, t) {
                    got += 1;
                }
            }
            let window = t.duration_since(t0).as_secs_f64();
            proptest::prop_assert!(f64::from(got) <= 5.0 + 20.0 * window + 1e-6);
        }
    }
}
