//! The control plane inside the broker: the HTTPS + JSON API (axum on rustls) for enrollment,
//! posture tokens and administration, over the store.
//!
//! Every change to users, groups, devices or the policy rebuilds the effective policy (policy
//! text merged with the store's directory) and hands it to the data path, which re-decides
//! cached flows on their next packet; a revoked device's peer and flows are removed at once.
//!
//! Several brokers may share one store (a cluster on PostgreSQL). Each follows the changes
//! made through the others: on PostgreSQL every write is announced with `NOTIFY` and each
//! broker `LISTEN`s and applies it at once ([`Control::registry_loop`] starts the listener);
//! a store fingerprint is also polled, as the fallback while the listener reconnects and as
//! all there is on SQLite. Applying is idempotent and serialized: the policy is rebuilt only
//! when the policy text or the directory differ from what the policy in force was built from.
//!
//! Posture tokens and override codes are signed with the newest signing key of the store; the
//! keys it replaced keep verifying for the posture token lifetime (plus a slack) after their
//! successor was made, then they are retired.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use sekisho_proto::api::{
    self, ADMIN_PREFIX, Credential, DEVICE_PREFIX, ENROLL_PREFIX, SigningKeyState,
};
use sekisho_proto::keys::PublicKeyBytes;
use sekisho_proto::policy::{Blocklist, Directory, ListSource, Policy, probe_flow};
use sekisho_proto::posture::{PostureClaims, TokenSigner, TokenVerifier};
use sekisho_proto::tunnel::OverrideKey;

use crate::config::ControlConfig;

pub mod console;
mod login;
#[path = "scim/mod.rs"]
mod scim;
mod ssf;
use crate::dataplane::DataPlane;
use crate::pki::{Ca, cert_serial};
use crate::store::{
    CHANGES_CHANNEL, DeviceRecord, EnrollError, KEY_RETIRE_SLACK, Reserved, SigningKeyRecord,
    Store, TokenKind, now_unix,
};

/// How the stored policy is named in error messages.
const STORED_POLICY: &str = "policy.toml (stored)";

/// Largest request body accepted (policy files included).
const MAX_BODY: usize = 4 << 20;
/// Body limit of requests that carry only a few fields (enrollment, posture).
const SMALL_BODY: usize = 64 << 10;

/// How often the LISTEN connection is checked by sending a probe notification through the
/// store, and how long the probe may take to come back before the connection is deemed dead.
const PROBE_EVERY: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Posture token lifetime in seconds (the config's, at least 10 s).
fn token_lifetime(config: &ControlConfig) -> u64 {
    config.posture_token_lifetime.as_secs().max(10)
}

/// How long a replaced signing key keeps verifying after its successor was made.
fn key_window(config: &ControlConfig) -> u64 {
    token_lifetime(config) + KEY_RETIRE_SLACK
}

/// The override-code key that goes with a posture signing key: its own Ed25519 key, derived
/// one way (HMAC-SHA256 with a purpose label) from the posture key's seed, so a signature of
/// one kind can never pass for the other and the two key ids differ; it rotates and retires
/// with its posture key.
fn override_signer(posture: &TokenSigner) -> TokenSigner {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &posture.seed());
    let tag = ring::hmac::sign(&key, b"sekisho override-code signing key v1");
    let mut seed = [0u8; 32];
    seed.copy_from_slice(tag.as_ref());
    TokenSigner::from_seed(seed)
}

/// The posture signing keys in force: the newest signs, every one verifies.
struct KeyRing {
    signer: TokenSigner,
    /// Signs override codes (see [`override_signer`]).
    override_signer: TokenSigner,
    verifier: TokenVerifier,
    /// For devices (override codes): every key that verifies.
    overrides: Vec<OverrideKey>,
    /// Key ids, newest first.
    kids: Vec<String>,
    /// The public keys as a JWK set (Sekisho's Shared Signals SETs are signed with them).
    jwks: serde_json::Value,
    /// When the next previous key's window ends (`u64::MAX`: there is none).
    next_retirement: u64,
}

impl KeyRing {
    fn from_records(records: &[SigningKeyRecord]) -> Option<KeyRing> {
        if records.first()?.state != SigningKeyState::Active {
            return None;
        }
        let signers: Vec<TokenSigner> = records.iter().filter_map(|r| r.signer()).collect();
        let next_retirement = records
            .iter()
            .filter(|r| r.state == SigningKeyState::Previous)
            .filter_map(|r| r.verifies_until)
            .min()
            .unwrap_or(u64::MAX);
        let mut signers = signers.into_iter();
        let signer = signers.next()?;
        let rest: Vec<TokenSigner> = signers.collect();
        let all = || std::iter::once(&signer).chain(rest.iter());
        Some(KeyRing {
            verifier: TokenVerifier::from_signers(all()),
            overrides: all()
                .map(|s| OverrideKey::of(&override_signer(s)))
                .collect(),
            override_signer: override_signer(&signer),
            kids: all().map(|s| s.kid().to_string()).collect(),
            jwks: crate::ssf::transmit::jwks(
                &all()
                    .map(|s| (s.kid().to_string(), s.seed()))
                    .collect::<Vec<_>>(),
            ),
            next_retirement,
            signer,
        })
    }

    /// The keys of `store` at `now` (making the first one if there is none).
    async fn load(store: &Store, now: u64, window: u64) -> Result<KeyRing> {
        if let Some(ring) = KeyRing::from_records(&store.signing_keys(now, window).await?) {
            return Ok(ring);
        }
        store.signing_key(now).await?;
        KeyRing::from_records(&store.signing_keys(now, window).await?)
            .context("no active posture signing key in the store")
    }
}

/// How the control plane and its link to the store are doing, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlHealth {
    /// The last store round trip succeeded.
    pub store_ok: bool,
    /// Following the store by LISTEN/NOTIFY right now (always false on SQLite).
    pub notify_connected: bool,
    /// Syncs with the store that changed something here (policy, keys, connector links).
    pub changes_applied: u64,
    /// Failed store round trips of the background loops.
    pub store_errors: u64,
    /// Posture signing keys that verify (the active one and the previous ones in their window).
    pub signing_keys_valid: usize,
    /// Brokers of the deployment (the store's registry; this one alone before it was read).
    pub brokers: usize,
    /// Directory entries left out of the policy in force because they clash with the policy
    /// text (each logged with the reason when the policy was built).
    pub directory_left_out: u64,
}

#[derive(Default)]
struct Health {
    store_ok: AtomicBool,
    notify_connected: AtomicBool,
    changes_applied: AtomicU64,
    store_errors: AtomicU64,
    signing_keys_valid: AtomicUsize,
    directory_left_out: AtomicU64,
}

/// The tasks following the store by LISTEN/NOTIFY; they end when this is dropped.
struct Follower(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Follower {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

pub struct Control {
    pub store: Store,
    dp: DataPlane,
    config: ControlConfig,
    ca: Ca,
    /// The signing keys in force; swapped whole on rotation and retirement.
    keys: RwLock<Arc<KeyRing>>,
    broker_key: String,
    /// The policy text in force (reported as STORED_POLICY in errors).
    policy_text: Mutex<String>,
    /// Serializes changes, so rebuilds see them in order.
    change: tokio::sync::Mutex<()>,
    audit: Mutex<Option<std::fs::File>>,
    policy_dir: PathBuf,
    /// Blocklist contents by list name, read or fetched when asked for and kept until the
    /// file changes or the refresh interval passes.
    lists: tokio::sync::Mutex<HashMap<String, CachedList>>,
    /// Every broker of the deployment (the store's registry), refreshed by [`Control::registry_loop`].
    brokers: Mutex<Vec<crate::store::BrokerRecord>>,
    /// The store's fingerprint when this broker last synced with it; held while syncing, so
    /// syncs run one at a time (lock order: `synced`, then `change`).
    synced: tokio::sync::Mutex<Option<String>>,
    /// What the policy in force was built from: the policy text and the directory.
    applied: Mutex<(String, Directory)>,
    health: Health,
    /// What the API's limits refused (connections, rates, timeouts), for metrics.
    pub api_refusals: Arc<crate::api_limits::Refusals>,
    /// The API's connection caps, once it serves (for the open-connection gauge).
    pub api_gate: Mutex<Option<Arc<crate::api_limits::Gate>>>,
    /// The identity provider devices and admins sign in with (`[control.oidc]`).
    oidc: Option<Arc<crate::oidc::Provider>>,
    /// Records for the SIEM (`[[log_sinks]]`).
    shipper: std::sync::OnceLock<sekisho_sys::logship::Shipper>,
    /// The risk engine (set once at start).
    risk: std::sync::OnceLock<Arc<crate::risk::RiskService>>,
    /// Shared Signals receiver and transmitter (`[control.ssf]`).
    ssf: Option<Arc<ssf::Ssf>>,
    /// The console's recent history (set once at start; see [`Control::use_feed`]).
    feed: std::sync::OnceLock<Arc<console::feed::Feed>>,
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

struct CachedList {
    source: ListSource,
    /// File lists: modification time and length; URL lists: when fetched.
    stamp: (Option<SystemTime>, u64),
    fetched: Instant,
    sha256: String,
    body: Bytes,
}

/// Largest blocklist served (a million domains is about 20 MB).
const MAX_LIST: usize = 128 << 20;

/// An API error: status and message, as `{"error": "..."}`.
pub struct ApiErr(StatusCode, String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.0, Json(api::ApiError { error: self.1 })).into_response()
    }
}

impl From<anyhow::Error> for ApiErr {
    fn from(e: anyhow::Error) -> Self {
        error!("control API internal error: {e:#}");
        ApiErr(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

fn bad(status: StatusCode, msg: impl Into<String>) -> ApiErr {
    ApiErr(status, msg.into())
}

type ApiResult<T> = std::result::Result<Json<T>, ApiErr>;
type Ctl = State<Arc<Control>>;

/// A broker not seen in the registry for this long is left out of the lists devices and
/// connectors get (brokers refresh their entry every 2 s).
const BROKER_GONE_AFTER: Duration = Duration::from_secs(60);

/// The control plane's state, opened before the data path it drives exists.
pub struct Opened {
    /// Relative blocklist paths are read from here (the policy file's folder).
    policy_dir: PathBuf,
    store: Store,
    policy_text: String,
    directory: Directory,
    ca: Ca,
    keys: KeyRing,
}

impl Control {
    /// Opens the store, imports the policy file when the store has none, and builds the
    /// effective policy. Returns the policy to start the data path with, and the rest for
    /// [`Control::new`].
    pub async fn open(
        config: &ControlConfig,
        policy_file: &Path,
        ca_cert: &Path,
    ) -> Result<(Policy, Opened)> {
        let store = Store::open(&config.database).await?;
        info!(
            backend = store.backend(),
            schema = store.schema_version().await?,
            "control plane store open"
        );
        let text = match store.latest_policy().await? {
            Some((version, text)) => {
                info!(version, "policy from the store");
                text
            }
            None => {
                let text = std::fs::read_to_string(policy_file)
                    .with_context(|| format!("cannot read the policy {}", policy_file.display()))?;
                let dir = store.directory().await?;
                Policy::parse_with(policy_file, &text, &dir)?;
                let v = store.save_policy(&text, now_unix(), "import").await?;
                info!(version = v, file = %policy_file.display(), "policy file imported into the store");
                text
            }
        };
        let dir = store.directory().await?;
        let (policy, left_out) = Policy::parse_with_lenient(Path::new(STORED_POLICY), &text, &dir)?;
        for why in &left_out {
            error!("left out of the policy: {why}");
        }
        let ca = Ca::load(ca_cert, &config.ca_key)?;
        // The signing keys are sealed in the store with the key-encryption key.
        let kek_file = config
            .key_encryption_key_file
            .clone()
            .unwrap_or_else(|| config.ca_key.with_file_name("signing-keys.kek"));
        let may_create = !store.has_sealed_signing_keys().await?;
        let env = std::env::var(crate::kek::ENV).ok();
        let (kek, origin) = crate::kek::Kek::load(env.as_deref(), &kek_file, may_create)?;
        info!(kek = kek.id(), ?origin, file = %kek_file.display(), "key-encryption key loaded");
        store.set_kek(kek);
        let sealed = store.seal_plaintext_signing_keys().await?;
        if sealed > 0 {
            info!(
                keys = sealed,
                "signing keys stored in the clear are sealed now"
            );
        }
        let keys = KeyRing::load(&store, now_unix(), key_window(config)).await?;
        Ok((
            policy,
            Opened {
                policy_dir: policy_file
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                store,
                policy_text: text,
                directory: dir,
                ca,
                keys,
            },
        ))
    }

    /// The control plane over the data path `dp`, whose WireGuard key is `broker_key`.
    pub fn new(
        opened: Opened,
        dp: DataPlane,
        config: ControlConfig,
        broker_key: String,
    ) -> Result<Arc<Control>> {
        let Opened {
            policy_dir,
            store,
            policy_text,
            directory,
            ca,
            keys,
        } = opened;
        let audit = if config.audit_log == Path::new("-") {
            None
        } else {
            if let Some(dir) = config.audit_log.parent() {
                std::fs::create_dir_all(dir).ok();
            }
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.audit_log)
                    .with_context(|| {
                        format!("cannot open the audit log {}", config.audit_log.display())
                    })?,
            )
        };
        let ssf = match &config.ssf {
            Some(c) => Some(Arc::new(
                ssf::Ssf::new(&config, c).context("[control.ssf]")?,
            )),
            None => None,
        };
        let oidc = match &config.oidc {
            Some(c) => Some(Arc::new(crate::oidc::Provider::new(c.clone())?)),
            None => None,
        };
        dp.set_token_keys(keys.verifier.clone());
        let health = Health::default();
        health.store_ok.store(true, Ordering::Relaxed);
        health
            .signing_keys_valid
            .store(keys.kids.len(), Ordering::Relaxed);
        Ok(Arc::new(Control {
            store,
            dp,
            config,
            ca,
            keys: RwLock::new(Arc::new(keys)),
            broker_key,
            applied: Mutex::new((policy_text.clone(), directory)),
            health,
            api_refusals: Arc::default(),
            api_gate: Mutex::new(None),
            policy_text: Mutex::new(policy_text),
            change: tokio::sync::Mutex::new(()),
            audit: Mutex::new(audit),
            policy_dir,
            lists: tokio::sync::Mutex::new(HashMap::new()),
            brokers: Mutex::new(Vec::new()),
            synced: tokio::sync::Mutex::new(None),
            oidc,
            shipper: std::sync::OnceLock::new(),
            risk: std::sync::OnceLock::new(),
            ssf,
            feed: std::sync::OnceLock::new(),
        }))
    }

    /// This broker as devices and connectors reach it.
    fn own_record(&self) -> crate::store::BrokerRecord {
        crate::store::BrokerRecord {
            public_key: self.broker_key.clone(),
            name: self
                .config
                .name
                .clone()
                .unwrap_or_else(|| self.config.wireguard_endpoint.clone()),
            wireguard_endpoint: self.config.wireguard_endpoint.clone(),
            connector_endpoint: self.config.connector_endpoint.clone(),
            api_url: self.config.url.clone(),
        }
    }

    /// Registers this broker in the store, keeps the list of all brokers current and follows
    /// the store, every `every` (the polling fallback). On PostgreSQL it also starts following
    /// the store by LISTEN/NOTIFY, which applies changes at once and ends with this loop.
    /// Signing keys whose window has passed are retired here too.
    pub async fn registry_loop(self: Arc<Self>, every: Duration) {
        let _follower = self
            .store
            .announces()
            .then(|| self.clone().follow_changes());
        loop {
            let own = self.own_record();
            let registered = self.store.register_broker(&own, now_unix()).await;
            if let Err(e) = self.track(registered) {
                warn!("cannot register this broker in the store: {e:#}");
            }
            if let Err(e) = self.sync_from_store(false).await {
                warn!("cannot follow the store: {e:#}");
            }
            if let Err(e) = self.tick_keys(now_unix()).await {
                warn!("cannot retire old signing keys: {e:#}");
            }
            self.refresh_registry().await;
            tokio::time::sleep(every).await;
        }
    }

    /// Records the outcome of a store round trip made by a background loop.
    fn track<T>(&self, r: Result<T>) -> Result<T> {
        self.health.store_ok.store(r.is_ok(), Ordering::Relaxed);
        if r.is_err() {
            self.health.store_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Reads the broker registry.
    async fn refresh_registry(&self) {
        // A broker that has not registered for a while has left (or is down): devices and
        // connectors stop trying it until it registers again.
        let since = now_unix().saturating_sub(BROKER_GONE_AFTER.as_secs());
        match self.track(self.store.brokers(since).await) {
            Ok(list) => {
                let mut cache = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
                if *cache != list {
                    info!(brokers = list.len(), "broker registry");
                }
                *cache = list;
            }
            Err(e) => warn!("cannot read the broker registry: {e:#}"),
        }
    }

    /// Brings this broker in line with the store after changes made through another broker
    /// (devices enrolled or revoked, users or groups changed, a new policy version, connectors
    /// revoked, signing keys rotated or retired): rebuilds the policy if its inputs changed,
    /// reloads the signing keys, closes the links of revoked connectors. With `force` false
    /// nothing is read when the store's fingerprint is the one of the last sync (polling).
    /// Idempotent, and serialized with other syncs and with local changes. True when
    /// something changed here.
    pub(crate) async fn sync_from_store(&self, force: bool) -> Result<bool> {
        let mut synced = self.synced.lock().await;
        let _g = self.change.lock().await;
        let fingerprint = self.track(self.store.fingerprint().await)?;
        let moved = synced.as_deref() != Some(fingerprint.as_str());
        if !force && !moved {
            return Ok(false);
        }
        let mut changed = self.track(self.reload_keys(now_unix()).await)?;
        // Revocations always move the fingerprint; new links are checked when they connect.
        if moved {
            changed |= self.drop_revoked_links().await > 0;
        }
        // Connectors drained by an admin: read on every sync (forced ones too), the same set
        // sent again is a no-op for the workers.
        self.dp
            .hold_connectors(self.track(self.store.drained_connectors().await)?);
        let latest = self.track(self.store.latest_policy().await)?;
        let dir = self.track(self.store.directory().await)?;
        let text = {
            let mut current = self.policy_text.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((version, text)) = latest
                && *current != text
            {
                info!(version, "newer policy in the store");
                *current = text;
            }
            current.clone()
        };
        let installed = self.install(text, dir);
        let changed = changed || matches!(installed, Ok(true));
        if changed {
            self.health.changes_applied.fetch_add(1, Ordering::Relaxed);
        }
        installed.map_err(|e| {
            anyhow::anyhow!("the store's directory cannot be merged with the policy: {e}")
        })?;
        *synced = Some(fingerprint);
        Ok(changed)
    }

    /// Follows the store by LISTEN/NOTIFY (PostgreSQL): one task listens and reconnects, one
    /// applies what was announced (several announcements during one sync make one more sync).
    fn follow_changes(self: Arc<Self>) -> Follower {
        let kick = Arc::new(tokio::sync::Notify::new());
        let applier = tokio::spawn({
            let (ctl, kick) = (self.clone(), kick.clone());
            async move {
                let mut retry = Duration::from_secs(1);
                loop {
                    kick.notified().await;
                    match ctl.sync_from_store(true).await {
                        Ok(changed) => {
                            debug!(changed, "store change followed");
                            retry = Duration::from_secs(1);
                        }
                        Err(e) => {
                            warn!("cannot apply a store change: {e:#}; trying again in {retry:?}");
                            tokio::time::sleep(retry).await;
                            retry = (retry * 2).min(Duration::from_secs(30));
                            kick.notify_one();
                        }
                    }
                    ctl.refresh_registry().await;
                }
            }
        });
        let listener = tokio::spawn(self.listen_loop(kick));
        Follower(vec![applier, listener])
    }

    /// Keeps a LISTEN connection to the store, reconnecting with backoff.
    async fn listen_loop(self: Arc<Self>, kick: Arc<tokio::sync::Notify>) {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let mut backoff = min;
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let e = match self.listen_session(&kick).await {
                Err(e) => e,
                Ok(never) => match never {},
            };
            if started.elapsed() > max {
                backoff = min;
            }
            if self.health.notify_connected.swap(false, Ordering::Relaxed) {
                failures = 0;
                warn!(
                    "lost the LISTEN/NOTIFY connection to the store: {e:#}; polling until it \
                     is back, reconnecting"
                );
            } else if failures == 0 {
                warn!("cannot LISTEN on the store: {e:#}; retrying in {backoff:?}");
            } else {
                debug!(
                    failures,
                    "cannot LISTEN on the store: {e:#}; retrying in {backoff:?}"
                );
            }
            failures += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max);
        }
    }

    /// One LISTEN connection, until it fails.
    async fn listen_session(&self, kick: &tokio::sync::Notify) -> Result<std::convert::Infallible> {
        let mut listener = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::postgres::PgListener::connect(&self.config.database),
        )
        .await
        .context("timed out connecting")?
        .context("cannot connect")?;
        // Reconnecting is done here, with backoff and a catch-up sync.
        listener.eager_reconnect(false);
        listener.listen(CHANGES_CHANNEL).await?;
        self.health.notify_connected.store(true, Ordering::Relaxed);
        info!(
            channel = CHANGES_CHANNEL,
            "following store changes by LISTEN/NOTIFY"
        );
        // Whatever changed while nobody listened.
        kick.notify_one();
        let probe = AtomicU64::new(0);
        let watchdog = self.watchdog(&probe);
        tokio::pin!(watchdog);
        loop {
            tokio::select! {
                r = listener.try_recv() => match r? {
                    Some(n) => {
                        if let Some(nonce) = n.payload().strip_prefix("probe:") {
                            if nonce.parse::<u64>().ok() == Some(probe.load(Ordering::Relaxed)) {
                                probe.store(0, Ordering::Relaxed);
                            }
                            continue;
                        }
                        debug!(change = n.payload(), "store change announced");
                        kick.notify_one();
                    }
                    None => anyhow::bail!("the connection was closed"),
                },
                // The listener is dropped after this, so cancelling its receive is harmless.
                e = &mut watchdog => return Err(e),
            }
        }
    }

    /// Sends a probe notification every [`PROBE_EVERY`] through the store; returns when one
    /// did not come back to the listener within [`PROBE_TIMEOUT`] (a dead connection that
    /// nobody closed) or could not be sent.
    async fn watchdog(&self, probe: &AtomicU64) -> anyhow::Error {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let nonce = rand::random::<u64>() | 1;
            probe.store(nonce, Ordering::Relaxed);
            let sent = self.store.notify(&format!("probe:{nonce}")).await;
            if let Err(e) = self.track(sent) {
                return e;
            }
            tokio::time::sleep(PROBE_TIMEOUT).await;
            if probe.load(Ordering::Relaxed) == nonce {
                return anyhow::anyhow!(
                    "a probe notification did not come back in {PROBE_TIMEOUT:?}"
                );
            }
        }
    }

    /// Reloads the signing keys from the store after retiring those whose window has passed
    /// at `now`; installs them when they changed (the data path's verifier first, then the
    /// signer, so this broker never issues a token it would refuse). True when they changed.
    /// The caller holds `change`.
    async fn reload_keys(&self, now: u64) -> Result<bool> {
        let window = key_window(&self.config);
        let retired = self.store.retire_signing_keys(now, window).await?;
        if !retired.is_empty() {
            info!(kids = ?retired, "posture signing keys retired: their window has passed");
            self.audit(
                "signing_key_retired",
                &self.own_record().name,
                serde_json::json!({"kids": retired}),
            );
        }
        let ring = KeyRing::load(&self.store, now, window).await?;
        self.health
            .signing_keys_valid
            .store(ring.kids.len(), Ordering::Relaxed);
        let current = self.key_ring();
        if current.kids == ring.kids && current.next_retirement == ring.next_retirement {
            return Ok(false);
        }
        let changed = current.kids != ring.kids;
        if changed {
            self.dp.set_token_keys(ring.verifier.clone());
            info!(
                active = %ring.kids[0],
                valid = ring.kids.len(),
                "posture signing keys in force"
            );
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        Ok(changed)
    }

    /// Retires signing keys whose window has passed at `now` (a no-op until the next one is
    /// due). True when the keys in force changed.
    pub(crate) async fn tick_keys(&self, now: u64) -> Result<bool> {
        if now < self.key_ring().next_retirement {
            return Ok(false);
        }
        let _g = self.change.lock().await;
        let r = self.reload_keys(now).await;
        self.track(r)
    }

    fn key_ring(&self) -> Arc<KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the data path verifies posture tokens with.
    #[cfg(test)]
    pub(crate) fn token_verifier(&self) -> TokenVerifier {
        self.key_ring().verifier.clone()
    }

    /// Every signing key and its state at `now`, newest first.
    pub(crate) async fn signing_keys(&self, now: u64) -> Result<Vec<api::SigningKeyInfo>> {
        Ok(self
            .store
            .signing_keys(now, key_window(&self.config))
            .await?
            .into_iter()
            .map(|k| api::SigningKeyInfo {
                verifies_until: (k.state == SigningKeyState::Previous)
                    .then_some(k.verifies_until)
                    .flatten(),
                kid: k.kid,
                created_at: k.created_at,
                state: k.state,
                retired_at: k.retired_at,
            })
            .collect())
    }

    /// Makes a new signing key the active one, on every broker of the store.
    pub async fn rotate_signing_key(&self, by: &str) -> Result<api::SigningKeyRotated> {
        let _g = self.change.lock().await;
        let now = now_unix();
        let fresh = self.store.rotate_signing_key(now).await?;
        self.reload_keys(now).await?;
        let keys = self.signing_keys(now).await?;
        info!(kid = fresh.kid(), by, "posture signing key rotated");
        let previous: Vec<_> = keys
            .iter()
            .filter(|k| k.state == SigningKeyState::Previous)
            .map(|k| serde_json::json!({"kid": k.kid, "verifies_until": k.verifies_until}))
            .collect();
        self.audit(
            "signing_key_rotated",
            by,
            serde_json::json!({"kid": fresh.kid(), "previous": previous}),
        );
        Ok(api::SigningKeyRotated {
            active: fresh.kid().to_string(),
            keys,
        })
    }

    /// How the control plane is doing (plain counters; no I/O).
    pub fn health(&self) -> ControlHealth {
        ControlHealth {
            store_ok: self.health.store_ok.load(Ordering::Relaxed),
            notify_connected: self.health.notify_connected.load(Ordering::Relaxed),
            changes_applied: self.health.changes_applied.load(Ordering::Relaxed),
            store_errors: self.health.store_errors.load(Ordering::Relaxed),
            signing_keys_valid: self.health.signing_keys_valid.load(Ordering::Relaxed),
            brokers: self.brokers().len(),
            directory_left_out: self.health.directory_left_out.load(Ordering::Relaxed),
        }
    }

    /// Whether the store answers a trivial query (within 2 s).
    pub async fn ready(&self) -> bool {
        let r = match tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("the store did not answer in 2 s")),
        };
        self.track(r).is_ok()
    }

    /// Every broker of the deployment; this one alone before the registry was read.
    pub fn brokers(&self) -> Vec<crate::store::BrokerRecord> {
        let cache = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
        if cache.is_empty() {
            vec![self.own_record()]
        } else {
            cache.clone()
        }
    }

    /// The connector endpoints of every broker.
    pub fn connector_endpoints(&self) -> Vec<String> {
        self.brokers()
            .into_iter()
            .map(|b| b.connector_endpoint)
            .collect()
    }

    /// The content of the blocklist `list` and its SHA-256 (hex): read from the file (again
    /// when it changed) or fetched from its URL (again after the refresh interval).
    async fn list_content(
        &self,
        list: &Blocklist,
        refresh: Duration,
    ) -> std::result::Result<(String, Bytes), String> {
        let mut cache = self.lists.lock().await;
        let stamp = match &list.source {
            ListSource::Path(p) => {
                let path = self.policy_dir.join(p);
                let meta = tokio::fs::metadata(&path)
                    .await
                    .map_err(|e| format!("blocklist {:?}: {}: {e}", list.name, path.display()))?;
                (meta.modified().ok(), meta.len())
            }
            ListSource::Url(_) => (None, 0),
        };
        if let Some(c) = cache.get(&list.name)
            && c.source == list.source
            && c.stamp == stamp
            && (matches!(list.source, ListSource::Path(_)) || c.fetched.elapsed() < refresh)
        {
            return Ok((c.sha256.clone(), c.body.clone()));
        }
        let body = match &list.source {
            ListSource::Path(p) => {
                let path = self.policy_dir.join(p);
                tokio::fs::read(&path)
                    .await
                    .map_err(|e| format!("blocklist {:?}: {}: {e}", list.name, path.display()))?
            }
            ListSource::Url(u) => match sekisho_sys::http::fetch_public(u, MAX_LIST).await {
                Ok(b) => b,
                Err(e) => {
                    // Keep serving the last good copy while the source is down.
                    if let Some(c) = cache.get(&list.name) {
                        warn!(list = %list.name, "cannot refresh blocklist from {u}: {e}; serving the last copy");
                        return Ok((c.sha256.clone(), c.body.clone()));
                    }
                    return Err(format!("blocklist {:?}: cannot fetch {u}: {e}", list.name));
                }
            },
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let sha256: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        info!(list = %list.name, bytes = body.len(), "blocklist loaded");
        let body = Bytes::from(body);
        cache.insert(
            list.name.clone(),
            CachedList {
                source: list.source.clone(),
                stamp,
                fetched: Instant::now(),
                sha256: sha256.clone(),
                body: body.clone(),
            },
        );
        Ok((sha256, body))
    }

    /// The DNS settings of `dev`'s user with the digests of their lists.
    async fn dns_settings(
        &self,
        dev: &DeviceRecord,
    ) -> std::result::Result<api::DnsSettingsResponse, ApiErr> {
        let policy = self.policy();
        let Some(user) = policy.user_by_name(&dev.user) else {
            return Err(bad(StatusCode::CONFLICT, "the device's user is unknown"));
        };
        let settings = policy.dns_for_user(user);
        let refresh = Duration::from_secs(policy.dns.refresh_secs);
        let mut lists = Vec::new();
        for name in &settings.blocklists {
            let Some(l) = policy.dns.blocklists.iter().find(|l| &l.name == name) else {
                continue;
            };
            match self.list_content(l, refresh).await {
                Ok((sha256, body)) => lists.push(api::ListMeta {
                    name: l.name.clone(),
                    category: l.category.clone(),
                    format: l.format.clone(),
                    sha256,
                    bytes: body.len(),
                }),
                // One unreadable list does not take the others down; clients keep their copy.
                Err(e) => error!("{e}"),
            }
        }
        Ok(api::DnsSettingsResponse { settings, lists })
    }

    /// The cluster CA this control plane issues certificates with.
    #[cfg(test)]
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Appends one audit record (JSON line).
    /// What the Shared Signals receivers got from this broker.
    pub fn ssf_stats(&self) -> Vec<crate::ssf::transmit::ReceiverStats> {
        self.ssf.as_ref().map(|s| s.stats()).unwrap_or_default()
    }

    /// The risk engine explain, Shared Signals and device changes use; set once at start.
    pub fn use_risk(&self, risk: Arc<crate::risk::RiskService>) {
        let _ = self.risk.set(risk);
    }

    /// The console's rings (decisions, samples, audit lines, posture reports); set once at
    /// start, before the API serves.
    pub fn use_feed(&self, feed: Arc<console::feed::Feed>) {
        if self.feed.set(feed).is_err() {
            warn!(
                "the console's feed was set twice (or used before it was set): the decision log's records will not reach it"
            );
        }
    }

    fn feed(&self) -> &console::feed::Feed {
        self.feed.get_or_init(Default::default)
    }

    /// What the console's in-memory views let go, for stats and metrics.
    pub fn console_forgotten(&self) -> console::feed::Forgotten {
        self.feed().forgotten()
    }

    /// Where records for the SIEM go (`[[log_sinks]]`); set once at start.
    pub fn ship_to(&self, shipper: sekisho_sys::logship::Shipper) {
        let _ = self.shipper.set(shipper);
    }

    fn audit(&self, event: &str, actor: &str, detail: serde_json::Value) {
        let now = std::time::SystemTime::now();
        if let Some(s) = self.shipper.get() {
            use sekisho_proto::ocsf::{AuditKind, audit_kind};
            use sekisho_sys::logship::{Record, RecordKind, Severity};
            let kind = match audit_kind(event) {
                AuditKind::Posture => RecordKind::Posture,
                AuditKind::Audit => RecordKind::Audit,
                AuditKind::Admin => RecordKind::Admin,
            };
            if s.wants(kind) {
                let ms = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let refused = detail.get("result").and_then(|r| r.as_str()) == Some("refused")
                    || event.ends_with("_refused");
                s.send(Arc::new(Record {
                    kind,
                    time_ms: ms,
                    severity: if refused {
                        Severity::Warning
                    } else {
                        Severity::Notice
                    },
                    msgid: event.to_string(),
                    body: sekisho_proto::ocsf::audit(event, actor, &detail, ms),
                }));
            }
        }
        let line = serde_json::json!({
            "ts": humantime::format_rfc3339_millis(now).to_string(),
            "event": event,
            "actor": actor,
            "detail": detail,
        });
        self.feed().audit(line.clone());
        let mut g = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(f) => {
                if let Err(e) = writeln!(f, "{line}") {
                    warn!(%e, "cannot write the audit log");
                }
            }
            None => println!("{line}"),
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.dp.policy()
    }

    /// Rebuilds the effective policy from the policy text and the store's directory, and
    /// installs it (unless both are what the policy in force was built from). The caller
    /// holds `change`.
    async fn rebuild(&self) -> Result<bool, ApiErr> {
        let dir = self.store.directory().await?;
        let text = self
            .policy_text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.install(text, dir).map_err(|e| {
            error!("the directory change cannot be merged with the policy: {e}");
            bad(
                StatusCode::CONFLICT,
                format!("stored, but the policy cannot be rebuilt: {e}"),
            )
        })
    }

    /// Builds the effective policy from `text` and `dir` and hands it to the data path, which
    /// drops the peers and flows of devices no longer in it; nothing when these are what the
    /// policy in force was built from. True when installed.
    fn install(&self, text: String, dir: Directory) -> Result<bool, String> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if applied.0 == text && applied.1 == dir {
            return Ok(false);
        }
        // Directory entries that clash with the policy text are left out (and said so), so
        // one bad entry never holds up later changes, revocations above all.
        let (policy, left_out) = Policy::parse_with_lenient(Path::new(STORED_POLICY), &text, &dir)
            .map_err(|e| e.to_string())?;
        for why in &left_out {
            error!("left out of the policy: {why}");
        }
        self.health
            .directory_left_out
            .store(left_out.len() as u64, Ordering::Relaxed);
        self.dp.set_policy(policy);
        info!(generation = self.dp.generation(), "policy rebuilt");
        *applied = (text, dir);
        Ok(true)
    }

    /// Checks a policy text as [`Control::apply_policy`] would (parsed with the store's
    /// directory, its tests run) without applying it, and diffs it against the text in force.
    pub async fn check_policy(&self, text: &str) -> Result<api::PolicyChecked, ApiErr> {
        let dir = self.store.directory().await?;
        let current = self
            .policy_text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Bounded work whatever is posted (the console checks as one types).
        let diff = similar::TextDiff::configure()
            .timeout(Duration::from_millis(250))
            .diff_lines(current.as_str(), text)
            .unified_diff()
            .context_radius(3)
            .header("policy.toml (in force)", "policy.toml (edited)")
            .to_string();
        Ok(
            match Policy::parse_with(Path::new("policy.toml"), text, &dir) {
                Ok(policy) => api::PolicyChecked {
                    error: None,
                    tests: policy.run_tests(),
                    diff,
                },
                Err(e) => api::PolicyChecked {
                    error: Some(e.to_string()),
                    tests: Vec::new(),
                    diff,
                },
            },
        )
    }

    /// Validates `text` against the directory, runs its tests and installs it.
    pub async fn apply_policy(
        &self,
        label: &Path,
        text: &str,
        by: &str,
    ) -> std::result::Result<api::PolicyApplied, (StatusCode, api::PolicyRejected)> {
        let _g = self.change.lock().await;
        let internal = |e: anyhow::Error| {
            error!("policy apply: {e:#}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                api::PolicyRejected {
                    error: "internal error".into(),
                    tests: vec![],
                },
            )
        };
        let dir = self.store.directory().await.map_err(internal)?;
        let policy = Policy::parse_with(label, text, &dir).map_err(|e| {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                api::PolicyRejected {
                    error: e.to_string(),
                    tests: vec![],
                },
            )
        })?;
        let tests = policy.run_tests();
        let failed = tests.iter().filter(|t| !t.passed).count();
        if failed > 0 {
            self.audit(
                "policy",
                by,
                serde_json::json!({"result": "rejected", "failed_tests": failed}),
            );
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                api::PolicyRejected {
                    error: format!("{failed} of {} policy tests failed", tests.len()),
                    tests,
                },
            ));
        }
        let version = self
            .store
            .save_policy(text, now_unix(), by)
            .await
            .map_err(internal)?;
        *self.policy_text.lock().unwrap_or_else(|e| e.into_inner()) = text.to_string();
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = (text.to_string(), dir);
        self.dp.set_policy(policy);
        info!(version, by, "policy applied");
        self.audit(
            "policy",
            by,
            serde_json::json!({"result": "applied", "version": version, "tests": tests.len()}),
        );
        Ok(api::PolicyApplied {
            version: version as u64,
            tests,
        })
    }

    /// What a device needs to run, from the current policy.
    /// `dead_overrides`: the device's override codes that no longer open it (revoked, used).
    fn device_config(
        &self,
        dev: &DeviceRecord,
        dead_overrides: (Vec<String>, Vec<String>),
    ) -> api::DeviceConfig {
        let (revoked_overrides, used_overrides) = dead_overrides;
        let policy = self.policy();
        let routes = policy
            .user_by_name(&dev.user)
            .map(|u| policy.networks_for_user(u))
            .unwrap_or_default();
        api::DeviceConfig {
            device: dev.name.clone(),
            user: dev.user.clone(),
            address: dev.address,
            device_range: policy.device_range,
            brokers: self
                .brokers()
                .into_iter()
                .map(|b| api::BrokerInfo {
                    endpoint: b.wireguard_endpoint,
                    public_key: b.public_key,
                    name: b.name,
                    api_url: b.api_url,
                })
                .collect(),
            routes,
            checks: api::check_specs(&policy),
            dns: policy
                .user_by_name(&dev.user)
                .map(|u| policy.dns_for_user(u))
                .unwrap_or_default(),
            tunnel: policy
                .user_by_name(&dev.user)
                .map(|u| policy.tunnel_for_user(u))
                .unwrap_or_default(),
            override_keys: self.key_ring().overrides.clone(),
            revoked_overrides,
            used_overrides,
            applications: policy
                .user_by_name(&dev.user)
                .map(|u| {
                    policy
                        .applications
                        .iter()
                        .enumerate()
                        .filter(|(a, _)| policy.user_may_use(u, *a as u32))
                        .map(|(_, a)| {
                            let targets: Vec<String> = a
                                .networks
                                .iter()
                                .map(|n| n.to_string())
                                .chain(a.names.iter().cloned())
                                .collect();
                            format!("{} ({})", a.name, targets.join(", "))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Issues a new certificate to the connector that holds the certificate `serial` (the
    /// one its live link was authenticated with). Returns the certificate PEM.
    pub async fn renew_connector(
        &self,
        serial: &str,
        site: &str,
        csr_pem: &str,
    ) -> std::result::Result<String, String> {
        let internal = |e: anyhow::Error| format!("{e:#}");
        let (name, enrolled_site) = self
            .store
            .connector_serial_valid(serial)
            .await
            .map_err(internal)?
            .ok_or("this certificate is revoked, replaced, or not of an enrolled connector")?;
        if enrolled_site != site {
            return Err("site mismatch".into());
        }
        let (pem, new_serial, not_after) = self
            .ca
            .sign_connector(csr_pem, site, self.config.connector_cert_lifetime)
            .map_err(internal)?;
        if !self
            .store
            .renew_connector(&name, serial, &new_serial, not_after)
            .await
            .map_err(internal)?
        {
            return Err("this connector was revoked".into());
        }
        info!(connector = %name, site, serial = %new_serial, "connector certificate renewed");
        self.audit(
            "connector_renewed",
            &name,
            serde_json::json!({"site": site, "serial": new_serial, "not_after": not_after}),
        );
        Ok(pem)
    }

    /// Closes the live links of connectors whose certificates are no longer active (a link
    /// whose status cannot be read now is left alone). Returns how many were closed.
    async fn drop_revoked_links(&self) -> usize {
        let links: Vec<(String, quinn::Connection)> = self
            .dp
            .links()
            .into_iter()
            .map(|(_, l)| (l.site, l.sender.connection().clone()))
            .collect();
        let mut closed = 0;
        for (site, conn) in links {
            let serial = crate::peer_leaf(&conn).and_then(|der| cert_serial(&der));
            let active = match &serial {
                Some(s) => match self.track(self.store.connector_serial_valid(s).await) {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(site = %site, "cannot check a connector's certificate: {e:#}");
                        continue;
                    }
                },
                None => None,
            };
            if active.is_none() {
                info!(site = %site, "closing the link of a revoked connector");
                conn.close(2u32.into(), b"connector revoked");
                closed += 1;
            }
        }
        closed
    }
}

/// Serves the API on `listen` with the broker's certificate (`cert_file`, `key_file`) followed
/// by the CA certificate (`ca_file`), so devices that pin the CA find it in the chain.
pub async fn serve(
    control: Arc<Control>,
    listen: SocketAddr,
    scope: Scope,
    cert_file: &Path,
    ca_file: &Path,
    key_file: &Path,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr)> {
    let mut cert_chain = crate::load_certs(cert_file)?;
    for ca in crate::load_certs(ca_file)? {
        if !cert_chain.contains(&ca) {
            cert_chain.push(ca);
        }
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("cannot read private key {}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .context("API certificate and key do not match")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot bind the control API on {listen}"))?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, ?scope, "control API listening (HTTPS)");
    use crate::api_limits::{CONNECTION_LIFETIME, Gate, HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, Remote};
    let gate = Gate::new(
        control.config.max_connections,
        control.config.max_connections_per_address,
        control.api_refusals.clone(),
    );
    if scope != Scope::Admin {
        *control.api_gate.lock().unwrap_or_else(|e| e.into_inner()) = Some(gate.clone());
    }
    let refusals = control.api_refusals.clone();
    let app = router_for(control, scope);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(%e, "control API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over a cap: closed at once (counted), so the slots stay with other clients.
            let Some(admitted) = gate.admit(remote.ip()) else {
                drop(tcp);
                continue;
            };
            let (acceptor, app, refusals) = (acceptor.clone(), app.clone(), refusals.clone());
            tokio::spawn(async move {
                let evicted = admitted.evicted.clone();
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let tls = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            debug!(%remote, "control API TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            refusals.timed_out.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                    _ = evicted.notified() => return,
                };
                admitted.handshake_done();
                let _admitted = admitted;
                let app = tower::ServiceExt::map_request(
                    app,
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(Remote(remote.ip()));
                        req
                    },
                );
                let service = TowerToHyperService::new(app);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    // One request per connection: an idle connection is gone after its answer.
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), service);
                match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        if e.is_timeout() {
                            refusals.timed_out.fetch_add(1, Ordering::Relaxed);
                        }
                        debug!(%remote, "control API connection: {e}");
                    }
                    Err(_) => {
                        refusals.timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok((task, bound))
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Devices, enrollment and the admin API.
    All,
    /// Devices and enrollment only (the admin API has a listener of its own).
    Public,
    /// The admin API only.
    Admin,
}

/// The admin API's routes, and the console (its sign-in pages limited per source address by
/// `rate`, like the API's own sign-in).
fn admin_routes(rate: Arc<crate::api_limits::RateGate>) -> Router<Arc<Control>> {
    Router::new()
        .route("/v1/admin/users", get(list_users).post(create_user))
        .route("/v1/admin/users/{name}/disable", post(disable_user))
        .route("/v1/admin/users/{name}/enable", post(enable_user))
        .route("/v1/admin/groups", post(create_group))
        .route("/v1/admin/enrollment-tokens", post(create_token))
        .route(
            "/v1/admin/devices",
            get(list_devices).post(register_devices),
        )
        .route("/v1/admin/devices/{name}/revoke", post(revoke_device))
        .route("/v1/admin/devices/{name}/class", post(set_device_class))
        .route("/v1/admin/devices/{name}/override", post(issue_override))
        .route("/v1/admin/overrides/{id}/revoke", post(revoke_override))
        .route("/v1/admin/connectors", get(list_connectors))
        .route("/v1/admin/connectors/{name}/revoke", post(revoke_connector))
        .route("/v1/admin/connectors/{name}/drain", post(drain_connector))
        .route("/v1/admin/connectors/{name}/resume", post(resume_connector))
        .route("/v1/admin/policy", get(get_policy).put(put_policy))
        .route("/v1/admin/policy/check", post(check_policy))
        .route("/v1/admin/policy/history", get(policy_history))
        .route("/v1/admin/policy/versions/{version}", get(policy_version))
        .route("/v1/admin/explain", post(explain))
        .route("/v1/admin/signing-keys", get(list_signing_keys))
        .route("/v1/admin/signing-keys/rotate", post(rotate_signing_key))
        .route(
            "/v1/admin/admin-tokens",
            get(list_admin_tokens).post(create_admin_token),
        )
        .route(
            "/v1/admin/admin-tokens/{id}/revoke",
            post(revoke_admin_token),
        )
        // SCIM provisioning (/scim/v2, its own tokens) and the SCIM token admin routes.
        .merge(scim::routes())
        // The console (/console), for admins in a browser.
        .merge(console::routes(rate))
}

pub fn router_for(control: Arc<Control>, scope: Scope) -> Router {
    let rate = crate::api_limits::RateGate::new(control.api_refusals.clone());
    if scope == Scope::Admin {
        return admin_routes(rate)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(control);
    }
    // Anyone may call these (a one-time token is checked inside): a rate per source address,
    // and small bodies.
    let open = Router::new()
        .route("/v1/enroll/device", post(enroll_device))
        .route("/v1/enroll/connector", post(enroll_connector))
        .route("/v1/login/start", post(login::start))
        .route("/v1/login/finish", post(login::finish))
        .route("/v1/ssf/events", post(ssf::receive))
        .route("/v1/ssf/jwks.json", get(ssf::jwks))
        .route("/.well-known/ssf-configuration", get(ssf::configuration))
        .layer(DefaultBodyLimit::max(SMALL_BODY))
        .route_layer(axum::middleware::from_fn_with_state(
            rate.clone(),
            crate::api_limits::limit_unauthenticated,
        ));
    let devices = Router::new()
        .route("/v1/posture", post(posture))
        .route("/v1/device/override-used", post(override_used))
        .layer(DefaultBodyLimit::max(SMALL_BODY));
    let mut app = Router::new()
        .merge(open)
        .merge(devices)
        .route("/v1/device/dns", get(device_dns))
        .route("/v1/device/dns/lists/{name}", get(device_dns_list));
    if scope == Scope::All {
        app = app.merge(admin_routes(rate));
    }
    app.layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(control)
}

async fn list_admin_tokens(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::AdminTokenInfo>> {
    Ok(Json(ctl.store.admin_tokens().await?))
}

async fn create_admin_token(
    State(ctl): Ctl,
    Admin(admin): Admin,
    Json(req): Json<api::CreateAdminToken>,
) -> ApiResult<api::AdminTokenCreated> {
    check_name("admin", &req.name)?;
    let now = now_unix();
    let expires_at = req.ttl_secs.map(|t| now.saturating_add(t.max(1)));
    let (id, secret) = ctl
        .store
        .create_admin_token_with(&req.name, req.role, expires_at, now)
        .await?;
    info!(name = %req.name, role = %req.role, by = %admin, "admin token created");
    ctl.audit(
        "admin_token_created",
        &admin,
        serde_json::json!({"id": id, "name": req.name, "role": req.role, "expires_at": expires_at}),
    );
    Ok(Json(api::AdminTokenCreated {
        token: Credential::format(ADMIN_PREFIX, &id, &secret, None),
        id,
        name: req.name,
        role: req.role,
        expires_at,
    }))
}

async fn revoke_admin_token(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Done> {
    if !ctl.store.revoke_admin_token(&id, now_unix()).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no unrevoked admin token {id:?}"),
        ));
    }
    info!(%id, by = %admin, "admin token revoked");
    ctl.audit("admin_token_revoked", &admin, serde_json::json!({"id": id}));
    Ok(Json(Done {
        done: format!("admin token {id} revoked"),
    }))
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// An authenticated admin (by admin token) whose role permits this call. Every refusal is
/// audited (`admin_refused`: method, path, reason, who when known, source address).
pub struct Admin(String);

impl FromRequestParts<Arc<Control>> for Admin {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, ApiErr> {
        let (method, path) = (
            parts.method.as_str().to_string(),
            parts.uri.path().to_string(),
        );
        let remote = parts
            .extensions
            .get::<crate::api_limits::Remote>()
            .map(|r| r.0.to_string());
        let refuse = |code: StatusCode, why: String, who: Option<&str>| {
            ctl.audit(
                "admin_refused",
                who.unwrap_or("-"),
                serde_json::json!({"method": method, "path": path.chars().take(200).collect::<String>(),
                    "reason": why, "from": remote}),
            );
            bad(code, why)
        };
        let Some(text) = bearer(parts) else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "authentication required: an admin token (Authorization: Bearer SKA1.…)".into(),
                None,
            ));
        };
        if text.starts_with(DEVICE_PREFIX) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "device credentials cannot call admin endpoints".into(),
                None,
            ));
        }
        let cred = Credential::parse(ADMIN_PREFIX, text)
            .map_err(|e| refuse(StatusCode::UNAUTHORIZED, e.to_string(), None))?;
        let who = match ctl
            .store
            .admin_by_token(&cred.id, &cred.secret, now_unix())
            .await?
        {
            Ok(who) => who,
            Err(why) => return Err(refuse(StatusCode::UNAUTHORIZED, why.into(), None)),
        };
        if !sekisho_proto::roles::permits(who.role, &method, &path) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("the {} role may not {method} {path}", who.role),
                Some(&who.name),
            ));
        }
        Ok(Admin(who.name))
    }
}

/// An authenticated, active device (by device credential).
pub struct DeviceAuth(DeviceRecord);

impl FromRequestParts<Arc<Control>> for DeviceAuth {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, ApiErr> {
        let Some(text) = bearer(parts) else {
            return Err(bad(
                StatusCode::UNAUTHORIZED,
                "authentication required: a device credential",
            ));
        };
        let cred = Credential::parse(DEVICE_PREFIX, text)
            .map_err(|e| bad(StatusCode::UNAUTHORIZED, e.to_string()))?;
        match ctl
            .store
            .device_by_credential(&cred.id, &cred.secret)
            .await?
        {
            Some(d) => Ok(DeviceAuth(d)),
            None => Err(bad(
                StatusCode::UNAUTHORIZED,
                "unknown or revoked device credential",
            )),
        }
    }
}

/// Parses a JSON body, keeping the raw bytes for the audit log.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<(T, serde_json::Value), ApiErr> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let parsed = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("bad request: {e}")))?;
    Ok((parsed, value))
}

/// Longest text of a request field kept in the audit log.
const AUDIT_FIELD: usize = 128;

/// The request as received, for the audit log: only the fields an admin needs (name, public
/// key, site), each cut to [`AUDIT_FIELD`] characters; the one-time token never, other fields
/// (a certificate request, say) only by their size. A refused request full of megabytes
/// leaves a line of a few hundred bytes.
fn redacted(value: serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let serde_json::Value::Object(fields) = value else {
        return serde_json::json!({"malformed": true});
    };
    for (k, v) in fields {
        let text = match &v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let kept = match k.as_str() {
            "token" => serde_json::Value::String("[redacted]".into()),
            "name" | "public_key" | "site" | "hostname" => {
                let mut t: String = text.chars().take(AUDIT_FIELD).collect();
                if t.len() < text.len() {
                    t.push_str(&format!("… ({} bytes)", text.len()));
                }
                serde_json::Value::String(t)
            }
            _ => serde_json::Value::String(format!("({} bytes)", text.len())),
        };
        if out.len() < 8 {
            let key: String = k.chars().take(32).collect();
            out.insert(key, kept);
        }
    }
    serde_json::Value::Object(out)
}

fn enroll_refusal(e: EnrollError) -> ApiErr {
    let status = match e {
        EnrollError::Unknown | EnrollError::Used | EnrollError::Expired => StatusCode::UNAUTHORIZED,
        EnrollError::WrongKind(_) => StatusCode::BAD_REQUEST,
        EnrollError::Conflict(_) | EnrollError::NoAddress(_) => StatusCode::CONFLICT,
    };
    bad(status, e.to_string())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A user name: as [`valid_name`], and also '@' and '+', up to 128 characters, so that e-mail
/// style names (a SCIM userName, an identity provider's username) are user names. User names
/// go in URL paths of the admin API; nothing here needs encoding there.
pub(crate) fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+'))
}

fn check_name(kind: &str, name: &str) -> Result<(), ApiErr> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(bad(
            StatusCode::BAD_REQUEST,
            format!("bad {kind} name {name:?}: use 1-63 letters, digits, '-', '_' or '.'"),
        ))
    }
}

async fn enroll_device(State(ctl): Ctl, body: Bytes) -> ApiResult<api::EnrollDeviceResponse> {
    let (req, raw): (api::EnrollDeviceRequest, _) = parse_body(&body)?;
    let remote_audit = redacted(raw);
    let refuse = |e: ApiErr| {
        ctl.audit(
            "enroll_device",
            "-",
            serde_json::json!({"result": "refused", "reason": e.1, "request": remote_audit}),
        );
        e
    };
    let cred = Credential::parse(ENROLL_PREFIX, &req.token)
        .map_err(|e| refuse(bad(StatusCode::UNAUTHORIZED, e.to_string())))?;
    PublicKeyBytes::parse(&req.public_key)
        .map_err(|e| refuse(bad(StatusCode::BAD_REQUEST, format!("bad public key: {e}"))))?;
    check_name("device", &req.name).map_err(refuse)?;
    let _g = ctl.change.lock().await;
    let policy = ctl.policy();
    let range = policy.device_range;
    let reserved = Reserved::of(&policy);
    let (dev, cred_id, cred_secret) = ctl
        .store
        .enroll_device(
            &cred.id,
            &cred.secret,
            now_unix(),
            &req.name,
            &req.public_key,
            range,
            &reserved,
        )
        .await?
        .map_err(|e| refuse(enroll_refusal(e)))?;
    ctl.rebuild().await?;
    info!(device = %dev.name, user = %dev.user, address = %dev.address, "device enrolled");
    ctl.audit(
        "enroll_device",
        &dev.user,
        serde_json::json!({"result": "enrolled", "device": dev.name, "address": dev.address,
            "request": remote_audit}),
    );
    Ok(Json(api::EnrollDeviceResponse {
        config: ctl.device_config(&dev, Default::default()),
        credential: Credential::format(DEVICE_PREFIX, &cred_id, &cred_secret, None),
        ca_pem: ctl.ca.cert_pem.clone(),
    }))
}

async fn enroll_connector(State(ctl): Ctl, body: Bytes) -> ApiResult<api::EnrollConnectorResponse> {
    let (req, raw): (api::EnrollConnectorRequest, _) = parse_body(&body)?;
    let remote_audit = redacted(raw);
    let refuse = |e: ApiErr| {
        ctl.audit(
            "enroll_connector",
            "-",
            serde_json::json!({"result": "refused", "reason": e.1}),
        );
        e
    };
    let cred = Credential::parse(ENROLL_PREFIX, &req.token)
        .map_err(|e| refuse(bad(StatusCode::UNAUTHORIZED, e.to_string())))?;
    // A bad request must not use up the token: check it before the transaction.
    rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem).map_err(|e| {
        refuse(bad(
            StatusCode::BAD_REQUEST,
            format!("bad certificate request: {e}"),
        ))
    })?;
    let lifetime = ctl.config.connector_cert_lifetime;
    let (site, name, pem) = ctl
        .store
        .enroll_connector(&cred.id, &cred.secret, now_unix(), |site, _| {
            ctl.ca.sign_connector(&req.csr_pem, site, lifetime)
        })
        .await?
        .map_err(|e| refuse(enroll_refusal(e)))?;
    info!(site = %site, connector = %name, "connector enrolled");
    let mut audit_req = remote_audit;
    if let Some(obj) = audit_req.as_object_mut() {
        obj.remove("csr_pem");
        obj.insert("csr".into(), "[PKCS#10 request]".into());
    }
    ctl.audit(
        "enroll_connector",
        &site,
        serde_json::json!({"result": "enrolled", "connector": name, "request": audit_req}),
    );
    Ok(Json(api::EnrollConnectorResponse {
        site,
        connector: name,
        certificate_pem: pem,
        ca_pem: ctl.ca.cert_pem.clone(),
        brokers: ctl.connector_endpoints(),
        broker_name: ctl.config.broker_name.clone(),
    }))
}

async fn device_dns(
    State(ctl): Ctl,
    DeviceAuth(dev): DeviceAuth,
) -> ApiResult<api::DnsSettingsResponse> {
    Ok(Json(ctl.dns_settings(&dev).await?))
}

/// A blocklist's content, for devices whose user's filter uses it.
async fn device_dns_list(
    State(ctl): Ctl,
    DeviceAuth(dev): DeviceAuth,
    UrlPath(name): UrlPath<String>,
) -> std::result::Result<Response, ApiErr> {
    let policy = ctl.policy();
    let user = policy
        .user_by_name(&dev.user)
        .ok_or_else(|| bad(StatusCode::CONFLICT, "the device's user is unknown"))?;
    if !policy.dns_for_user(user).blocklists.contains(&name) {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no blocklist {name:?} for this device"),
        ));
    }
    let list = policy
        .dns
        .blocklists
        .iter()
        .find(|l| l.name == name)
        .cloned()
        .ok_or_else(|| bad(StatusCode::NOT_FOUND, "no such blocklist"))?;
    let refresh = Duration::from_secs(policy.dns.refresh_secs);
    drop(policy);
    let (_, body) = ctl
        .list_content(&list, refresh)
        .await
        .map_err(|e| bad(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain")], body).into_response())
}

async fn posture(
    State(ctl): Ctl,
    DeviceAuth(dev): DeviceAuth,
    body: Bytes,
) -> ApiResult<api::PostureResponse> {
    let (req, raw): (api::PostureRequest, _) = parse_body(&body)?;
    let policy = ctl.policy();
    let Some(user) = policy.user_by_name(&dev.user) else {
        return Err(bad(StatusCode::CONFLICT, "the device's user is unknown"));
    };
    // Only results of checks the policy declares are attested.
    let checks = policy
        .posture_checks
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                req.checks.get(&c.name).copied().unwrap_or(false),
            )
        })
        .collect();
    let u = &policy.users[user as usize];
    let now = now_unix();
    let lifetime = token_lifetime(&ctl.config);
    let claims = PostureClaims {
        device: dev.name.clone(),
        device_key: dev.public_key.clone(),
        user: dev.user.clone(),
        groups: u
            .groups
            .iter()
            .map(|&g| policy.groups[g as usize].clone())
            .collect(),
        checks,
        iat: now,
        exp: now + lifetime,
        kid: String::new(),
        auth_time: ctl.store.device_signed_in_at(&dev.name).await?,
    };
    let token = ctl.key_ring().signer.issue(claims.clone());
    ctl.posture_compliance(&dev.name, &dev.user, claims.checks.values().all(|&ok| ok));
    ctl.feed()
        .posture(&dev.name, claims.checks.clone(), &req.dns_blocks, now);
    if let Some(risk) = ctl.risk.get() {
        // Counts per category only, and only categories a list of the policy could name.
        for (category, &count) in req.dns_blocks.iter().take(16) {
            if count > 0 && category.len() <= 64 {
                risk.feed().send(crate::risk::Input::DnsBlocks {
                    device: dev.name.clone(),
                    category: category.clone(),
                    count,
                });
            }
        }
    }
    let failing: Vec<&String> = claims
        .checks
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(n, _)| n)
        .collect();
    ctl.audit(
        "posture",
        &dev.user,
        serde_json::json!({"device": dev.name, "failing_checks": failing, "request": raw}),
    );
    Ok(Json(api::PostureResponse {
        token,
        expires_at: now + lifetime,
        refresh_after: lifetime / 2,
        config: ctl.device_config(&dev, ctl.store.dead_overrides(&dev.name, now).await?),
        signed_in_at: claims.auth_time,
    }))
}

async fn list_users(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::UserInfo>> {
    Ok(Json(
        ctl.store
            .users()
            .await?
            .into_iter()
            .map(|u| api::UserInfo {
                name: u.name,
                groups: u.groups,
                disabled: u.disabled,
            })
            .collect(),
    ))
}

async fn create_user(
    State(ctl): Ctl,
    Admin(admin): Admin,
    body: Bytes,
) -> ApiResult<api::UserInfo> {
    let (req, _): (api::CreateUser, _) = parse_body(&body)?;
    if !valid_user_name(&req.name) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!(
                "bad user name {:?}: use 1-128 letters, digits, '-', '_', '.', '@' or '+'",
                req.name
            ),
        ));
    }
    for g in &req.groups {
        check_name("group", g)?;
    }
    let _g = ctl.change.lock().await;
    if ctl.policy().user_by_name(&req.name).is_some() {
        return Err(bad(
            StatusCode::CONFLICT,
            format!("user {:?} already exists", req.name),
        ));
    }
    if !ctl
        .store
        .create_user(&req.name, &req.groups, now_unix())
        .await?
    {
        return Err(bad(
            StatusCode::CONFLICT,
            format!("user {:?} already exists", req.name),
        ));
    }
    ctl.rebuild().await?;
    ctl.audit(
        "user_created",
        &admin,
        serde_json::json!({"user": req.name, "groups": req.groups}),
    );
    Ok(Json(api::UserInfo {
        name: req.name,
        groups: req.groups,
        disabled: false,
    }))
}

async fn set_disabled(
    ctl: &Control,
    admin: &str,
    name: &str,
    disabled: bool,
) -> ApiResult<api::UserInfo> {
    let _g = ctl.change.lock().await;
    if !ctl.store.set_user_disabled(name, disabled).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no user {name:?} in the directory"),
        ));
    }
    ctl.rebuild().await?;
    ctl.audit(
        if disabled {
            "user_disabled"
        } else {
            "user_enabled"
        },
        admin,
        serde_json::json!({"user": name}),
    );
    let user = ctl
        .store
        .users()
        .await?
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| bad(StatusCode::NOT_FOUND, "user vanished"))?;
    Ok(Json(api::UserInfo {
        name: user.name,
        groups: user.groups,
        disabled: user.disabled,
    }))
}

async fn disable_user(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<api::UserInfo> {
    set_disabled(&ctl, &admin, &name, true).await
}

async fn enable_user(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<api::UserInfo> {
    set_disabled(&ctl, &admin, &name, false).await
}

async fn create_group(
    State(ctl): Ctl,
    Admin(admin): Admin,
    body: Bytes,
) -> ApiResult<api::CreateGroup> {
    let (req, _): (api::CreateGroup, _) = parse_body(&body)?;
    check_name("group", &req.name)?;
    let _g = ctl.change.lock().await;
    if !ctl.store.create_group(&req.name, now_unix()).await? {
        return Err(bad(
            StatusCode::CONFLICT,
            format!("group {:?} already exists", req.name),
        ));
    }
    ctl.rebuild().await?;
    ctl.audit(
        "group_created",
        &admin,
        serde_json::json!({"group": req.name}),
    );
    Ok(Json(req))
}

async fn create_token(
    State(ctl): Ctl,
    Admin(admin): Admin,
    body: Bytes,
) -> ApiResult<api::EnrollmentTokenInfo> {
    let (req, _): (api::CreateEnrollmentToken, _) = parse_body(&body)?;
    if req.ttl_secs == 0 || req.ttl_secs > 30 * 86400 {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "ttl_secs must be between 1 second and 30 days",
        ));
    }
    let (kind, subject) = match (&req.user, &req.site) {
        (Some(user), None) => {
            if !ctl.store.users().await?.iter().any(|u| &u.name == user) {
                return Err(bad(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no user {user:?} in the directory (create it with `sekisho-broker admin user add`)"
                    ),
                ));
            }
            (TokenKind::Device, user.clone())
        }
        (None, Some(site)) => {
            if !ctl.policy().sites.contains(site) {
                return Err(bad(
                    StatusCode::NOT_FOUND,
                    format!("no site {site:?} in the policy"),
                ));
            }
            (TokenKind::Connector, site.clone())
        }
        _ => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "give exactly one of `user` (a device token) or `site` (a connector token)",
            ));
        }
    };
    if req.class.is_some() && kind != TokenKind::Device {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "`class` is for device tokens (with `user`)",
        ));
    }
    let now = now_unix();
    let (id, secret) = ctl
        .store
        .create_enrollment_token(kind, &subject, now, req.ttl_secs)
        .await?;
    if let Some(class) = req.class {
        ctl.store.set_token_device_class(&id, class).await?;
    }
    ctl.audit(
        "enrollment_token_created",
        &admin,
        serde_json::json!({"id": id, "for": subject, "kind": format!("{kind:?}").to_lowercase(),
            "expires_at": now + req.ttl_secs, "class": req.class}),
    );
    Ok(Json(api::EnrollmentTokenInfo {
        token: Credential::format(ENROLL_PREFIX, &id, &secret, Some(&ctl.ca.sha256)),
        expires_at: now + req.ttl_secs,
    }))
}

async fn list_devices(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::DeviceInfo>> {
    Ok(Json(
        ctl.store
            .devices()
            .await?
            .into_iter()
            .map(|d| api::DeviceInfo {
                name: d.name,
                user: d.user,
                address: d.address,
                public_key: d.public_key,
                created_at: d.created_at,
                revoked_at: d.revoked_at,
                class: d.class,
            })
            .collect(),
    ))
}

#[derive(Serialize)]
pub struct Done {
    pub done: String,
}

/// Devices registered in bulk by an admin (keys made elsewhere; no token).
async fn register_devices(
    State(ctl): Ctl,
    Admin(admin): Admin,
    Json(req): Json<api::RegisterDevices>,
) -> ApiResult<Vec<api::RegisteredDevice>> {
    if req.devices.len() > api::MAX_BULK_DEVICES {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("at most {} devices at once", api::MAX_BULK_DEVICES),
        ));
    }
    let mut list = Vec::with_capacity(req.devices.len());
    for d in &req.devices {
        check_name("device", &d.name)?;
        PublicKeyBytes::parse(&d.public_key).map_err(|e| {
            bad(
                StatusCode::BAD_REQUEST,
                format!("bad public key of {}: {e}", d.name),
            )
        })?;
        list.push((d.name.clone(), d.public_key.clone()));
    }
    let _g = ctl.change.lock().await;
    let policy = ctl.policy();
    let registered = ctl
        .store
        .register_devices(
            &req.user,
            &list,
            now_unix(),
            policy.device_range,
            &Reserved::of(&policy),
        )
        .await?
        .map_err(enroll_refusal)?;
    ctl.rebuild().await?;
    info!(user = %req.user, devices = registered.len(), by = %admin, "devices registered");
    ctl.audit(
        "devices_registered",
        &admin,
        serde_json::json!({"user": req.user, "devices": registered.len()}),
    );
    Ok(Json(
        registered
            .into_iter()
            .map(|(d, id, secret)| api::RegisteredDevice {
                name: d.name,
                address: d.address,
                credential: Credential::format(DEVICE_PREFIX, &id, &secret, None),
            })
            .collect(),
    ))
}

async fn revoke_device(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Done> {
    let _g = ctl.change.lock().await;
    if !ctl.store.revoke_device(&name, now_unix()).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no active device {name:?}"),
        ));
    }
    ctl.rebuild().await?;
    info!(device = %name, by = %admin, "device revoked");
    ctl.audit(
        "device_revoked",
        &admin,
        serde_json::json!({"device": name}),
    );
    Ok(Json(Done {
        done: format!("device {name} revoked; its tunnel and flows are cut"),
    }))
}

/// A device's class (managed or personal): an MDM's word or an admin's. Sensitivity levels
/// the class may not use close at once (`[device_classes]`).
async fn set_device_class(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Done> {
    let (req, _): (api::SetDeviceClass, _) = parse_body(&body)?;
    let _g = ctl.change.lock().await;
    if !ctl.store.set_device_class(&name, req.class).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no active device {name:?}"),
        ));
    }
    ctl.rebuild().await?;
    info!(device = %name, class = req.class.as_str(), by = %admin, "device class set");
    ctl.audit(
        "device_class_set",
        &admin,
        serde_json::json!({"device": name, "class": req.class}),
    );
    Ok(Json(Done {
        done: format!("device {name} is {}", req.class.as_str()),
    }))
}

/// An override code for a device: its kill switch opens for the code's lifetime.
async fn issue_override(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<api::OverrideRequest>,
) -> ApiResult<api::OverrideIssued> {
    if req.seconds == 0 || req.seconds > 86400 {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "an override lasts between 1 second and 24 hours",
        ));
    }
    let known = ctl
        .store
        .devices()
        .await?
        .into_iter()
        .any(|d| d.name == name && d.revoked_at.is_none());
    if !known {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no active device {name:?}"),
        ));
    }
    let claims = sekisho_proto::tunnel::OverrideClaims {
        id: crate::store::random_text(8),
        device: name.clone(),
        not_after: now_unix() + req.seconds,
        by: admin.clone(),
        kid: String::new(),
    };
    ctl.store
        .record_override(&claims.id, &name, claims.not_after, &admin, now_unix())
        .await?;
    let code =
        sekisho_proto::tunnel::issue_override(&ctl.key_ring().override_signer, claims.clone());
    info!(device = %name, id = %claims.id, seconds = req.seconds, by = %admin, "override code issued");
    ctl.audit(
        "override_issued",
        &admin,
        serde_json::json!({"device": name, "id": claims.id, "not_after": claims.not_after}),
    );
    Ok(Json(api::OverrideIssued {
        code,
        id: claims.id,
        device: name,
        not_after: claims.not_after,
    }))
}

/// A device reports that it used an override code (it also logs that locally).
async fn override_used(
    State(ctl): Ctl,
    DeviceAuth(dev): DeviceAuth,
    Json(req): Json<api::OverrideUsed>,
) -> ApiResult<Done> {
    info!(device = %dev.name, id = %req.id, "override code used");
    // Used once: from now on it is in the device's list of codes that no longer open it.
    if !ctl
        .store
        .override_used(&req.id, &dev.name, now_unix())
        .await?
    {
        warn!(device = %dev.name, id = %req.id, "a device used an override code this control plane did not issue to it");
    }
    ctl.audit(
        "override_used",
        &dev.name,
        serde_json::json!({"device": dev.name, "id": req.id, "not_after": req.not_after, "issued_by": req.by}),
    );
    Ok(Json(Done {
        done: "noted".into(),
    }))
}

/// Revokes an override code: devices drop it at their next configuration refresh (and close a
/// window it opened). A device that cannot reach the control plane cannot learn of it.
async fn revoke_override(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Done> {
    let Some(device) = ctl.store.revoke_override(&id, now_unix()).await? else {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no unrevoked override code {id:?}"),
        ));
    };
    info!(%device, %id, by = %admin, "override code revoked");
    ctl.audit(
        "override_revoked",
        &admin,
        serde_json::json!({"device": device, "id": id}),
    );
    Ok(Json(Done {
        done: format!(
            "override code {id} of {device} revoked; the device drops it at its next configuration refresh"
        ),
    }))
}

async fn list_connectors(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::ConnectorInfo>> {
    Ok(Json(
        ctl.store
            .connectors()
            .await?
            .into_iter()
            .map(|c| api::ConnectorInfo {
                name: c.name,
                site: c.site,
                serial: c.serial,
                not_after: c.not_after,
                created_at: c.created_at,
                revoked_at: c.revoked_at,
                drained_at: c.drained_at,
            })
            .collect(),
    ))
}

async fn drain_connector(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Done> {
    set_drained(&ctl, &admin, &name, true).await
}

async fn resume_connector(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Done> {
    set_drained(&ctl, &admin, &name, false).await
}

/// Drains a connector (its links on every broker take no new flows; open flows go on) or
/// resumes it. Other brokers apply it when they see the store change.
async fn set_drained(ctl: &Control, admin: &str, name: &str, drain: bool) -> ApiResult<Done> {
    // Serialized with syncs, so the set sent to the workers is never an older one.
    let _g = ctl.change.lock().await;
    let at = drain.then(now_unix);
    if !ctl.store.set_connector_drained(name, at).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no active connector {name:?}"),
        ));
    }
    ctl.dp
        .hold_connectors(ctl.store.drained_connectors().await?);
    let event = if drain {
        "connector_drained"
    } else {
        "connector_resumed"
    };
    info!(connector = %name, by = %admin, "{}", event.replace('_', " "));
    ctl.audit(event, admin, serde_json::json!({"connector": name}));
    Ok(Json(Done {
        done: if drain {
            format!("connector {name} drained: no new flows through it; open flows go on")
        } else {
            format!("connector {name} takes new flows again")
        },
    }))
}

async fn revoke_connector(
    State(ctl): Ctl,
    Admin(admin): Admin,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Done> {
    if !ctl.store.revoke_connector(&name, now_unix()).await? {
        return Err(bad(
            StatusCode::NOT_FOUND,
            format!("no active connector {name:?}"),
        ));
    }
    ctl.drop_revoked_links().await;
    ctl.audit(
        "connector_revoked",
        &admin,
        serde_json::json!({"connector": name}),
    );
    Ok(Json(Done {
        done: format!("connector {name} revoked; its link is closed"),
    }))
}

async fn list_signing_keys(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::SigningKeyInfo>> {
    Ok(Json(ctl.signing_keys(now_unix()).await?))
}

/// A new posture signing key: it signs from now on, on every broker; tokens and override
/// codes signed with the previous keys keep verifying until their window ends.
async fn rotate_signing_key(
    State(ctl): Ctl,
    Admin(admin): Admin,
) -> ApiResult<api::SigningKeyRotated> {
    Ok(Json(ctl.rotate_signing_key(&admin).await?))
}

async fn get_policy(State(ctl): Ctl, _: Admin) -> ApiResult<api::ApplyPolicy> {
    let text = ctl
        .policy_text
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Json(api::ApplyPolicy { text }))
}

async fn put_policy(State(ctl): Ctl, Admin(admin): Admin, body: Bytes) -> Response {
    let req: api::ApplyPolicy = match parse_body(&body) {
        Ok((r, _)) => r,
        Err(e) => return e.into_response(),
    };
    match ctl
        .apply_policy(Path::new("policy.toml"), &req.text, &admin)
        .await
    {
        Ok(applied) => Json(applied).into_response(),
        Err((status, rejected)) => (status, Json(rejected)).into_response(),
    }
}

/// A policy checked and its tests run, without applying it; with its diff to the one in force.
async fn check_policy(State(ctl): Ctl, _: Admin, body: Bytes) -> ApiResult<api::PolicyChecked> {
    let (req, _): (api::ApplyPolicy, _) = parse_body(&body)?;
    Ok(Json(ctl.check_policy(&req.text).await?))
}

async fn policy_history(State(ctl): Ctl, _: Admin) -> ApiResult<Vec<api::PolicyVersion>> {
    Ok(Json(ctl.store.policy_history(1000).await?))
}

async fn policy_version(
    State(ctl): Ctl,
    _: Admin,
    UrlPath(version): UrlPath<u64>,
) -> ApiResult<api::ApplyPolicy> {
    match ctl.store.policy_version(version).await? {
        Some(text) => Ok(Json(api::ApplyPolicy { text })),
        None => Err(bad(
            StatusCode::NOT_FOUND,
            format!("no policy version {version}"),
        )),
    }
}

async fn explain(State(ctl): Ctl, _: Admin, body: Bytes) -> ApiResult<api::Explanation> {
    use sekisho_proto::policy::{DeviceClass, Facts};
    use sekisho_proto::risk::{Assessment, Level};
    let (req, _): (api::ExplainRequest, _) = parse_body(&body)?;
    let policy = ctl.policy();
    let key = probe_flow(req.protocol, req.address, req.port);
    let named = match &req.application {
        Some(name) => Some(
            policy
                .app_by_name(name)
                .ok_or_else(|| bad(StatusCode::NOT_FOUND, format!("no application {name:?}")))?,
        ),
        None => None,
    };
    let (decision, posture, class, risk) = match (&req.user, &req.device) {
        (Some(user), None) => {
            let id = policy
                .user_by_name(user)
                .ok_or_else(|| bad(StatusCode::NOT_FOUND, format!("no user {user:?}")))?;
            for c in &req.failing_checks {
                if policy.check_by_name(c).is_none() {
                    return Err(bad(
                        StatusCode::BAD_REQUEST,
                        format!("no posture check {c:?}"),
                    ));
                }
            }
            let claims = policy.assumed_posture(id, &req.failing_checks);
            let level = req.risk.unwrap_or(Level::Low);
            let facts = Facts::new(Some(&claims), sekisho_proto::policy::ANY_TIME).at_risk(level);
            let assessed = Assessment {
                level,
                score: 0.0,
                reasons: Vec::new(),
            };
            (
                policy.evaluate_user(id, &key, &facts, named),
                "assumed",
                DeviceClass::Managed,
                (assessed, "assumed"),
            )
        }
        (None, Some(device)) => {
            let id = policy
                .devices
                .iter()
                .position(|d| &d.name == device)
                .ok_or_else(|| {
                    bad(
                        StatusCode::NOT_FOUND,
                        format!("no active device {device:?}"),
                    )
                })?;
            let dev = &policy.devices[id];
            let claims = ctl.dp.posture_of(&dev.public_key).await;
            let assessed = match ctl.risk.get() {
                Some(r) => r.assess(&dev.name, &policy.users[dev.user as usize].name),
                None => Assessment {
                    level: Level::Low,
                    score: 0.0,
                    reasons: Vec::new(),
                },
            };
            let facts = Facts::new(claims.as_ref(), now_unix()).at_risk(assessed.level);
            let d = match named {
                Some(app) => policy.evaluate_named(id as u32, &key, &facts, app),
                None => policy.evaluate(id as u32, &key, &facts),
            };
            (
                d,
                if claims.is_some() { "token" } else { "none" },
                dev.class,
                (assessed, "engine"),
            )
        }
        _ => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "give exactly one of `user` or `device`",
            ));
        }
    };
    let (assessed, source) = risk;
    let response = decision.application.and_then(|a| {
        policy
            .risk
            .response(policy.applications[a as usize].sensitivity, assessed.level)
    });
    let risk = api::ExplainedRisk {
        level: assessed.level,
        score: (assessed.score * 10.0).round() / 10.0,
        source: source.to_string(),
        reasons: assessed
            .reasons
            .iter()
            .map(|r| api::ExplainedReason {
                signal: r.signal.as_str().to_string(),
                detail: r.detail.clone(),
                score: (r.score * 10.0).round() / 10.0,
            })
            .collect(),
        response: response.map(|r| {
            match r {
                sekisho_proto::policy::risk::Response::Allow => "allow",
                sekisho_proto::policy::risk::Response::Log => "log",
                sekisho_proto::policy::risk::Response::Deny => "deny",
            }
            .to_string()
        }),
    };
    let required = decision
        .application
        .map(|a| {
            policy
                .required_checks(a)
                .iter()
                .map(|&c| policy.posture_checks[c as usize].name.clone())
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(api::Explanation {
        decision: decision.action,
        application: policy.app_name(decision.application).map(str::to_string),
        rule: policy.rule_name(decision.reason).map(str::to_string),
        reason: policy.reason_text(decision.reason).to_string(),
        check: policy.check_name(decision.reason).map(str::to_string),
        required_checks: required,
        posture: posture.to_string(),
        class: class.as_str().to_string(),
        risk: Some(risk),
    }))
}
