//! The store: users and groups.

use super::*;

impl Store {
    pub async fn create_group(&self, name: &str, now: u64) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO groups (name, created_at, id, updated_at) VALUES ($1, $2, $3, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(ts(now))
        .bind(new_id("g-"))
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
            "INSERT INTO users (name, disabled, created_at, id, updated_at) \
             VALUES ($1, 0, $2, $3, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(ts(now))
        .bind(new_id("u-"))
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        for g in groups {
            sqlx::query(
                "INSERT INTO groups (name, created_at, id, updated_at) VALUES ($1, $2, $3, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(g.as_str())
            .bind(ts(now))
            .bind(new_id("g-"))
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
                class: d.class,
            })
            .collect();
        Ok(Directory {
            groups,
            users,
            devices,
        })
    }
}
