//! Posture tokens: what the control plane attests about a device, signed, short-lived and bound
//! to the device's WireGuard key, so a broker can check it without a database round trip.
//!
//! Text form: `base64url(claims JSON) "." base64url(Ed25519 signature over the first part)`.
//! The claims carry only results (check name → pass/fail), never the raw data behind them.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::keys::PublicKeyBytes;

/// UDP port of the broker's posture service, reached inside the tunnel at the device range's
/// first address (see [`service_address`]).
pub const POSTURE_PORT: u16 = 7443;

/// The broker's own address inside the tunnel: the first address of the device range.
pub fn service_address(device_range: &ipnet::IpNet) -> std::net::IpAddr {
    match device_range {
        ipnet::IpNet::V4(n) => std::net::IpAddr::V4((u32::from(n.network()) + 1).into()),
        ipnet::IpNet::V6(n) => std::net::IpAddr::V6((u128::from(n.network()) + 1).into()),
    }
}

/// The broker's answer to a presented token (JSON in one UDP datagram).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenAnswer {
    pub accepted: bool,
    /// When accepted: the token's expiry (Unix seconds).
    #[serde(default)]
    pub exp: u64,
    /// When refused: why.
    #[serde(default)]
    pub error: String,
}

/// Longest token accepted (a token travels in one UDP datagram inside the tunnel).
pub const MAX_TOKEN_LEN: usize = 4096;

/// Parses a dotted numeric version ("5.10.0-21-amd64" reads as 5.10.0; leading "v" allowed).
pub fn parse_version(text: &str) -> Option<Vec<u64>> {
    let t = text.trim().trim_start_matches('v');
    let mut parts = Vec::new();
    for p in t.split('.') {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            break;
        }
        parts.push(digits.parse().ok()?);
        if digits.len() != p.len() {
            break;
        }
    }
    (!parts.is_empty()).then_some(parts)
}

/// A MAC address (`aa:bb:cc:dd:ee:ff`, also with `-` between the octets, any case) in the form
/// the neighbour table prints: lowercase, colons. The all-zero address (an unresolved
/// neighbour) is refused.
pub fn normalize_mac(text: &str) -> Result<String, String> {
    let t = text.trim();
    let octets: Vec<&str> = t.split([':', '-']).collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    let mac = t.to_ascii_lowercase().replace('-', ":");
    if !ok {
        return Err(format!(
            "{text:?} is not a MAC address: six hex octets like \"aa:bb:cc:dd:ee:ff\""
        ));
    }
    if mac == "00:00:00:00:00:00" {
        return Err(format!(
            "{text:?} is the all-zero MAC address, which no gateway has"
        ));
    }
    Ok(mac)
}

/// A DNS suffix (`corp.example`) in lowercase without a trailing dot. Wildcards are refused:
/// a suffix already covers the names under it.
pub fn normalize_dns_suffix(text: &str) -> Result<String, String> {
    let t = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if let Some(rest) = t.strip_prefix("*.") {
        return Err(format!(
            "{text:?}: write the suffix without \"*.\" (\"{rest}\" also covers the names under it)"
        ));
    }
    let ok = !t.is_empty()
        && t.len() <= 253
        && t.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(t)
    } else {
        Err(format!(
            "{text:?} is not a DNS suffix: labels of letters, digits and '-', like \"corp.example\""
        ))
    }
}

/// Whether the DNS name `name` equals `suffix` or lies under it (both normalized, see
/// [`normalize_dns_suffix`]): `office.corp.example` is under `corp.example`,
/// `notcorp.example` is not.
pub fn under_dns_suffix(name: &str, suffix: &str) -> bool {
    name == suffix
        || name
            .strip_suffix(suffix)
            .is_some_and(|head| head.ends_with('.'))
}

/// `have >= want`, comparing dotted versions numerically (missing parts count as 0).
pub fn version_at_least(have: &str, want: &str) -> bool {
    match (parse_version(have), parse_version(want)) {
        (Some(h), Some(w)) => {
            let n = h.len().max(w.len());
            let get = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
            (0..n)
                .map(|i| get(&h, i).cmp(&get(&w, i)))
                .find(|o| o.is_ne())
                != Some(std::cmp::Ordering::Less)
        }
        _ => false,
    }
}

/// What a posture token says about a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureClaims {
    /// Device name.
    pub device: String,
    /// The device's WireGuard public key (base64): the token is valid only on its tunnel.
    pub device_key: String,
    pub user: String,
    pub groups: Vec<String>,
    /// Result of each posture check the policy declares: true = pass.
    pub checks: BTreeMap<String, bool>,
    /// Issued at / expires at, Unix seconds.
    pub iat: u64,
    pub exp: u64,
    /// Which signing key signed it (for rotation).
    pub kid: String,
    /// When the user last signed in through the identity provider on this device (Unix
    /// seconds); absent for a device enrolled with a one-time token and never signed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<u64>,
}

impl PostureClaims {
    pub fn passes(&self, check: &str) -> bool {
        self.checks.get(check).copied().unwrap_or(false)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is signed by an unknown key {0:?}")]
    UnknownKey(String),
    #[error("token signature is invalid (forged or edited)")]
    BadSignature,
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token belongs to another device ({0})")]
    WrongDevice(String),
}

impl TokenError {
    /// A short stable word for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey(_) => "unknown-key",
            TokenError::BadSignature => "bad-signature",
            TokenError::Expired(_) => "expired",
            TokenError::NotYetValid => "not-yet-valid",
            TokenError::WrongDevice(_) => "wrong-device",
        }
    }
}

/// The control plane's signing key.
pub struct TokenSigner {
    key: SigningKey,
    kid: String,
}

impl TokenSigner {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Self::from_seed(seed)
    }

    /// A signer from its 32-byte secret; the key id is derived from the public key.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let kid = B64.encode(&key.verifying_key().to_bytes()[..9]);
        TokenSigner { key, kid }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// An Ed25519 signature of `data` with this key.
    pub fn sign(&self, data: &[u8]) -> Signature {
        self.key.sign(data)
    }

    /// Signs `claims` (its `kid` is set to this key's).
    pub fn issue(&self, mut claims: PostureClaims) -> String {
        claims.kid = self.kid.clone();
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = self.key.sign(body.as_bytes());
        format!("{body}.{}", B64.encode(sig.to_bytes()))
    }
}

/// Checks tokens against the control plane's public keys (several during a key rotation).
#[derive(Default, Clone)]
pub struct TokenVerifier {
    keys: HashMap<String, VerifyingKey>,
}

impl TokenVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_key(&mut self, kid: &str, key: VerifyingKey) {
        self.keys.insert(kid.to_string(), key);
    }

    pub fn from_signer(signer: &TokenSigner) -> Self {
        let mut v = Self::new();
        v.add_key(signer.kid(), signer.public());
        v
    }

    /// A verifier that accepts tokens of any of `signers` (the active key and the previous
    /// ones during a rotation).
    pub fn from_signers<'a>(signers: impl IntoIterator<Item = &'a TokenSigner>) -> Self {
        let mut v = Self::new();
        for s in signers {
            v.add_key(s.kid(), s.public());
        }
        v
    }

    /// The key ids accepted, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `token` at Unix time `now` as presented on the tunnel of `presented_by`.
    /// Pure: time comes in as an argument.
    pub fn verify(
        &self,
        token: &str,
        now: u64,
        presented_by: &PublicKeyBytes,
    ) -> Result<PostureClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, sig) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        let claims_json = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        let claims: PostureClaims =
            serde_json::from_slice(&claims_json).map_err(|_| TokenError::Malformed)?;
        let key = self
            .keys
            .get(&claims.kid)
            .ok_or_else(|| TokenError::UnknownKey(claims.kid.clone()))?;
        let sig: [u8; 64] = B64
            .decode(sig)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(TokenError::Malformed)?;
        key.verify(body.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| TokenError::BadSignature)?;
        if now >= claims.exp {
            return Err(TokenError::Expired(now - claims.exp));
        }
        // Allow a little clock skew between control plane and broker.
        if claims.iat > now + 30 {
            return Err(TokenError::NotYetValid);
        }
        if claims.device_key != presented_by.to_string() {
            return Err(TokenError::WrongDevice(claims.device.clone()));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn claims(device_key: &PublicKeyBytes, now: u64) -> PostureClaims {
        PostureClaims {
            device: "alice-laptop".into(),
            device_key: device_key.to_string(),
            user: "alice".into(),
            groups: vec!["engineering".into()],
            checks: [("firewall".to_string(), true), ("disk".to_string(), false)].into(),
            iat: now,
            exp: now + 300,
            kid: String::new(),
            auth_time: None,
        }
    }

    #[test]
    fn macs_and_dns_suffixes_are_normalized_and_matched() {
        assert_eq!(
            normalize_mac(" AA:bb:0C:dd:ee:FF ").unwrap(),
            "aa:bb:0c:dd:ee:ff"
        );
        assert_eq!(
            normalize_mac("aa-bb-cc-dd-ee-ff").unwrap(),
            "aa:bb:cc:dd:ee:ff"
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "a:bb:cc:dd:ee:ff",
            "gg:bb:cc:dd:ee:ff",
            "aabbccddeeff",
            "00:00:00:00:00:00",
        ] {
            assert!(normalize_mac(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            normalize_dns_suffix("Corp.Example.").unwrap(),
            "corp.example"
        );
        assert_eq!(normalize_dns_suffix("lan").unwrap(), "lan");
        for bad in [
            "",
            ".",
            "*.corp.example",
            "a..b",
            "-a.example",
            "a b.example",
        ] {
            assert!(normalize_dns_suffix(bad).is_err(), "{bad:?}");
        }
        assert!(under_dns_suffix("corp.example", "corp.example"));
        assert!(under_dns_suffix("office.corp.example", "corp.example"));
        assert!(!under_dns_suffix("notcorp.example", "corp.example"));
        assert!(!under_dns_suffix("example", "corp.example"));
    }

    #[test]
    fn valid_token_round_trips() {
        let s = TokenSigner::generate();
        let v = TokenVerifier::from_signer(&s);
        let dev = PrivateKey::generate().public();
        let t = s.issue(claims(&dev, 1000));
        let c = v.verify(&t, 1100, &dev).unwrap();
        assert!(c.passes("firewall") && !c.passes("disk") && !c.passes("absent"));
        assert_eq!(c.kid, s.kid());
    }

    #[test]
    fn forged_edited_expired_and_stolen_tokens_are_refused() {
        let s = TokenSigner::generate();
        let v = TokenVerifier::from_signer(&s);
        let a = PrivateKey::generate().public();
        let b = PrivateKey::generate().public();
        let t = s.issue(claims(&a, 1000));

        // Signed by another key that claims the same key id.
        let forger = TokenSigner::generate();
        let mut c = claims(&a, 1000);
        c.kid = s.kid().to_string();
        let body = B64.encode(serde_json::to_vec(&c).unwrap());
        let sig = forger.key.sign(body.as_bytes());
        let forged = format!("{body}.{}", B64.encode(sig.to_bytes()));
        assert_eq!(v.verify(&forged, 1100, &a), Err(TokenError::BadSignature));

        // Claims edited after signing (disk check flipped to pass).
        let (body, sig) = t.split_once('.').unwrap();
        let mut c: PostureClaims = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        c.checks.insert("disk".into(), true);
        let edited = format!("{}.{sig}", B64.encode(serde_json::to_vec(&c).unwrap()));
        assert_eq!(v.verify(&edited, 1100, &a), Err(TokenError::BadSignature));

        assert_eq!(v.verify(&t, 1300, &a), Err(TokenError::Expired(0)));
        assert_eq!(
            v.verify(&t, 1100, &b),
            Err(TokenError::WrongDevice("alice-laptop".into()))
        );
        assert_eq!(v.verify("garbage", 1100, &a), Err(TokenError::Malformed));
        assert_eq!(
            v.verify(&"x".repeat(5000), 1100, &a),
            Err(TokenError::Malformed)
        );
        assert!(matches!(
            TokenVerifier::new().verify(&t, 1100, &a),
            Err(TokenError::UnknownKey(_))
        ));
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("6.1.0-21-amd64", "5.10"));
        assert!(version_at_least("5.10", "5.10.0"));
        assert!(!version_at_least("5.9.12", "5.10"));
        assert!(version_at_least("v0.10.1", "0.9"));
        assert!(!version_at_least("garbage", "1"));
        assert_eq!(parse_version("12"), Some(vec![12]));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_expiry() {
        let old = TokenSigner::generate();
        let new = TokenSigner::generate();
        let mut v = TokenVerifier::from_signer(&new);
        v.add_key(old.kid(), old.public());
        let dev = PrivateKey::generate().public();
        assert!(v.verify(&old.issue(claims(&dev, 1000)), 1100, &dev).is_ok());
        assert!(v.verify(&new.issue(claims(&dev, 1000)), 1100, &dev).is_ok());
        assert_eq!(TokenSigner::from_seed(old.seed()).kid(), old.kid());
        let both = TokenVerifier::from_signers([&new, &old]);
        assert_eq!(both.len(), 2);
        let mut kids = vec![old.kid().to_string(), new.kid().to_string()];
        kids.sort();
        assert_eq!(both.kids(), kids);
        assert!(
            TokenVerifier::from_signers([&new])
                .verify(&old.issue(claims(&dev, 1000)), 1100, &dev)
                .is_err()
        );
    }
}
