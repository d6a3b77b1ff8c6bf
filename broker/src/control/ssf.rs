//! Shared Signals in the control plane: the push endpoint transmitters send their Security
//! Event Tokens to (`POST /v1/ssf/events`, RFC 8935), what each CAEP event does here, and
//! Sekisho's own SETs (risk-level-change, device-compliance-change) to the configured
//! receivers, signed with the posture signing key and published at `/v1/ssf/jwks.json`.
//!
//! What a received event does:
//! - **device-compliance-change** `not-compliant`: a lasting `non_compliant` signal on the
//!   device (the external-high weight: high risk) until the same transmitter says `compliant`;
//! - **risk-level-change**: a lasting `external` signal on the user or device at that level
//!   (`LOW` withdraws it);
//! - **assurance-level-change** that decreased: a lasting medium `external` signal on the user
//!   until an increase;
//! - **session-revoked**, **credential-change**: the user's devices lose their sign-in (levels
//!   with `sign_in_max_age` close until `sekisho-client login`) and the user gets a decaying
//!   medium `external` signal.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tracing::{info, warn};

use sekisho_proto::risk::{Level, Signal};

use super::{Control, Ctl, now_unix};
use crate::config::{ControlConfig, SsfConfig};
use crate::risk::{Change, Input, RiskService};
use crate::ssf::set::{self, EventKind, Expect, Jtis, Refusal, UserRef};
use crate::ssf::transmit::{Outgoing, Principal, Pusher, Receiver};
use crate::ssf::{KeySource, TransmitterKeys};

struct Transmitter {
    issuer: String,
    keys: TransmitterKeys,
    bearer: Option<String>,
    /// The event kinds it may send (None: all).
    events: Option<Vec<String>>,
}

/// Short names of the CAEP events, as `events` in `[[control.ssf.transmitters]]` lists them.
pub const EVENT_NAMES: [&str; 5] = [
    "session-revoked",
    "credential-change",
    "device-compliance-change",
    "assurance-level-change",
    "risk-level-change",
];

fn event_name(k: &EventKind) -> &'static str {
    match k {
        EventKind::SessionRevoked => EVENT_NAMES[0],
        EventKind::CredentialChange => EVENT_NAMES[1],
        EventKind::Compliance { .. } => EVENT_NAMES[2],
        EventKind::Assurance { .. } => EVENT_NAMES[3],
        EventKind::RiskLevel { .. } => EVENT_NAMES[4],
    }
}

/// Event times already applied, per (subject, event kind, transmitter): an older event that
/// arrives late does not undo a newer one. Bounded: beyond it, it starts afresh.
const LATEST: usize = 100_000;

/// The control plane's Shared Signals state.
pub struct Ssf {
    issuer: String,
    audience: String,
    max_age: u64,
    transmitters: Vec<Transmitter>,
    jtis: std::sync::Mutex<Jtis>,
    pusher: Option<Pusher>,
    /// Whether each device passed its checks at its last posture request.
    compliance: std::sync::Mutex<HashMap<String, bool>>,
    latest: std::sync::Mutex<HashMap<(String, &'static str, String), u64>>,
}

fn read_secret(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!s.is_empty(), "the {what} {} is empty", path.display());
    Ok(s)
}

impl Ssf {
    /// From `[control.ssf]`: transmitters' key sources (a file is read now), receivers'
    /// senders (inside the runtime).
    pub fn new(ctl: &ControlConfig, c: &SsfConfig) -> anyhow::Result<Ssf> {
        let mut transmitters = Vec::new();
        for (i, t) in c.transmitters.iter().enumerate() {
            let source = match (&t.jwks_uri, &t.jwks_file) {
                (Some(u), None) => KeySource::Url {
                    jwks_uri: u.clone(),
                    ca_file: t.ca_file.clone(),
                },
                (None, Some(f)) => KeySource::File(f.clone()),
                _ => anyhow::bail!(
                    "[[control.ssf.transmitters]] {i} ({}): give exactly one of jwks_uri or jwks_file",
                    t.issuer
                ),
            };
            if let Some(bad) = t
                .events
                .iter()
                .flatten()
                .find(|e| !EVENT_NAMES.contains(&e.as_str()))
            {
                anyhow::bail!(
                    "[[control.ssf.transmitters]] {i} ({}): unknown event {bad:?} (known: {})",
                    t.issuer,
                    EVENT_NAMES.join(", ")
                );
            }
            transmitters.push(Transmitter {
                events: t.events.clone(),
                issuer: t.issuer.clone(),
                keys: TransmitterKeys::new(source)?,
                bearer: t
                    .bearer_token_file
                    .as_deref()
                    .map(|p| read_secret(p, "SSF transmitter bearer token file"))
                    .transpose()?,
            });
        }
        let receivers = c
            .receivers
            .iter()
            .map(|r| {
                Ok(Receiver {
                    url: r.url.clone(),
                    audience: r.audience.clone(),
                    authorization: r
                        .authorization_file
                        .as_deref()
                        .map(|p| read_secret(p, "SSF receiver authorization file"))
                        .transpose()?,
                    ca_file: r.ca_file.clone(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pusher = if receivers.is_empty() {
            None
        } else {
            Some(Pusher::new(receivers, c.queue.max(1))?)
        };
        let max_age = c.max_age.as_secs().max(1);
        Ok(Ssf {
            issuer: c.issuer.clone().unwrap_or_else(|| ctl.url.clone()),
            audience: c.audience.clone().unwrap_or_else(|| ctl.url.clone()),
            max_age,
            transmitters,
            jtis: std::sync::Mutex::new(Jtis::new(max_age, Jtis::CAPACITY)),
            pusher,
            compliance: std::sync::Mutex::new(HashMap::new()),
            latest: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn stats(&self) -> Vec<crate::ssf::transmit::ReceiverStats> {
        self.pusher.as_ref().map(|p| p.stats()).unwrap_or_default()
    }
}

impl Control {
    fn ssf(&self) -> Option<&Arc<Ssf>> {
        self.ssf.as_ref()
    }

    /// Sends a SET to every receiver, signed with the active posture key.
    fn transmit(&self, event: &Outgoing) {
        let Some(ssf) = self.ssf() else { return };
        let Some(pusher) = &ssf.pusher else { return };
        let ring = self.key_ring();
        let signer = &ring.signer;
        pusher.send(signer.kid(), &signer.seed(), &ssf.issuer, now_unix(), event);
    }

    /// A device's posture was just attested: tell receivers when its compliance changed.
    pub(super) fn posture_compliance(&self, device: &str, user: &str, compliant: bool) {
        let Some(ssf) = self.ssf() else { return };
        // Held while sending (sending only queues): two posture requests at once cannot
        // send their changes in the other order than the map has them.
        let mut m = ssf.compliance.lock().unwrap_or_else(|e| e.into_inner());
        let previous = m.insert(device.to_string(), compliant);
        if previous == Some(compliant) || (previous.is_none() && compliant) {
            return;
        }
        info!(
            device,
            compliant, "device compliance changed: telling SSF receivers"
        );
        self.transmit(&Outgoing::Compliance {
            device: device.to_string(),
            user: Some(user.to_string()),
            compliant,
            previous,
        });
    }

    /// The risk engine changed a device's level: tell receivers.
    pub fn risk_changed(&self, c: &Change) {
        let reasons = c
            .reasons
            .iter()
            .map(|r| r.detail.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        self.transmit(&Outgoing::RiskLevel {
            principal: Principal::Device {
                device: c.device.clone(),
                user: Some(c.user.clone()),
            },
            level: c.level,
            previous: Some(c.previous),
            reasons,
        });
    }

    /// Hooks the risk engine's changes to the transmitter.
    pub fn transmit_risk(self: &Arc<Self>, risk: &RiskService) {
        if self.ssf().is_some_and(|s| s.pusher.is_some()) {
            let me = Arc::downgrade(self);
            risk.on_change(move |c| {
                if let Some(ctl) = me.upgrade() {
                    ctl.risk_changed(c);
                }
            });
        }
    }
}

/// At most `n` characters of untrusted text.
fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn refused(ctl: &Control, issuer: &str, r: &Refusal) -> Response {
    let issuer = clip(issuer, 200);
    let description = clip(&r.to_string(), 300);
    warn!(
        issuer,
        error = r.code(),
        "Shared Signals event refused: {description}"
    );
    ctl.audit(
        "ssf_refused",
        &issuer,
        serde_json::json!({"error": r.code(), "description": description}),
    );
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(r.body())).into_response()
}

/// `POST /v1/ssf/events`: a transmitter pushes one SET (RFC 8935 §2).
pub(super) async fn receive(State(ctl): Ctl, headers: HeaderMap, body: Bytes) -> Response {
    let Some(ssf) = ctl.ssf().cloned() else {
        return (StatusCode::NOT_FOUND, "no Shared Signals receiver here").into_response();
    };
    let token = String::from_utf8_lossy(&body).trim().to_string();
    let Some(issuer) = set::peek_issuer(&token) else {
        return refused(
            &ctl,
            "-",
            &Refusal::Malformed("not a JWS with an iss claim".into()),
        );
    };
    let Some(t) = ssf.transmitters.iter().find(|t| t.issuer == issuer) else {
        return refused(
            &ctl,
            "-",
            &Refusal::UnknownIssuer {
                got: issuer.clone(),
                want: "a configured transmitter".into(),
            },
        );
    };
    if let Some(want) = &t.bearer {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !super::same_secret(got, want) {
            warn!(
                issuer,
                "Shared Signals push without the transmitter's bearer token"
            );
            ctl.audit(
                "ssf_refused",
                &issuer,
                serde_json::json!({"error": "authentication_failed", "description": "no or wrong bearer token"}),
            );
            return (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"err": "authentication_failed", "description": "no or wrong bearer token"})),
            )
                .into_response();
        }
    }
    let now = now_unix();
    let expect = Expect {
        issuer: issuer.clone(),
        audience: ssf.audience.clone(),
        max_age: ssf.max_age,
        now,
    };
    let set = match t.keys.verify(&token, &expect).await {
        Ok(s) => s,
        Err(r) => return refused(&ctl, &issuer, &r),
    };
    let replay = ssf
        .jtis
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&issuer, &set.jti);
    if replay {
        // A retransmission (our 202 was lost): accepted again, done once.
        info!(issuer, jti = %set.jti, "Shared Signals event seen before; ignored");
        return StatusCode::ACCEPTED.into_response();
    }
    for e in &set.events {
        if let Some(allowed) = &t.events
            && !allowed.iter().any(|a| a == event_name(&e.kind))
        {
            warn!(
                issuer,
                event = event_name(&e.kind),
                "Shared Signals event this transmitter may not send; ignored"
            );
            ctl.audit(
                "ssf_ignored",
                &issuer,
                serde_json::json!({"event": event_name(&e.kind), "why": "not among the transmitter's events"}),
            );
            continue;
        }
        if let Err(err) = apply(&ctl, &ssf, &issuer, e).await {
            // Not noted as seen: the transmitter retries (RFC 8935: a 5xx is retried).
            warn!(issuer, "Shared Signals event not applied: {err:#}");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"err": "temporarily_unavailable", "description": "try again"})),
            )
                .into_response();
        }
    }
    ssf.jtis
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .seen(&issuer, &set.jti, now);
    if !set.unknown.is_empty() {
        info!(issuer, events = ?set.unknown, "Shared Signals events of types not acted on");
    }
    StatusCode::ACCEPTED.into_response()
}

/// The Sekisho user a subject names, if any.
async fn user_of(ctl: &Control, u: &UserRef) -> anyhow::Result<Option<String>> {
    match u {
        UserRef::Email(e) => ctl.store.user_named_by(None, Some(e)).await,
        UserRef::Opaque(n) => ctl.store.user_named_by(None, Some(n)).await,
        UserRef::IssSub { iss, sub } => {
            ctl.store
                .user_named_by(Some(&format!("{iss} {sub}")), None)
                .await
        }
    }
}

async fn apply(ctl: &Control, ssf: &Ssf, issuer: &str, e: &set::Event) -> anyhow::Result<()> {
    let Some(risk) = ctl.risk.get() else {
        return Ok(());
    };
    let policy = ctl.policy();
    let device = e
        .subject
        .device
        .as_ref()
        .filter(|d| policy.devices.iter().any(|x| &x.name == *d))
        .cloned();
    let user = match &e.subject.user {
        Some(u) => user_of(ctl, u).await?,
        None => None,
    };
    // A subject naming both: the device must be that user's.
    if let (Some(d), Some(u)) = (&device, &user)
        && let Some(dev) = policy.devices.iter().find(|x| &x.name == d)
        && &policy.users[dev.user as usize].name != u
    {
        warn!(issuer, device = %d, user = %u, "Shared Signals event names a device of another user; ignored");
        ctl.audit(
            "ssf_ignored",
            issuer,
            serde_json::json!({"event": event_name(&e.kind), "why": "the device is not the named user's"}),
        );
        return Ok(());
    }
    // A late event older than one already applied for the same subject and kind changes
    // nothing.
    if let Some(at) = e.at {
        let subject = device.clone().or(user.clone()).unwrap_or_default();
        let key = (subject, event_name(&e.kind), issuer.to_string());
        let mut latest = ssf.latest.lock().unwrap_or_else(|e| e.into_inner());
        if latest.get(&key).is_some_and(|&t| t > at) {
            info!(
                issuer,
                event = key.1,
                "Shared Signals event older than one applied; ignored"
            );
            return Ok(());
        }
        if latest.len() >= LATEST {
            latest.clear();
        }
        latest.insert(key, at);
    }
    let weight = |level: Level| match level {
        Level::High => risk.config().external_high,
        Level::Medium => risk.config().external_high / 2.0,
        Level::Low => 0.0,
    };
    let why = e
        .reason
        .as_deref()
        .map(|r| format!(": {}", clip(r, 120)))
        .unwrap_or_default();
    let (what, subject) = match &e.kind {
        EventKind::Compliance { compliant } => {
            let Some(d) = &device else {
                warn!(issuer, subject = ?e.subject, "device-compliance-change for no device of the policy; ignored");
                return Ok(());
            };
            risk.feed()
                .send_reliably(Input::Standing {
                    subject: crate::risk::device_subject(d),
                    signal: Signal::NonCompliant,
                    source: issuer.to_string(),
                    state: (!compliant).then(|| {
                        (
                            weight(Level::High),
                            format!("not compliant according to {issuer}{why}"),
                        )
                    }),
                })
                .await;
            (
                if *compliant {
                    "compliant"
                } else {
                    "not-compliant"
                },
                d.clone(),
            )
        }
        EventKind::RiskLevel { level } => {
            let subject = match (&device, &user) {
                (Some(d), _) => crate::risk::device_subject(d),
                (None, Some(u)) => crate::risk::user_subject(u),
                _ => {
                    warn!(issuer, subject = ?e.subject, "risk-level-change for no user or device here; ignored");
                    return Ok(());
                }
            };
            risk.feed()
                .send_reliably(Input::Standing {
                    subject: subject.clone(),
                    signal: Signal::External,
                    source: issuer.to_string(),
                    state: (*level != Level::Low).then(|| {
                        (
                            weight(*level),
                            format!("{} risk according to {issuer}{why}", level.as_str()),
                        )
                    }),
                })
                .await;
            (level.as_str(), subject)
        }
        EventKind::Assurance { decreased, level } => {
            let Some(u) = &user else {
                warn!(issuer, subject = ?e.subject, "assurance-level-change for no user here; ignored");
                return Ok(());
            };
            risk.feed()
                .send_reliably(Input::Standing {
                    subject: crate::risk::user_subject(u),
                    signal: Signal::External,
                    source: format!("{issuer} assurance"),
                    state: decreased.then(|| {
                        (
                            weight(Level::Medium),
                            format!("sign-in assurance lowered to {level} by {issuer}{why}"),
                        )
                    }),
                })
                .await;
            (
                if *decreased {
                    "assurance-decreased"
                } else {
                    "assurance-increased"
                },
                u.clone(),
            )
        }
        EventKind::SessionRevoked | EventKind::CredentialChange => {
            let owner = user.clone().or_else(|| {
                let d = device.as_ref()?;
                let dev = policy.devices.iter().find(|x| &x.name == d)?;
                Some(policy.users[dev.user as usize].name.clone())
            });
            let Some(u) = owner else {
                warn!(issuer, subject = ?e.subject, "session event for no user here; ignored");
                return Ok(());
            };
            let forgot = ctl.store.forget_sign_ins(&u).await?;
            let what = if e.kind == EventKind::SessionRevoked {
                "session-revoked"
            } else {
                "credential-change"
            };
            risk.feed()
                .send_reliably(Input::External {
                    subject: crate::risk::user_subject(&u),
                    level: Level::Medium,
                    source: format!("{issuer} ({what})"),
                })
                .await;
            info!(issuer, user = %u, devices = forgot, "{what}: the user's sign-ins are forgotten");
            (what, u)
        }
    };
    info!(issuer, event = what, subject = %subject, "Shared Signals event applied");
    ctl.audit(
        "ssf_event",
        issuer,
        serde_json::json!({"event": what, "subject": subject}),
    );
    Ok(())
}

/// `GET /v1/ssf/jwks.json`: the keys Sekisho's SETs are signed with (the posture signing keys
/// still in use).
pub(super) async fn jwks(State(ctl): Ctl) -> Response {
    let ring = ctl.key_ring();
    Json(ring.jwks.clone()).into_response()
}

/// `GET /.well-known/ssf-configuration` (SSF 1.0 §7.1), for receivers that discover.
pub(super) async fn configuration(State(ctl): Ctl) -> Response {
    let Some(ssf) = ctl.ssf() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let base = ctl.config.url.trim_end_matches('/');
    Json(serde_json::json!({
        "spec_version": "1_0",
        "issuer": ssf.issuer,
        "jwks_uri": format!("{base}/v1/ssf/jwks.json"),
        "delivery_methods_supported": ["urn:ietf:rfc:8935"],
        // What this transmitter sends, and (Sekisho's own field) what its receiver acts on.
        "events_supported": [set::DEVICE_COMPLIANCE_CHANGE, set::RISK_LEVEL_CHANGE],
        "sekisho_events_received": [
            set::SESSION_REVOKED,
            set::CREDENTIAL_CHANGE,
            set::DEVICE_COMPLIANCE_CHANGE,
            set::ASSURANCE_LEVEL_CHANGE,
            set::RISK_LEVEL_CHANGE,
        ],
    }))
    .into_response()
}
