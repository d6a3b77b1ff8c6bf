//! The store: enrollment tokens.

use super::*;

impl Store {
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
    pub(super) async fn consume(
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
}
