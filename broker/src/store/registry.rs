//! The store: broker registry.

use super::*;

impl Store {
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
}
