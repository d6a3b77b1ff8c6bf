//! The key-encryption key (KEK) that seals the posture signing keys in the store: whoever reads
//! the database alone cannot sign posture tokens or override codes. The KEK comes from the
//! environment (`SEKISHO_KEY_ENCRYPTION_KEY`, 32 bytes in base64url) or from a file
//! (`[control] key_encryption_key_file`, default `signing-keys.kek` beside the CA key), made on
//! first start when neither exists and the store holds no sealed key yet. Every broker of a
//! cluster needs the same KEK (copy the file like the CA key). A KMS would hand the same 32
//! bytes to the broker at start (through the environment), nothing else changes.
//!
//! Sealed form: `kek1.<kek id>.<base64url(nonce || AES-256-GCM ciphertext)>`, with the signing
//! key's id as associated data, so a sealed seed cannot be moved to another row. The KEK id is
//! the first 8 hex digits of the KEK's SHA-256: a broker with another KEK says so by name.

use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The environment variable that carries the KEK (wins over the file).
pub const ENV: &str = "SEKISHO_KEY_ENCRYPTION_KEY";
const PREFIX: &str = "kek1";

pub struct Kek {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.id)
    }
}

/// Where a KEK came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Environment,
    File,
    Created,
}

impl Kek {
    pub fn from_bytes(bytes: &[u8; 32]) -> Kek {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte key"));
        Kek { key, id }
    }

    fn parse(text: &str, whence: &str) -> Result<Kek> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .with_context(|| {
                format!("{whence}: a key-encryption key is 32 bytes in base64url (43 characters)")
            })?;
        Ok(Kek::from_bytes(&bytes))
    }

    /// The KEK from `env` (the value of [`ENV`], if set) or `file`; with `may_create`, a new
    /// one is written to `file` (mode 0600) when there is neither.
    pub fn load(env: Option<&str>, file: &Path, may_create: bool) -> Result<(Kek, Origin)> {
        if let Some(v) = env.filter(|v| !v.trim().is_empty()) {
            return Ok((Kek::parse(v, ENV)?, Origin::Environment));
        }
        match std::fs::read_to_string(file) {
            Ok(text) => Ok((
                Kek::parse(&text, &file.display().to_string())?,
                Origin::File,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                let mut bytes = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| anyhow::anyhow!("no randomness"))?;
                let text = URL_SAFE_NO_PAD.encode(bytes);
                write_secret(file, &text)?;
                Ok((Kek::from_bytes(&bytes), Origin::Created))
            }
            Err(e) => Err(e).with_context(|| {
                format!(
                    "cannot read the key-encryption key {} (or set {ENV}); every broker of a \
                     cluster needs the same one",
                    file.display()
                )
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals a signing key's seed; `kid` is bound to it.
    pub fn seal(&self, kid: &str, seed: &[u8; 32]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("system randomness");
        let mut buf = seed.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM seals 32 bytes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{PREFIX}.{}.{}", self.id, URL_SAFE_NO_PAD.encode(out))
    }

    /// Whether `stored` is sealed (by any KEK).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(&format!("{PREFIX}."))
    }

    /// Opens what [`Kek::seal`] made for `kid`.
    pub fn open(&self, kid: &str, stored: &str) -> Result<[u8; 32]> {
        let mut parts = stored.splitn(3, '.');
        let (Some(PREFIX), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("signing key {kid}: not sealed");
        };
        if id != self.id {
            bail!(
                "signing key {kid} is sealed with key-encryption key {id}, this broker has {}: \
                 give every broker of the cluster the same key-encryption key",
                self.id
            );
        }
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .with_context(|| format!("signing key {kid}: bad sealed form"))?;
        if raw.len() < NONCE_LEN {
            bail!("signing key {kid}: bad sealed form");
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let mut buf = ct.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| anyhow::anyhow!("signing key {kid}: bad nonce"))?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut buf)
            .map_err(|_| anyhow::anyhow!("signing key {kid}: the sealed seed does not open (altered, or moved from another key)"))?;
        <[u8; 32]>::try_from(&plain[..])
            .map_err(|_| anyhow::anyhow!("signing key {kid}: bad length"))
    }
}

/// Writes a secret file with mode 0600 (never readable by others, even for a moment).
fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{text}")?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_seal_and_open_only_with_their_kek_and_their_kid() {
        let kek = Kek::from_bytes(&[7; 32]);
        let seed = [42u8; 32];
        let sealed = kek.seal("kid-a", &seed);
        assert!(Kek::is_sealed(&sealed));
        assert!(!sealed.contains(&URL_SAFE_NO_PAD.encode(seed)));
        assert_eq!(kek.open("kid-a", &sealed).unwrap(), seed);
        assert!(kek.open("kid-b", &sealed).is_err(), "moved to another key");
        let other = Kek::from_bytes(&[8; 32]);
        let e = other.open("kid-a", &sealed).unwrap_err().to_string();
        assert!(
            e.contains(kek.id()) && e.contains("same key-encryption key"),
            "{e}"
        );
        let mut altered = sealed.clone();
        altered.pop();
        altered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(kek.open("kid-a", &altered).is_err());
    }

    #[test]
    fn the_kek_comes_from_the_environment_or_a_file_made_once() {
        let dir = std::env::temp_dir().join(format!("sekisho-kek-{}", std::process::id()));
        let file = dir.join("signing-keys.kek");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            Kek::load(None, &file, false).is_err(),
            "no file, may not create"
        );
        let (made, origin) = Kek::load(None, &file, true).unwrap();
        assert_eq!(origin, Origin::Created);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = Kek::load(None, &file, true).unwrap();
        assert_eq!((again.id(), origin), (made.id(), Origin::File));
        let env = URL_SAFE_NO_PAD.encode([9u8; 32]);
        let (from_env, origin) = Kek::load(Some(&env), &file, true).unwrap();
        assert_eq!(origin, Origin::Environment);
        assert_ne!(from_env.id(), made.id());
        assert!(Kek::load(Some("short"), &file, true).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
