//! Receiving a Security Event Token (RFC 8417) from a Shared Signals transmitter, as a pure
//! function of the token, the transmitter's keys, what this receiver expects and the time.
//!
//! Checks, in order: the JWS header (asymmetric algorithm, explicit type, RFC 8417 §2.3 and
//! SSF 1.0 §4.1.1), the signature with the key its `kid` names, then the claims: `iss` (the
//! transmitter configured), `aud` (this receiver), `iat` (neither stale nor in the future),
//! `jti` (present; replays are the caller's, see [`Jtis`]) and `events` (an object,
//! RFC 8417 §2.2). Every refusal carries its RFC 8935 §2.4 error code ([`Refusal::code`]).
//!
//! The CAEP 1.0 events Sekisho acts on are parsed into [`Event`]s, with their subject from
//! the SSF `sub_id` (RFC 9493 subject identifiers; SSF 1.0 §2): session revoked, credential
//! change, device compliance change, assurance level change and risk level change. Other
//! event types are listed by URI in [`Set::unknown`], not refused (SSF 1.0 §4.2.3: receivers
//! ignore what they do not understand).

use std::collections::{HashSet, VecDeque};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Map, Value};

use crate::jose::SigError;
use sekisho_proto::risk::Level;

/// Seconds of clock skew tolerated between a transmitter and this broker (for `iat` in the
/// future).
pub const LEEWAY: u64 = 60;

/// The CAEP event type URIs (CAEP 1.0 §3).
pub const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
pub const SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
pub const CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";
pub const DEVICE_COMPLIANCE_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/device-compliance-change";
pub const ASSURANCE_LEVEL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/assurance-level-change";
pub const RISK_LEVEL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/risk-level-change";

/// What this receiver expects of a SET from one transmitter.
#[derive(Debug, Clone)]
pub struct Expect {
    /// The transmitter's issuer, as configured.
    pub issuer: String,
    /// This receiver's audience, as agreed with the transmitter.
    pub audience: String,
    /// A SET whose `iat` is older than this many seconds is refused as stale.
    pub max_age: u64,
    /// Unix time now.
    pub now: u64,
}

/// A SET that verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    pub issuer: String,
    pub jti: String,
    pub iat: u64,
    /// The transmitter's transaction id (SSF 1.0 §4.1.9), shared by SETs of one cause.
    pub txn: Option<String>,
    /// The events understood, in the order of the `events` object.
    pub events: Vec<Event>,
    /// The URIs of the event types not understood (for the log).
    pub unknown: Vec<String>,
    /// Every claim, as received (for the log).
    pub claims: Value,
}

/// One event of a SET.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub subject: Subject,
    /// `event_timestamp`: when the event happened, Unix seconds.
    pub at: Option<u64>,
    /// Why, for the log: `risk_reason` for a risk level change, else `reason_admin` (its
    /// English text, else any); a credential change without either says which credential
    /// changed how.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// CAEP §3.1: the subject's sessions are revoked.
    SessionRevoked,
    /// CAEP §3.3: a credential was created, changed, revoked or deleted.
    CredentialChange,
    /// CAEP §3.5: the device is now compliant or not.
    Compliance { compliant: bool },
    /// CAEP §3.4: the authentication's assurance changed; `decreased` only when the
    /// transmitter says so (`change_direction` "decrease"), `level` is `current_level` in the
    /// event's namespace.
    Assurance { decreased: bool, level: String },
    /// CAEP §3.8: the transmitter's risk level for the subject.
    RiskLevel { level: Level },
}

/// Who an event is about. Both empty: the subject is in a format Sekisho cannot map to one of
/// its users or devices (the caller logs and ignores such an event).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub user: Option<UserRef>,
    /// The device's name in Sekisho: a `device` member with format `opaque` (or a simple
    /// `opaque` subject of an event about a device).
    pub device: Option<String>,
}

/// A user as a subject identifier names them (RFC 9493 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    /// `email`, and `account` (an `acct:` URI, its address).
    Email(String),
    IssSub {
        iss: String,
        sub: String,
    },
    Opaque(String),
}

/// Why a SET is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the SET is malformed: {0}")]
    Malformed(String),
    #[error("the SET's type is {0:?}, not \"secevent+jwt\"")]
    Type(String),
    #[error("the SET is signed with {0}, which is not accepted")]
    Algorithm(String),
    #[error("the SET is signed with a key the transmitter does not publish (kid {0:?})")]
    UnknownKey(String),
    #[error("the SET's signature does not verify")]
    BadSignature,
    #[error("the transmitter's keys cannot be had: {0}")]
    KeysUnavailable(String),
    #[error("the SET is from issuer {got:?}, not {want:?}")]
    UnknownIssuer { got: String, want: String },
    #[error("the SET is for another audience ({got}), not this receiver")]
    WrongAudience { got: String },
    #[error("the SET was issued {0} s ago, longer than accepted")]
    Stale(u64),
    #[error("the SET is issued in the future")]
    Future,
    #[error("the SET has no {0:?} claim")]
    Missing(&'static str),
    #[error("the {event} event is malformed: {problem}")]
    Event { event: String, problem: String },
}

impl Refusal {
    /// The RFC 8935 §2.4 error code (the `err` of a 400 answer).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed(_)
            | Refusal::Type(_)
            | Refusal::Stale(_)
            | Refusal::Future
            | Refusal::Missing(_)
            | Refusal::Event { .. } => "invalid_request",
            Refusal::Algorithm(_) | Refusal::UnknownKey(_) | Refusal::KeysUnavailable(_) => {
                "invalid_key"
            }
            Refusal::BadSignature => "authentication_failed",
            Refusal::UnknownIssuer { .. } => "invalid_issuer",
            Refusal::WrongAudience { .. } => "invalid_audience",
        }
    }

    /// The HTTP status to answer a push with: 400 (RFC 8935 §2.3, the transmitter does not
    /// retry), except 503 when the transmitter's keys could not be fetched: that is this
    /// side's trouble, and the transmitter should try again later.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::KeysUnavailable(_) => 503,
            _ => 400,
        }
    }

    /// The RFC 8935 §2.3 error body: `{"err": code, "description": text}`.
    pub fn body(&self) -> Value {
        serde_json::json!({"err": self.code(), "description": self.to_string()})
    }
}

impl From<SigError> for Refusal {
    fn from(e: SigError) -> Self {
        match e {
            SigError::Malformed(m) => Refusal::Malformed(m),
            SigError::Algorithm(a) => Refusal::Algorithm(a),
            SigError::UnknownKey(kid) => Refusal::UnknownKey(kid),
            SigError::BadSignature => Refusal::BadSignature,
        }
    }
}

/// The JOSE header, decoded but not yet trusted.
fn raw_header(token: &str) -> Result<Map<String, Value>, Refusal> {
    let bad = || Refusal::Malformed("not a compact JWS".into());
    let (h, rest) = token.split_once('.').ok_or_else(bad)?;
    if rest.split('.').count() != 2 {
        return Err(bad());
    }
    let json = URL_SAFE_NO_PAD.decode(h).map_err(|_| bad())?;
    match serde_json::from_slice(&json) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Refusal::Malformed("the header is not a JSON object".into())),
    }
}

/// The `iss` a token claims, unverified: for a receiver endpoint shared by several
/// transmitters to pick whose keys and [`Expect`] to [`verify`] it with (a false claim then
/// fails the signature check).
pub fn peek_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    text(&claims, "iss")
}

/// Checks `token` against the transmitter's `keys` and `expect`, and parses its events.
pub fn verify(token: &str, keys: &JwkSet, expect: &Expect) -> Result<Set, Refusal> {
    let header = raw_header(token)?;
    // Named before the JWS library sees it: it knows neither `none` nor other algorithms.
    match header.get("alg").and_then(Value::as_str) {
        None => return Err(Refusal::Malformed("the header has no \"alg\"".into())),
        Some(alg)
            if !crate::jose::ALGORITHMS
                .iter()
                .any(|a| format!("{a:?}") == alg) =>
        {
            return Err(Refusal::Algorithm(alg.to_string()));
        }
        Some(_) => {}
    }
    // Explicit typing (RFC 8417 §2.3): "secevent+jwt" (the media type application/secevent+jwt
    // without its optional "application/" prefix, compared case-insensitively, RFC 7515
    // §4.1.9). RFC 8417 only RECOMMENDS the header and transmitters that predate SSF leave it
    // out, so a SET without `typ` is taken: it still cannot be another kind of JWT passed off
    // as a SET, since it must carry `events`, which no ID or access token has (RFC 8417
    // §4.3). But a token that says what else it is ("JWT", "at+jwt", ...) is refused: that is
    // the confusion explicit typing exists to stop (RFC 8417 §4.5-4.7; SSF 1.0 §4.1.1 makes
    // the header mandatory).
    match header.get("typ") {
        None => {}
        Some(Value::String(t))
            if t.eq_ignore_ascii_case("secevent+jwt")
                || t.eq_ignore_ascii_case("application/secevent+jwt") => {}
        Some(other) => {
            return Err(Refusal::Type(
                other
                    .as_str()
                    .map_or_else(|| other.to_string(), String::from),
            ));
        }
    }
    let (_, claims) = crate::jose::verify_signature(token, keys)?;
    check_claims(claims, expect)
}

fn text(v: &Value, name: &str) -> Option<String> {
    v.get(name)?.as_str().map(str::to_string)
}

fn number(v: &Value, name: &str) -> Option<u64> {
    let v = v.get(name)?;
    v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64))
}

/// The claim checks and the events, on claims whose signature verified.
pub fn check_claims(claims: Value, expect: &Expect) -> Result<Set, Refusal> {
    if !claims.is_object() {
        return Err(Refusal::Malformed(
            "the claims are not a JSON object".into(),
        ));
    }
    let iss = text(&claims, "iss").ok_or(Refusal::Missing("iss"))?;
    if iss != expect.issuer {
        return Err(Refusal::UnknownIssuer {
            got: iss,
            want: expect.issuer.clone(),
        });
    }
    let aud: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => return Err(Refusal::Missing("aud")),
    };
    if !aud.contains(&expect.audience.as_str()) {
        return Err(Refusal::WrongAudience {
            got: aud.join(", "),
        });
    }
    let iat = number(&claims, "iat").ok_or(Refusal::Missing("iat"))?;
    if iat > expect.now + LEEWAY {
        return Err(Refusal::Future);
    }
    if iat + expect.max_age < expect.now {
        return Err(Refusal::Stale(expect.now - iat));
    }
    let jti = text(&claims, "jti")
        .filter(|j| !j.is_empty())
        .ok_or(Refusal::Missing("jti"))?;
    let events = match claims.get("events") {
        Some(Value::Object(m)) => m,
        Some(_) => return Err(Refusal::Malformed("\"events\" is not a JSON object".into())),
        None => return Err(Refusal::Missing("events")),
    };
    let top_subject = claims.get("sub_id");
    let mut parsed = Vec::new();
    let mut unknown = Vec::new();
    for (uri, body) in events {
        match parse_event(uri, body, top_subject)? {
            Some(e) => parsed.push(e),
            None => unknown.push(uri.clone()),
        }
    }
    Ok(Set {
        issuer: iss,
        jti,
        iat,
        txn: text(&claims, "txn"),
        events: parsed,
        unknown,
        claims,
    })
}

/// One event; None for a type not understood.
fn parse_event(uri: &str, body: &Value, top: Option<&Value>) -> Result<Option<Event>, Refusal> {
    let Some(name) = uri.strip_prefix(CAEP) else {
        return Ok(None);
    };
    if !matches!(
        name,
        "session-revoked"
            | "credential-change"
            | "device-compliance-change"
            | "assurance-level-change"
            | "risk-level-change"
    ) {
        return Ok(None);
    }
    let bad = |problem: &str| Refusal::Event {
        event: name.to_string(),
        problem: problem.to_string(),
    };
    if !body.is_object() {
        return Err(bad("not a JSON object"));
    }
    let mut reason = reason_admin(body);
    let mut about_device = false;
    let kind = match name {
        "session-revoked" => EventKind::SessionRevoked,
        "credential-change" => {
            if reason.is_none() {
                let what = [text(body, "credential_type"), text(body, "change_type")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>();
                reason = (!what.is_empty()).then(|| what.join(" "));
            }
            EventKind::CredentialChange
        }
        "device-compliance-change" => {
            about_device = true;
            let compliant = match body.get("current_status").and_then(Value::as_str) {
                Some("compliant") => true,
                Some("not-compliant") => false,
                Some(_) => {
                    return Err(bad("current_status is neither compliant nor not-compliant"));
                }
                None => return Err(bad("no current_status")),
            };
            EventKind::Compliance { compliant }
        }
        "assurance-level-change" => {
            let level = text(body, "current_level").ok_or_else(|| bad("no current_level"))?;
            let decreased = text(body, "change_direction").as_deref() == Some("decrease");
            EventKind::Assurance { decreased, level }
        }
        _ => {
            let level = text(body, "current_level").ok_or_else(|| bad("no current_level"))?;
            let level = Level::parse(&level.to_ascii_lowercase())
                .ok_or_else(|| bad("current_level is not LOW, MEDIUM or HIGH"))?;
            if let Some(r) = text(body, "risk_reason") {
                reason = Some(r);
            }
            about_device =
                text(body, "principal").is_some_and(|p| p.eq_ignore_ascii_case("DEVICE"));
            EventKind::RiskLevel { level }
        }
    };
    // The subject: `sub_id` or (CAEP before SSF 1.0) `subject` in the event, else the
    // top-level `sub_id` (SSF 1.0 §2.1).
    let sub = body
        .get("sub_id")
        .or_else(|| body.get("subject"))
        .or(top)
        .ok_or_else(|| bad("no subject (sub_id)"))?;
    let mut subject = parse_subject(sub, about_device);
    // A risk level change names its principal: of a user and a device together, the risk is
    // the one named.
    if let EventKind::RiskLevel { .. } = kind {
        match text(body, "principal")
            .map(|p| p.to_ascii_uppercase())
            .as_deref()
        {
            Some("DEVICE") if subject.device.is_some() => subject.user = None,
            Some("USER") if subject.user.is_some() => subject.device = None,
            _ => {}
        }
    }
    let at = number(body, "event_timestamp").map(|t| {
        // Early CAEP examples had milliseconds (openid/sharedsignals#275); no event of ours
        // is from after the year 5000.
        if t > 100_000_000_000 { t / 1000 } else { t }
    });
    Ok(Some(Event {
        kind,
        subject,
        at,
        reason,
    }))
}

/// `reason_admin`: a map of language tags to text (CAEP §2), its English text else any; a
/// plain string is taken as it is.
fn reason_admin(body: &Value) -> Option<String> {
    match body.get("reason_admin")? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m
            .get("en")
            .or_else(|| m.values().next())
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

/// A subject member (simple or complex, SSF 1.0 §2). A simple `opaque` subject of an event
/// about a device names the device; otherwise simple subjects name a user.
fn parse_subject(v: &Value, about_device: bool) -> Subject {
    match v.get("format").and_then(Value::as_str) {
        Some("complex") => Subject {
            user: v.get("user").and_then(user_ref),
            device: v
                .get("device")
                .and_then(|d| match d.get("format")?.as_str()? {
                    "opaque" => text(d, "id"),
                    _ => None,
                }),
        },
        Some("opaque") if about_device => Subject {
            user: None,
            device: text(v, "id"),
        },
        _ => Subject {
            user: user_ref(v),
            device: None,
        },
    }
}

/// A simple subject identifier naming a user (RFC 9493 §3.2).
fn user_ref(v: &Value) -> Option<UserRef> {
    match v.get("format")?.as_str()? {
        "email" => text(v, "email").map(UserRef::Email),
        "account" => text(v, "uri")
            .and_then(|u| u.strip_prefix("acct:").map(String::from))
            .map(UserRef::Email),
        "iss_sub" => Some(UserRef::IssSub {
            iss: text(v, "iss")?,
            sub: text(v, "sub")?,
        }),
        "opaque" => text(v, "id").map(UserRef::Opaque),
        _ => None,
    }
}

/// The `jti`s seen recently, per issuer, to refuse a SET received twice (RFC 8417 §2.2:
/// `jti` is unique per issuer). A SET older than `max_age` is refused as stale anyway, so an
/// entry is kept `max_age` plus [`LEEWAY`] (an `iat` may be that far ahead) after it was
/// seen; beyond `capacity` entries the oldest goes first (a replay of it would then pass
/// this check, which a flood of fresh SETs from a trusted transmitter would take to arrange).
#[derive(Debug)]
pub struct Jtis {
    keep: u64,
    capacity: usize,
    order: VecDeque<(u64, String)>,
    seen: HashSet<String>,
}

impl Jtis {
    pub const CAPACITY: usize = 100_000;

    pub fn new(max_age: u64, capacity: usize) -> Jtis {
        Jtis {
            keep: max_age + LEEWAY,
            capacity: capacity.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// Whether `jti` from `iss` was seen already (nothing is noted).
    pub fn contains(&self, iss: &str, jti: &str) -> bool {
        self.seen.contains(&format!("{iss}\u{0}{jti}"))
    }

    /// Whether `jti` from `iss` was seen already; if not, it is now.
    pub fn seen(&mut self, iss: &str, jti: &str, now: u64) -> bool {
        while let Some((t, _)) = self.order.front()
            && t + self.keep < now
        {
            let (_, k) = self.order.pop_front().expect("front exists");
            self.seen.remove(&k);
        }
        let key = format!("{iss}\u{0}{jti}");
        if self.seen.contains(&key) {
            return true;
        }
        while self.order.len() >= self.capacity {
            let (_, k) = self.order.pop_front().expect("not empty");
            self.seen.remove(&k);
        }
        self.seen.insert(key.clone());
        self.order.push_back((now, key));
        false
    }

    #[cfg(test)]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::jose::testing::{Signer, key_set as keyset, sign_typ, signer};

    fn sign(s: &Signer, kid: &str, claims: &Value) -> String {
        sign_typ(s, kid, Some("secevent+jwt"), claims)
    }

    const NOW: u64 = 1_800_000_000;
    const ISS: &str = "https://idp.example.com/123456789/";
    const AUD: &str = "https://sekisho.example/ssf";

    fn expect() -> Expect {
        Expect {
            issuer: ISS.into(),
            audience: AUD.into(),
            max_age: 300,
            now: NOW,
        }
    }

    /// CAEP 1.0 §3.5.2's example, with our issuer, audience and times.
    fn compliance() -> Value {
        json!({
            "iss": ISS, "jti": "24c63fb56e5a2d77a6b512616ca9fa24", "iat": NOW - 5,
            "aud": AUD, "txn": "8675309",
            "sub_id": {
                "format": "complex",
                "device": {"format": "opaque", "id": "alice-laptop"},
                "tenant": {"format": "opaque", "id": "123456789"}
            },
            "events": {
                DEVICE_COMPLIANCE_CHANGE: {
                    "current_status": "not-compliant",
                    "previous_status": "compliant",
                    "initiating_entity": "policy",
                    "reason_admin": {"en": "Location Policy Violation: C076E8A3"},
                    "reason_user": {"en": "Device is no longer in a trusted location."},
                    "event_timestamp": NOW - 10
                }
            }
        })
    }

    fn one(claims: &Value) -> Event {
        let k = signer("k1");
        let set = verify(&sign(&k, "k1", claims), &keyset(&[&k]), &expect()).unwrap();
        assert_eq!(set.events.len(), 1, "{set:?}");
        set.events.into_iter().next().unwrap()
    }

    #[test]
    fn a_good_set_verifies() {
        let k = signer("k1");
        let set = verify(&sign(&k, "k1", &compliance()), &keyset(&[&k]), &expect()).unwrap();
        assert_eq!(set.issuer, ISS);
        assert_eq!(set.jti, "24c63fb56e5a2d77a6b512616ca9fa24");
        assert_eq!(set.iat, NOW - 5);
        assert_eq!(set.txn.as_deref(), Some("8675309"));
        assert!(set.unknown.is_empty());
        assert_eq!(
            set.events,
            [Event {
                kind: EventKind::Compliance { compliant: false },
                subject: Subject {
                    user: None,
                    device: Some("alice-laptop".into())
                },
                at: Some(NOW - 10),
                reason: Some("Location Policy Violation: C076E8A3".into()),
            }]
        );
        // An audience among several; typ as a full media type; no typ at all.
        let mut c = compliance();
        c["aud"] = json!(["other", AUD]);
        assert!(verify(&sign(&k, "k1", &c), &keyset(&[&k]), &expect()).is_ok());
        let t = sign_typ(&k, "k1", Some("application/secevent+jwt"), &compliance());
        assert!(verify(&t, &keyset(&[&k]), &expect()).is_ok());
        let t = sign_typ(&k, "k1", None, &compliance());
        assert!(verify(&t, &keyset(&[&k]), &expect()).is_ok());
    }

    #[test]
    fn the_issuer_can_be_peeked_at() {
        let k = signer("k1");
        assert_eq!(
            peek_issuer(&sign(&k, "k1", &compliance())).as_deref(),
            Some(ISS)
        );
        for junk in ["", "a.b.c", "e30.e30.e30", "e30.WzFd.e30"] {
            assert_eq!(peek_issuer(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn every_refusal_is_named_with_its_code() {
        let k = signer("k1");
        let other = signer("k1");
        let keys = keyset(&[&k]);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = compliance();
            f(&mut c);
            verify(&sign(&k, "k1", &c), &keys, &expect())
        };
        let code = |r: Result<Set, Refusal>| r.unwrap_err().code();

        // Signed by another key under the same kid.
        let r = verify(&sign(&other, "k1", &compliance()), &keys, &expect());
        assert_eq!(r, Err(Refusal::BadSignature));
        assert_eq!(code(r), "authentication_failed");
        // An edited payload under the original signature.
        let t = sign(&k, "k1", &compliance());
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = compliance();
        c["events"][DEVICE_COMPLIANCE_CHANGE]["current_status"] = "compliant".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(c.to_string()),
            parts[2]
        );
        assert_eq!(
            verify(&forged, &keys, &expect()),
            Err(Refusal::BadSignature)
        );
        // A kid the transmitter does not publish: the caller fetches the keys again.
        let r = verify(&sign(&k, "k9", &compliance()), &keys, &expect());
        assert_eq!(r, Err(Refusal::UnknownKey("k9".into())));
        assert_eq!(code(r), "invalid_key");
        // Another kind of JWT.
        let r = verify(
            &sign_typ(&k, "k1", Some("JWT"), &compliance()),
            &keys,
            &expect(),
        );
        assert_eq!(r, Err(Refusal::Type("JWT".into())));
        assert_eq!(code(r), "invalid_request");

        let r = with(&|c| c["iss"] = "https://evil.example".into());
        assert!(matches!(r, Err(Refusal::UnknownIssuer { .. })), "{r:?}");
        assert_eq!(code(r), "invalid_issuer");
        let r = with(&|c| c["aud"] = "someone-else".into());
        assert!(matches!(r, Err(Refusal::WrongAudience { .. })), "{r:?}");
        assert_eq!(code(r), "invalid_audience");
        let r = with(&|c| c["aud"] = json!(["a", "b"]));
        assert!(matches!(r, Err(Refusal::WrongAudience { .. })), "{r:?}");

        let r = with(&|c| c["iat"] = (NOW - 3600).into());
        assert_eq!(r, Err(Refusal::Stale(3600)));
        assert_eq!(code(r), "invalid_request");
        // Exactly max_age old is still fresh; within the leeway, the future is forgiven.
        assert!(with(&|c| c["iat"] = (NOW - 300).into()).is_ok());
        assert!(with(&|c| c["iat"] = (NOW + 30).into()).is_ok());
        assert_eq!(
            with(&|c| c["iat"] = (NOW + 3600).into()),
            Err(Refusal::Future)
        );
        for claim in ["iss", "aud", "iat", "jti", "events"] {
            let r = with(&|c| {
                c.as_object_mut().unwrap().remove(claim);
            });
            assert_eq!(r, Err(Refusal::Missing(claim)));
        }
        assert_eq!(
            with(&|c| c["jti"] = "".into()),
            Err(Refusal::Missing("jti"))
        );
        assert!(matches!(
            with(&|c| c["events"] = json!(["not", "an", "object"])),
            Err(Refusal::Malformed(_))
        ));
        // A known event that does not follow its definition.
        let r = with(&|c| c["events"][DEVICE_COMPLIANCE_CHANGE]["current_status"] = "meh".into());
        assert!(matches!(r, Err(Refusal::Event { .. })), "{r:?}");
        assert_eq!(code(r), "invalid_request");

        let body = Refusal::BadSignature.body();
        assert_eq!(body["err"], "authentication_failed");
        assert_eq!(body["description"], "the SET's signature does not verify");
        assert_eq!(Refusal::BadSignature.status(), 400);
        assert_eq!(Refusal::KeysUnavailable("down".into()).status(), 503);

        // Garbage is malformed, never a panic.
        for junk in [
            "",
            "a",
            "a.b",
            "a.b.c",
            "....",
            "eyJhbGciOiJFUzI1NiJ9.e30.",
            "e30.e30.e30",
        ] {
            assert!(verify(junk, &keys, &expect()).is_err(), "{junk:?}");
        }
        // Claims that are not an object.
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#);
        let t = format!("{h}.{}.c2ln", URL_SAFE_NO_PAD.encode("[1,2]"));
        assert!(verify(&t, &keys, &expect()).is_err());
    }

    #[test]
    fn no_algorithm_none_nor_hmac() {
        let keys = keyset(&[&signer("k1")]);
        let p = URL_SAFE_NO_PAD.encode(compliance().to_string());
        for alg in ["none", "HS256", "HS512", "ES512"] {
            let h = URL_SAFE_NO_PAD.encode(format!(
                r#"{{"alg":"{alg}","kid":"k1","typ":"secevent+jwt"}}"#
            ));
            for sig in ["", "c2ln"] {
                let r = verify(&format!("{h}.{p}.{sig}"), &keys, &expect());
                assert_eq!(r, Err(Refusal::Algorithm(alg.into())));
                assert_eq!(r.unwrap_err().code(), "invalid_key");
            }
        }
        // An HMAC key in the set changes nothing.
        let keys: JwkSet =
            serde_json::from_value(json!({"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}]}))
                .unwrap();
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k1"}"#);
        assert_eq!(
            verify(&format!("{h}.{p}.c2ln"), &keys, &expect()),
            Err(Refusal::Algorithm("HS256".into()))
        );
    }

    #[test]
    fn session_revoked_with_a_complex_user_subject() {
        // CAEP 1.0 §3.1.2, the second example: the subject in the top-level sub_id.
        let c = json!({
            "iss": ISS, "jti": "j-1", "iat": NOW, "aud": AUD,
            "sub_id": {
                "format": "complex",
                "session": {"format": "opaque", "id": "dMTlD|1600802906337.16|16008.16"},
                "user": {"format": "iss_sub", "iss": ISS,
                    "sub": "99beb27c-c1c2-4955-882a-e0dc4996fcbc"},
                "tenant": {"format": "opaque", "id": "123456789"}
            },
            "events": {SESSION_REVOKED: {
                "initiating_entity": "policy",
                "reason_admin": {"de": "Landspeed-Richtlinienverstoß",
                    "en": "Landspeed Policy Violation: C076E82F"},
                "reason_user": {"en": "Access attempt from multiple regions."},
                "event_timestamp": 1615304991
            }}
        });
        assert_eq!(
            one(&c),
            Event {
                kind: EventKind::SessionRevoked,
                subject: Subject {
                    user: Some(UserRef::IssSub {
                        iss: ISS.into(),
                        sub: "99beb27c-c1c2-4955-882a-e0dc4996fcbc".into()
                    }),
                    device: None
                },
                at: Some(1615304991),
                reason: Some("Landspeed Policy Violation: C076E82F".into()),
            }
        );
    }

    #[test]
    fn credential_change_with_an_event_level_subject() {
        // CAEP before SSF 1.0 put the subject in the event as "subject".
        let c = json!({
            "iss": ISS, "jti": "j-2", "iat": NOW, "aud": AUD,
            "events": {CREDENTIAL_CHANGE: {
                "subject": {"format": "email", "email": "alice@example.com"},
                "credential_type": "password",
                "change_type": "update",
                "initiating_entity": "user",
                "event_timestamp": 1615304991643u64
            }}
        });
        let e = one(&c);
        assert_eq!(e.kind, EventKind::CredentialChange);
        assert_eq!(
            e.subject.user,
            Some(UserRef::Email("alice@example.com".into()))
        );
        assert_eq!(e.reason.as_deref(), Some("password update"));
        // Milliseconds, as early examples had them.
        assert_eq!(e.at, Some(1615304991));
    }

    #[test]
    fn assurance_level_changes() {
        let mk = |body: Value| {
            json!({"iss": ISS, "jti": "j-3", "iat": NOW, "aud": AUD,
                "sub_id": {"format": "iss_sub", "iss": ISS, "sub": "jane.smith@example.com"},
                "events": {ASSURANCE_LEVEL_CHANGE: body}})
        };
        let e = one(&mk(
            json!({"namespace": "NIST-AAL", "current_level": "nist-aal1",
            "previous_level": "nist-aal2", "change_direction": "decrease",
            "initiating_entity": "user", "event_timestamp": 1615304991}),
        ));
        assert_eq!(
            e.kind,
            EventKind::Assurance {
                decreased: true,
                level: "nist-aal1".into()
            }
        );
        let e = one(&mk(
            json!({"namespace": "NIST-AAL", "current_level": "nist-aal2",
            "previous_level": "nist-aal1", "change_direction": "increase"}),
        ));
        assert_eq!(
            e.kind,
            EventKind::Assurance {
                decreased: false,
                level: "nist-aal2".into()
            }
        );
        // Without a direction, nothing says it decreased.
        let e = one(&mk(
            json!({"namespace": "Retinal Scan", "current_level": "hi-res-scan"}),
        ));
        assert_eq!(
            e.kind,
            EventKind::Assurance {
                decreased: false,
                level: "hi-res-scan".into()
            }
        );
        let k = signer("k1");
        let r = verify(
            &sign(&k, "k1", &mk(json!({"namespace": "NIST-AAL"}))),
            &keyset(&[&k]),
            &expect(),
        );
        assert!(matches!(r, Err(Refusal::Event { .. })), "{r:?}");
    }

    #[test]
    fn risk_level_changes() {
        let mk = |sub: Value, body: Value| {
            json!({"iss": ISS, "jti": "j-4", "iat": NOW, "aud": AUD, "sub_id": sub,
                "events": {RISK_LEVEL_CHANGE: body}})
        };
        // CAEP 1.0 §3.8's example.
        let e = one(&mk(
            json!({"format": "iss_sub", "iss": "https://idp.example.com/3456789/",
                "sub": "jane.doe@example.com"}),
            json!({"current_level": "LOW", "previous_level": "HIGH", "event_timestamp": 1615304991,
                "principal": "USER", "risk_reason": "PASSWORD_FOUND_IN_DATA_BREACH"}),
        ));
        assert_eq!(e.kind, EventKind::RiskLevel { level: Level::Low });
        assert_eq!(e.reason.as_deref(), Some("PASSWORD_FOUND_IN_DATA_BREACH"));
        assert!(matches!(e.subject.user, Some(UserRef::IssSub { .. })));
        // Case does not matter; a device principal with a simple opaque subject is a device.
        let e = one(&mk(
            json!({"format": "opaque", "id": "bob-desktop"}),
            json!({"current_level": "high", "principal": "DEVICE",
                "reason_admin": {"en": "unapproved software"}}),
        ));
        assert_eq!(e.kind, EventKind::RiskLevel { level: Level::High });
        assert_eq!(
            e.subject,
            Subject {
                user: None,
                device: Some("bob-desktop".into())
            }
        );
        assert_eq!(e.reason.as_deref(), Some("unapproved software"));
        // User and device together: the principal says whose risk it is.
        let both = json!({"format": "complex",
            "user": {"format": "email", "email": "bob@example.com"},
            "device": {"format": "opaque", "id": "bob-desktop"}});
        let e = one(&mk(
            both.clone(),
            json!({"current_level": "Medium", "principal": "DEVICE"}),
        ));
        assert_eq!(
            e.kind,
            EventKind::RiskLevel {
                level: Level::Medium
            }
        );
        assert_eq!(e.subject.user, None);
        assert_eq!(e.subject.device.as_deref(), Some("bob-desktop"));
        let e = one(&mk(
            both,
            json!({"current_level": "MEDIUM", "principal": "USER"}),
        ));
        assert_eq!(
            e.subject,
            Subject {
                user: Some(UserRef::Email("bob@example.com".into())),
                device: None
            }
        );
        // A level outside the three.
        let k = signer("k1");
        let c = mk(
            json!({"format": "opaque", "id": "x"}),
            json!({"current_level": "CRITICAL", "principal": "USER"}),
        );
        let r = verify(&sign(&k, "k1", &c), &keyset(&[&k]), &expect());
        assert!(matches!(r, Err(Refusal::Event { .. })), "{r:?}");
    }

    #[test]
    fn subject_formats() {
        let s = |v: Value| parse_subject(&v, false);
        assert_eq!(
            s(json!({"format": "email", "email": "a@example.com"})).user,
            Some(UserRef::Email("a@example.com".into()))
        );
        assert_eq!(
            s(json!({"format": "account", "uri": "acct:a@example.com"})).user,
            Some(UserRef::Email("a@example.com".into()))
        );
        assert_eq!(
            s(json!({"format": "iss_sub", "iss": "https://i", "sub": "s"})).user,
            Some(UserRef::IssSub {
                iss: "https://i".into(),
                sub: "s".into()
            })
        );
        assert_eq!(
            s(json!({"format": "opaque", "id": "u-1"})).user,
            Some(UserRef::Opaque("u-1".into()))
        );
        assert_eq!(
            s(json!({"format": "complex",
                "user": {"format": "opaque", "id": "u-1"},
                "device": {"format": "opaque", "id": "d-1"},
                "session": {"format": "opaque", "id": "s-1"}})),
            Subject {
                user: Some(UserRef::Opaque("u-1".into())),
                device: Some("d-1".into())
            }
        );
        // Formats Sekisho cannot map to its users or devices.
        for v in [
            json!({"format": "phone_number", "phone_number": "+12065550100"}),
            json!({"format": "did", "url": "did:example:123"}),
            json!({"format": "complex", "device": {"format": "iss_sub", "iss": "i", "sub": "s"}}),
            json!({"format": "email"}),
            json!("alice"),
        ] {
            assert_eq!(s(v.clone()), Subject::default(), "{v}");
        }
    }

    #[test]
    fn unknown_events_are_listed_not_refused() {
        let c = json!({"iss": ISS, "jti": "j-5", "iat": NOW, "aud": AUD,
        "sub_id": {"format": "opaque", "id": "stream-1"},
        "events": {
            "https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "abc"},
            "https://schemas.openid.net/secevent/caep/event-type/session-established": {},
            "https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}
        }});
        let k = signer("k1");
        let set = verify(&sign(&k, "k1", &c), &keyset(&[&k]), &expect()).unwrap();
        assert!(set.events.is_empty());
        assert_eq!(set.unknown.len(), 3);
        assert_eq!(set.claims["events"].as_object().unwrap().len(), 3);
        // A known event without any subject is malformed.
        let c = json!({"iss": ISS, "jti": "j-6", "iat": NOW, "aud": AUD,
            "events": {SESSION_REVOKED: {}}});
        let r = verify(&sign(&k, "k1", &c), &keyset(&[&k]), &expect());
        assert!(matches!(r, Err(Refusal::Event { .. })), "{r:?}");
    }

    #[test]
    fn the_replay_cache_is_bounded_in_time_and_size() {
        let mut j = Jtis::new(300, 3);
        assert!(!j.seen("a", "1", 1000));
        assert!(j.seen("a", "1", 1001));
        // Per issuer.
        assert!(!j.seen("b", "1", 1001));
        // Kept max_age + leeway, then forgotten.
        assert!(j.seen("a", "1", 1000 + 360));
        assert!(!j.seen("a", "1", 1000 + 361));
        assert_eq!(j.len(), 2);
        assert!(!j.seen("c", "1", 1000 + 362));
        assert_eq!(j.len(), 2, "b's entry went with time too");
        // Beyond capacity, the oldest goes.
        let mut j = Jtis::new(300, 3);
        for (i, jti) in ["1", "2", "3", "4"].iter().enumerate() {
            assert!(!j.seen("a", jti, 1000 + i as u64));
        }
        assert_eq!(j.len(), 3);
        assert!(!j.seen("a", "1", 1010), "the oldest was evicted");
        assert!(j.seen("a", "4", 1010));
        let mut j = Jtis::new(300, Jtis::CAPACITY);
        for i in 0..Jtis::CAPACITY + 10 {
            j.seen("a", &i.to_string(), 1000);
        }
        assert_eq!(j.len(), Jtis::CAPACITY);
    }
}
