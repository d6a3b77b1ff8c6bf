//! The store: admin tokens.

use super::*;

impl Store {
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
    /// unknown, revoked or expired, its SSO user is disabled, or (a console session) the
    /// token it was made from is no longer valid.
    pub async fn admin_by_token(
        &self,
        id: &str,
        secret: &str,
        now: u64,
    ) -> Result<std::result::Result<AdminIdentity, &'static str>> {
        let row = sqlx::query("SELECT secret_hash FROM admin_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else {
            return Ok(Err("unknown admin token"));
        };
        if !same_hash(&r.try_get::<String, _>(0)?, &hash_secret(secret)) {
            return Ok(Err("unknown admin token"));
        }
        // The token, then (a console session) the token it was made from: one level only.
        let mut first: Option<AdminIdentity> = None;
        let mut current = id.to_string();
        loop {
            let identity = match self.admin_in_force(&current, now).await? {
                Ok(i) => i,
                Err(why) if first.is_none() => return Ok(Err(why)),
                Err(_) => {
                    return Ok(Err(
                        "the admin token this console session was made from is no longer valid",
                    ));
                }
            };
            let parent = identity.parent.clone();
            let nested = first.is_some();
            if first.is_none() {
                first = Some(identity);
            }
            match parent {
                Some(_) if nested => return Ok(Err("a console session made from another")),
                Some(p) => current = p,
                None => return Ok(first.ok_or("unknown admin token")),
            }
        }
    }

    /// The admin of token `id` if it is in force at `now`: not revoked, not expired, its
    /// user (a token from `admin login`) active. The secret is not checked here.
    async fn admin_in_force(
        &self,
        id: &str,
        now: u64,
    ) -> Result<std::result::Result<AdminIdentity, &'static str>> {
        let row = sqlx::query(
            "SELECT name, role, expires_at, revoked_at, parent FROM admin_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(Err("unknown admin token"));
        };
        if opt_u64(r.try_get(3)?).is_some() {
            return Ok(Err("revoked admin token"));
        }
        let expires_at = opt_u64(r.try_get(2)?);
        if expires_at.is_some_and(|e| e <= now) {
            return Ok(Err("expired admin token"));
        }
        let name: String = r.try_get(0)?;
        // A token from `admin login` ("sso:NAME#USER-ID") is worth what its user is:
        // deactivated or deleted (SCIM, an admin), it stops at once; a user made again under
        // the same name has another id and does not bring it back.
        if let Some(rest) = name.strip_prefix("sso:") {
            let id = rest.rsplit_once('#').map_or("", |(_, id)| id);
            let row = sqlx::query("SELECT disabled FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            let active = match row {
                Some(u) => u.try_get::<i64, _>(0)? == 0,
                None => false,
            };
            if !active {
                return Ok(Err("the admin's user is disabled or deleted"));
            }
        }
        let role: String = r.try_get(1)?;
        Ok(Ok(AdminIdentity {
            id: id.to_string(),
            // Audit lines name the admin, not the id it is bound to.
            name: match name.strip_prefix("sso:").and_then(|r| r.rsplit_once('#')) {
                Some((user, _)) => format!("sso:{user}"),
                None => name,
            },
            role: role.parse().unwrap_or(Role::Auditor),
            expires_at,
            parent: r.try_get(4)?,
        }))
    }

    /// A console session made by presenting the admin token `parent`: a token of its own, with
    /// the parent's role, ending at `expires_at` or with the parent, whichever comes first
    /// (see [`Store::admin_by_token`]); returns (id, secret).
    pub async fn create_console_session(
        &self,
        name: &str,
        role: Role,
        expires_at: u64,
        now: u64,
        parent: &str,
    ) -> Result<(String, String)> {
        let id = random_text(9);
        let secret = random_text(32);
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, secret_hash, created_at, role, expires_at, parent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(hash_secret(&secret))
        .bind(ts(now))
        .bind(role.as_str())
        .bind(ts(expires_at))
        .bind(parent)
        .execute(&self.pool)
        .await?;
        Ok((id, secret))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console session is worth what the token it was made from is: it ends when that one
    /// is revoked or expires, and cannot itself open another.
    #[tokio::test]
    async fn console_sessions_end_with_their_parent() {
        let dir = std::env::temp_dir().join(format!(
            "sekisho-console-sessions-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store = Store::open(&format!("sqlite://{}/s.db", dir.display()))
            .await
            .unwrap();
        let (pid, psecret) = store
            .create_admin_token_with("desk", Role::Helpdesk, Some(5000), 1000)
            .await
            .unwrap();
        let parent = store
            .admin_by_token(&pid, &psecret, 1000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (parent.parent.as_deref(), parent.expires_at),
            (None, Some(5000))
        );
        let (cid, csecret) = store
            .create_console_session("console:desk", parent.role, 4000, 1000, &pid)
            .await
            .unwrap();
        let child = store
            .admin_by_token(&cid, &csecret, 1001)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(child.name, "console:desk");
        assert_eq!(child.role, Role::Helpdesk);
        assert_eq!(child.parent.as_deref(), Some(pid.as_str()));
        // Its own expiry.
        assert_eq!(
            store.admin_by_token(&cid, &csecret, 4000).await.unwrap(),
            Err("expired admin token")
        );
        // A wrong secret is unknown, whatever the parent.
        assert_eq!(
            store.admin_by_token(&cid, "nope", 1001).await.unwrap(),
            Err("unknown admin token")
        );
        // The parent revoked: the session ends at once.
        assert!(store.revoke_admin_token(&pid, 1002).await.unwrap());
        assert_eq!(
            store.admin_by_token(&cid, &csecret, 1003).await.unwrap(),
            Err("the admin token this console session was made from is no longer valid")
        );
        // A session made from a session is refused.
        let (pid2, _) = store
            .create_admin_token_with("root", Role::Admin, None, 1000)
            .await
            .unwrap();
        let (cid2, _) = store
            .create_console_session("console:root", Role::Admin, 9000, 1000, &pid2)
            .await
            .unwrap();
        let (gid, gsecret) = store
            .create_console_session("console:console:root", Role::Admin, 9000, 1000, &cid2)
            .await
            .unwrap();
        assert_eq!(
            store.admin_by_token(&gid, &gsecret, 1001).await.unwrap(),
            Err("a console session made from another")
        );
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
