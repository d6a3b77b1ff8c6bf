//! The WireGuard engine, behind one module so that a maintained fork of boringtun can replace it.
//!
//! [`Session`] is one peer-to-peer tunnel (Noise handshake, keys, timers, replay protection);
//! [`Responder`] finds which peer a datagram arriving at a shared server socket belongs to: by
//! the initiator's static key in a handshake initiation, by our session index otherwise.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

pub use boringtun::noise::errors::WireGuardError;

use crate::keys::{PrivateKey, PublicKeyBytes};
use crate::ratelimit::{Bucket, Buckets, Rate};
use std::time::Instant;

/// Bytes WireGuard adds to an IP packet (header 16 + tag 16), not counting the outer IP and UDP.
pub const DATA_OVERHEAD: usize = 32;
/// Smallest buffer the engine accepts for any output (a handshake initiation is 148 bytes).
pub const MIN_BUFFER: usize = 148;
/// Handshake messages (after the per-source limit) a server takes per second before it is
/// "under load" and asks for cookies (mac2) first.
pub const SERVER_HANDSHAKE_RATE: u64 = 100;
/// Handshake messages one source address may send: per second, and as a burst. Checked before
/// any other work, always; a NAT with many devices behind one address still fits (every device
/// handshakes every two minutes, 20 at once after an outage).
pub const PER_SOURCE: Rate = Rate::new(50.0, 100.0);
/// Cookie replies one source address gets while the server is under load: per second, and as a
/// burst. A device that got one comes back with mac2 (one reply is all it needs); a flood from
/// many addresses, each within [`PER_SOURCE`], would otherwise make the server answer (and send)
/// thousands of replies a second.
pub const COOKIES_PER_SOURCE: Rate = Rate::new(10.0, 20.0);
/// Handshakes a server works through (Diffie-Hellman) per second at most, whatever passed the
/// limits above (cookie-bearing floods included), so packets always get the CPU.
pub const HANDSHAKE_BUDGET: Rate = Rate::new(2000.0, 500.0);
/// Source addresses tracked at once by the per-source limit.
pub const SOURCES_TRACKED: usize = 65536;

/// What the engine asks its caller to do.
#[derive(Debug)]
pub enum Output<'a> {
    /// Send these bytes to the peer over UDP.
    Network(&'a [u8]),
    /// An IP packet from the peer, decrypted, for the local side.
    Tunnel(&'a [u8]),
    /// Nothing to do.
    Done,
    Error(WireGuardError),
}

impl<'a> From<TunnResult<'a>> for Output<'a> {
    fn from(r: TunnResult<'a>) -> Self {
        match r {
            TunnResult::Done => Output::Done,
            TunnResult::Err(e) => Output::Error(e),
            TunnResult::WriteToNetwork(b) => Output::Network(b),
            TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
                Output::Tunnel(b)
            }
        }
    }
}

/// One WireGuard tunnel to one peer.
pub struct Session {
    tunn: Tunn,
}

impl Session {
    /// `index` tells sessions of one server apart (24 bits are used; the engine adds 8).
    pub fn new(
        own: &PrivateKey,
        peer: PublicKeyBytes,
        persistent_keepalive: Option<u16>,
        index: u32,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Self {
        Session {
            tunn: Tunn::new(
                own.secret().clone(),
                peer.to_x25519(),
                None,
                persistent_keepalive,
                index,
                limiter,
            ),
        }
    }

    /// Encrypts an IP packet for the peer (or queues it and starts a handshake).
    /// `buf` must hold `packet.len() + DATA_OVERHEAD` and at least [`MIN_BUFFER`] bytes.
    pub fn encapsulate<'a>(&mut self, packet: &[u8], buf: &'a mut [u8]) -> Output<'a> {
        if buf.len() < (packet.len() + DATA_OVERHEAD).max(MIN_BUFFER) {
            return Output::Error(WireGuardError::DestinationBufferTooSmall);
        }
        self.tunn.encapsulate(packet, buf).into()
    }

    /// Handles a datagram from the peer. After [`Output::Network`], call [`Session::flush`]
    /// until it returns [`Output::Done`] to send packets queued during the handshake.
    pub fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        buf: &'a mut [u8],
    ) -> Output<'a> {
        if datagram.is_empty() {
            return Output::Done;
        }
        self.tunn.decapsulate(from, datagram, buf).into()
    }

    /// Sends what was queued while no session existed.
    pub fn flush<'a>(&mut self, buf: &'a mut [u8]) -> Output<'a> {
        self.tunn.decapsulate(None, &[], buf).into()
    }

    /// Runs the timers (keepalive, rekey, expiry). Call every 100–250 ms.
    pub fn tick<'a>(&mut self, buf: &'a mut [u8]) -> Output<'a> {
        self.tunn.update_timers(buf).into()
    }

    /// Starts a handshake now (unless one is under way and `force` is false).
    pub fn initiate<'a>(&mut self, buf: &'a mut [u8], force: bool) -> Output<'a> {
        self.tunn.format_handshake_initiation(buf, force).into()
    }

    pub fn time_since_handshake(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    /// True once the session's keys are too old to use and no new handshake succeeded.
    pub fn is_expired(&self) -> bool {
        self.tunn.is_expired()
    }

    /// (tx bytes, rx bytes) of tunnelled packets.
    pub fn traffic(&self) -> (usize, usize) {
        let (_, tx, rx, _, _) = self.tunn.stats();
        (tx, rx)
    }
}

/// Where a datagram arriving at a server socket should go.
#[derive(Debug)]
pub enum Route<'a> {
    /// A handshake initiation from the peer with this static key.
    Initiation(PublicKeyBytes),
    /// A packet for the session with this index (as given to [`Session::new`]).
    Session(u32),
    /// Under load: send this cookie reply back instead of processing the datagram.
    Cookie(&'a [u8]),
    /// Not a valid WireGuard datagram for us: drop it.
    Invalid(WireGuardError),
    /// A handshake message over a limit: drop it (nothing was computed).
    Limited(Limit),
}

/// Which handshake limit a message ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Its source address sent more than [`PER_SOURCE`] allows.
    PerSource,
    /// The server's handshake budget ([`HANDSHAKE_BUDGET`]) is spent for now.
    Budget,
    /// Under load, its source address had the cookie replies [`COOKIES_PER_SOURCE`] allows.
    Cookies,
}

/// The server side of many sessions sharing one socket and one static key, with the
/// handshake defence in front of any Diffie-Hellman work: a token bucket per source address
/// (always), cookies when under load (only for messages within their source's bucket, so
/// cookie replies cannot be used to flood a victim either), and a budget of handshakes per
/// second. Each message is counted once.
pub struct Responder {
    key: PrivateKey,
    public: x25519::PublicKey,
    /// Decides "under load" and makes and checks cookies.
    limiter: Arc<RateLimiter>,
    /// Given to sessions: they check mac1 again but never ask for cookies (the decision was
    /// taken here, once).
    session_limiter: Arc<RateLimiter>,
    per_source: Buckets<IpAddr>,
    cookies_per_source: Buckets<IpAddr>,
    /// Made full at the first handshake (time comes in with the messages).
    budget: Option<Bucket>,
}

impl Responder {
    pub fn new(key: PrivateKey) -> Self {
        let public = x25519::PublicKey::from(key.secret());
        let limiter = Arc::new(RateLimiter::new(&public, SERVER_HANDSHAKE_RATE));
        let session_limiter = Arc::new(RateLimiter::new(&public, u64::MAX));
        Responder {
            key,
            public,
            limiter,
            session_limiter,
            per_source: Buckets::new(PER_SOURCE, SOURCES_TRACKED),
            cookies_per_source: Buckets::new(COOKIES_PER_SOURCE, SOURCES_TRACKED),
            budget: None,
        }
    }

    pub fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    /// The rate limiter to hand to every [`Session`] of this server.
    pub fn limiter(&self) -> Arc<RateLimiter> {
        Arc::clone(&self.session_limiter)
    }

    /// Call once a second: the handshake rate limit counts per second.
    pub fn reset_rate_limit(&self) {
        self.limiter.reset_count();
    }

    /// Drops the per-source state of sources that have been quiet (call now and then).
    pub fn forget_quiet_sources(&mut self, now: Instant) -> usize {
        self.per_source.forget_idle(now) + self.cookies_per_source.forget_idle(now)
    }

    /// Applies the handshake defence, checks the datagram's MACs (cheap) before any
    /// Diffie-Hellman work, then finds its peer.
    pub fn route<'a>(
        &mut self,
        from: IpAddr,
        datagram: &[u8],
        cookie_buf: &'a mut [u8],
        now: Instant,
    ) -> Route<'a> {
        // Handshake initiations and responses (types 1 and 2) cost the server work.
        let handshake = matches!(datagram.first(), Some(1 | 2));
        if handshake && !self.per_source.take(&from, now) {
            return Route::Limited(Limit::PerSource);
        }
        match self.limiter.verify_packet(Some(from), datagram, cookie_buf) {
            Ok(Packet::HandshakeInit(init)) => {
                let budget = self
                    .budget
                    .get_or_insert_with(|| Bucket::new(HANDSHAKE_BUDGET, now));
                if !budget.take(HANDSHAKE_BUDGET, now) {
                    return Route::Limited(Limit::Budget);
                }
                match parse_handshake_anon(self.key.secret(), &self.public, &init) {
                    Ok(half) => Route::Initiation(PublicKeyBytes(half.peer_static_public)),
                    Err(e) => Route::Invalid(e),
                }
            }
            Ok(Packet::HandshakeResponse(p)) => Route::Session(p.receiver_idx >> 8),
            Ok(Packet::PacketCookieReply(p)) => Route::Session(p.receiver_idx >> 8),
            Ok(Packet::PacketData(p)) => Route::Session(p.receiver_idx >> 8),
            Err(TunnResult::WriteToNetwork(cookie)) => {
                // The reply is computed (cheap) but not sent: sending is what costs.
                if self.cookies_per_source.take(&from, now) {
                    Route::Cookie(cookie)
                } else {
                    Route::Limited(Limit::Cookies)
                }
            }
            Err(TunnResult::Err(e)) => Route::Invalid(e),
            Err(_) => Route::Invalid(WireGuardError::InvalidPacket),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client session and a server responder complete a handshake and carry a packet.
    #[test]
    fn handshake_and_data_through_responder() {
        let client_key = PrivateKey::generate();
        let mut server = Responder::new(PrivateKey::generate());
        let now = Instant::now();
        let mut client = Session::new(&client_key, server.private_key().public(), None, 1, None);
        let mut srv_session: Option<Session> = None;
        let from: IpAddr = [10, 0, 0, 1].into();
        let mut b1 = vec![0u8; 2048];
        let mut b2 = vec![0u8; 2048];
        let mut cookie = vec![0u8; 256];

        let Output::Network(init) = client.initiate(&mut b1, false) else {
            panic!()
        };
        let init = init.to_vec();
        let Route::Initiation(peer) = server.route(from, &init, &mut cookie, now) else {
            panic!()
        };
        assert_eq!(peer, client_key.public());
        let s = srv_session.insert(Session::new(
            server.private_key(),
            peer,
            None,
            7,
            Some(server.limiter()),
        ));
        let Output::Network(resp) = s.decapsulate(Some(from), &init, &mut b2) else {
            panic!()
        };
        let resp = resp.to_vec();
        assert!(matches!(
            client.decapsulate(Some(from), &resp, &mut b1),
            Output::Network(_) | Output::Done
        ));

        let packet = crate::packet::testpkt::udp4([100, 118, 0, 2], 1, [10, 20, 0, 10], 2, b"hi");
        let Output::Network(data) = client.encapsulate(&packet, &mut b1) else {
            panic!()
        };
        let data = data.to_vec();
        let Route::Session(idx) = server.route(from, &data, &mut cookie, now) else {
            panic!()
        };
        assert_eq!(idx, 7);
        let s = srv_session.as_mut().unwrap();
        match s.decapsulate(Some(from), &data, &mut b2) {
            Output::Tunnel(p) => assert_eq!(p, &packet[..]),
            other => panic!("{other:?}"),
        }
        // Garbage is refused, not a panic.
        assert!(matches!(
            server.route(from, &[1, 0, 0, 0, 9], &mut cookie, now),
            Route::Invalid(_)
        ));
        assert!(matches!(
            server.route(from, &[], &mut cookie, now),
            Route::Invalid(_)
        ));
    }

    /// Valid handshake initiations (good mac1) from a key the server may not know.
    fn initiations(server: &PublicKeyBytes, n: usize) -> Vec<Vec<u8>> {
        let mut c = Session::new(&PrivateKey::generate(), *server, None, 1, None);
        let mut buf = vec![0u8; 256];
        (0..n)
            .map(|_| match c.initiate(&mut buf, true) {
                Output::Network(d) => d.to_vec(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn one_source_is_limited_before_any_work_and_many_get_cookies_under_load() {
        let mut server = Responder::new(PrivateKey::generate());
        let pk = server.private_key().public();
        let now = Instant::now();
        let mut cookie = vec![0u8; 256];
        let flood = initiations(&pk, 300);
        let one: IpAddr = [192, 0, 2, 7].into();
        let mut limited = 0;
        for m in &flood {
            if matches!(
                server.route(one, m, &mut cookie, now),
                Route::Limited(Limit::PerSource)
            ) {
                limited += 1;
            }
        }
        assert_eq!(
            limited,
            300 - PER_SOURCE.burst as usize,
            "one source: its burst, no more"
        );
        // Many sources: the first SERVER_HANDSHAKE_RATE messages are worked through, then the
        // server is under load and answers with cookies (no Diffie-Hellman).
        let mut worked = 0;
        let mut cookies = 0;
        for (i, m) in flood.iter().enumerate() {
            let from: IpAddr = [198, 51, 100, i as u8].into();
            match server.route(from, m, &mut cookie, now) {
                Route::Cookie(_) => cookies += 1,
                Route::Initiation(_) | Route::Invalid(_) => worked += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(
            worked <= SERVER_HANDSHAKE_RATE as usize,
            "{worked} handshakes worked"
        );
        assert!(
            cookies >= 300 - SERVER_HANDSHAKE_RATE as usize,
            "{cookies} cookies"
        );
    }

    #[test]
    fn under_load_one_source_gets_a_bounded_number_of_cookie_replies() {
        let mut server = Responder::new(PrivateKey::generate());
        let pk = server.private_key().public();
        let now = Instant::now();
        let mut cookie = vec![0u8; 256];
        let flood = initiations(&pk, 400);
        // Load the server from many other addresses first.
        for (i, m) in flood[..200].iter().enumerate() {
            let from: IpAddr = [198, 51, 100, i as u8].into();
            server.route(from, m, &mut cookie, now);
        }
        // Then one address, within its per-source burst: cookie replies up to their burst.
        let one: IpAddr = [192, 0, 2, 9].into();
        let (mut cookies, mut limited) = (0, 0);
        for m in &flood[200..200 + PER_SOURCE.burst as usize] {
            match server.route(one, m, &mut cookie, now) {
                Route::Cookie(_) => cookies += 1,
                Route::Limited(Limit::Cookies) => limited += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(cookies, COOKIES_PER_SOURCE.burst as usize);
        assert_eq!(limited, PER_SOURCE.burst as usize - cookies);
    }

    #[test]
    fn a_real_peer_completes_through_the_cookie_round_trip_under_load() {
        let mut server = Responder::new(PrivateKey::generate());
        let pk = server.private_key().public();
        let now = Instant::now();
        let mut cookie = vec![0u8; 256];
        // Put the server under load from many sources.
        for (i, m) in initiations(&pk, 200).iter().enumerate() {
            let from: IpAddr = [198, 51, 100, i as u8].into();
            let _ = server.route(from, m, &mut cookie, now);
        }
        let client_key = PrivateKey::generate();
        let mut client = Session::new(&client_key, pk, None, 1, None);
        let from: IpAddr = [10, 0, 0, 1].into();
        let mut b = vec![0u8; 2048];
        let Output::Network(init) = client.initiate(&mut b, false) else {
            panic!()
        };
        let init = init.to_vec();
        let Route::Cookie(reply) = server.route(from, &init, &mut cookie, now) else {
            panic!("under load, a first initiation gets a cookie")
        };
        let reply = reply.to_vec();
        assert!(matches!(
            client.decapsulate(Some(from), &reply, &mut b),
            Output::Done
        ));
        // The retry carries mac2 and is worked through.
        let Output::Network(again) = client.initiate(&mut b, true) else {
            panic!()
        };
        let again = again.to_vec();
        match server.route(from, &again, &mut cookie, now) {
            Route::Initiation(k) => assert_eq!(k, client_key.public()),
            other => panic!("{other:?}"),
        }
    }
}
