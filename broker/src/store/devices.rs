//! The store: devices.

use super::*;

impl Store {
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
        let class = sqlx::query("SELECT device_class FROM enrollment_tokens WHERE id = $1")
            .bind(token_id)
            .fetch_optional(&mut *tx)
            .await?
            .and_then(|r| r.try_get::<Option<String>, _>(0).ok().flatten())
            .and_then(|c| sekisho_proto::policy::DeviceClass::parse(&c))
            .unwrap_or_default();
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
             credential_hash, created_at, class) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(name)
        .bind(user.as_str())
        .bind(public_key)
        .bind(address.to_string())
        .bind(cred_id.as_str())
        .bind(hash_secret(&cred_secret))
        .bind(ts(now))
        .bind(class.as_str())
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
                class,
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
                    class: Default::default(),
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
            class: r
                .try_get::<String, _>("class")
                .ok()
                .and_then(|c| sekisho_proto::policy::DeviceClass::parse(&c))
                .unwrap_or_default(),
        })
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        sqlx::query(
            "SELECT name, user_name, public_key, address, created_at, revoked_at, class \
             FROM devices ORDER BY name",
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
            "SELECT name, user_name, public_key, address, created_at, revoked_at, credential_hash, \
             class FROM devices WHERE credential_id = $1 AND revoked_at IS NULL",
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
    /// Sets a device's class (an MDM's word, or an admin's). False: no such active device.
    pub async fn set_device_class(
        &self,
        name: &str,
        class: sekisho_proto::policy::DeviceClass,
    ) -> Result<bool> {
        let r = sqlx::query("UPDATE devices SET class = $1 WHERE name = $2 AND revoked_at IS NULL")
            .bind(class.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        let changed = r.rows_affected() == 1;
        if changed {
            self.announce("device_class").await;
        }
        Ok(changed)
    }

    /// Devices enrolled with this (unused) token get `class`.
    pub async fn set_token_device_class(
        &self,
        token_id: &str,
        class: sekisho_proto::policy::DeviceClass,
    ) -> Result<()> {
        sqlx::query("UPDATE enrollment_tokens SET device_class = $1 WHERE id = $2")
            .bind(class.as_str())
            .bind(token_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

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
}
