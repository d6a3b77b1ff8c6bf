//! The control plane's state: users, groups, devices, connectors, enrollment and admin tokens,
//! policy versions and the posture signing key.
//!
//! One schema for SQLite (default: a file created and migrated on first start) and PostgreSQL
//! (clusters), through sqlx's `Any` driver. The SQL sticks to what both accept: `TEXT` and
//! `BIGINT` columns, `$n` placeholders in ascending order, `ON CONFLICT DO NOTHING`. Secrets are
//! stored as SHA-256 hashes; the posture signing key is stored as is (every broker of a cluster
//! needs it) and the database must be protected accordingly.

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRecord {
    pub name: String,
    pub site: String,
    pub serial: String,
    pub not_after: u64,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
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

    // ---- users and groups ----

    pub async fn create_group(&self, name: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO groups (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        let created = r.rows_affected() == 1;
        if created {
            self.announce("group_created").await;
        }
        Ok(created)
    }

    /// Creates a user in `groups` (groups are created as needed). False if the user exists.
    pub async fn create_user(&self, name: &str, groups: &[String], now: u64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "INSERT INTO users (name, disabled, created_at) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        for g in groups {
            sqlx::query(
                "INSERT INTO groups (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(g.as_str())
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO user_groups (user_name, group_name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .bind(g.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.announce("user_created").await;
        Ok(true)
    }

    /// Disables or enables a user. False if there is no such user.
    pub async fn set_user_disabled(&self, name: &str, disabled: bool) -> Result<bool> {
        let r = sqlx::query("UPDATE users SET disabled = $1 WHERE name = $2")
            .bind(i64::from(disabled))
            .bind(name)
            .execute(&self.pool)
            .await?;
        let found = r.rows_affected() == 1;
        if found {
            self.announce(if disabled {
                "user_disabled"
            } else {
                "user_enabled"
            })
            .await;
        }
        Ok(found)
    }

    pub async fn users(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT name, disabled FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let members = sqlx::query(
            "SELECT user_name, group_name FROM user_groups ORDER BY user_name, group_name",
        )
        .fetch_all(&self.pool)
        .await?;
        // One pass over the memberships (thousands of users are rebuilt on every change).
        let mut groups_of: std::collections::HashMap<String, Vec<String>> = Default::default();
        for m in &members {
            groups_of
                .entry(m.try_get(0)?)
                .or_default()
                .push(m.try_get(1)?);
        }
        let users = rows
            .iter()
            .map(|r| {
                let name: String = r.try_get(0)?;
                Ok(UserRecord {
                    groups: groups_of.remove(&name).unwrap_or_default(),
                    disabled: r.try_get::<i64, _>(1)? != 0,
                    name,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(users)
    }

    /// Users, groups and active devices, to merge with the policy file.
    pub async fn directory(&self) -> Result<Directory> {
        let groups = sqlx::query("SELECT name FROM groups ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<Vec<String>, _>>()?;
        let users = self
            .users()
            .await?
            .into_iter()
            .map(|u| DirectoryUser {
                name: u.name,
                groups: u.groups,
                disabled: u.disabled,
            })
            .collect();
        let devices = self
            .devices()
            .await?
            .into_iter()
            .filter(|d| d.revoked_at.is_none())
            .map(|d| DirectoryDevice {
                name: d.name,
                user: d.user,
                public_key: d.public_key,
                address: d.address,
            })
            .collect();
        Ok(Directory {
            groups,
            users,
            devices,
        })
    }

    // ---- enrollment tokens ----

    /// Creates a one-time enrollment token; returns (id, secret).
    pub async fn create_enrollment_token(
        &self,
        kind: TokenKind,
        subject: &str,
        now: u64,
        ttl_secs: u64,
    ) -> Result<(String, String)> {
        let id = random_text(9);
        let secret = random_text(24);
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, secret_hash, kind, subject, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(hash_secret(&secret))
        .bind(kind.as_str())
        .bind(subject)
        .bind(ts(now))
        .bind(ts(now.saturating_add(ttl_secs)))
        .execute(&self.pool)
        .await?;
        Ok((id, secret))
    }

    /// Marks the token used inside `tx`, if it is valid for `kind`; returns its subject.
    async fn consume(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        kind: TokenKind,
        id: &str,
        secret: &str,
        now: u64,
        used_by: &str,
    ) -> Result<std::result::Result<String, EnrollError>> {
        let Some(row) = sqlx::query(
            "SELECT secret_hash, kind, subject, expires_at, used_at FROM enrollment_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok(Err(EnrollError::Unknown));
        };
        let hash: String = row.try_get(0)?;
        if !same_hash(&hash, &hash_secret(secret)) {
            return Ok(Err(EnrollError::Unknown));
        }
        let token_kind: String = row.try_get(1)?;
        if token_kind != kind.as_str() {
            return Ok(Err(EnrollError::WrongKind(if token_kind == "device" {
                "device"
            } else {
                "connector"
            })));
        }
        if row.try_get::<Option<i64>, _>(4)?.is_some() {
            return Ok(Err(EnrollError::Used));
        }
        if opt_u64(Some(row.try_get(3)?)).unwrap_or(0) <= now {
            return Ok(Err(EnrollError::Expired));
        }
        // The condition makes two concurrent uses impossible: only one update matches.
        let r = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = $1, used_by = $2 WHERE id = $3 AND used_at IS NULL",
        )
        .bind(ts(now))
        .bind(used_by)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(Err(EnrollError::Used));
        }
        Ok(Ok(row.try_get(2)?))
    }

    // ---- devices ----

    /// Enrolls a device with a one-time token: picks the first free address of `range` (the
    /// range's first address is the broker's), records the device and its credential hash.
    /// Returns the record and the device credential (id, secret). All or nothing.
    #[allow(clippy::too_many_arguments)]
    pub async fn enroll_device(
        &self,
        token_id: &str,
        token_secret: &str,
        now: u64,
        name: &str,
        public_key: &str,
        range: IpNet,
        reserved: &Reserved,
    ) -> Result<std::result::Result<(DeviceRecord, String, String), EnrollError>> {
        let mut tx = self.pool.begin().await?;
        let user = match Self::consume(
            &mut tx,
            TokenKind::Device,
            token_id,
            token_secret,
            now,
            name,
        )
        .await?
        {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        let taken = sqlx::query("SELECT name FROM devices WHERE name = $1 OR public_key = $2")
            .bind(name)
            .bind(public_key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = taken {
            let other: String = row.try_get(0)?;
            return Ok(Err(EnrollError::Conflict(if other == name {
                format!("a device named {name:?} is already enrolled; choose another name")
            } else {
                "this public key is already enrolled".to_string()
            })));
        }
        if let Some(why) = reserved.clash(name, public_key) {
            return Ok(Err(EnrollError::Conflict(why)));
        }
        let mut used: Vec<IpAddr> = sqlx::query("SELECT address FROM devices")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok()?.parse().ok())
            .collect();
        used.extend(reserved.addresses.iter().copied());
        let service = sekisho_proto::posture::service_address(&range);
        let Some(address) = range.hosts().find(|a| *a != service && !used.contains(a)) else {
            return Ok(Err(EnrollError::NoAddress(range)));
        };
        let cred_id = random_text(9);
        let cred_secret = random_text(24);
        let exists = sqlx::query("SELECT name FROM users WHERE name = $1")
            .bind(user.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(Err(EnrollError::Conflict(format!(
                "the token's user {user:?} no longer exists"
            ))));
        }
        sqlx::query(
            "INSERT INTO devices (name, user_name, public_key, address, credential_id, \
             credential_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(name)
        .bind(user.as_str())
        .bind(public_key)
        .bind(address.to_string())
        .bind(cred_id.as_str())
        .bind(hash_secret(&cred_secret))
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.announce("device_enrolled").await;
        Ok(Ok((
            DeviceRecord {
                name: name.to_string(),
                user,
                public_key: public_key.to_string(),
                address,
                created_at: now,
                revoked_at: None,
            },
            cred_id,
            cred_secret,
        )))
    }

    /// Registers devices of `user` whose keys were made elsewhere (no token): each gets the
    /// next free address of `range` and a credential. All or nothing; a name or key already
    /// enrolled refuses the whole batch.
    pub async fn register_devices(
        &self,
        user: &str,
        devices: &[(String, String)],
        now: u64,
        range: IpNet,
        reserved: &Reserved,
    ) -> Result<std::result::Result<Vec<(DeviceRecord, String, String)>, EnrollError>> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT name FROM users WHERE name = $1")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(Err(EnrollError::Conflict(format!("no user {user:?}"))));
        }
        let rows = sqlx::query("SELECT name, public_key, address FROM devices")
            .fetch_all(&mut *tx)
            .await?;
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        let mut used = std::collections::HashSet::new();
        for r in &rows {
            names.insert(r.try_get::<String, _>(0)?);
            keys.insert(r.try_get::<String, _>(1)?);
            if let Ok(a) = r.try_get::<String, _>(2)?.parse::<IpAddr>() {
                used.insert(a);
            }
        }
        used.extend(reserved.addresses.iter().copied());
        let service = sekisho_proto::posture::service_address(&range);
        let mut free = range.hosts().filter(|a| *a != service && !used.contains(a));
        let mut out = Vec::with_capacity(devices.len());
        for (name, key) in devices {
            if let Some(why) = reserved.clash(name, key) {
                return Ok(Err(EnrollError::Conflict(format!("{name}: {why}"))));
            }
            if !names.insert(name.clone()) {
                return Ok(Err(EnrollError::Conflict(format!(
                    "a device named {name:?} is already enrolled"
                ))));
            }
            if !keys.insert(key.clone()) {
                return Ok(Err(EnrollError::Conflict(format!(
                    "the key of {name:?} is already enrolled"
                ))));
            }
            let Some(address) = free.next() else {
                return Ok(Err(EnrollError::NoAddress(range)));
            };
            let cred_id = random_text(9);
            let cred_secret = random_text(24);
            sqlx::query(
                "INSERT INTO devices (name, user_name, public_key, address, credential_id, \
                 credential_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(name.as_str())
            .bind(user)
            .bind(key.as_str())
            .bind(address.to_string())
            .bind(cred_id.as_str())
            .bind(hash_secret(&cred_secret))
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
            out.push((
                DeviceRecord {
                    name: name.clone(),
                    user: user.to_string(),
                    public_key: key.clone(),
                    address,
                    created_at: now,
                    revoked_at: None,
                },
                cred_id,
                cred_secret,
            ));
        }
        tx.commit().await?;
        self.announce("device_enrolled").await;
        Ok(Ok(out))
    }

    fn device_row(r: &sqlx::any::AnyRow) -> Result<DeviceRecord> {
        let address: String = r.try_get(3)?;
        Ok(DeviceRecord {
            name: r.try_get(0)?,
            user: r.try_get(1)?,
            public_key: r.try_get(2)?,
            address: address.parse().context("bad address in the database")?,
            created_at: opt_u64(Some(r.try_get(4)?)).unwrap_or(0),
            revoked_at: opt_u64(r.try_get(5)?),
        })
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        sqlx::query(
            "SELECT name, user_name, public_key, address, created_at, revoked_at FROM devices \
             ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(Self::device_row)
        .collect()
    }

    /// The active device a credential belongs to.
    pub async fn device_by_credential(
        &self,
        id: &str,
        secret: &str,
    ) -> Result<Option<DeviceRecord>> {
        let row = sqlx::query(
            "SELECT name, user_name, public_key, address, created_at, revoked_at, credential_hash \
             FROM devices WHERE credential_id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) if same_hash(&r.try_get::<String, _>(6)?, &hash_secret(secret)) => {
                Ok(Some(Self::device_row(&r)?))
            }
            _ => Ok(None),
        }
    }

    /// Revokes a device. False if there is no such active device.
    pub async fn revoke_device(&self, name: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE devices SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(name)
        .execute(&self.pool)
        .await?;
        let revoked = r.rows_affected() == 1;
        if revoked {
            self.announce("device_revoked").await;
        }
        Ok(revoked)
    }

    // ---- connectors ----

    /// Enrolls a connector with a one-time token. `issue(site, name)` signs its certificate
    /// and returns (certificate PEM, serial, not_after); it runs inside the transaction, so a
    /// failure creates nothing. Returns (site, name, certificate PEM).
    pub async fn enroll_connector(
        &self,
        token_id: &str,
        token_secret: &str,
        now: u64,
        issue: impl FnOnce(&str, &str) -> Result<(String, String, u64)>,
    ) -> Result<std::result::Result<(String, String, String), EnrollError>> {
        let mut tx = self.pool.begin().await?;
        let name = format!(
            "connector-{}",
            random_text(6).to_lowercase().replace(['-', '_'], "x")
        );
        let site = match Self::consume(
            &mut tx,
            TokenKind::Connector,
            token_id,
            token_secret,
            now,
            &name,
        )
        .await?
        {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let (pem, serial, not_after) = issue(&site, &name)?;
        sqlx::query(
            "INSERT INTO connectors (name, site, serial, not_after, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(name.as_str())
        .bind(site.as_str())
        .bind(serial.as_str())
        .bind(ts(not_after))
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO connector_certs (serial, connector, not_after) VALUES ($1, $2, $3)",
        )
        .bind(serial.as_str())
        .bind(name.as_str())
        .bind(ts(not_after))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.announce("connector_enrolled").await;
        Ok(Ok((site, name, pem)))
    }

    /// Records a renewed certificate of an active connector. False if the connector is unknown
    /// or revoked.
    /// Renewal is asked for with `from`, the certificate of the asking link: the current one
    /// (it becomes the predecessor, still good for new links until the new one is first
    /// used), or the predecessor itself (the answer to a renewal was lost: the predecessor
    /// stays, the lost certificate is replaced).
    pub async fn renew_connector(
        &self,
        name: &str,
        from: &str,
        serial: &str,
        not_after: u64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE connectors SET \
               prev_serial = CASE WHEN serial = $4 THEN serial ELSE prev_serial END, \
               serial = $1, not_after = $2 \
             WHERE name = $3 AND revoked_at IS NULL AND (serial = $4 OR prev_serial = $4)",
        )
        .bind(serial)
        .bind(ts(not_after))
        .bind(name)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO connector_certs (serial, connector, not_after) VALUES ($1, $2, $3)",
        )
        .bind(serial)
        .bind(name)
        .bind(ts(not_after))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.announce("connector_renewed").await;
        Ok(true)
    }

    pub async fn connectors(&self) -> Result<Vec<ConnectorRecord>> {
        sqlx::query(
            "SELECT name, site, serial, not_after, created_at, revoked_at FROM connectors ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(ConnectorRecord {
                name: r.try_get(0)?,
                site: r.try_get(1)?,
                serial: r.try_get(2)?,
                not_after: opt_u64(Some(r.try_get(3)?)).unwrap_or(0),
                created_at: opt_u64(Some(r.try_get(4)?)).unwrap_or(0),
                revoked_at: opt_u64(r.try_get(5)?),
            })
        })
        .collect()
    }

    /// The connector whose current certificate (or, until that one is first used, its
    /// predecessor) has this serial, if that connector is active. A new link with the current
    /// certificate revokes the predecessor: a renewal revokes the certificate it replaces as
    /// soon as the connector has shown it holds the new one, and a renewal whose answer was
    /// lost does not lock the connector out.
    pub async fn connector_by_serial(&self, serial: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT name, site, serial = $1, prev_serial FROM connectors \
             WHERE (serial = $1 OR prev_serial = $1) AND revoked_at IS NULL",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        let name: String = r.try_get(0)?;
        let current: bool = r
            .try_get::<bool, _>(2)
            .or_else(|_| r.try_get::<i64, _>(2).map(|v| v != 0))?;
        let prev: Option<String> = r.try_get(3)?;
        if current && prev.is_some() {
            sqlx::query("UPDATE connectors SET prev_serial = NULL WHERE name = $1 AND serial = $2")
                .bind(name.as_str())
                .bind(serial)
                .execute(&self.pool)
                .await?;
            self.announce("connector_renewed").await;
        }
        Ok(Some((name, r.try_get(1)?)))
    }

    /// Whether `serial` is the current certificate of an active connector, or its
    /// predecessor still in its window: the certificates a live link may keep using and renew
    /// with.
    pub async fn connector_serial_valid(&self, serial: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT name, site FROM connectors \
             WHERE (serial = $1 OR prev_serial = $1) AND revoked_at IS NULL",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
            None => None,
        })
    }

    pub async fn revoke_connector(&self, name: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE connectors SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(name)
        .execute(&self.pool)
        .await?;
        let revoked = r.rows_affected() == 1;
        if revoked {
            self.announce("connector_revoked").await;
        }
        Ok(revoked)
    }

    // ---- policy ----

    pub async fn latest_policy(&self) -> Result<Option<(u64, String)>> {
        let row = sqlx::query("SELECT version, text FROM policies ORDER BY version DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((opt_u64(Some(r.try_get(0)?)).unwrap_or(0), r.try_get(1)?)),
            None => None,
        })
    }

    /// Stores a new policy version; returns its number.
    pub async fn save_policy(&self, text: &str, now: u64, by: &str) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT MAX(version) FROM policies")
            .fetch_one(&mut *tx)
            .await?;
        let version = row.try_get::<Option<i64>, _>(0)?.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO policies (version, text, applied_at, applied_by) VALUES ($1, $2, $3, $4)",
        )
        .bind(version)
        .bind(text)
        .bind(ts(now))
        .bind(by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.announce("policy_saved").await;
        Ok(version as u64)
    }

    /// A summary that changes whenever devices, users, groups, the policy, connectors or the
    /// signing keys change: brokers sharing the store compare it to learn of changes made
    /// through another broker (the polling fallback of LISTEN/NOTIFY, and all there is on
    /// SQLite).
    pub async fn fingerprint(&self) -> Result<String> {
        const PARTS: &[&str] = &[
            "(SELECT COUNT(*) FROM devices)",
            "(SELECT COALESCE(MAX(created_at), 0) FROM devices)",
            "(SELECT COUNT(*) FROM devices WHERE revoked_at IS NOT NULL)",
            "(SELECT COUNT(*) FROM users)",
            "(SELECT COUNT(*) FROM users WHERE disabled <> 0)",
            "(SELECT COUNT(*) FROM user_groups)",
            "(SELECT COUNT(*) FROM groups)",
            "(SELECT COALESCE(MAX(version), 0) FROM policies)",
            "(SELECT COUNT(*) FROM connectors)",
            "(SELECT COUNT(*) FROM connectors WHERE revoked_at IS NOT NULL)",
            "(SELECT COUNT(*) FROM connector_certs)",
            "(SELECT COALESCE(MAX(generation), 0) FROM signing_keys)",
            "(SELECT COUNT(*) FROM signing_keys WHERE retired_at IS NOT NULL)",
        ];
        let row = sqlx::query(&format!("SELECT {}", PARTS.join(", ")))
            .fetch_one(&self.pool)
            .await?;
        let mut parts = Vec::new();
        for i in 0..PARTS.len() {
            parts.push(row.try_get::<i64, _>(i)?.to_string());
        }
        Ok(parts.join("/"))
    }

    // ---- broker registry ----

    /// Records (or refreshes) a broker of this deployment: devices and connectors learn every
    /// registered broker from the control plane.
    pub async fn register_broker(&self, b: &BrokerRecord, now: u64) -> Result<()> {
        let known = sqlx::query(
            "SELECT 1 FROM brokers WHERE public_key = $1 AND name = $2 AND \
             wireguard_endpoint = $3 AND connector_endpoint = $4 AND api_url = $5",
        )
        .bind(b.public_key.as_str())
        .bind(b.name.as_str())
        .bind(b.wireguard_endpoint.as_str())
        .bind(b.connector_endpoint.as_str())
        .bind(b.api_url.as_str())
        .fetch_optional(&self.pool)
        .await?
        .is_some();
        sqlx::query(
            "INSERT INTO brokers (public_key, name, wireguard_endpoint, connector_endpoint, \
             api_url, seen_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (public_key) DO \
             UPDATE SET name = $2, wireguard_endpoint = $3, connector_endpoint = $4, \
             api_url = $5, seen_at = $6",
        )
        .bind(b.public_key.as_str())
        .bind(b.name.as_str())
        .bind(b.wireguard_endpoint.as_str())
        .bind(b.connector_endpoint.as_str())
        .bind(b.api_url.as_str())
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        // Refreshing `seen_at` is not news; a new or changed broker is.
        if !known {
            self.announce("broker_registered").await;
        }
        Ok(())
    }

    /// The brokers that registered at or after `seen_since` (Unix seconds), by name.
    pub async fn brokers(&self, seen_since: u64) -> Result<Vec<BrokerRecord>> {
        let rows = sqlx::query(
            "SELECT public_key, name, wireguard_endpoint, connector_endpoint, api_url \
             FROM brokers WHERE seen_at >= $1 ORDER BY name, public_key",
        )
        .bind(ts(seen_since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BrokerRecord {
                    public_key: r.try_get(0)?,
                    name: r.try_get(1)?,
                    wireguard_endpoint: r.try_get(2)?,
                    connector_endpoint: r.try_get(3)?,
                    api_url: r.try_get(4)?,
                })
            })
            .collect()
    }

    // ---- admin tokens ----

    /// Creates an admin token with the `admin` role and no expiry; returns (id, secret).
    pub async fn create_admin_token(&self, name: &str, now: u64) -> Result<(String, String)> {
        self.create_admin_token_with(name, Role::Admin, None, now)
            .await
    }

    /// Creates an admin token; returns (id, secret).
    pub async fn create_admin_token_with(
        &self,
        name: &str,
        role: Role,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<(String, String)> {
        let id = random_text(9);
        let secret = random_text(32);
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, secret_hash, created_at, role, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(hash_secret(&secret))
        .bind(ts(now))
        .bind(role.as_str())
        .bind(expires_at.map(ts))
        .execute(&self.pool)
        .await?;
        Ok((id, secret))
    }

    /// Who a token belongs to: Ok(admin) when it is valid at `now`; Err(reason) when it is
    /// unknown, revoked or expired.
    pub async fn admin_by_token(
        &self,
        id: &str,
        secret: &str,
        now: u64,
    ) -> Result<std::result::Result<AdminIdentity, &'static str>> {
        let row = sqlx::query(
            "SELECT name, secret_hash, role, expires_at, revoked_at FROM admin_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(Err("unknown admin token"));
        };
        if !same_hash(&r.try_get::<String, _>(1)?, &hash_secret(secret)) {
            return Ok(Err("unknown admin token"));
        }
        if opt_u64(r.try_get(4)?).is_some() {
            return Ok(Err("revoked admin token"));
        }
        if opt_u64(r.try_get(3)?).is_some_and(|e| e <= now) {
            return Ok(Err("expired admin token"));
        }
        let role: String = r.try_get(2)?;
        Ok(Ok(AdminIdentity {
            id: id.to_string(),
            name: r.try_get(0)?,
            role: role.parse().unwrap_or(Role::Auditor),
        }))
    }

    /// Every admin token (never its secret), oldest first.
    pub async fn admin_tokens(&self) -> Result<Vec<sekisho_proto::api::AdminTokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at, expires_at, revoked_at FROM admin_tokens \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let role: String = r.try_get(2)?;
                Ok(sekisho_proto::api::AdminTokenInfo {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    role: role.parse().unwrap_or(Role::Auditor),
                    created_at: opt_u64(Some(r.try_get(3)?)).unwrap_or(0),
                    expires_at: opt_u64(r.try_get(4)?),
                    revoked_at: opt_u64(r.try_get(5)?),
                })
            })
            .collect()
    }

    /// Revokes an admin token; false when there is no unrevoked token `id`.
    pub async fn revoke_admin_token(&self, id: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- override codes ----

    pub async fn record_override(
        &self,
        id: &str,
        device: &str,
        not_after: u64,
        by: &str,
        now: u64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO override_codes (id, device, not_after, issued_by, issued_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(device)
        .bind(ts(not_after))
        .bind(by)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a code of `device` used (first use only). False when there is no such code.
    pub async fn override_used(&self, id: &str, device: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE override_codes SET used_at = COALESCE(used_at, $1) WHERE id = $2 AND device = $3",
        )
        .bind(ts(now))
        .bind(id)
        .bind(device)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Revokes a code; returns its device, or None when there is no unrevoked code `id`.
    pub async fn revoke_override(&self, id: &str, now: u64) -> Result<Option<String>> {
        let row = sqlx::query(
            "UPDATE override_codes SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL \
             RETURNING device",
        )
        .bind(ts(now))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let device = row.map(|r| r.try_get::<String, _>(0)).transpose()?;
        if device.is_some() {
            self.announce("override_revoked").await;
        }
        Ok(device)
    }

    /// Unexpired codes of `device` that no longer open it: (revoked, used but not revoked).
    pub async fn dead_overrides(
        &self,
        device: &str,
        now: u64,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let rows = sqlx::query(
            "SELECT id, revoked_at FROM override_codes WHERE device = $1 AND not_after > $2 \
             AND (revoked_at IS NOT NULL OR used_at IS NOT NULL) ORDER BY id",
        )
        .bind(device)
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await?;
        let (mut revoked, mut used) = (Vec::new(), Vec::new());
        for r in &rows {
            let id: String = r.try_get(0)?;
            if opt_u64(r.try_get(1)?).is_some() {
                revoked.push(id);
            } else {
                used.push(id);
            }
        }
        Ok((revoked, used))
    }

    // ---- posture signing keys ----

    /// From now on, signing keys are sealed with `kek` when written and opened with it when
    /// read. Set once; a second call is ignored.
    pub fn set_kek(&self, kek: crate::kek::Kek) {
        let _ = self.kek.set(kek);
    }

    /// Whether some signing key in the store is sealed (by any KEK).
    pub async fn has_sealed_signing_keys(&self) -> Result<bool> {
        let rows = sqlx::query("SELECT seed FROM signing_keys")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().any(|r| {
            r.try_get::<String, _>(0)
                .is_ok_and(|s| crate::kek::Kek::is_sealed(&s))
        }))
    }

    /// Seals the seeds still stored in the clear (written before keys were sealed). Returns
    /// how many it sealed.
    pub async fn seal_plaintext_signing_keys(&self) -> Result<usize> {
        let kek = self.kek.get().context("no key-encryption key loaded")?;
        let rows = sqlx::query("SELECT kid, seed FROM signing_keys WHERE seed <> ''")
            .fetch_all(&self.pool)
            .await?;
        let mut sealed = 0;
        for r in &rows {
            let kid: String = r.try_get(0)?;
            let seed: String = r.try_get(1)?;
            if crate::kek::Kek::is_sealed(&seed) {
                continue;
            }
            let plain = URL_SAFE_NO_PAD
                .decode(&seed)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .context("bad signing key in the database")?;
            let n = sqlx::query("UPDATE signing_keys SET seed = $1 WHERE kid = $2 AND seed = $3")
                .bind(kek.seal(&kid, &plain))
                .bind(kid.as_str())
                .bind(seed.as_str())
                .execute(&self.pool)
                .await?
                .rows_affected();
            sealed += n as usize;
        }
        Ok(sealed)
    }

    /// The stored form of a seed: sealed when a KEK is set.
    fn stored_seed(&self, kid: &str, seed: &[u8; 32]) -> String {
        match self.kek.get() {
            Some(kek) => kek.seal(kid, seed),
            None => URL_SAFE_NO_PAD.encode(seed),
        }
    }

    /// A seed from its stored form.
    fn open_seed(&self, kid: &str, stored: &str) -> Result<[u8; 32]> {
        if crate::kek::Kek::is_sealed(stored) {
            let kek = self.kek.get().with_context(|| {
                format!("signing key {kid} is sealed, and no key-encryption key is loaded")
            })?;
            return kek.open(kid, stored);
        }
        URL_SAFE_NO_PAD
            .decode(stored)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .context("bad signing key in the database")
    }

    /// The active posture signing key (the newest), created on first use. Every broker
    /// sharing the database signs with it and verifies with it and the previous keys that
    /// are still in their window (see [`Store::signing_keys`]).
    pub async fn signing_key(&self, now: u64) -> Result<TokenSigner> {
        for _ in 0..3 {
            let keys = self.signing_keys(now, u64::MAX).await?;
            if let Some(active) = keys.first().and_then(SigningKeyRecord::signer) {
                return Ok(active);
            }
            // None yet (or, which never happens, only retired ones): make one. Two brokers
            // starting at once race here; the unique generation lets one of them win.
            let next = keys.first().map_or(1, |k| k.generation + 1);
            self.insert_signing_key(&TokenSigner::generate(), next, now)
                .await?;
        }
        anyhow::bail!("cannot create a posture signing key")
    }

    async fn insert_signing_key(
        &self,
        key: &TokenSigner,
        generation: i64,
        now: u64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO signing_keys (kid, seed, created_at, generation) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(key.kid())
        .bind(self.stored_seed(key.kid(), &key.seed()))
        .bind(ts(now))
        .bind(generation)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every signing key, newest first, with its state at `now`: the newest signs
    /// ("active"); an older key verifies ("previous") until `window` seconds after its
    /// successor was created (the posture token lifetime plus [`KEY_RETIRE_SLACK`]), then it
    /// is "retired" (also when a broker marked it so, see [`Store::retire_signing_keys`]).
    pub async fn signing_keys(&self, now: u64, window: u64) -> Result<Vec<SigningKeyRecord>> {
        let rows = sqlx::query(
            "SELECT kid, seed, created_at, generation, retired_at FROM signing_keys \
             ORDER BY generation DESC, created_at DESC, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut keys: Vec<SigningKeyRecord> = Vec::with_capacity(rows.len());
        for r in &rows {
            let created_at = opt_u64(Some(r.try_get(2)?)).unwrap_or(0);
            let retired_at = opt_u64(r.try_get(4)?);
            let seed: String = r.try_get(1)?;
            let kid: String = r.try_get(0)?;
            let seed = if retired_at.is_some() {
                None
            } else {
                Some(self.open_seed(&kid, &seed)?)
            };
            let verifies_until = keys
                .last()
                .map(|successor| successor.created_at.saturating_add(window));
            let state = match (retired_at, verifies_until) {
                (Some(_), _) => SigningKeyState::Retired,
                (None, None) => SigningKeyState::Active,
                (None, Some(until)) if now < until => SigningKeyState::Previous,
                (None, Some(_)) => SigningKeyState::Retired,
            };
            keys.push(SigningKeyRecord {
                kid,
                created_at,
                generation: r.try_get(3)?,
                retired_at,
                state,
                verifies_until,
                seed,
            });
        }
        Ok(keys)
    }

    /// Makes a new signing key the active one; the one it replaces keeps verifying for
    /// `window` (see [`Store::signing_keys`]). Returns the new key.
    pub async fn rotate_signing_key(&self, now: u64) -> Result<TokenSigner> {
        self.signing_key(now).await?;
        for _ in 0..5 {
            let next = sqlx::query("SELECT COALESCE(MAX(generation), 0) FROM signing_keys")
                .fetch_one(&self.pool)
                .await?
                .try_get::<i64, _>(0)?
                + 1;
            let fresh = TokenSigner::generate();
            // Another broker rotating at the same moment takes the same generation: one wins,
            // the other tries the next one.
            if self.insert_signing_key(&fresh, next, now).await? {
                self.announce("signing_key_rotated").await;
                return Ok(fresh);
            }
        }
        anyhow::bail!("cannot rotate the signing key: too many concurrent rotations")
    }

    /// Marks the keys whose window has passed at `now` as retired and erases their private
    /// seed (the record stays, for the key list and the audit trail). Returns their kids.
    pub async fn retire_signing_keys(&self, now: u64, window: u64) -> Result<Vec<String>> {
        let mut retired = Vec::new();
        for k in self.signing_keys(now, window).await? {
            if k.state != SigningKeyState::Retired || k.retired_at.is_some() {
                continue;
            }
            let r = sqlx::query(
                "UPDATE signing_keys SET retired_at = $1, seed = '' WHERE kid = $2 \
                 AND retired_at IS NULL",
            )
            .bind(ts(now))
            .bind(k.kid.as_str())
            .execute(&self.pool)
            .await?;
            if r.rows_affected() == 1 {
                retired.push(k.kid);
            }
        }
        if !retired.is_empty() {
            self.announce("signing_key_retired").await;
        }
        Ok(retired)
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
