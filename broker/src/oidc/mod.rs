//! The control plane as an OpenID Connect relying party: discovery and the provider's keys
//! (fetched, cached, fetched again when a token names a key not seen yet: rotation), the
//! authorization code exchange (with the device's PKCE verifier) and the device authorization
//! grant (RFC 8628). ID tokens are checked by the pure [`id_token::check`].

pub mod id_token;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::OidcConfig;
pub use id_token::{Identity, Refusal};

/// Responses larger than this from the provider are refused.
const MAX_ANSWER: usize = 1 << 20;
/// The keys are fetched again for an unknown `kid` at most this often.
const JWKS_RETRY: Duration = Duration::from_secs(10);

/// What discovery says (the parts used).
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
}

struct Cached {
    meta: Arc<Metadata>,
    keys: Arc<JwkSet>,
    fetched: Instant,
    keys_fetched: Instant,
}

/// Why talking to the provider failed: it refused (an OAuth error it named) or could not be
/// used (unreachable, malformed answers).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("the identity provider refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        error: String,
        description: Option<String>,
    },
    #[error("the identity provider cannot be used: {0:#}")]
    Unavailable(anyhow::Error),
}

/// The token endpoint's answer.
#[derive(Debug, Deserialize)]
pub struct Tokens {
    #[serde(default)]
    pub id_token: Option<String>,
}

/// The device authorization endpoint's answer (RFC 8628 §3.2).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

/// One poll of the token endpoint for a device grant.
pub enum DevicePoll {
    Tokens(Tokens),
    /// The user has not finished yet; `slow_down` asks for a longer interval.
    Pending {
        slow_down: bool,
    },
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

pub struct Provider {
    pub config: OidcConfig,
    secret: String,
    http: reqwest::Client,
    cache: Mutex<Option<Cached>>,
}

impl Provider {
    /// Reads the client secret and sets up TLS (system CAs plus `ca_file`). Nothing is
    /// fetched yet: the provider may be down when the broker starts.
    pub fn new(config: OidcConfig) -> Result<Provider> {
        let secret = std::fs::read_to_string(&config.client_secret_file)
            .with_context(|| {
                format!(
                    "cannot read the OIDC client secret {}",
                    config.client_secret_file.display()
                )
            })?
            .trim()
            .to_string();
        anyhow::ensure!(
            !secret.is_empty(),
            "the OIDC client secret file {} is empty",
            config.client_secret_file.display()
        );
        let http = crate::jose::https_client(config.ca_file.as_deref(), "OIDC")?;
        Ok(Provider {
            config,
            secret,
            http,
            cache: Mutex::new(None),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T> {
        crate::jose::get_json(&self.http, url, MAX_ANSWER).await
    }

    async fn fetch(&self) -> Result<Cached> {
        let issuer = self.config.issuer.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let meta: Metadata = self.get_json(&url).await?;
        // Discovery must speak for the issuer configured (OIDC Discovery §4.3).
        anyhow::ensure!(
            meta.issuer == self.config.issuer,
            "discovery at {url} names the issuer {:?}, not {:?}",
            meta.issuer,
            self.config.issuer
        );
        let keys: JwkSet = self.get_json(&meta.jwks_uri).await?;
        info!(issuer = %meta.issuer, keys = keys.keys.len(), "identity provider discovered");
        let now = Instant::now();
        Ok(Cached {
            meta: Arc::new(meta),
            keys: Arc::new(keys),
            fetched: now,
            keys_fetched: now,
        })
    }

    /// Discovery and keys, from the cache while fresh.
    pub async fn metadata(&self) -> Result<(Arc<Metadata>, Arc<JwkSet>), ProviderError> {
        let mut cache = self.cache.lock().await;
        let stale = cache
            .as_ref()
            .is_none_or(|c| c.fetched.elapsed() > self.config.metadata_refresh);
        if stale {
            match self.fetch().await {
                Ok(c) => *cache = Some(c),
                // A provider briefly down: what was cached goes on serving.
                Err(e) if cache.is_some() => {
                    warn!("cannot refresh the identity provider's metadata: {e:#}")
                }
                Err(e) => return Err(ProviderError::Unavailable(e)),
            }
        }
        let c = cache.as_ref().expect("filled above");
        Ok((c.meta.clone(), c.keys.clone()))
    }

    /// The keys again, for a token that names a key not in the cached set (the provider
    /// rotated); at most every [`JWKS_RETRY`].
    async fn refetch_keys(&self) -> Option<Arc<JwkSet>> {
        let mut cache = self.cache.lock().await;
        let c = cache.as_mut()?;
        if c.keys_fetched.elapsed() < JWKS_RETRY {
            return None;
        }
        c.keys_fetched = Instant::now();
        match self.get_json::<JwkSet>(&c.meta.jwks_uri).await {
            Ok(keys) => {
                info!(
                    keys = keys.keys.len(),
                    "identity provider keys fetched again"
                );
                c.keys = Arc::new(keys);
                Some(c.keys.clone())
            }
            Err(e) => {
                warn!("cannot fetch the identity provider's keys: {e:#}");
                None
            }
        }
    }

    /// Checks an ID token; a token signed by a key not seen yet fetches the keys once more.
    pub async fn check_id_token(
        &self,
        token: &str,
        nonce: Option<&str>,
        now: u64,
        max_age: Option<u64>,
    ) -> Result<Identity, VerifyError> {
        let (meta, keys) = self.metadata().await?;
        let expect = id_token::Expect {
            issuer: &meta.issuer,
            client_id: &self.config.client_id,
            nonce,
            now,
            max_age,
            username_claim: &self.config.username_claim,
            groups_claim: &self.config.groups_claim,
        };
        match id_token::check(token, &keys, &expect) {
            Err(Refusal::UnknownKey(kid)) => match self.refetch_keys().await {
                Some(keys) => Ok(id_token::check(token, &keys, &expect)?),
                None => Err(Refusal::UnknownKey(kid).into()),
            },
            r => Ok(r?),
        }
    }

    /// The URL the user's browser is sent to for the authorization code flow.
    pub async fn authorization_url(
        &self,
        redirect_uri: &str,
        state: &str,
        nonce: &str,
        code_challenge: &str,
        max_age: Option<u64>,
    ) -> Result<String, ProviderError> {
        let (meta, _) = self.metadata().await?;
        let scope = self.config.scopes.join(" ");
        let mut params = vec![
            ("response_type", "code".to_string()),
            ("client_id", self.config.client_id.clone()),
            ("redirect_uri", redirect_uri.to_string()),
            ("scope", scope),
            ("state", state.to_string()),
            ("nonce", nonce.to_string()),
            ("code_challenge", code_challenge.to_string()),
            ("code_challenge_method", "S256".to_string()),
        ];
        if let Some(m) = max_age {
            params.push(("max_age", m.to_string()));
        }
        let url =
            url::Url::parse_with_params(&meta.authorization_endpoint, &params).map_err(|e| {
                ProviderError::Unavailable(anyhow::anyhow!("authorization endpoint: {e}"))
            })?;
        Ok(url.to_string())
    }

    /// A form POST with the client's credentials (`client_secret_basic`, RFC 6749 §2.3.1).
    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Result<Vec<u8>, ProviderError> {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let resp = self
            .http
            .post(url)
            .basic_auth(enc(&self.config.client_id), Some(enc(&self.secret)))
            .form(form)
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(anyhow::anyhow!("POST {url}: {e}")))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| ProviderError::Unavailable(anyhow::anyhow!("POST {url}: {e}")))?;
        if body.len() > MAX_ANSWER {
            return Err(ProviderError::Unavailable(anyhow::anyhow!(
                "POST {url}: answer too large"
            )));
        }
        if !status.is_success() {
            return Err(match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) => ProviderError::Refused {
                    error: e.error,
                    description: e.error_description,
                },
                Err(_) => ProviderError::Unavailable(anyhow::anyhow!("POST {url}: HTTP {status}")),
            });
        }
        Ok(body.to_vec())
    }

    /// Redeems an authorization code (with the PKCE verifier the device made).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> Result<Tokens, ProviderError> {
        let (meta, _) = self.metadata().await?;
        let body = self
            .post_form(
                &meta.token_endpoint,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                    ("code_verifier", code_verifier),
                ],
            )
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ProviderError::Unavailable(anyhow::anyhow!("token answer: {e}")))
    }

    /// Starts a device authorization grant.
    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, ProviderError> {
        let (meta, _) = self.metadata().await?;
        let Some(url) = meta.device_authorization_endpoint.clone() else {
            return Err(ProviderError::Unavailable(anyhow::anyhow!(
                "the identity provider offers no device authorization endpoint"
            )));
        };
        let scope = self.config.scopes.join(" ");
        let body = self
            .post_form(
                &url,
                &[("client_id", &self.config.client_id), ("scope", &scope)],
            )
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ProviderError::Unavailable(anyhow::anyhow!("device answer: {e}")))
    }

    /// One poll for a device grant's tokens.
    pub async fn poll_device(&self, device_code: &str) -> Result<DevicePoll, ProviderError> {
        let (meta, _) = self.metadata().await?;
        match self
            .post_form(
                &meta.token_endpoint,
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", device_code),
                ],
            )
            .await
        {
            Ok(body) => serde_json::from_slice(&body)
                .map(DevicePoll::Tokens)
                .map_err(|e| ProviderError::Unavailable(anyhow::anyhow!("token answer: {e}"))),
            Err(ProviderError::Refused { error, .. }) if error == "authorization_pending" => {
                Ok(DevicePoll::Pending { slow_down: false })
            }
            Err(ProviderError::Refused { error, .. }) if error == "slow_down" => {
                Ok(DevicePoll::Pending { slow_down: true })
            }
            Err(e) => Err(e),
        }
    }
}

/// Why an ID token could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}
