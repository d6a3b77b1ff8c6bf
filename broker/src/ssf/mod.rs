//! OpenID Shared Signals Framework 1.0: Sekisho as a receiver of Security Event Tokens
//! (RFC 8417) pushed by configured transmitters (RFC 8935), and as a transmitter of its own.
//!
//! - [`set`]: checking a received SET and parsing its CAEP 1.0 events (pure);
//! - [`transmit`]: Sekisho's SETs (EdDSA-signed CAEP events), its JWK set, and the push
//!   sender [`transmit::Pusher`];
//! - [`TransmitterKeys`] here: a transmitter's keys (its `jwks_uri`, SSF 1.0 §4.1.6 and §6.1,
//!   or a file), cached and fetched again when a SET names a key not seen yet (rotation), at
//!   most every 10 s.

pub mod set;
pub mod transmit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jsonwebtoken::jwk::JwkSet;
use tokio::sync::Mutex;
use tracing::{info, warn};

use set::{Expect, Refusal, Set};

/// Key sets larger than this are refused.
const MAX_KEYS: usize = 1 << 20;
/// The keys are fetched again for an unknown `kid`, or after a failed fetch, at most this
/// often.
const KEYS_RETRY: Duration = Duration::from_secs(10);
/// The keys are fetched again this long after they were, whatever the SETs say.
const KEYS_REFRESH: Duration = Duration::from_secs(3600);

/// Where a transmitter's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Its `jwks_uri`, over HTTPS checked against the system CAs and `ca_file` (plain
    /// `http://` works too, for tests).
    Url {
        jwks_uri: String,
        ca_file: Option<PathBuf>,
    },
    /// A JWK set in a file (read again like a URL would be fetched).
    File(PathBuf),
}

#[derive(Default)]
struct Cache {
    keys: Option<Arc<JwkSet>>,
    /// When `keys` were had.
    fetched: Option<Instant>,
    /// When they were last asked for, successfully or not, and the failure.
    tried: Option<Instant>,
    error: Option<String>,
}

/// One transmitter's keys.
pub struct TransmitterKeys {
    source: KeySource,
    http: Option<reqwest::Client>,
    cache: Mutex<Cache>,
    retry: Duration,
}

impl TransmitterKeys {
    /// For a URL, sets up TLS (nothing is fetched yet: the transmitter may be down when the
    /// broker starts); a file is read at once, so that a wrong one stops the start.
    pub fn new(source: KeySource) -> Result<TransmitterKeys> {
        let mut cache = Cache::default();
        let http = match &source {
            KeySource::Url { jwks_uri, ca_file } => Some(crate::jose::client_for(
                jwks_uri,
                ca_file.as_deref(),
                "SSF transmitter",
            )?),
            KeySource::File(path) => {
                let keys = read_file(path)?;
                let now = Instant::now();
                cache = Cache {
                    keys: Some(Arc::new(keys)),
                    fetched: Some(now),
                    tried: Some(now),
                    error: None,
                };
                None
            }
        };
        Ok(TransmitterKeys {
            source,
            http,
            cache: Mutex::new(cache),
            retry: KEYS_RETRY,
        })
    }

    async fn load(&self) -> Result<JwkSet> {
        match (&self.source, &self.http) {
            (KeySource::Url { jwks_uri, .. }, Some(http)) => {
                crate::jose::get_json(http, jwks_uri, MAX_KEYS).await
            }
            (KeySource::File(path), _) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path)).await?
            }
            (KeySource::Url { .. }, None) => unreachable!("a URL source has a client"),
        }
    }

    /// Loads the keys into `cache` (marking the attempt); the new keys, or why not.
    async fn reload(&self, cache: &mut Cache) -> Result<Arc<JwkSet>, String> {
        let now = Instant::now();
        cache.tried = Some(now);
        match self.load().await {
            Ok(keys) => {
                info!(source = ?self.source, keys = keys.keys.len(), "SSF transmitter keys loaded");
                let keys = Arc::new(keys);
                cache.keys = Some(keys.clone());
                cache.fetched = Some(now);
                cache.error = None;
                Ok(keys)
            }
            Err(e) => {
                let e = format!("{e:#}");
                warn!(source = ?self.source, "cannot load the SSF transmitter's keys: {e}");
                cache.error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The keys: cached while fresh; when they cannot be had, the cached ones go on serving.
    pub async fn keys(&self) -> Result<Arc<JwkSet>, Refusal> {
        let mut cache = self.cache.lock().await;
        let fresh = cache.fetched.is_some_and(|t| t.elapsed() < KEYS_REFRESH);
        let tried_lately = cache.tried.is_some_and(|t| t.elapsed() < self.retry);
        if !fresh && !tried_lately {
            let _ = self.reload(&mut cache).await;
        }
        match &cache.keys {
            Some(keys) => Ok(keys.clone()),
            None => Err(Refusal::KeysUnavailable(
                cache
                    .error
                    .clone()
                    .unwrap_or_else(|| "not loaded yet".into()),
            )),
        }
    }

    /// The keys again, for a SET that names a key not in the cached set (the transmitter
    /// rotated); at most every 10 s.
    async fn refetch(&self) -> Option<Arc<JwkSet>> {
        let mut cache = self.cache.lock().await;
        if cache.tried.is_some_and(|t| t.elapsed() < self.retry) {
            return None;
        }
        self.reload(&mut cache).await.ok()
    }

    /// Checks a SET ([`set::verify`]); a SET signed by a key not seen yet loads the keys once
    /// more.
    pub async fn verify(&self, token: &str, expect: &Expect) -> Result<Set, Refusal> {
        let keys = self.keys().await?;
        match set::verify(token, &keys, expect) {
            Err(Refusal::UnknownKey(kid)) => match self.refetch().await {
                Some(keys) => set::verify(token, &keys, expect),
                None => Err(Refusal::UnknownKey(kid)),
            },
            r => r,
        }
    }
}

fn read_file(path: &std::path::Path) -> Result<JwkSet> {
    let text = std::fs::read(path)
        .with_context(|| format!("cannot read the JWK set {}", path.display()))?;
    anyhow::ensure!(
        text.len() <= MAX_KEYS,
        "the JWK set {} is too large",
        path.display()
    );
    serde_json::from_slice(&text).with_context(|| format!("{} is not a JWK set", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn expect() -> Expect {
        Expect {
            issuer: "https://tx.example".into(),
            audience: "sekisho".into(),
            max_age: 300,
            now: NOW,
        }
    }

    fn token(kid: &str, seed: &[u8; 32]) -> String {
        let ev = transmit::Outgoing::Compliance {
            device: "d1".into(),
            user: None,
            compliant: true,
            previous: None,
        };
        let claims = transmit::set_claims("https://tx.example", "sekisho", "j", NOW, &ev);
        transmit::sign(kid, seed, &claims)
    }

    fn write(path: &std::path::Path, keys: &[(String, [u8; 32])]) {
        std::fs::write(path, transmit::jwks(keys).to_string()).unwrap();
    }

    #[tokio::test]
    async fn an_unknown_kid_loads_the_keys_again_at_most_every_retry() {
        let dir = std::env::temp_dir().join(format!("sekisho-ssf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwks.json");
        write(&file, &[("a".into(), [1; 32])]);
        let mut keys = TransmitterKeys::new(KeySource::File(file.clone())).unwrap();
        keys.retry = Duration::from_millis(300);
        assert!(keys.verify(&token("a", &[1; 32]), &expect()).await.is_ok());

        // The transmitter rotates to b: a SET signed with b comes before the keys are
        // looked at again (within `retry` of the last load: refused, nothing loaded).
        write(&file, &[("a".into(), [1; 32]), ("b".into(), [2; 32])]);
        assert_eq!(
            keys.verify(&token("b", &[2; 32]), &expect()).await,
            Err(Refusal::UnknownKey("b".into()))
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        let set = keys.verify(&token("b", &[2; 32]), &expect()).await.unwrap();
        assert_eq!(set.events.len(), 1);
        // A kid nobody publishes, just after a load: no load again within `retry`.
        assert_eq!(
            keys.verify(&token("z", &[3; 32]), &expect()).await,
            Err(Refusal::UnknownKey("z".into()))
        );
        std::fs::remove_file(&file).unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        // The file is gone: the keys held go on serving.
        assert!(keys.verify(&token("b", &[2; 32]), &expect()).await.is_ok());
        assert_eq!(
            keys.verify(&token("z", &[3; 32]), &expect()).await,
            Err(Refusal::UnknownKey("z".into()))
        );
        assert!(keys.cache.lock().await.error.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
        // A missing file stops the start.
        assert!(TransmitterKeys::new(KeySource::File(dir.join("nope.json"))).is_err());
    }

    #[tokio::test]
    async fn unreachable_keys_answer_503_not_400() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        drop(listener);
        let keys = TransmitterKeys::new(KeySource::Url {
            jwks_uri: url,
            ca_file: None,
        })
        .unwrap();
        let r = keys.verify(&token("a", &[1; 32]), &expect()).await;
        let Err(refusal @ Refusal::KeysUnavailable(_)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(refusal.status(), 503);
        // Not tried again at once.
        let tried = keys.cache.lock().await.tried;
        let _ = keys.verify(&token("a", &[1; 32]), &expect()).await;
        assert_eq!(keys.cache.lock().await.tried, tried);
    }
}
