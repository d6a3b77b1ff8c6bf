//! The store: connectors.

use super::*;

impl Store {
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
            "SELECT name, site, serial, not_after, created_at, revoked_at, drained_at \
             FROM connectors ORDER BY name",
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
                drained_at: opt_u64(r.try_get(6)?),
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

    /// Drains an active connector (`Some(now)`) or resumes it (`None`); false when there is
    /// no active connector of that name.
    pub async fn set_connector_drained(&self, name: &str, at: Option<u64>) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE connectors SET drained_at = $1 WHERE name = $2 AND revoked_at IS NULL",
        )
        .bind(at.map(ts))
        .bind(name)
        .execute(&self.pool)
        .await?;
        let done = r.rows_affected() == 1;
        if done {
            self.announce("connector_drained").await;
        }
        Ok(done)
    }

    /// The names of the active connectors an admin drained.
    pub async fn drained_connectors(&self) -> Result<std::collections::BTreeSet<String>> {
        sqlx::query(
            "SELECT name FROM connectors WHERE drained_at IS NOT NULL AND revoked_at IS NULL",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
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
}
