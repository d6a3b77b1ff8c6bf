//! JOSE helpers shared by the OpenID Connect relying party (ID tokens) and the Shared Signals
//! receiver (Security Event Tokens): checking a JWS signature against a JWK set (RFC 7515,
//! RFC 7517; asymmetric algorithms only), and fetching a JWK set or other JSON over HTTPS
//! with the system CAs plus an optional CA file.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde_json::Value;

/// Signature algorithms accepted: asymmetric only (never `none`, never HMAC with a shared
/// secret, which anyone holding the secret could forge).
pub const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The key the token's header names (by `kid`; without a kid, the only key that fits).
pub fn key_for<'k>(keys: &'k JwkSet, kid: Option<&str>) -> Option<&'k Jwk> {
    match kid {
        Some(kid) => keys.find(kid),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigError {
    /// Not a JWS, or a key that cannot be used.
    Malformed(String),
    /// An algorithm outside [`ALGORITHMS`].
    Algorithm(String),
    /// The header names a key not in the set (the kid, empty without one).
    UnknownKey(String),
    BadSignature,
}

/// Checks the signature of the compact JWS `token` with the key of `keys` its header names,
/// and returns the header and the claims. No claim is checked (not even `exp`): that is the
/// caller's business, against its own clock.
pub fn verify_signature(token: &str, keys: &JwkSet) -> Result<(Header, Value), SigError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| SigError::Malformed(e.to_string()))?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(SigError::Algorithm(format!("{:?}", header.alg)));
    }
    let jwk = key_for(keys, header.kid.as_deref())
        .ok_or_else(|| SigError::UnknownKey(header.kid.clone().unwrap_or_default()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| SigError::Malformed(format!("key: {e}")))?;
    let mut v = Validation::new(header.alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    match jsonwebtoken::decode::<Value>(token, &key, &v) {
        Ok(d) => Ok((header, d.claims)),
        Err(e) => {
            use jsonwebtoken::errors::ErrorKind;
            Err(match e.kind() {
                ErrorKind::InvalidSignature => SigError::BadSignature,
                // The key cannot do this algorithm: the token claims what the key does not.
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => SigError::BadSignature,
                _ => SigError::Malformed(e.to_string()),
            })
        }
    }
}

/// An HTTP client for fetching from a party's HTTPS endpoints: the system CAs plus `ca_file`
/// (`what` names the party in errors), short timeouts, no redirects.
pub fn https_client(ca_file: Option<&Path>, what: &str) -> Result<reqwest::Client> {
    let mut pem = sekisho_sys::http::system_roots_pem().unwrap_or_default();
    if let Some(ca) = ca_file {
        pem.push('\n');
        pem.push_str(
            &std::fs::read_to_string(ca)
                .with_context(|| format!("cannot read the {what} CA file {}", ca.display()))?,
        );
    }
    let tls = sekisho_sys::http::ca_tls(&pem).with_context(|| format!("{what} TLS"))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .with_context(|| format!("{what} HTTP client"))
}

/// [`https_client`] for talking to `url`; when that fails for want of any CA (no system
/// bundle, no `ca_file`) and `url` is plain `http://` (test set-ups), a client without CAs.
pub fn client_for(url: &str, ca_file: Option<&Path>, what: &str) -> Result<reqwest::Client> {
    match https_client(ca_file, what) {
        Err(_) if url.starts_with("http://") && ca_file.is_none() => {
            let tls = sekisho_sys::http::pinned_tls([0; 32])?;
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(Duration::from_secs(10))
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .with_context(|| format!("{what} HTTP client"))
        }
        r => r,
    }
}

/// GETs `url` and parses its JSON; fails on a status but 2xx and on answers over `max` bytes.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    max: usize,
) -> Result<T> {
    let resp = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body = resp.bytes().await.with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(status.is_success(), "GET {url}: HTTP {status}");
    anyhow::ensure!(body.len() <= max, "GET {url}: answer too large");
    serde_json::from_slice(&body).with_context(|| format!("GET {url}: not the JSON expected"))
}

/// Test keys: ES256 signers with their public JWKs, and tokens signed by them.
#[cfg(test)]
pub mod testing {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::Value;

    pub struct Signer {
        pub pkcs8: Vec<u8>,
        pub jwk: Value,
    }

    /// A new P-256 key published under `kid`.
    pub fn signer(kid: &str) -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "use": "sig", "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
        Signer { pkcs8, jwk }
    }

    /// `claims` signed ES256 by `s`, naming `kid`, with header type `typ`.
    pub fn sign_typ(s: &Signer, kid: &str, typ: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        h.typ = typ.map(String::from);
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&s.pkcs8)).unwrap()
    }

    /// The JWK set publishing `signers`.
    pub fn key_set(signers: &[&Signer]) -> JwkSet {
        serde_json::from_value(
            serde_json::json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}),
        )
        .unwrap()
    }
}
