//! Named timers for the sans-IO cores: each core lists its timers in an enum; `poll_timeout`
//! is the earliest deadline, `handle_timeout(now)` runs the ones due.

use std::marker::PhantomData;
use std::time::Instant;

/// An enum of timer names; `index` is its position in `ALL`.
pub trait TimerName: Copy + Eq + std::fmt::Debug + 'static {
    const ALL: &'static [Self];
    fn index(self) -> usize;
}

/// One deadline per timer name (`N` = the number of names).
#[derive(Debug, Clone)]
pub struct Timers<T: TimerName, const N: usize> {
    at: [Option<Instant>; N],
    _names: PhantomData<T>,
}

impl<T: TimerName, const N: usize> Default for Timers<T, N> {
    fn default() -> Self {
        Timers {
            at: [None; N],
            _names: PhantomData,
        }
    }
}

impl<T: TimerName, const N: usize> Timers<T, N> {
    pub fn set(&mut self, t: T, at: Instant) {
        self.at[t.index()] = Some(at);
    }

    /// Sets `t` to `at` unless it is already due earlier.
    pub fn set_earliest(&mut self, t: T, at: Instant) {
        let slot = &mut self.at[t.index()];
        if slot.is_none_or(|cur| at < cur) {
            *slot = Some(at);
        }
    }

    pub fn stop(&mut self, t: T) {
        self.at[t.index()] = None;
    }

    pub fn get(&self, t: T) -> Option<Instant> {
        self.at[t.index()]
    }

    /// The earliest deadline of all.
    pub fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }

    /// Takes the timers due at `now` (they stop; the core sets them again as it needs).
    pub fn take_due(&mut self, now: Instant) -> Vec<T> {
        let mut due = Vec::new();
        for &t in T::ALL {
            if self.at[t.index()].is_some_and(|at| at <= now) {
                self.at[t.index()] = None;
                due.push(t);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum T {
        A,
        B,
    }
    impl TimerName for T {
        const ALL: &'static [T] = &[T::A, T::B];
        fn index(self) -> usize {
            self as usize
        }
    }

    #[test]
    fn earliest_first_and_due_ones_fire_once() {
        let now = Instant::now();
        let mut t: Timers<T, 2> = Timers::default();
        assert_eq!(t.next(), None);
        t.set(T::A, now + Duration::from_secs(2));
        t.set(T::B, now + Duration::from_secs(1));
        assert_eq!(t.next(), Some(now + Duration::from_secs(1)));
        t.set_earliest(T::A, now + Duration::from_secs(3));
        assert_eq!(t.get(T::A), Some(now + Duration::from_secs(2)));
        assert_eq!(t.take_due(now + Duration::from_secs(1)), vec![T::B]);
        assert_eq!(t.take_due(now + Duration::from_secs(1)), vec![]);
        assert_eq!(t.take_due(now + Duration::from_secs(5)), vec![T::A]);
        assert_eq!(t.next(), None);
    }
}
