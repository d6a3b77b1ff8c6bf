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
        let role: String = r.try_get(2)?;
        Ok(Ok(AdminIdentity {
            id: id.to_string(),
            // Audit lines name the admin, not the id it is bound to.
            name: match name.strip_prefix("sso:").and_then(|r| r.rsplit_once('#')) {
                Some((user, _)) => format!("sso:{user}"),
                None => name,
            },
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
}
