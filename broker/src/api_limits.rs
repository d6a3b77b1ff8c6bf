//! What keeps the control API answering under abuse: connections capped in all and per source
//! address (so idle or slow connections from a few hosts cannot take every slot), at most
//! [`MAX_HANDSHAKING`] connections still in their TLS handshake (a new one evicts the oldest:
//! connections that never speak cannot pile up to the cap, however many addresses they come
//! from), and a rate per source address on the routes anyone may call without a credential
//! (enrollment).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use sekisho_proto::ratelimit::{Buckets, Rate};

/// How long a client has for the TLS handshake, and for its request's headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection may take in all (a blocklist download included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Unauthenticated requests (enrollment) per source address: per second and as a burst.
pub const UNAUTHENTICATED: Rate = Rate::new(2.0, 20.0);
/// Source addresses tracked by that rate.
const ADDRESSES_TRACKED: usize = 65536;
/// Connections in their TLS handshake at once; the oldest goes when another comes.
pub const MAX_HANDSHAKING: usize = 512;

/// The source address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub IpAddr);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts of what the limits refused, for metrics.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Connections closed at once: the API had its most connections.
    pub connections_total: AtomicU64,
    /// Connections closed at once: their source address had its most connections.
    pub connections_per_address: AtomicU64,
    /// Unauthenticated requests answered 429.
    pub rate_limited: AtomicU64,
    /// Connections closed for a slow TLS handshake or slow request headers, or for lasting
    /// too long.
    pub timed_out: AtomicU64,
    /// Connections closed during their TLS handshake to make room for a newer one.
    pub evicted: AtomicU64,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Connections still in their handshake, oldest first: (id, how to close it).
    handshaking: std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
    next_id: u64,
}

/// The connection caps.
pub struct Gate {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<Open>,
    pub refusals: Arc<Refusals>,
}

/// An admitted connection; it frees its slot when dropped.
pub struct Admitted {
    gate: Arc<Gate>,
    address: IpAddr,
    id: u64,
    /// Notified when a newer connection evicts this one during its handshake.
    pub evicted: Arc<tokio::sync::Notify>,
}

impl Admitted {
    /// The TLS handshake is done: the connection can no longer be evicted.
    pub fn handshake_done(&self) {
        let mut o = lock(&self.gate.open);
        o.handshaking.retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut o = lock(&self.gate.open);
        o.handshaking.retain(|(id, _)| *id != self.id);
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.per_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                o.per_address.remove(&self.address);
            }
        }
    }
}

impl Gate {
    pub fn new(max_total: usize, max_per_address: usize, refusals: Arc<Refusals>) -> Arc<Gate> {
        Arc::new(Gate {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            open: Mutex::new(Open::default()),
            refusals,
        })
    }

    /// A slot for a connection from `address`, or None (counted) when a cap is reached.
    pub fn admit(self: &Arc<Gate>, address: IpAddr) -> Option<Admitted> {
        let mut o = lock(&self.open);
        if o.total >= self.max_total {
            self.refusals
                .connections_total
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let n = o.per_address.entry(address).or_insert(0);
        if *n >= self.max_per_address {
            self.refusals
                .connections_per_address
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        o.total += 1;
        if o.handshaking.len() >= MAX_HANDSHAKING
            && let Some((_, oldest)) = o.handshaking.pop_front()
        {
            oldest.notify_one();
            self.refusals.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = o.next_id;
        o.next_id += 1;
        let evicted = Arc::new(tokio::sync::Notify::new());
        o.handshaking.push_back((id, evicted.clone()));
        Some(Admitted {
            gate: self.clone(),
            address,
            id,
            evicted,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).total
    }
}

/// The rate of unauthenticated requests per source address.
pub struct RateGate {
    buckets: Mutex<Buckets<IpAddr>>,
    refusals: Arc<Refusals>,
}

impl RateGate {
    pub fn new(refusals: Arc<Refusals>) -> Arc<RateGate> {
        Arc::new(RateGate {
            buckets: Mutex::new(Buckets::new(UNAUTHENTICATED, ADDRESSES_TRACKED)),
            refusals,
        })
    }
}

/// Middleware for the routes anyone may call: 429 past the rate of the request's source.
pub async fn limit_unauthenticated(
    State(gate): State<Arc<RateGate>>,
    request: Request,
    next: Next,
) -> Response {
    let address = request.extensions().get::<Remote>().map(|r| r.0);
    if let Some(address) = address
        && !lock(&gate.buckets).take(&address, Instant::now())
    {
        gate.refusals.rate_limited.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(serde_json::json!({
                "error": "too many requests from this address; try again in a few seconds"
            })),
        )
            .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_connection_in_its_handshake_makes_room() {
        let gate = Gate::new(100_000, 100_000, Arc::default());
        let mut held = Vec::new();
        for i in 0..MAX_HANDSHAKING as u32 {
            held.push(gate.admit(IpAddr::from(i.to_be_bytes())).unwrap());
        }
        let first = held[0].evicted.clone();
        let done = held[1].evicted.clone();
        held[1].handshake_done();
        // One more fills the handshake queue again; the next evicts its oldest.
        let _fill = gate.admit([10, 0, 0, 3].into()).unwrap();
        let _next = gate.admit([10, 0, 0, 1].into()).unwrap();
        // The oldest still handshaking was told to go; one that finished is not.
        tokio::time::timeout(std::time::Duration::from_secs(1), first.notified())
            .await
            .expect("evicted");
        let _again = gate.admit([10, 0, 0, 2].into()).unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), done.notified())
                .await
                .is_err()
        );
        assert_eq!(gate.refusals.evicted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn connections_are_capped_per_address_and_in_all_and_slots_come_back() {
        let gate = Gate::new(3, 2, Arc::default());
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "a third from one address");
        let _b1 = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "the API is full");
        drop(a1);
        assert!(gate.admit(b).is_some(), "a slot came back");
        let r = &gate.refusals;
        assert_eq!(
            (
                r.connections_per_address.load(Ordering::Relaxed),
                r.connections_total.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
    }
}
