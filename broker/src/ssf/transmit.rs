//! Transmitting Sekisho's own Security Event Tokens: CAEP 1.0 events (device compliance
//! change §3.5, risk level change §3.8) as SETs (RFC 8417) with an SSF 1.0 top-level `sub_id`
//! (§2), signed with the broker's Ed25519 keys (EdDSA, RFC 8037; explicitly typed
//! `secevent+jwt`, SSF 1.0 §4.1.1), the public keys as a JWK set for receivers to fetch, and
//! push delivery (RFC 8935) to each configured receiver through a bounded queue, with retries
//! of transient failures.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use sekisho_proto::risk::Level;

use super::set::{DEVICE_COMPLIANCE_CHANGE, RISK_LEVEL_CHANGE};

/// The media type of a SET (RFC 8417 §7.2), the body of a push.
pub const CONTENT_TYPE: &str = "application/secevent+jwt";

fn key_pair(seed: &[u8; 32]) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are an Ed25519 seed")
}

/// The public JWK (RFC 8037 §2) of the Ed25519 key with this seed.
pub fn jwk(kid: &str, seed: &[u8; 32]) -> Value {
    let public = key_pair(seed);
    json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(public.public_key().as_ref()),
        "kid": kid,
        "use": "sig",
        "alg": "EdDSA",
    })
}

/// The JWK set receivers verify Sekisho's SETs with: every key still in use, (kid, seed).
pub fn jwks(keys: &[(String, [u8; 32])]) -> Value {
    json!({"keys": keys.iter().map(|(kid, seed)| jwk(kid, seed)).collect::<Vec<_>>()})
}

/// `claims` as a compact JWS signed with EdDSA, typed `secevent+jwt`.
pub fn sign(kid: &str, seed: &[u8; 32], claims: &Value) -> String {
    let header = json!({"alg": "EdDSA", "typ": "secevent+jwt", "kid": kid});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key_pair(seed).sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Whom a risk level is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user: by email address when the name is one, else as an opaque name.
    // Sekisho's changes are per device (with the user as context) for now.
    #[cfg_attr(not(test), allow(dead_code))]
    User(String),
    /// A device, by its name in Sekisho, with its user (as context) when known.
    Device {
        device: String,
        user: Option<String>,
    },
}

/// An event Sekisho tells receivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A device's posture now passes (or fails) the checks required of it.
    Compliance {
        device: String,
        /// The device's user, as context for the receiver.
        user: Option<String>,
        compliant: bool,
        /// CAEP requires `previous_status`: when unknown, the opposite of the current one
        /// is sent (the event is a change).
        previous: Option<bool>,
    },
    /// Sekisho's risk level for a user or device changed.
    RiskLevel {
        principal: Principal,
        level: Level,
        previous: Option<Level>,
        /// Why (`risk_reason`), e.g. the signals that raised it.
        reasons: String,
    },
}

/// A user as a subject identifier (RFC 9493): `email` when the name is an address, else
/// `opaque`.
fn user_id(user: &str) -> Value {
    if user.contains('@') {
        json!({"format": "email", "email": user})
    } else {
        json!({"format": "opaque", "id": user})
    }
}

/// A device as a complex subject (SSF 1.0 §2.3), so receivers know it is a device, with its
/// user when known.
fn device_subject(device: &str, user: Option<&str>) -> Value {
    let mut s = json!({"format": "complex", "device": {"format": "opaque", "id": device}});
    if let Some(u) = user {
        s["user"] = user_id(u);
    }
    s
}

fn caep_status(compliant: bool) -> &'static str {
    if compliant {
        "compliant"
    } else {
        "not-compliant"
    }
}

fn caep_level(l: Level) -> String {
    l.as_str().to_ascii_uppercase()
}

/// The claims of a SET carrying `event` for `audience` (RFC 8417 §2.2; no `sub`, no `exp`:
/// SSF 1.0 §4.1.2, §4.1.7), the event dated `now`.
pub fn set_claims(issuer: &str, audience: &str, jti: &str, now: u64, event: &Outgoing) -> Value {
    let (sub_id, uri, body) = match event {
        Outgoing::Compliance {
            device,
            user,
            compliant,
            previous,
        } => (
            device_subject(device, user.as_deref()),
            DEVICE_COMPLIANCE_CHANGE,
            json!({
                "current_status": caep_status(*compliant),
                "previous_status": caep_status(previous.unwrap_or(!compliant)),
                "initiating_entity": "policy",
                "event_timestamp": now,
            }),
        ),
        Outgoing::RiskLevel {
            principal,
            level,
            previous,
            reasons,
        } => {
            let (sub_id, p) = match principal {
                Principal::User(u) => (user_id(u), "USER"),
                Principal::Device { device, user } => {
                    (device_subject(device, user.as_deref()), "DEVICE")
                }
            };
            let mut body = json!({
                "current_level": caep_level(*level),
                "principal": p,
                "risk_reason": reasons,
                "event_timestamp": now,
            });
            if let Some(prev) = previous {
                body["previous_level"] = caep_level(*prev).into();
            }
            (sub_id, RISK_LEVEL_CHANGE, body)
        }
    };
    json!({
        "iss": issuer,
        "aud": audience,
        "iat": now,
        "jti": jti,
        "sub_id": sub_id,
        "events": {uri: body},
    })
}

/// A random identifier (a `jti`, a `txn`).
pub fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// A push receiver (RFC 8935), as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiver {
    /// Its push endpoint (https://, or http:// for tests).
    pub url: String,
    /// The `aud` of the SETs it is sent.
    pub audience: String,
    /// What to send in `Authorization`: a bearer token, or (with a space) the header's
    /// whole value, like SSF's `authorization_header` ("Bearer abc", "Basic ...").
    pub authorization: Option<String>,
    /// A CA file trusted besides the system's for its certificate.
    pub ca_file: Option<PathBuf>,
}

/// One receiver's delivery counters, for `stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReceiverStats {
    pub url: String,
    pub audience: String,
    /// SETs waiting in the queue.
    pub queued: usize,
    /// Accepted by the receiver (202).
    pub sent: u64,
    /// Refused by the receiver (400 with an RFC 8935 error, or another 4xx): not retried.
    pub refused: u64,
    /// Given up after the retries (5xx, 429, no connection) or an unexpected answer.
    pub failed: u64,
    /// Attempts made again after a transient failure (each also sets `last_error`).
    pub retried: u64,
    /// Not queued: the queue was full.
    pub dropped_queue_full: u64,
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dropped_queue_full: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, counter: &AtomicU64, e: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().expect("not poisoned") = Some(e);
    }
}

struct Lane {
    receiver: Receiver,
    tx: mpsc::Sender<String>,
    counters: Arc<Counters>,
}

/// Attempts per SET; between them 100 ms, doubling, at most 5 s (about 11 s in all).
const ATTEMPTS: u32 = 8;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Answers longer than this are cut in the error kept.
const MAX_ERROR: usize = 300;

/// Pushes SETs to every receiver: one queue and one delivery task per receiver (so a slow
/// receiver delays only its own SETs), in order, never blocking the sender.
pub struct Pusher {
    lanes: Vec<Lane>,
}

impl Pusher {
    /// Sets up the HTTP clients and starts the delivery tasks (in the current Tokio runtime);
    /// each receiver queues at most `queue` SETs. The tasks end when the pusher is dropped.
    pub fn new(receivers: Vec<Receiver>, queue: usize) -> Result<Pusher> {
        let mut lanes = Vec::new();
        for receiver in receivers {
            let http = crate::jose::client_for(
                &receiver.url,
                receiver.ca_file.as_deref(),
                "SSF receiver",
            )?;
            let (tx, rx) = mpsc::channel(queue.max(1));
            let counters = Arc::new(Counters::default());
            tokio::spawn(deliver(http, receiver.clone(), rx, counters.clone()));
            lanes.push(Lane {
                receiver,
                tx,
                counters,
            });
        }
        Ok(Pusher { lanes })
    }

    /// Queues, for every receiver, the SET `token` makes for it (the `aud` differs, so does
    /// the signature). A full queue drops the SET and counts it.
    pub fn send_with(&self, mut token: impl FnMut(&Receiver) -> String) {
        for lane in &self.lanes {
            if lane.tx.try_send(token(&lane.receiver)).is_err() {
                lane.counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                warn!(receiver = %lane.receiver.url, "SET dropped: the receiver's queue is full");
            }
        }
    }

    /// Queues `event` for every receiver, signed with the key `kid`/`seed`: one SET each
    /// (its own `jti`), the same `txn` in all.
    pub fn send(&self, kid: &str, seed: &[u8; 32], issuer: &str, now: u64, event: &Outgoing) {
        let txn = random_id();
        self.send_with(|r| {
            let mut claims = set_claims(issuer, &r.audience, &random_id(), now, event);
            claims["txn"] = txn.clone().into();
            sign(kid, seed, &claims)
        });
    }

    pub fn stats(&self) -> Vec<ReceiverStats> {
        self.lanes
            .iter()
            .map(|l| {
                let c = &l.counters;
                ReceiverStats {
                    url: l.receiver.url.clone(),
                    audience: l.receiver.audience.clone(),
                    queued: l.tx.max_capacity() - l.tx.capacity(),
                    sent: c.sent.load(Ordering::Relaxed),
                    refused: c.refused.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    retried: c.retried.load(Ordering::Relaxed),
                    dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
                    last_error: c.last_error.lock().expect("not poisoned").clone(),
                }
            })
            .collect()
    }
}

/// What one POST came to.
enum Outcome {
    Accepted,
    /// The receiver said no: not worth trying again.
    Refused(String),
    /// Perhaps better later.
    Transient(String),
    /// Neither (a redirect, say).
    Failed(String),
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One POST of a SET (RFC 8935 §2.1), judged by its answer (§2.2, §2.3).
async fn post(http: &reqwest::Client, r: &Receiver, token: &str) -> Outcome {
    let mut req = http
        .post(&r.url)
        .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
        .header(reqwest::header::ACCEPT, "application/json")
        .body(token.to_string());
    if let Some(auth) = &r.authorization {
        req = match auth.contains(' ') {
            true => req.header(reqwest::header::AUTHORIZATION, auth),
            false => req.bearer_auth(auth),
        };
    }
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => return Outcome::Transient(format!("POST {}: {e}", r.url)),
    };
    let status = resp.status();
    if status.is_success() {
        if status != reqwest::StatusCode::ACCEPTED {
            debug!(receiver = %r.url, %status, "SET accepted with a status other than 202");
        }
        return Outcome::Accepted;
    }
    let body = resp.bytes().await.unwrap_or_default();
    let said = match serde_json::from_slice::<Value>(&body) {
        Ok(v) if v.get("err").is_some() => format!(
            "{}{}",
            v["err"].as_str().unwrap_or("?"),
            v.get("description")
                .and_then(Value::as_str)
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        ),
        _ => String::from_utf8_lossy(&body).trim().to_string(),
    };
    let e = cut(format!("HTTP {status} {said}").trim());
    match status.as_u16() {
        408 | 429 | 500..=599 => Outcome::Transient(e),
        400..=499 => Outcome::Refused(e),
        _ => Outcome::Failed(e),
    }
}

async fn deliver(
    http: reqwest::Client,
    r: Receiver,
    mut rx: mpsc::Receiver<String>,
    c: Arc<Counters>,
) {
    while let Some(token) = rx.recv().await {
        let mut delay = BACKOFF_FIRST;
        for attempt in 1..=ATTEMPTS {
            match post(&http, &r, &token).await {
                Outcome::Accepted => {
                    c.sent.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Outcome::Refused(e) => {
                    warn!(receiver = %r.url, "the receiver refused a SET: {e}");
                    c.error(&c.refused, e);
                    break;
                }
                Outcome::Transient(e) if attempt < ATTEMPTS => {
                    debug!(receiver = %r.url, attempt, "SET push failed, will retry: {e}");
                    c.error(&c.retried, e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                Outcome::Transient(e) | Outcome::Failed(e) => {
                    warn!(receiver = %r.url, attempt, "cannot push a SET: {e}");
                    c.error(&c.failed, e);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssf::set::{self, EventKind, Expect, Subject, UserRef};
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post as post_route;
    use jsonwebtoken::jwk::JwkSet;
    use std::sync::Mutex;

    const NOW: u64 = 1_800_000_000;
    const SEED: [u8; 32] = [7; 32];

    fn keys() -> JwkSet {
        serde_json::from_value(jwks(&[
            ("old".to_string(), [1; 32]),
            ("k1".to_string(), SEED),
        ]))
        .unwrap()
    }

    fn expect(aud: &str) -> Expect {
        Expect {
            issuer: "https://broker.example".into(),
            audience: aud.into(),
            max_age: 300,
            now: NOW,
        }
    }

    #[test]
    fn the_jwk_is_an_rfc8037_public_key() {
        let j = jwk("k1", &SEED);
        assert_eq!(j["kty"], "OKP");
        assert_eq!(j["crv"], "Ed25519");
        assert_eq!(j["alg"], "EdDSA");
        assert_eq!(j["use"], "sig");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(j["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert!(j.get("d").is_none(), "never the private part");
        // The same key as the posture tokens' (ed25519-dalek) from that seed.
        let signer = sekisho_proto::posture::TokenSigner::from_seed(SEED);
        assert_eq!(
            j["x"].as_str().unwrap(),
            URL_SAFE_NO_PAD.encode(signer.public().to_bytes())
        );
    }

    #[test]
    fn signed_sets_verify_with_the_published_keys() {
        let ev = Outgoing::Compliance {
            device: "alice-laptop".into(),
            user: Some("alice@example.com".into()),
            compliant: false,
            previous: None,
        };
        let claims = set_claims("https://broker.example", "rx-1", "j-1", NOW, &ev);
        assert!(claims.get("sub").is_none() && claims.get("exp").is_none());
        let body = &claims["events"][DEVICE_COMPLIANCE_CHANGE];
        assert_eq!(body["current_status"], "not-compliant");
        assert_eq!(body["previous_status"], "compliant");
        assert_eq!(body["event_timestamp"], NOW);
        let token = sign("k1", &SEED, &claims);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("secevent+jwt"));
        assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
        let got = set::verify(&token, &keys(), &expect("rx-1")).unwrap();
        assert_eq!(got.jti, "j-1");
        assert_eq!(
            got.events[0].kind,
            EventKind::Compliance { compliant: false }
        );
        assert_eq!(
            got.events[0].subject,
            Subject {
                user: Some(UserRef::Email("alice@example.com".into())),
                device: Some("alice-laptop".into())
            }
        );
        assert_eq!(got.events[0].at, Some(NOW));
        // For another receiver, or with another key, it does not verify.
        assert!(matches!(
            set::verify(&token, &keys(), &expect("rx-2")),
            Err(set::Refusal::WrongAudience { .. })
        ));
        let forged = sign("k1", &[9; 32], &claims);
        assert_eq!(
            set::verify(&forged, &keys(), &expect("rx-1")),
            Err(set::Refusal::BadSignature)
        );

        for (principal, subject) in [
            (
                Principal::User("bob".into()),
                Subject {
                    user: Some(UserRef::Opaque("bob".into())),
                    device: None,
                },
            ),
            (
                Principal::Device {
                    device: "bob-desktop".into(),
                    user: None,
                },
                Subject {
                    user: None,
                    device: Some("bob-desktop".into()),
                },
            ),
            // The user goes along as context; the receiver sees the risk is the device's.
            (
                Principal::Device {
                    device: "bob-desktop".into(),
                    user: Some("bob@example.com".into()),
                },
                Subject {
                    user: None,
                    device: Some("bob-desktop".into()),
                },
            ),
        ] {
            let ev = Outgoing::RiskLevel {
                principal,
                level: Level::High,
                previous: Some(Level::Low),
                reasons: "volume, denied_burst".into(),
            };
            let claims = set_claims("https://broker.example", "rx-1", "j-2", NOW, &ev);
            let body = &claims["events"][RISK_LEVEL_CHANGE];
            assert_eq!(body["current_level"], "HIGH");
            assert_eq!(body["previous_level"], "LOW");
            let got = set::verify(&sign("k1", &SEED, &claims), &keys(), &expect("rx-1")).unwrap();
            assert_eq!(
                got.events[0].kind,
                EventKind::RiskLevel { level: Level::High }
            );
            assert_eq!(got.events[0].subject, subject);
            assert_eq!(
                got.events[0].reason.as_deref(),
                Some("volume, denied_burst")
            );
        }
    }

    #[derive(Clone, Default)]
    struct Seen {
        /// Answers to give, in order (202 once they run out).
        script: Arc<Mutex<Vec<u16>>>,
        requests: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    }

    async fn receiver(
        State(s): State<Seen>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        s.requests.lock().unwrap().push((headers, body));
        let next = {
            let mut script = s.script.lock().unwrap();
            if script.is_empty() {
                202
            } else {
                script.remove(0)
            }
        };
        let body = match next {
            400 => r#"{"err":"invalid_audience","description":"not us"}"#.to_string(),
            _ => String::new(),
        };
        (StatusCode::from_u16(next).unwrap(), body)
    }

    async fn serve(seen: Seen) -> String {
        let app = axum::Router::new()
            .route("/events", post_route(receiver))
            .with_state(seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/events")
    }

    async fn settle(p: &Pusher, done: impl Fn(&[ReceiverStats]) -> bool) -> Vec<ReceiverStats> {
        for _ in 0..200 {
            let s = p.stats();
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the pusher did not settle: {:?}", p.stats());
    }

    #[tokio::test]
    async fn the_pusher_delivers_retries_and_counts() {
        let seen = Seen::default();
        // A 503 and a 500 first (retried), then a 202; then a 400 (refused, not retried).
        *seen.script.lock().unwrap() = vec![503, 500, 202, 400];
        let url = serve(seen.clone()).await;
        let p = Pusher::new(
            vec![Receiver {
                url: url.clone(),
                audience: "rx-1".into(),
                authorization: Some("s3cret".into()),
                ca_file: None,
            }],
            16,
        )
        .unwrap();
        let ev = Outgoing::RiskLevel {
            principal: Principal::User("alice@example.com".into()),
            level: Level::Medium,
            previous: None,
            reasons: "off_hours".into(),
        };
        p.send("k1", &SEED, "https://broker.example", NOW, &ev);
        p.send("k1", &SEED, "https://broker.example", NOW, &ev);
        let s = settle(&p, |s| s[0].sent + s[0].refused == 2).await;
        assert_eq!(s[0].sent, 1);
        assert_eq!(s[0].refused, 1);
        assert_eq!(s[0].retried, 2);
        assert_eq!(s[0].failed, 0);
        assert_eq!(s[0].queued, 0);
        assert_eq!(
            s[0].last_error.as_deref(),
            Some("HTTP 400 Bad Request invalid_audience: not us")
        );
        let requests = seen.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 4);
        let (headers, token) = &requests[0];
        assert_eq!(headers["content-type"], CONTENT_TYPE);
        assert_eq!(headers["accept"], "application/json");
        assert_eq!(headers["authorization"], "Bearer s3cret");
        let got = set::verify(token, &keys(), &expect("rx-1")).unwrap();
        assert_eq!(
            got.events[0].kind,
            EventKind::RiskLevel {
                level: Level::Medium
            }
        );
        // The retries carry the same SET; the second SET is another one of its own.
        assert_eq!(&requests[2].1, token);
        let second = set::verify(&requests[3].1, &keys(), &expect("rx-1")).unwrap();
        assert_ne!(second.jti, got.jti);
        assert_ne!(second.txn, got.txn);
        assert!(
            serde_json::to_value(&s).unwrap()[0]
                .get("dropped_queue_full")
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_never_blocks() {
        // Nobody listens there: the SET in flight is being retried while the rest pile up.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        drop(listener);
        let p = Pusher::new(
            vec![Receiver {
                url,
                audience: "rx".into(),
                authorization: Some("Basic dTpw".into()),
                ca_file: None,
            }],
            1,
        )
        .unwrap();
        for _ in 0..5 {
            p.send_with(|r| format!("token-for-{}", r.audience));
        }
        let s = p.stats();
        assert!(s[0].dropped_queue_full >= 3, "{s:?}");
        assert_eq!(s[0].sent, 0);
        let s = settle(&p, |s| s[0].retried > 0).await;
        assert_eq!(s[0].failed, 0, "still retrying: {s:?}");
        assert!(
            s[0].last_error.as_deref().unwrap().starts_with("POST "),
            "{s:?}"
        );
    }
}
