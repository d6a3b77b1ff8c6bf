//! The store: what SCIM provisioning reads and writes (users and groups by their stable ids,
//! renames, deletions) and the SCIM tokens an identity provider's provisioning client uses.
//!
//! Users and groups stay keyed by name everywhere (memberships, devices, policy rules), so a
//! rename happens in one transaction: the old row gives up its unique keys (id, subject), a row
//! with the new name takes them over with every other column, the memberships, devices and
//! pending enrollment tokens move to it, and the old row goes. PostgreSQL's foreign keys have no
//! `ON UPDATE CASCADE`, and this order never leaves a reference dangling.
//!
//! A user or group deleted through SCIM whose name must stay (a user with devices, whose
//! records name them; a name the policy text refers to) is kept as a *tombstone*: disabled,
//! without memberships, its id replaced by [`DELETED_ID_PREFIX`] + the old id, so SCIM no longer
//! sees it. Creating a user or group of that name later revives the record under a new id.
//!
//! Every write raises `updated_at` (to now, or by one second when it is already there or
//! later), so the store's fingerprint, which sums it, moves with every change: brokers that
//! follow the store by polling see renames and membership swaps that leave every count as it
//! was.

use super::*;

/// The id of a user or group deleted through SCIM but kept (see the module documentation)
/// starts with this; such records are invisible to SCIM.
pub const DELETED_ID_PREFIX: &str = "deleted-";

/// Only records SCIM sees (the SQL condition on `id`).
const VISIBLE: &str = "id IS NOT NULL AND id NOT LIKE 'deleted-%'";

/// `updated_at` raised for a write at `$1`: now, or one more than before when that is not
/// earlier (so each write changes it). Statements using it start with it, as SQLite numbers
/// `$n` placeholders in the order they first appear.
const BUMP: &str = "updated_at = CASE WHEN updated_at >= $1 THEN updated_at + 1 ELSE $1 END";

/// The columns of `users`, as a rename copies them (migration 7). A column added to `users`
/// later must be added here, or a rename would drop its value: `users_columns_are_all_copied`
/// fails until it is.
pub(crate) const USER_COLUMNS: &[&str] = &[
    "name",
    "disabled",
    "created_at",
    "id",
    "external_id",
    "display_name",
    "email",
    "subject",
    "updated_at",
];

/// The columns of `groups`, as a rename copies them.
pub(crate) const GROUP_COLUMNS: &[&str] =
    &["name", "created_at", "id", "external_id", "updated_at"];

/// A user as SCIM shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimUserRecord {
    pub id: String,
    pub name: String,
    pub external_id: Option<String>,
    pub display_name: Option<String>,
    pub email: Option<String>,
    pub disabled: bool,
    pub created_at: u64,
    pub updated_at: u64,
    /// The groups SCIM sees the user in: (group id, group name), by name.
    pub groups: Vec<(String, String)>,
}

/// A group as SCIM shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimGroupRecord {
    pub id: String,
    pub name: String,
    pub external_id: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// (user id, user name), by name; None when not asked for.
    pub members: Option<Vec<(String, String)>>,
}

/// Which users to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSelect<'a> {
    All,
    Id(&'a str),
    /// userName, compared without regard to ASCII case (user names are ASCII).
    NameNoCase(&'a str),
    ExternalId(&'a str),
}

/// The attributes of a user SCIM writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimUserWrite {
    pub name: String,
    pub external_id: Option<String>,
    pub display_name: Option<String>,
    pub email: Option<String>,
    pub disabled: bool,
}

/// The attributes of a group SCIM writes (members apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimGroupWrite {
    pub name: String,
    pub external_id: Option<String>,
}

/// A record of this name (any case) exists, maybe as a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameHolder {
    pub name: String,
    /// The visible id; None for a tombstone (or a record without id).
    pub id: Option<String>,
}

/// Why a SCIM write was not made (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScimWriteError {
    /// The name is taken (by the record named here).
    Taken(String),
    /// No (visible) record with this id or name.
    Gone,
    /// A member id that is no user SCIM sees.
    UnknownMember(String),
}

/// What deleting a user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDeleted {
    /// Kept as a disabled, hidden record (devices or the policy name the user).
    pub tombstone: bool,
    /// Devices revoked by the deletion.
    pub devices_revoked: Vec<String>,
}

fn visible_id(id: Option<String>) -> Option<String> {
    id.filter(|i| !i.starts_with(DELETED_ID_PREFIX))
}

type Tx<'t> = sqlx::Transaction<'t, sqlx::Any>;

impl Store {
    // ---- SCIM tokens

    /// Creates a SCIM token; returns (id, secret).
    pub async fn create_scim_token(&self, name: &str, now: u64) -> Result<(String, String)> {
        let id = random_text(9);
        let secret = random_text(32);
        sqlx::query(
            "INSERT INTO scim_tokens (id, name, secret_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(hash_secret(&secret))
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok((id, secret))
    }

    /// The name of a SCIM token valid at `now` (its use is recorded, to the minute), or why
    /// it is not valid.
    pub async fn scim_token(
        &self,
        id: &str,
        secret: &str,
        now: u64,
    ) -> Result<std::result::Result<String, &'static str>> {
        let row =
            sqlx::query("SELECT name, secret_hash, revoked_at FROM scim_tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(r) = row else {
            return Ok(Err("unknown SCIM token"));
        };
        if !same_hash(&r.try_get::<String, _>(1)?, &hash_secret(secret)) {
            return Ok(Err("unknown SCIM token"));
        }
        if r.try_get::<Option<i64>, _>(2)?.is_some() {
            return Ok(Err("revoked SCIM token"));
        }
        sqlx::query(
            "UPDATE scim_tokens SET used_at = $1 WHERE id = $2 AND (used_at IS NULL OR used_at < $3)",
        )
        .bind(ts(now))
        .bind(id)
        .bind(ts(now.saturating_sub(60)))
        .execute(&self.pool)
        .await?;
        Ok(Ok(r.try_get(0)?))
    }

    /// Every SCIM token (never its secret), oldest first.
    pub async fn scim_tokens(&self) -> Result<Vec<sekisho_proto::api::ScimTokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, revoked_at, used_at FROM scim_tokens \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(sekisho_proto::api::ScimTokenInfo {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    created_at: opt_u64(Some(r.try_get(2)?)).unwrap_or(0),
                    revoked_at: opt_u64(r.try_get(3)?),
                    used_at: opt_u64(r.try_get(4)?),
                })
            })
            .collect()
    }

    /// Revokes a SCIM token; false when there is no unrevoked token `id`.
    pub async fn revoke_scim_token(&self, id: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE scim_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- Users

    /// The users SCIM sees, oldest first (then by id: a stable order for paging), with their
    /// groups.
    pub async fn scim_users(&self, select: UserSelect<'_>) -> Result<Vec<ScimUserRecord>> {
        let cols = "SELECT id, name, external_id, display_name, email, disabled, created_at, \
                    updated_at FROM users WHERE ";
        let order = " ORDER BY created_at, id";
        let rows = match select {
            UserSelect::All => {
                sqlx::query(&format!("{cols}{VISIBLE}{order}"))
                    .fetch_all(&self.pool)
                    .await?
            }
            UserSelect::Id(id) => {
                sqlx::query(&format!("{cols}{VISIBLE} AND id = $1{order}"))
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await?
            }
            UserSelect::NameNoCase(name) => {
                sqlx::query(&format!(
                    "{cols}{VISIBLE} AND LOWER(name) = LOWER($1){order}"
                ))
                .bind(name)
                .fetch_all(&self.pool)
                .await?
            }
            UserSelect::ExternalId(x) => {
                sqlx::query(&format!("{cols}{VISIBLE} AND external_id = $1{order}"))
                    .bind(x)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut users = rows
            .iter()
            .map(|r| {
                Ok(ScimUserRecord {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    external_id: r.try_get(2)?,
                    display_name: r.try_get(3)?,
                    email: r.try_get(4)?,
                    disabled: r.try_get::<i64, _>(5)? != 0,
                    created_at: opt_u64(Some(r.try_get(6)?)).unwrap_or(0),
                    updated_at: opt_u64(Some(r.try_get(7)?)).unwrap_or(0),
                    groups: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if users.is_empty() {
            return Ok(users);
        }
        let memberships = "SELECT ug.user_name, g.id, g.name FROM user_groups ug \
                           JOIN groups g ON g.name = ug.group_name \
                           WHERE g.id IS NOT NULL AND g.id NOT LIKE 'deleted-%'";
        let rows = if users.len() == 1 {
            sqlx::query(&format!(
                "{memberships} AND ug.user_name = $1 ORDER BY g.name"
            ))
            .bind(users[0].name.as_str())
            .fetch_all(&self.pool)
            .await?
        } else {
            sqlx::query(&format!("{memberships} ORDER BY g.name"))
                .fetch_all(&self.pool)
                .await?
        };
        let mut of: std::collections::HashMap<String, Vec<(String, String)>> = Default::default();
        for r in &rows {
            of.entry(r.try_get(0)?)
                .or_default()
                .push((r.try_get(1)?, r.try_get(2)?));
        }
        for u in &mut users {
            u.groups = of.remove(&u.name).unwrap_or_default();
        }
        Ok(users)
    }

    /// The user SCIM knows as `id`.
    pub async fn scim_user(&self, id: &str) -> Result<Option<ScimUserRecord>> {
        Ok(self
            .scim_users(UserSelect::Id(id))
            .await?
            .into_iter()
            .next())
    }

    /// Every user record whose name equals `name` without regard to ASCII case, tombstones
    /// included.
    pub async fn user_names_like(&self, name: &str) -> Result<Vec<NameHolder>> {
        let rows = sqlx::query("SELECT name, id FROM users WHERE LOWER(name) = LOWER($1)")
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NameHolder {
                    name: r.try_get(0)?,
                    id: visible_id(r.try_get(1)?),
                })
            })
            .collect()
    }

    /// Creates a user; returns its id. Taken when the name is (in this case).
    pub async fn scim_create_user(
        &self,
        u: &ScimUserWrite,
        now: u64,
    ) -> Result<std::result::Result<String, ScimWriteError>> {
        let id = new_id("u-");
        let r = sqlx::query(
            "INSERT INTO users (name, disabled, created_at, id, external_id, display_name, email, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $3) ON CONFLICT DO NOTHING",
        )
        .bind(u.name.as_str())
        .bind(i64::from(u.disabled))
        .bind(ts(now))
        .bind(id.as_str())
        .bind(u.external_id.clone())
        .bind(u.display_name.clone())
        .bind(u.email.clone())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(Err(ScimWriteError::Taken(u.name.clone())));
        }
        self.announce("user_created").await;
        Ok(Ok(id))
    }

    /// Writes user `name`'s attributes, renaming it when `u.name` differs. With `revive`, the
    /// record (a tombstone) takes that id. All or nothing.
    pub async fn scim_update_user(
        &self,
        name: &str,
        u: &ScimUserWrite,
        revive: Option<&str>,
        now: u64,
    ) -> Result<std::result::Result<(), ScimWriteError>> {
        let mut tx = self.pool.begin().await?;
        if u.name != name
            && let Err(e) = Self::rename_user(&mut tx, name, &u.name, now).await?
        {
            return Ok(Err(e));
        }
        let r = sqlx::query(&format!(
            "UPDATE users SET {BUMP}, external_id = $2, display_name = $3, email = $4, \
             disabled = $5, id = COALESCE($6, id) WHERE name = $7"
        ))
        .bind(ts(now))
        .bind(u.external_id.clone())
        .bind(u.display_name.clone())
        .bind(u.email.clone())
        .bind(i64::from(u.disabled))
        .bind(revive.map(str::to_string))
        .bind(u.name.as_str())
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(Err(ScimWriteError::Gone));
        }
        tx.commit().await?;
        self.announce("user_updated").await;
        Ok(Ok(()))
    }

    /// Renames user `old` to `new` inside `tx` (see the module documentation).
    async fn rename_user(
        tx: &mut Tx<'_>,
        old: &str,
        new: &str,
        now: u64,
    ) -> Result<std::result::Result<(), ScimWriteError>> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {} FROM users WHERE name = $1",
            USER_COLUMNS.join(", ")
        ))
        .bind(old)
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok(Err(ScimWriteError::Gone));
        };
        // Free the unique keys the new row takes over.
        sqlx::query("UPDATE users SET id = NULL, subject = NULL WHERE name = $1")
            .bind(old)
            .execute(&mut **tx)
            .await?;
        let placeholders: Vec<String> = (1..=USER_COLUMNS.len()).map(|i| format!("${i}")).collect();
        let r = sqlx::query(&format!(
            "INSERT INTO users ({}) VALUES ({}) ON CONFLICT DO NOTHING",
            USER_COLUMNS.join(", "),
            placeholders.join(", ")
        ))
        .bind(new)
        .bind(row.try_get::<i64, _>(1)?)
        .bind(row.try_get::<i64, _>(2)?)
        .bind(row.try_get::<Option<String>, _>(3)?)
        .bind(row.try_get::<Option<String>, _>(4)?)
        .bind(row.try_get::<Option<String>, _>(5)?)
        .bind(row.try_get::<Option<String>, _>(6)?)
        .bind(row.try_get::<Option<String>, _>(7)?)
        .bind(row.try_get::<i64, _>(8)?.max(ts(now)))
        .execute(&mut **tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(Err(ScimWriteError::Taken(new.to_string())));
        }
        for sql in [
            "UPDATE user_groups SET user_name = $1 WHERE user_name = $2",
            "UPDATE devices SET user_name = $1 WHERE user_name = $2",
            // A token not used yet enrolls a device of the renamed user.
            "UPDATE enrollment_tokens SET subject = $1 WHERE kind = 'device' AND subject = $2 \
             AND used_at IS NULL",
        ] {
            sqlx::query(sql)
                .bind(new)
                .bind(old)
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(old)
            .execute(&mut **tx)
            .await?;
        Ok(Ok(()))
    }

    /// Deletes user `name`: memberships go, devices are revoked, enrollment tokens not used
    /// yet expire; the record goes too unless it has devices or `keep` (then it stays as a
    /// disabled tombstone SCIM does not see).
    pub async fn scim_delete_user(
        &self,
        name: &str,
        keep: bool,
        now: u64,
    ) -> Result<std::result::Result<UserDeleted, ScimWriteError>> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query(&format!(
            "SELECT name FROM users WHERE name = $1 AND {VISIBLE}"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Ok(Err(ScimWriteError::Gone));
        }
        let devices = sqlx::query("SELECT name, revoked_at FROM devices WHERE user_name = $1")
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
        let mut revoked = Vec::new();
        for d in &devices {
            if d.try_get::<Option<i64>, _>(1)?.is_none() {
                revoked.push(d.try_get::<String, _>(0)?);
            }
        }
        sqlx::query(
            "UPDATE devices SET revoked_at = $1 WHERE user_name = $2 AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM user_groups WHERE user_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE enrollment_tokens SET expires_at = $1 WHERE kind = 'device' AND subject = $2 \
             AND used_at IS NULL AND expires_at > $1",
        )
        .bind(ts(now))
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let tombstone = keep || !devices.is_empty();
        if tombstone {
            sqlx::query(&format!(
                "UPDATE users SET disabled = 1, id = '{DELETED_ID_PREFIX}' || id, \
                 external_id = NULL, subject = NULL, {BUMP} WHERE name = $2"
            ))
            .bind(ts(now))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("DELETE FROM users WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if !revoked.is_empty() {
            self.announce("device_revoked").await;
        }
        self.announce("user_deleted").await;
        Ok(Ok(UserDeleted {
            tombstone,
            devices_revoked: revoked,
        }))
    }

    // ---- Groups

    /// The groups SCIM sees, oldest first, with their members when `members`.
    pub async fn scim_groups(
        &self,
        id: Option<&str>,
        members: bool,
    ) -> Result<Vec<ScimGroupRecord>> {
        let cols = "SELECT id, name, external_id, created_at, updated_at FROM groups WHERE ";
        let order = " ORDER BY created_at, id";
        let rows = match id {
            None => {
                sqlx::query(&format!("{cols}{VISIBLE}{order}"))
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(id) => {
                sqlx::query(&format!("{cols}{VISIBLE} AND id = $1{order}"))
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut groups = rows
            .iter()
            .map(|r| {
                Ok(ScimGroupRecord {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    external_id: r.try_get(2)?,
                    created_at: opt_u64(Some(r.try_get(3)?)).unwrap_or(0),
                    updated_at: opt_u64(Some(r.try_get(4)?)).unwrap_or(0),
                    members: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if !members || groups.is_empty() {
            return Ok(groups);
        }
        let sql = "SELECT ug.group_name, u.id, u.name FROM user_groups ug \
                   JOIN users u ON u.name = ug.user_name \
                   WHERE u.id IS NOT NULL AND u.id NOT LIKE 'deleted-%'";
        let rows = if groups.len() == 1 {
            sqlx::query(&format!("{sql} AND ug.group_name = $1 ORDER BY u.name"))
                .bind(groups[0].name.as_str())
                .fetch_all(&self.pool)
                .await?
        } else {
            sqlx::query(&format!("{sql} ORDER BY u.name"))
                .fetch_all(&self.pool)
                .await?
        };
        let mut of: std::collections::HashMap<String, Vec<(String, String)>> = Default::default();
        for r in &rows {
            of.entry(r.try_get(0)?)
                .or_default()
                .push((r.try_get(1)?, r.try_get(2)?));
        }
        for g in &mut groups {
            g.members = Some(of.remove(&g.name).unwrap_or_default());
        }
        Ok(groups)
    }

    /// The group SCIM knows as `id`, with its members when `members`.
    pub async fn scim_group(&self, id: &str, members: bool) -> Result<Option<ScimGroupRecord>> {
        Ok(self
            .scim_groups(Some(id), members)
            .await?
            .into_iter()
            .next())
    }

    /// Every group record whose name equals `name` without regard to case (ASCII), tombstones
    /// included.
    pub async fn group_names_like(&self, name: &str) -> Result<Vec<NameHolder>> {
        let rows = sqlx::query("SELECT name, id FROM groups WHERE LOWER(name) = LOWER($1)")
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NameHolder {
                    name: r.try_get(0)?,
                    id: visible_id(r.try_get(1)?),
                })
            })
            .collect()
    }

    /// Creates a group with members (user ids); returns its id.
    pub async fn scim_create_group(
        &self,
        g: &ScimGroupWrite,
        members: &[String],
        now: u64,
    ) -> Result<std::result::Result<String, ScimWriteError>> {
        let mut tx = self.pool.begin().await?;
        let id = new_id("g-");
        let r = sqlx::query(
            "INSERT INTO groups (name, created_at, id, external_id, updated_at) \
             VALUES ($1, $2, $3, $4, $2) ON CONFLICT DO NOTHING",
        )
        .bind(g.name.as_str())
        .bind(ts(now))
        .bind(id.as_str())
        .bind(g.external_id.clone())
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(Err(ScimWriteError::Taken(g.name.clone())));
        }
        if let Err(e) = Self::change_members(&mut tx, &g.name, members, &[]).await? {
            return Ok(Err(e));
        }
        tx.commit().await?;
        self.announce("group_created").await;
        Ok(Ok(id))
    }

    /// Writes group `name`'s attributes (renaming it when `g.name` differs) and adds and
    /// removes members (user ids). With `revive`, the record (a tombstone) takes that id. All
    /// or nothing.
    pub async fn scim_update_group(
        &self,
        name: &str,
        g: &ScimGroupWrite,
        add: &[String],
        remove: &[String],
        revive: Option<&str>,
        now: u64,
    ) -> Result<std::result::Result<(), ScimWriteError>> {
        let mut tx = self.pool.begin().await?;
        if g.name != name
            && let Err(e) = Self::rename_group(&mut tx, name, &g.name, now).await?
        {
            return Ok(Err(e));
        }
        let r = sqlx::query(&format!(
            "UPDATE groups SET {BUMP}, external_id = $2, id = COALESCE($3, id) WHERE name = $4"
        ))
        .bind(ts(now))
        .bind(g.external_id.clone())
        .bind(revive.map(str::to_string))
        .bind(g.name.as_str())
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(Err(ScimWriteError::Gone));
        }
        if let Err(e) = Self::change_members(&mut tx, &g.name, add, remove).await? {
            return Ok(Err(e));
        }
        tx.commit().await?;
        self.announce("group_updated").await;
        Ok(Ok(()))
    }

    /// Adds and removes members (user ids SCIM sees) of group `group` inside `tx`.
    async fn change_members(
        tx: &mut Tx<'_>,
        group: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<std::result::Result<(), ScimWriteError>> {
        for (id, adding) in add
            .iter()
            .map(|i| (i, true))
            .chain(remove.iter().map(|i| (i, false)))
        {
            let user = sqlx::query(&format!(
                "SELECT name FROM users WHERE id = $1 AND {VISIBLE}"
            ))
            .bind(id.as_str())
            .fetch_optional(&mut **tx)
            .await?;
            let Some(user) = user else {
                if adding {
                    return Ok(Err(ScimWriteError::UnknownMember(id.clone())));
                }
                // Removing someone who is gone: nothing to do.
                continue;
            };
            let user: String = user.try_get(0)?;
            let sql = if adding {
                "INSERT INTO user_groups (user_name, group_name) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM user_groups WHERE user_name = $1 AND group_name = $2"
            };
            sqlx::query(sql)
                .bind(user.as_str())
                .bind(group)
                .execute(&mut **tx)
                .await?;
        }
        Ok(Ok(()))
    }

    /// Renames group `old` to `new` inside `tx`.
    async fn rename_group(
        tx: &mut Tx<'_>,
        old: &str,
        new: &str,
        now: u64,
    ) -> Result<std::result::Result<(), ScimWriteError>> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {} FROM groups WHERE name = $1",
            GROUP_COLUMNS.join(", ")
        ))
        .bind(old)
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok(Err(ScimWriteError::Gone));
        };
        sqlx::query("UPDATE groups SET id = NULL WHERE name = $1")
            .bind(old)
            .execute(&mut **tx)
            .await?;
        let r = sqlx::query(
            "INSERT INTO groups (name, created_at, id, external_id, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(new)
        .bind(row.try_get::<i64, _>(1)?)
        .bind(row.try_get::<Option<String>, _>(2)?)
        .bind(row.try_get::<Option<String>, _>(3)?)
        .bind(row.try_get::<i64, _>(4)?.max(ts(now)))
        .execute(&mut **tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(Err(ScimWriteError::Taken(new.to_string())));
        }
        sqlx::query("UPDATE user_groups SET group_name = $1 WHERE group_name = $2")
            .bind(new)
            .bind(old)
            .execute(&mut **tx)
            .await?;
        sqlx::query("DELETE FROM groups WHERE name = $1")
            .bind(old)
            .execute(&mut **tx)
            .await?;
        Ok(Ok(()))
    }

    /// Deletes group `name` and its memberships; with `keep` (the policy names it) the record
    /// stays as a tombstone SCIM does not see. True when it was a tombstone.
    pub async fn scim_delete_group(
        &self,
        name: &str,
        keep: bool,
        now: u64,
    ) -> Result<std::result::Result<bool, ScimWriteError>> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query(&format!(
            "SELECT name FROM groups WHERE name = $1 AND {VISIBLE}"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Ok(Err(ScimWriteError::Gone));
        }
        sqlx::query("DELETE FROM user_groups WHERE group_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if keep {
            sqlx::query(&format!(
                "UPDATE groups SET id = '{DELETED_ID_PREFIX}' || id, external_id = NULL, {BUMP} \
                 WHERE name = $2"
            ))
            .bind(ts(now))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("DELETE FROM groups WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.announce("group_deleted").await;
        Ok(Ok(keep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rename copies a row column by column: every column of `users` and `groups` must be
    /// in the lists it copies.
    #[tokio::test]
    async fn users_columns_are_all_copied() {
        let dir = std::env::temp_dir().join(format!(
            "sekisho-scim-columns-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store = Store::open(&format!("sqlite://{}/s.db", dir.display()))
            .await
            .unwrap();
        for (table, copied) in [("users", USER_COLUMNS), ("groups", GROUP_COLUMNS)] {
            let mut columns: Vec<String> =
                sqlx::query(&format!("SELECT name FROM pragma_table_info('{table}')"))
                    .fetch_all(&store.pool)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.try_get(0).unwrap())
                    .collect();
            columns.sort();
            let mut copied: Vec<String> = copied.iter().map(|c| c.to_string()).collect();
            copied.sort();
            assert_eq!(
                columns, copied,
                "store/scim.rs: a rename must copy every column of {table}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
