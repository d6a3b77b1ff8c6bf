//! Checking an ID token (OpenID Connect Core 1.0 §3.1.3.7), as a pure function of the token,
//! the provider's keys, what the relying party expects and the time: signature first (so a
//! forged token is named as such whatever it claims), then issuer, audience, times, nonce.

use jsonwebtoken::jwk::JwkSet;
use serde_json::Value;

use crate::jose::SigError;

/// Seconds of clock skew tolerated between the provider and this broker.
pub const LEEWAY: u64 = 60;

/// What the relying party expects of a token.
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The nonce sent in the authorization request (the code flow); None for the device grant,
    /// which has none.
    pub nonce: Option<&'a str>,
    pub now: u64,
    /// `max_age` sent in the request: the sign-in must be at most this old (plus leeway).
    pub max_age: Option<u64>,
    pub username_claim: &'a str,
    pub groups_claim: &'a str,
}

/// Who signed in, as the token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    /// The provider's object id of the user (`oid`, Microsoft Entra), when the token has one:
    /// what Entra's SCIM provisioning sends as externalId.
    pub object_id: Option<String>,
    pub username: String,
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// The provider's groups (the configured claim; absent = none).
    pub groups: Vec<String>,
    /// When the user authenticated at the provider (`auth_time`, else the token's `iat`),
    /// never later than `now`.
    pub auth_time: u64,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the ID token is malformed: {0}")]
    Malformed(String),
    #[error("the ID token is signed with {0}, which is not accepted")]
    Algorithm(String),
    #[error("the ID token is signed with a key the provider does not publish (kid {0:?})")]
    UnknownKey(String),
    #[error("the ID token's signature does not verify")]
    BadSignature,
    #[error("the ID token is from issuer {got:?}, not {want:?}")]
    Issuer { got: String, want: String },
    #[error("the ID token is for another audience ({got}), not this client")]
    Audience { got: String },
    #[error("the ID token expired {0} s ago")]
    Expired(u64),
    #[error("the ID token is issued in the future")]
    Future,
    #[error("the ID token's nonce is not the one this sign-in sent")]
    Nonce,
    #[error("the ID token has no {0:?} claim")]
    Missing(String),
    #[error("the sign-in at the provider is older than the {0} s asked for")]
    AuthTooOld(u64),
}

/// Checks `token` against `keys` and `expect`.
pub fn check(token: &str, keys: &JwkSet, expect: &Expect<'_>) -> Result<Identity, Refusal> {
    // The signature only; every claim is checked below against `now`.
    let (_, claims) = crate::jose::verify_signature(token, keys).map_err(|e| match e {
        SigError::Malformed(m) => Refusal::Malformed(m),
        SigError::Algorithm(a) => Refusal::Algorithm(a),
        SigError::UnknownKey(kid) => Refusal::UnknownKey(kid),
        SigError::BadSignature => Refusal::BadSignature,
    })?;
    claims_check(&claims, expect)
}

fn text(claims: &Value, name: &str) -> Option<String> {
    claims.get(name)?.as_str().map(str::to_string)
}

fn number(claims: &Value, name: &str) -> Option<u64> {
    let v = claims.get(name)?;
    v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64))
}

/// The claim checks, on claims whose signature verified.
pub fn claims_check(claims: &Value, expect: &Expect<'_>) -> Result<Identity, Refusal> {
    let missing = |n: &str| Refusal::Missing(n.to_string());
    let iss = text(claims, "iss").ok_or_else(|| missing("iss"))?;
    if iss != expect.issuer {
        return Err(Refusal::Issuer {
            got: iss,
            want: expect.issuer.to_string(),
        });
    }
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => return Err(missing("aud")),
    };
    if !aud.iter().any(|a| a == expect.client_id) {
        return Err(Refusal::Audience {
            got: aud.join(", "),
        });
    }
    // Several audiences: the authorized party must be this client (Core §3.1.3.7 items 4-5).
    if aud.len() > 1 && text(claims, "azp").as_deref() != Some(expect.client_id) {
        return Err(Refusal::Audience {
            got: aud.join(", "),
        });
    }
    let exp = number(claims, "exp").ok_or_else(|| missing("exp"))?;
    if expect.now > exp + LEEWAY {
        return Err(Refusal::Expired(expect.now - exp));
    }
    let iat = number(claims, "iat").ok_or_else(|| missing("iat"))?;
    if iat > expect.now + LEEWAY {
        return Err(Refusal::Future);
    }
    if let Some(want) = expect.nonce
        && text(claims, "nonce").as_deref() != Some(want)
    {
        return Err(Refusal::Nonce);
    }
    let auth_time = number(claims, "auth_time");
    if let Some(max) = expect.max_age {
        let t = auth_time.ok_or_else(|| missing("auth_time"))?;
        if expect.now.saturating_sub(t) > max + LEEWAY {
            return Err(Refusal::AuthTooOld(max));
        }
    }
    let subject = text(claims, "sub").ok_or_else(|| missing("sub"))?;
    let username = text(claims, expect.username_claim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| missing(expect.username_claim))?;
    let groups = match claims.get(expect.groups_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(_) => {
            return Err(Refusal::Malformed(format!(
                "the {:?} claim is not a list of names",
                expect.groups_claim
            )));
        }
    };
    Ok(Identity {
        issuer: iss,
        subject,
        object_id: text(claims, "oid"),
        username,
        email: text(claims, "email"),
        display_name: text(claims, "name"),
        groups,
        auth_time: auth_time.unwrap_or(iat).min(expect.now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use crate::jose::testing::{Signer, key_set as set, sign_typ, signer};

    fn sign(s: &Signer, kid: &str, claims: &Value) -> String {
        sign_typ(s, kid, Some("JWT"), claims)
    }

    const NOW: u64 = 1_800_000_000;

    fn good() -> Value {
        serde_json::json!({"iss": "https://idp.example", "aud": "sekisho", "sub": "s-1",
            "exp": NOW + 300, "iat": NOW - 5, "auth_time": NOW - 10, "nonce": "n-1",
            "preferred_username": "alice", "email": "alice@example.com", "name": "Alice",
            "groups": ["engineering", "sekisho-admins"]})
    }

    fn expect() -> Expect<'static> {
        Expect {
            issuer: "https://idp.example",
            client_id: "sekisho",
            nonce: Some("n-1"),
            now: NOW,
            max_age: None,
            username_claim: "preferred_username",
            groups_claim: "groups",
        }
    }

    #[test]
    fn a_good_token_gives_the_identity() {
        let k = signer("k1");
        let id = check(&sign(&k, "k1", &good()), &set(&[&k]), &expect()).unwrap();
        assert_eq!(id.username, "alice");
        assert_eq!(id.subject, "s-1");
        assert_eq!(id.groups, ["engineering", "sekisho-admins"]);
        assert_eq!(id.auth_time, NOW - 10);
        assert_eq!(id.email.as_deref(), Some("alice@example.com"));
    }

    #[test]
    fn every_refusal_is_named() {
        let k = signer("k1");
        let other = signer("k1");
        let keys = set(&[&k]);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = good();
            f(&mut c);
            check(&sign(&k, "k1", &c), &keys, &expect())
        };
        // Signed by another key under the same kid.
        assert_eq!(
            check(&sign(&other, "k1", &good()), &keys, &expect()),
            Err(Refusal::BadSignature)
        );
        // A kid the provider does not publish.
        assert_eq!(
            check(&sign(&k, "k9", &good()), &keys, &expect()),
            Err(Refusal::UnknownKey("k9".into()))
        );
        // An edited payload under the original signature.
        let t = sign(&k, "k1", &good());
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = good();
        c["groups"] = serde_json::json!(["admins"]);
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(c.to_string()),
            parts[2]
        );
        assert_eq!(check(&forged, &keys, &expect()), Err(Refusal::BadSignature));
        assert!(matches!(
            with(&|c| c["iss"] = "https://evil.example".into()),
            Err(Refusal::Issuer { .. })
        ));
        assert!(matches!(
            with(&|c| c["aud"] = "someone-else".into()),
            Err(Refusal::Audience { .. })
        ));
        assert!(matches!(
            with(&|c| c["aud"] = serde_json::json!(["sekisho", "other"])),
            Err(Refusal::Audience { .. })
        ));
        assert!(
            with(&|c| {
                c["aud"] = serde_json::json!(["sekisho", "other"]);
                c["azp"] = "sekisho".into();
            })
            .is_ok()
        );
        assert_eq!(
            with(&|c| c["exp"] = (NOW - 7200).into()),
            Err(Refusal::Expired(7200))
        );
        // Within the leeway, an expiry is forgiven.
        assert!(with(&|c| c["exp"] = (NOW - 30).into()).is_ok());
        assert_eq!(
            with(&|c| c["iat"] = (NOW + 3600).into()),
            Err(Refusal::Future)
        );
        assert_eq!(
            with(&|c| c["nonce"] = "not-the-nonce".into()),
            Err(Refusal::Nonce)
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("nonce");
            }),
            Err(Refusal::Nonce)
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("preferred_username");
            }),
            Err(Refusal::Missing("preferred_username".into()))
        );
        // max_age asked: the sign-in must be that recent.
        let mut e = expect();
        e.max_age = Some(60);
        let mut c = good();
        c["auth_time"] = (NOW - 3600).into();
        assert_eq!(
            check(&sign(&k, "k1", &c), &keys, &e),
            Err(Refusal::AuthTooOld(60))
        );
        // Garbage is malformed, never a panic.
        for junk in ["", "a.b", "a.b.c", "....", "eyJhbGciOiJub25lIn0.e30."] {
            assert!(check(junk, &keys, &expect()).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn no_algorithm_none_nor_hmac() {
        let keys = set(&[&signer("k1")]);
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k1"}"#);
        let p = URL_SAFE_NO_PAD.encode(good().to_string());
        let t = format!("{h}.{p}.c2ln");
        assert_eq!(
            check(&t, &keys, &expect()),
            Err(Refusal::Algorithm("HS256".into()))
        );
    }
}
