//! Name-based applications at the connector: the broker says which host name a synthetic
//! address stands for (per device); the shell resolves the name with the site's DNS and
//! installs a destination-NAT element, so the kernel translates the flow both ways. Packets
//! that arrive before their translation is in place wait here: a packet let through
//! untranslated would pin its connection untranslated in conntrack.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;

/// Packets kept per waiting (device, synthetic address) pair.
pub const QUEUE_PER_KEY: usize = 64;
/// Pairs waiting at once.
const MAX_WAITING: usize = 4096;
/// How long a packet waits for its translation.
pub const WAIT: Duration = Duration::from_secs(5);

/// A device and a synthetic address it uses.
pub type Key = (IpAddr, IpAddr);

/// What to do with a packet from the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it to the site now.
    Forward,
    /// Kept until its translation is installed.
    Queued,
    /// Dropped (queue full).
    Dropped,
}

/// Translations in place and packets waiting for one.
#[derive(Default)]
pub struct Translations {
    app_ranges: Vec<IpNet>,
    installed: HashMap<Key, (String, Ipv4Addr)>,
    /// Per pair: what the device's address-based deny rules forbid at the site.
    denials: HashMap<Key, super::Allowlist>,
    /// What the kernel's translation map holds per pair (it outlives a translation dropped
    /// here until the shell replaces it).
    kernel: HashMap<Key, Ipv4Addr>,
    /// The name the broker wants each pair to stand for now.
    wanted: HashMap<Key, String>,
    /// Pairs whose name the shell is resolving and installing now (one at a time per pair,
    /// so an older resolution can never land after a newer one), with that name.
    in_flight: HashMap<Key, String>,
    waiting: HashMap<Key, (Instant, Vec<Bytes>)>,
    /// Packets dropped: queue full, waited too long, or the name did not resolve.
    pub dropped: u64,
}

impl Translations {
    pub fn set_app_ranges(&mut self, ranges: Vec<IpNet>) {
        self.app_ranges = ranges;
    }

    /// Decides a packet from `src` to `dst`.
    pub fn admit(&mut self, src: IpAddr, dst: IpAddr, pkt: &Bytes, now: Instant) -> Admit {
        if !self.app_ranges.iter().any(|r| r.contains(&dst)) {
            return Admit::Forward;
        }
        let key = (src, dst);
        if self.installed.contains_key(&key) {
            return Admit::Forward;
        }
        if !self.waiting.contains_key(&key) && self.waiting.len() >= MAX_WAITING {
            self.dropped += 1;
            return Admit::Dropped;
        }
        let (_, q) = self.waiting.entry(key).or_insert_with(|| (now, Vec::new()));
        if q.len() >= QUEUE_PER_KEY {
            self.dropped += 1;
            return Admit::Dropped;
        }
        q.push(pkt.clone());
        Admit::Queued
    }

    /// `net` is no synthetic range any more.
    pub fn forget_range(&mut self, net: &IpNet) {
        self.app_ranges.retain(|r| r != net);
    }

    /// Whether `dst` is in a synthetic (name-based application) range.
    pub fn is_synthetic(&self, dst: IpAddr) -> bool {
        self.app_ranges.iter().any(|r| r.contains(&dst))
    }

    /// The address `key` translates to, if its translation is in place.
    pub fn translation(&self, key: &Key) -> Option<Ipv4Addr> {
        self.installed.get(key).map(|(_, a)| *a)
    }

    /// The broker asks that `key` stand for `name`, with these denials. A translation of
    /// `key` to another name is dropped at once, so no packet follows it while the new one is
    /// resolved (they wait instead).
    pub fn mapping(&mut self, key: Key, name: &str, denials: super::Allowlist) {
        if self.installed.get(&key).is_some_and(|(n, _)| n != name) {
            self.installed.remove(&key);
        }
        self.denials.insert(key, denials);
        self.wanted.insert(key, name.to_string());
    }

    /// Whether the shell may start resolving `name` for `key` now (nothing in flight for the
    /// pair); marks it in flight if so.
    pub fn start_resolving(&mut self, key: Key, name: &str) -> bool {
        if self.in_flight.contains_key(&key) {
            return false;
        }
        self.in_flight.insert(key, name.to_string());
        true
    }

    /// A resolution of `name` for `key` came back; `installed_real` is what the shell put into
    /// the kernel (None when it failed). Returns whether `name` is still the wanted one, and
    /// the wanted name to resolve next when it is not.
    pub fn finished(
        &mut self,
        key: Key,
        name: &str,
        installed_real: Option<Ipv4Addr>,
    ) -> (bool, Option<String>) {
        self.in_flight.remove(&key);
        if let Some(real) = installed_real {
            self.kernel.insert(key, real);
        }
        match self.wanted.get(&key) {
            Some(w) if w != name => {
                let next = w.clone();
                self.in_flight.insert(key, next.clone());
                (false, Some(next))
            }
            _ => (true, None),
        }
    }

    /// What the device's deny rules forbid for `key`, if the broker said.
    pub fn denials(&self, key: &Key) -> Option<&super::Allowlist> {
        self.denials.get(key).filter(|d| !d.is_empty())
    }

    /// Whether `key` already translates to a resolution of `name`.
    pub fn has(&self, key: &Key, name: &str) -> bool {
        self.installed.get(key).is_some_and(|(n, _)| n == name)
    }

    /// The address the kernel translates `key` to now, if any (to replace it).
    pub fn previous(&self, key: &Key) -> Option<Ipv4Addr> {
        self.kernel.get(key).copied()
    }

    /// The translation of `key` is in place: returns the packets that waited for it.
    pub fn installed(&mut self, key: Key, name: String, real: Ipv4Addr) -> Vec<Bytes> {
        self.installed.insert(key, (name, real));
        self.kernel.insert(key, real);
        self.waiting
            .remove(&key)
            .map(|(_, q)| q)
            .unwrap_or_default()
    }

    /// The name could not be resolved: drop what waited.
    pub fn failed(&mut self, key: &Key) {
        if let Some((_, q)) = self.waiting.remove(key) {
            self.dropped += q.len() as u64;
        }
    }

    /// Drops packets that waited longer than [`WAIT`].
    pub fn expire(&mut self, now: Instant) {
        let mut dropped = 0;
        self.waiting.retain(|_, (since, q)| {
            let keep = now.duration_since(*since) < WAIT;
            if !keep {
                dropped += q.len() as u64;
            }
            keep
        });
        self.dropped += dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_to_synthetic_addresses_wait_for_their_translation() {
        let mut t = Translations::default();
        t.set_app_ranges(vec!["100.119.0.0/16".parse().unwrap()]);
        let dev: IpAddr = "100.118.0.2".parse().unwrap();
        let syn: IpAddr = "100.119.0.9".parse().unwrap();
        let real: IpAddr = "10.20.0.10".parse().unwrap();
        let now = Instant::now();
        let p = Bytes::from_static(b"syn");
        assert_eq!(t.admit(dev, real, &p, now), Admit::Forward);
        assert_eq!(t.admit(dev, syn, &p, now), Admit::Queued);
        assert_eq!(t.admit(dev, syn, &p, now), Admit::Queued);
        let released = t.installed(
            (dev, syn),
            "wiki.corp.example".into(),
            Ipv4Addr::new(10, 20, 0, 10),
        );
        assert_eq!(released.len(), 2);
        assert_eq!(t.admit(dev, syn, &p, now), Admit::Forward);
        assert!(t.has(&(dev, syn), "wiki.corp.example"));
        // Another device's packets to the same synthetic address still wait for their own.
        let other: IpAddr = "100.118.0.3".parse().unwrap();
        assert_eq!(t.admit(other, syn, &p, now), Admit::Queued);
        t.expire(now + WAIT);
        assert_eq!(t.dropped, 1);
        for _ in 0..QUEUE_PER_KEY {
            t.admit(other, syn, &p, now);
        }
        assert_eq!(t.admit(other, syn, &p, now), Admit::Dropped);
    }
}
