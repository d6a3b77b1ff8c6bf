//! WireGuard keys in the usual base64 text form (as `wg genkey` / `wg pubkey` print them).

use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a WireGuard key: expected 44 characters of base64 for 32 bytes")]
    Malformed,
    #[error("cannot read key file {path}: {reason}")]
    Read { path: String, reason: String },
}

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyError::Malformed)?;
    bytes.try_into().map_err(|_| KeyError::Malformed)
}

/// A WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKeyBytes(pub [u8; 32]);

impl PublicKeyBytes {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(PublicKeyBytes)
    }

    pub fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl fmt::Display for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A WireGuard private key. Its Debug form never shows the key.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        PrivateKey(x25519::StaticSecret::random_from_rng(rand::rngs::OsRng))
    }

    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(|b| PrivateKey(x25519::StaticSecret::from(b)))
    }

    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text)
    }

    pub fn public(&self) -> PublicKeyBytes {
        PublicKeyBytes(x25519::PublicKey::from(&self.0).to_bytes())
    }

    pub fn secret(&self) -> &x25519::StaticSecret {
        &self.0
    }

    /// The base64 text form, for writing a new key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let k = PrivateKey::generate();
        let k2 = PrivateKey::parse(&k.to_base64()).unwrap();
        assert_eq!(k.public(), k2.public());
        assert_eq!(
            PublicKeyBytes::parse(&k.public().to_string()).unwrap(),
            k.public()
        );
        assert_eq!(PublicKeyBytes::parse("abc"), Err(KeyError::Malformed));
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
