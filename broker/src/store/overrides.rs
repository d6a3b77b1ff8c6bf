//! The store: override codes.

use super::*;

impl Store {
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
}
