//! Devices as the broker's data plane holds them: where each lives ([`Assignment`]: a slot,
//! and from it a worker) and the per-device state a worker keeps ([`Peer`]: WireGuard
//! session, endpoint, posture, synthetic names, latest denials).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::api::Denial;
use crate::dns::SyntheticMap;
use crate::keys::PublicKeyBytes;
use crate::policy::{DeviceId, Policy};
use crate::posture::PostureClaims;
use crate::ratelimit::{Bucket, Rate};
use crate::wg::Session;
use std::time::Instant;

/// A device's place in the broker: stable while its key stays in the policy. Its WireGuard
/// session index is the slot plus one, so index 0 never names a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PeerSlot(pub u32);

impl PeerSlot {
    /// The session index given to the WireGuard engine (24 bits are used).
    pub fn session_index(self) -> u32 {
        self.0 + 1
    }

    /// The slot of a session index taken from a datagram (`receiver_idx >> 8`).
    pub fn from_session_index(index: u32) -> Option<PeerSlot> {
        index.checked_sub(1).map(PeerSlot)
    }
}

/// A data-plane worker (one per core by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkerId(pub u16);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Placed {
    key: PublicKeyBytes,
    address: IpAddr,
}

/// Every device of the policy with its slot, and the worker that owns each slot. The worker
/// of a slot is the low byte of its session index modulo the number of workers: that byte is
/// on the wire in every data message (`receiver_idx`), so the kernel can steer a peer's
/// datagrams to its worker's socket (see `reuseport_program`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    workers: u16,
    slots: Vec<Option<Placed>>,
    by_key: HashMap<PublicKeyBytes, PeerSlot>,
    by_addr: HashMap<IpAddr, PeerSlot>,
}

impl Assignment {
    /// No devices yet, `workers` workers (at least one).
    pub fn new(workers: u16) -> Assignment {
        Assignment {
            workers: workers.max(1),
            slots: Vec::new(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
        }
    }

    pub fn workers(&self) -> u16 {
        self.workers
    }

    /// The assignment for `policy`: devices that stay keep their slots; new ones take the
    /// lowest free slots.
    pub fn next(&self, policy: &Policy) -> Assignment {
        let mut slots: Vec<Option<Placed>> = vec![None; self.slots.len()];
        let mut by_key = HashMap::new();
        let mut by_addr = HashMap::new();
        let mut fresh = Vec::new();
        for dev in &policy.devices {
            match self.by_key.get(&dev.public_key) {
                Some(&slot) if !by_key.contains_key(&dev.public_key) => {
                    slots[slot.0 as usize] = Some(Placed {
                        key: dev.public_key,
                        address: dev.address,
                    });
                    by_key.insert(dev.public_key, slot);
                    by_addr.insert(dev.address, slot);
                }
                Some(_) => {}
                None => fresh.push(dev),
            }
        }
        let mut free = 0usize;
        for dev in fresh {
            if by_key.contains_key(&dev.public_key) {
                continue;
            }
            while free < slots.len() && slots[free].is_some() {
                free += 1;
            }
            if free == slots.len() {
                slots.push(None);
            }
            slots[free] = Some(Placed {
                key: dev.public_key,
                address: dev.address,
            });
            let slot = PeerSlot(free as u32);
            by_key.insert(dev.public_key, slot);
            by_addr.insert(dev.address, slot);
        }
        while slots.last().is_some_and(Option::is_none) {
            slots.pop();
        }
        Assignment {
            workers: self.workers,
            slots,
            by_key,
            by_addr,
        }
    }

    /// The worker of a slot.
    pub fn owner(&self, slot: PeerSlot) -> WorkerId {
        owner_of_index(slot.session_index(), self.workers)
    }

    pub fn slot_of_key(&self, key: &PublicKeyBytes) -> Option<PeerSlot> {
        self.by_key.get(key).copied()
    }

    pub fn slot_of_address(&self, address: IpAddr) -> Option<PeerSlot> {
        self.by_addr.get(&address).copied()
    }

    /// The worker that owns the device with this overlay address.
    pub fn owner_of_address(&self, address: IpAddr) -> Option<WorkerId> {
        self.slot_of_address(address).map(|s| self.owner(s))
    }

    /// The slots of one worker's devices with their keys.
    pub fn owned_by(&self, worker: WorkerId) -> impl Iterator<Item = (PeerSlot, PublicKeyBytes)> {
        self.slots.iter().enumerate().filter_map(move |(i, p)| {
            let slot = PeerSlot(i as u32);
            let p = p.as_ref()?;
            (self.owner(slot) == worker).then_some((slot, p.key))
        })
    }

    /// Devices placed.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// The worker of a WireGuard session index: its low byte modulo the workers.
pub fn owner_of_index(index: u32, workers: u16) -> WorkerId {
    WorkerId(((index & 0xff) % u32::from(workers.max(1))) as u16)
}

/// Denials kept per device for its status.
pub const DENIALS_KEPT: usize = 10;

/// One device's state in the worker that owns it.
pub struct Peer {
    pub device: DeviceId,
    pub key: PublicKeyBytes,
    pub address: IpAddr,
    /// The WireGuard engine of this device, made at its first handshake (about 11 KB each:
    /// devices that never connect cost none of it).
    pub session: Option<Box<Session>>,
    /// Where its datagrams come from; moved only by input that authenticated as this peer.
    pub endpoint: Option<SocketAddr>,
    /// The verified posture of the device, from its latest accepted token.
    pub posture: Option<PostureClaims>,
    /// Bumped when `posture` changes: the peer's cached flows are then decided anew.
    pub generation: u64,
    /// The device's synthetic addresses (name-based applications), for its session here.
    pub names: SyntheticMap,
    /// The latest denials, oldest first (the device's status command shows them).
    pub denials: VecDeque<Denial>,
    /// Decision records this device may cause in the log (made at its first decision).
    pub log_budget: Option<Bucket>,
    /// Decisions left out of the log since the last summary: (allowed, denied).
    pub unlogged: (u64, u64),
    /// In-tunnel service requests (token, DNS, status, echo) this device may make.
    pub service_budget: Option<Bucket>,
    /// Its risk, as the control plane's risk engine last said (a change bumps `generation`).
    pub risk: crate::risk::Level,
    /// The same with its reasons, for the device's status.
    pub risk_status: Option<std::sync::Arc<crate::api::RiskStatus>>,
}

/// Decision records one device may cause per second, and as a burst; the rest are summed into
/// one line a second ("1,234 more denied flows in 1 s"), so a scan writes a summary, not a
/// line per port.
pub const DECISION_LOG: Rate = Rate::new(50.0, 200.0);
/// In-tunnel service requests one device may make per second, and as a burst (its client
/// makes a few a second: probes, token, status; DNS for application names).
pub const SERVICE_REQUESTS: Rate = Rate::new(100.0, 200.0);

impl Peer {
    /// A fresh peer for `device` with `session`.
    pub fn new(
        device: DeviceId,
        key: PublicKeyBytes,
        address: IpAddr,
        names: SyntheticMap,
    ) -> Peer {
        Peer {
            device,
            key,
            address,
            session: None,
            endpoint: None,
            posture: None,
            generation: 0,
            names,
            denials: VecDeque::new(),
            log_budget: None,
            unlogged: (0, 0),
            service_budget: None,
            risk: crate::risk::Level::Low,
            risk_status: None,
        }
    }

    /// Whether a decision of this device goes to the log (else it is summed up later).
    pub fn may_log(&mut self, allowed: bool, now: Instant) -> bool {
        let b = self
            .log_budget
            .get_or_insert_with(|| Bucket::new(DECISION_LOG, now));
        if b.take(DECISION_LOG, now) {
            return true;
        }
        if allowed {
            self.unlogged.0 += 1;
        } else {
            self.unlogged.1 += 1;
        }
        false
    }

    /// Whether this device may make another in-tunnel service request now.
    pub fn may_ask(&mut self, now: Instant) -> bool {
        self.service_budget
            .get_or_insert_with(|| Bucket::new(SERVICE_REQUESTS, now))
            .take(SERVICE_REQUESTS, now)
    }

    pub fn note_denial(&mut self, d: Denial) {
        if self.denials.len() == DENIALS_KEPT {
            self.denials.pop_front();
        }
        self.denials.push_back(d);
    }

    /// Names of the checks the accepted token says fail.
    pub fn failing_checks(&self) -> Vec<String> {
        self.posture
            .as_ref()
            .map(|c| {
                c.checks
                    .iter()
                    .filter(|(_, ok)| !**ok)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn policy_with(keys: &[PublicKeyBytes]) -> Policy {
        let mut text = String::from("[[users]]\nname = \"u\"\n");
        for (i, k) in keys.iter().enumerate() {
            text.push_str(&format!(
                "[[devices]]\nname = \"d{i}\"\nuser = \"u\"\npublic_key = \"{k}\"\naddress = \"100.118.0.{}\"\n",
                i + 2
            ));
        }
        Policy::parse(std::path::Path::new("p.toml"), &text).unwrap()
    }

    #[test]
    fn slots_are_stable_and_reused_and_spread_over_workers() {
        let keys: Vec<PublicKeyBytes> = (0..6).map(|_| PrivateKey::generate().public()).collect();
        let a = Assignment::new(2).next(&policy_with(&keys[..4]));
        let slots: Vec<PeerSlot> = keys[..4]
            .iter()
            .map(|k| a.slot_of_key(k).unwrap())
            .collect();
        assert_eq!(slots, (0..4).map(PeerSlot).collect::<Vec<_>>());
        let owners: Vec<u16> = slots.iter().map(|s| a.owner(*s).0).collect();
        assert_eq!(owners, vec![1, 0, 1, 0]);
        assert_eq!(a.owned_by(WorkerId(0)).count(), 2);
        // Device 1 leaves, two come: the survivors keep their slots, a newcomer takes slot 1.
        let b = a.next(&policy_with(&[keys[0], keys[2], keys[3], keys[4], keys[5]]));
        assert_eq!(b.slot_of_key(&keys[0]), Some(PeerSlot(0)));
        assert_eq!(b.slot_of_key(&keys[3]), Some(PeerSlot(3)));
        assert_eq!(b.slot_of_key(&keys[4]), Some(PeerSlot(1)));
        assert_eq!(b.slot_of_key(&keys[5]), Some(PeerSlot(4)));
        assert_eq!(b.slot_of_key(&keys[1]), None);
        assert_eq!(b.len(), 5);
        let addr: IpAddr = "100.118.0.2".parse().unwrap();
        assert_eq!(b.owner_of_address(addr), Some(b.owner(PeerSlot(0))));
    }

    #[test]
    fn the_owner_is_in_the_session_index_on_the_wire() {
        // Session index 0x0203 (slot 0x0202): low byte 3, so worker 3 of 4 and 0 of 3.
        let slot = PeerSlot(0x0202);
        assert_eq!(owner_of_index(slot.session_index(), 4), WorkerId(3));
        assert_eq!(owner_of_index(slot.session_index(), 3), WorkerId(0));
        assert_eq!(PeerSlot::from_session_index(0), None);
    }
}
