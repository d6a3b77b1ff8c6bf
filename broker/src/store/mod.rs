//! The control plane's state: users, groups, devices, connectors, enrollment and admin tokens,
//! policy versions and the posture signing key.
//!
//! One schema for SQLite (default: a file created and migrated on first start) and PostgreSQL
//! (clusters), through sqlx's `Any` driver. The SQL sticks to what both accept: `TEXT` and
//! `BIGINT` columns, `$n` placeholders in ascending order, `ON CONFLICT DO NOTHING`. Secrets are
//! stored as SHA-256 hashes; the posture signing keys are sealed with the key-encryption key
//! ([`crate::kek`]). One module per kind of record.

mod admin_tokens;
mod connectors;
mod devices;
mod directory;
mod enrollment;
mod identity;
mod overrides;
mod policy;
mod registry;
pub(crate) mod scim;
mod signing_keys;

pub use identity::{DeviceSignIn, LoginSession, SignIn, SignInRefusal};

use std::net::IpAddr;
use std::sync::Arc;

use sekisho_proto::roles::Role;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::IpNet;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use sekisho_proto::api::SigningKeyState;
use sekisho_proto::policy::{Directory, DirectoryDevice, DirectoryUser};
use sekisho_proto::posture::TokenSigner;

/// Schema migrations, applied in order, each once, in a transaction.
pub(crate) const MIGRATIONS: &[(i64, &str, &[&str])] = &[
    (
        1,
        "initial schema",
        &[
            "CREATE TABLE groups (name TEXT PRIMARY KEY, created_at BIGINT NOT NULL)",
            "CREATE TABLE users (name TEXT PRIMARY KEY, disabled BIGINT NOT NULL DEFAULT 0, \
         created_at BIGINT NOT NULL)",
            "CREATE TABLE user_groups (user_name TEXT NOT NULL REFERENCES users(name), \
         group_name TEXT NOT NULL REFERENCES groups(name), PRIMARY KEY (user_name, group_name))",
            "CREATE TABLE enrollment_tokens (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, \
         kind TEXT NOT NULL, subject TEXT NOT NULL, created_at BIGINT NOT NULL, \
         expires_at BIGINT NOT NULL, used_at BIGINT, used_by TEXT)",
            "CREATE TABLE devices (name TEXT PRIMARY KEY, user_name TEXT NOT NULL REFERENCES users(name), \
         public_key TEXT NOT NULL UNIQUE, address TEXT NOT NULL UNIQUE, \
         credential_id TEXT NOT NULL UNIQUE, credential_hash TEXT NOT NULL, \
         created_at BIGINT NOT NULL, revoked_at BIGINT)",
            "CREATE TABLE connectors (name TEXT PRIMARY KEY, site TEXT NOT NULL, serial TEXT NOT NULL, \
         not_after BIGINT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT)",
            "CREATE TABLE connector_certs (serial TEXT PRIMARY KEY, connector TEXT NOT NULL \
         REFERENCES connectors(name), not_after BIGINT NOT NULL)",
            "CREATE TABLE admin_tokens (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
         secret_hash TEXT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT)",
            "CREATE TABLE policies (version BIGINT PRIMARY KEY, text TEXT NOT NULL, \
         applied_at BIGINT NOT NULL, applied_by TEXT NOT NULL)",
            "CREATE TABLE signing_keys (kid TEXT PRIMARY KEY, seed TEXT NOT NULL, \
         created_at BIGINT NOT NULL)",
        ],
    ),
    (
        2,
        "broker registry",
        &[
            "CREATE TABLE brokers (public_key TEXT PRIMARY KEY, name TEXT NOT NULL, \
       wireguard_endpoint TEXT NOT NULL, connector_endpoint TEXT NOT NULL, \
       api_url TEXT NOT NULL, seen_at BIGINT NOT NULL)",
        ],
    ),
    (
        3,
        "signing key rotation",
        &[
            "ALTER TABLE signing_keys ADD COLUMN generation BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE signing_keys ADD COLUMN retired_at BIGINT",
            // Before rotation the oldest key signed: it gets the highest generation, so it
            // stays the active key (there is normally only one).
            "UPDATE signing_keys SET generation = 1 + (SELECT COUNT(*) FROM signing_keys s \
         WHERE s.created_at > signing_keys.created_at \
         OR (s.created_at = signing_keys.created_at AND s.kid > signing_keys.kid))",
            "CREATE UNIQUE INDEX signing_keys_generation ON signing_keys (generation)",
        ],
    ),
    (
        4,
        "override codes: used once, revocable",
        &[
            "CREATE TABLE override_codes (id TEXT PRIMARY KEY, device TEXT NOT NULL, \
         not_after BIGINT NOT NULL, issued_by TEXT NOT NULL, issued_at BIGINT NOT NULL, \
         used_at BIGINT, revoked_at BIGINT)",
        ],
    ),
    (
        5,
        "admin roles and token expiry",
        &[
            "ALTER TABLE admin_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin'",
            "ALTER TABLE admin_tokens ADD COLUMN expires_at BIGINT",
        ],
    ),
    (
        6,
        "a renewed connector certificate's predecessor",
        &["ALTER TABLE connectors ADD COLUMN prev_serial TEXT"],
    ),
    (
        7,
        "identity: stable ids, sign-in through the identity provider, SCIM",
        &[
            // Users and groups keep their name as key (rules, devices and memberships name
            // them) and gain a stable id: SCIM addresses them by id across renames.
            "ALTER TABLE users ADD COLUMN id TEXT",
            "UPDATE users SET id = 'u-' || name",
            "CREATE UNIQUE INDEX users_id ON users (id)",
            "ALTER TABLE users ADD COLUMN external_id TEXT",
            "ALTER TABLE users ADD COLUMN display_name TEXT",
            "ALTER TABLE users ADD COLUMN email TEXT",
            // The identity provider's subject: "ISSUER SUB", unique.
            "ALTER TABLE users ADD COLUMN subject TEXT",
            "CREATE UNIQUE INDEX users_subject ON users (subject)",
            "ALTER TABLE users ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE groups ADD COLUMN id TEXT",
            "UPDATE groups SET id = 'g-' || name",
            "CREATE UNIQUE INDEX groups_id ON groups (id)",
            "ALTER TABLE groups ADD COLUMN external_id TEXT",
            "ALTER TABLE groups ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0",
            // When the device's user last signed in through the identity provider.
            "ALTER TABLE devices ADD COLUMN signed_in_at BIGINT",
            "CREATE TABLE scim_tokens (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
         secret_hash TEXT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT, \
         used_at BIGINT)",
            // A sign-in under way (authorization code or device grant), used once.
            "CREATE TABLE login_sessions (id TEXT PRIMARY KEY, purpose TEXT NOT NULL, \
         method TEXT NOT NULL, state TEXT NOT NULL, nonce TEXT NOT NULL, redirect_uri TEXT, \
         device_code TEXT, interval_s BIGINT NOT NULL DEFAULT 5, created_at BIGINT NOT NULL, \
         expires_at BIGINT NOT NULL, used_at BIGINT)",
        ],
    ),
    (
        8,
        "device classes",
        &[
            // managed (the organisation's) or personal; set by the enrollment token or an
            // MDM through the admin API, never by the device.
            "ALTER TABLE devices ADD COLUMN class TEXT NOT NULL DEFAULT 'managed'",
            "ALTER TABLE enrollment_tokens ADD COLUMN device_class TEXT",
        ],
    ),
    (
        9,
        "connector drain by an admin",
        &[
            // When an admin drained the connector (no new flows through it on any broker
            // until resumed); NULL: not drained.
            "ALTER TABLE connectors ADD COLUMN drained_at BIGINT",
        ],
    ),
    (
        10,
        "console sessions",
        &[
            // A console session made by presenting another admin token: that token's id. The
            // session is worth what its parent is (revoked, expired, its user disabled: ended).
            "ALTER TABLE admin_tokens ADD COLUMN parent TEXT",
        ],
    ),
];

/// The PostgreSQL channel on which every change of shared state is announced (`NOTIFY`); the
/// payload names the kind of change. Brokers `LISTEN` on it to follow each other at once.
pub const CHANGES_CHANNEL: &str = "sekisho_changes";

/// Seconds a replaced signing key keeps verifying beyond the posture token lifetime (clock
/// skew, tokens issued just before the rotation reached every broker).
pub const KEY_RETIRE_SLACK: u64 = 60;

/// A posture signing key as stored. Retired keys keep their record (kid, dates) but their
/// private seed is erased.
#[derive(Clone)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub created_at: u64,
    /// Rotation order: the highest generation is the active (signing) key.
    pub generation: i64,
    pub retired_at: Option<u64>,
    pub state: SigningKeyState,
    /// A previous key: until when it still verifies (its successor's creation + the window).
    pub verifies_until: Option<u64>,
    seed: Option<[u8; 32]>,
}

impl SigningKeyRecord {
    /// The key, unless it is retired.
    pub fn signer(&self) -> Option<TokenSigner> {
        match self.state {
            SigningKeyState::Retired => None,
            _ => self.seed.map(TokenSigner::from_seed),
        }
    }
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("generation", &self.generation)
            .field("retired_at", &self.retired_at)
            .field("state", &self.state)
            .field("verifies_until", &self.verifies_until)
            .finish_non_exhaustive()
    }
}

/// A broker of this deployment, as devices and connectors reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRecord {
    pub public_key: String,
    pub name: String,
    pub wireguard_endpoint: String,
    pub connector_endpoint: String,
    pub api_url: String,
}

/// Why an enrollment was refused. Nothing is created in any of these cases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token was already used")]
    Used,
    #[error("enrollment token has expired")]
    Expired,
    #[error("this enrollment token is for a {0}, not for this kind of enrollment")]
    WrongKind(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("no free address left in the device range {0}")]
    NoAddress(IpNet),
}

/// Device names, keys and addresses the policy text already uses (its own `[[devices]]`): a
/// new device may take none of them, or the policy could not be rebuilt with it.
#[derive(Debug, Default, Clone)]
pub struct Reserved {
    pub names: std::collections::HashSet<String>,
    pub keys: std::collections::HashSet<String>,
    pub addresses: std::collections::HashSet<IpAddr>,
}

impl Reserved {
    /// Everything the devices of `policy` use (the policy file's and the directory's).
    pub fn of(policy: &sekisho_proto::policy::Policy) -> Reserved {
        let mut r = Reserved::default();
        for d in &policy.devices {
            r.names.insert(d.name.clone());
            r.keys.insert(d.public_key.to_string());
            r.addresses.insert(d.address);
        }
        r
    }

    /// Why `name` with `key` cannot be enrolled, if it cannot.
    fn clash(&self, name: &str, key: &str) -> Option<String> {
        if self.names.contains(name) {
            Some(format!(
                "a device named {name:?} is already in the policy; choose another name"
            ))
        } else if self.keys.contains(key.trim()) {
            Some("this public key is already a device of the policy".to_string())
        } else {
            None
        }
    }
}

/// The admin behind a valid admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// When it expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
    /// A console session's: the token it was made from.
    pub parent: Option<String>,
}

/// What an enrollment token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Device,
    Connector,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Device => "device",
            TokenKind::Connector => "connector",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub name: String,
    pub user: String,
    pub public_key: String,
    pub address: IpAddr,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
    pub class: sekisho_proto::policy::DeviceClass,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRecord {
    pub name: String,
    pub site: String,
    pub serial: String,
    pub not_after: u64,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
    /// When an admin drained it (no new flows until resumed).
    pub drained_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
}

/// SHA-256 of a secret, hex.
pub fn hash_secret(secret: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `n` random bytes from the OS, base64url.
pub fn random_text(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A new stable id for a user (`u-…`) or group (`g-…`): what SCIM calls them by.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", random_text(16))
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|v| v.max(0) as u64)
}

fn ts(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: &'static str,
    /// Seals the signing keys' seeds (see [`crate::kek`]); set once at start.
    kek: Arc<std::sync::OnceLock<crate::kek::Kek>>,
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://…`), creating an SQLite file if
    /// needed, and applies pending migrations.
    pub async fn open(url: &str) -> Result<Store> {
        install_default_drivers();
        let (url, backend, max) = if let Some(path) = url.strip_prefix("sqlite://") {
            if let Some(dir) = std::path::Path::new(path.split('?').next().unwrap_or(path)).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let sep = if path.contains('?') { '&' } else { '?' };
            // One connection: SQLite serializes writers anyway, and a single connection never
            // meets "database is locked".
            (format!("sqlite://{path}{sep}mode=rwc"), "sqlite", 1)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (url.to_string(), "postgres", 8)
        } else {
            anyhow::bail!("database URL must start with sqlite:// or postgres:// (got {url:?})");
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .connect(&url)
            .await
            .with_context(|| format!("cannot open the {backend} database"))?;
        let store = Store {
            pool,
            backend,
            kek: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether changes are announced on [`CHANGES_CHANNEL`] (PostgreSQL only).
    pub fn announces(&self) -> bool {
        self.backend == "postgres"
    }

    /// Sends `payload` on [`CHANGES_CHANNEL`] (PostgreSQL; nothing on SQLite).
    pub async fn notify(&self, payload: &str) -> Result<()> {
        if self.announces() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGES_CHANNEL)
                .bind(payload)
                .execute(&self.pool)
                .await
                .context("NOTIFY failed")?;
        }
        Ok(())
    }

    /// Tells the other brokers, right after a committed write, that shared state changed.
    /// A lost announcement is not an error: the brokers' polling catches up.
    async fn announce(&self, kind: &str) {
        if let Err(e) = self.notify(kind).await {
            tracing::warn!(kind, "cannot announce a store change: {e:#}");
        }
    }

    /// A cheap round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .context("cannot create the migrations table")?;
        for (version, description, statements) in MIGRATIONS {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(*version)
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_some() {
                continue;
            }
            for sql in *statements {
                sqlx::query(sql)
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("migration {version} ({description}) failed"))?;
            }
            sqlx::query(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(*version)
            .bind(*description)
            .bind(ts(now_unix()))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                version,
                description,
                backend = self.backend,
                "database migrated"
            );
        }
        Ok(())
    }

    pub async fn schema_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
