//! The store: policy.

use super::*;

impl Store {
    pub async fn latest_policy(&self) -> Result<Option<(u64, String)>> {
        let row = sqlx::query("SELECT version, text FROM policies ORDER BY version DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((opt_u64(Some(r.try_get(0)?)).unwrap_or(0), r.try_get(1)?)),
            None => None,
        })
    }

    /// Every stored policy version, newest first (at most `limit`).
    pub async fn policy_history(
        &self,
        limit: u64,
    ) -> Result<Vec<sekisho_proto::api::PolicyVersion>> {
        let rows = sqlx::query(
            "SELECT version, applied_at, applied_by, LENGTH(text) FROM policies \
             ORDER BY version DESC LIMIT $1",
        )
        .bind(ts(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(sekisho_proto::api::PolicyVersion {
                    version: opt_u64(Some(r.try_get(0)?)).unwrap_or(0),
                    applied_at: opt_u64(Some(r.try_get(1)?)).unwrap_or(0),
                    applied_by: r.try_get(2)?,
                    bytes: opt_u64(Some(r.try_get::<i64, _>(3)?)).unwrap_or(0),
                })
            })
            .collect()
    }

    /// The text of one stored policy version.
    pub async fn policy_version(&self, version: u64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT text FROM policies WHERE version = $1")
            .bind(ts(version))
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
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
            // Renames and membership changes can leave every count as it was; each write
            // through SCIM raises the record's updated_at (see store/scim.rs).
            "(SELECT CAST(COALESCE(SUM(updated_at), 0) AS BIGINT) FROM users)",
            "(SELECT CAST(COALESCE(SUM(updated_at), 0) AS BIGINT) FROM groups)",
            "(SELECT COALESCE(MAX(version), 0) FROM policies)",
            "(SELECT COUNT(*) FROM connectors)",
            "(SELECT COUNT(*) FROM connectors WHERE revoked_at IS NOT NULL)",
            // Drains and resumes: the count and the sum of the times (a drain and a resume
            // between two looks can leave one of them as it was, not both).
            "(SELECT COUNT(drained_at) FROM connectors)",
            "(SELECT CAST(COALESCE(SUM(drained_at), 0) AS BIGINT) FROM connectors)",
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
}
