//! The store: sign-ins through the identity provider (login sessions, users found or created
//! by the provider's subject, devices enrolled or re-authenticated by a sign-in).

use super::*;

/// A sign-in under way: made by `POST /v1/login/start`, used once by `/v1/login/finish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginSession {
    pub id: String,
    /// `device` (enroll or re-authenticate a device) or `admin` (an admin token).
    pub purpose: String,
    /// `code` (authorization code + PKCE, loopback redirect) or `device` (RFC 8628).
    pub method: String,
    pub state: String,
    pub nonce: String,
    pub redirect_uri: Option<String>,
    pub device_code: Option<String>,
    pub interval_s: u64,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
}

/// Why a sign-in cannot become a user or a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInRefusal {
    /// No such user and users are not created on sign-in.
    NoUser(String),
    /// The user name belongs to another identity of the provider.
    Taken(String),
    /// A user of that name exists but nothing ties them to this identity of the provider.
    NotLinked(String),
    Disabled(String),
    /// The device (its key or name) cannot be used: enrolled for someone else, revoked.
    Device(String),
    NoAddress(IpNet),
}

impl std::fmt::Display for SignInRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignInRefusal::NoUser(u) => write!(
                f,
                "there is no user {u:?} here, and users are not created on sign-in: ask an admin"
            ),
            SignInRefusal::Taken(u) => write!(
                f,
                "the user name {u:?} belongs to another identity of the provider"
            ),
            SignInRefusal::Disabled(u) => write!(f, "user {u:?} is disabled"),
            SignInRefusal::NotLinked(u) => write!(
                f,
                "a user {u:?} exists here but is not linked to this identity: its externalId \
                 is not this sign-in's subject or object id (and [control.oidc] \
                 link_by_name is off)"
            ),
            SignInRefusal::Device(why) => f.write_str(why),
            SignInRefusal::NoAddress(r) => write!(f, "no free address left in {r}"),
        }
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// The device a sign-in enrolls or re-authenticates.
pub struct DeviceSignIn<'a> {
    pub name: &'a str,
    pub public_key: &'a str,
    /// When the user signed in at the provider.
    pub signed_in_at: u64,
    pub range: IpNet,
    pub reserved: &'a Reserved,
    /// The class a device enrolled by this sign-in gets (`[control.oidc] device_class`).
    pub class: sekisho_proto::policy::DeviceClass,
}

/// The device of a sign-in, and its new credential (id, secret) when it was enrolled by it.
pub type SignedInDevice = (DeviceRecord, Option<(String, String)>);

/// The user a sign-in is for, as the provider says.
pub struct SignIn<'a> {
    /// "ISSUER SUB".
    pub subject: &'a str,
    pub username: &'a str,
    pub email: Option<&'a str>,
    pub display_name: Option<&'a str>,
    /// Sekisho groups the provider's groups map to, and the groups the mapping governs.
    pub member_of: &'a [String],
    pub governed: &'a [String],
    pub create: bool,
    /// The provider's ids of this user (`sub`, and `oid` where the provider has one): an
    /// existing user whose externalId is one of them is this user.
    pub provider_ids: &'a [&'a str],
    /// Link an existing user without externalId by name alone.
    pub link_by_name: bool,
}

fn session_of(r: &sqlx::any::AnyRow) -> Result<LoginSession> {
    Ok(LoginSession {
        id: r.try_get(0)?,
        purpose: r.try_get(1)?,
        method: r.try_get(2)?,
        state: r.try_get(3)?,
        nonce: r.try_get(4)?,
        redirect_uri: r.try_get(5)?,
        device_code: r.try_get(6)?,
        interval_s: r.try_get::<i64, _>(7)? as u64,
        created_at: r.try_get::<i64, _>(8)? as u64,
        expires_at: r.try_get::<i64, _>(9)? as u64,
        used_at: opt_u64(r.try_get(10)?),
    })
}

impl Store {
    pub async fn create_login(&self, s: &LoginSession) -> Result<()> {
        // Sessions long over are cleared as new ones come.
        sqlx::query("DELETE FROM login_sessions WHERE expires_at < $1")
            .bind(ts(s.created_at.saturating_sub(3600)))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO login_sessions (id, purpose, method, state, nonce, redirect_uri, \
             device_code, interval_s, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(s.id.as_str())
        .bind(s.purpose.as_str())
        .bind(s.method.as_str())
        .bind(s.state.as_str())
        .bind(s.nonce.as_str())
        .bind(s.redirect_uri.clone())
        .bind(s.device_code.clone())
        .bind(s.interval_s as i64)
        .bind(ts(s.created_at))
        .bind(ts(s.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn login(&self, id: &str) -> Result<Option<LoginSession>> {
        let row = sqlx::query(
            "SELECT id, purpose, method, state, nonce, redirect_uri, device_code, interval_s, \
             created_at, expires_at, used_at FROM login_sessions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(session_of).transpose()
    }

    /// Marks a sign-in used; false if it was already (a replay, or two brokers racing).
    pub async fn use_login(&self, id: &str, now: u64) -> Result<bool> {
        let r =
            sqlx::query("UPDATE login_sessions SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                .bind(ts(now))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A device grant's poll interval, raised after the provider said `slow_down`.
    pub async fn slow_login(&self, id: &str, interval_s: u64) -> Result<()> {
        sqlx::query("UPDATE login_sessions SET interval_s = $1 WHERE id = $2")
            .bind(interval_s as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The device part of a sign-in alone, for a user who exists (see [`Store::sign_in`]).
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub async fn sign_in_device(
        &self,
        user: &str,
        name: &str,
        public_key: &str,
        signed_in_at: u64,
        now: u64,
        range: IpNet,
        reserved: &Reserved,
    ) -> Result<std::result::Result<SignedInDevice, SignInRefusal>> {
        let mut tx = self.pool.begin().await?;
        let r = Self::device_in(
            &mut tx,
            user,
            name,
            public_key,
            signed_in_at,
            now,
            range,
            reserved,
            Default::default(),
        )
        .await?;
        if r.is_ok() {
            tx.commit().await?;
            self.announce("device_signed_in").await;
        }
        Ok(r)
    }

    /// A user signing in (see [`Store::sign_in`]), without a device (an admin).
    pub async fn sign_in_user(
        &self,
        s: &SignIn<'_>,
        now: u64,
    ) -> Result<std::result::Result<String, SignInRefusal>> {
        Ok(self.sign_in(s, None, now).await?.map(|(user, _)| user))
    }

    /// A sign-in, all or nothing: the user found by the provider's subject (else by name,
    /// linking the subject to a user an admin or SCIM made), or created when allowed, in the
    /// groups the identity mapping governs as the provider says; and with `device`, the device
    /// enrolled with that key (re-authenticated) or a new one. A refusal of either leaves the
    /// store as it was.
    pub async fn sign_in(
        &self,
        s: &SignIn<'_>,
        device: Option<DeviceSignIn<'_>>,
        now: u64,
    ) -> Result<std::result::Result<(String, Option<SignedInDevice>), SignInRefusal>> {
        let mut tx = self.pool.begin().await?;
        let user = match Self::user_in(&mut tx, s, now).await? {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        let dev = match device {
            None => None,
            Some(d) => match Self::device_in(
                &mut tx,
                &user,
                d.name,
                d.public_key,
                d.signed_in_at,
                now,
                d.range,
                d.reserved,
                d.class,
            )
            .await?
            {
                Ok(x) => Some(x),
                Err(e) => return Ok(Err(e)),
            },
        };
        tx.commit().await?;
        self.announce(if dev.is_some() {
            "device_signed_in"
        } else {
            "user_signed_in"
        })
        .await;
        Ok(Ok((user, dev)))
    }

    /// Finds the signed-in user by the provider's subject (else by name, linking the subject
    /// to a user an admin or SCIM made), or creates them when allowed; brings the groups the
    /// identity mapping governs in line with the provider's. Returns the user's name.
    async fn user_in(
        tx: &mut Tx<'_>,
        s: &SignIn<'_>,
        now: u64,
    ) -> Result<std::result::Result<String, SignInRefusal>> {
        let by_subject = sqlx::query("SELECT name, disabled FROM users WHERE subject = $1")
            .bind(s.subject)
            .fetch_optional(&mut **tx)
            .await?;
        let (name, disabled) = match by_subject {
            Some(r) => (r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? != 0),
            None => {
                // Names are unique ignoring case (SCIM's userName is case-insensitive).
                let by_name = sqlx::query(
                    "SELECT name, disabled, subject, external_id FROM users \
                     WHERE LOWER(name) = LOWER($1)",
                )
                .bind(s.username)
                .fetch_optional(&mut **tx)
                .await?;
                match by_name {
                    Some(r) => {
                        if r.try_get::<Option<String>, _>(2)?.is_some() {
                            return Ok(Err(SignInRefusal::Taken(s.username.to_string())));
                        }
                        // A name alone is no proof (a provider may let users pick it): a user
                        // provisioned with the provider's id (SCIM externalId) is linked when
                        // the token carries that id; one without is linked by name only when
                        // the setting allows it.
                        let linked = match r.try_get::<Option<String>, _>(3)? {
                            Some(ext) => s.provider_ids.iter().any(|id| *id == ext),
                            None => s.link_by_name,
                        };
                        if !linked {
                            return Ok(Err(SignInRefusal::NotLinked(s.username.to_string())));
                        }
                        sqlx::query("UPDATE users SET subject = $1 WHERE name = $2")
                            .bind(s.subject)
                            .bind(r.try_get::<String, _>(0)?)
                            .execute(&mut **tx)
                            .await?;
                        (r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? != 0)
                    }
                    None if !s.create => {
                        return Ok(Err(SignInRefusal::NoUser(s.username.to_string())));
                    }
                    None => {
                        sqlx::query(
                            "INSERT INTO users (name, disabled, created_at, id, updated_at, \
                             subject, email, display_name) VALUES ($1, 0, $2, $3, $2, $4, $5, $6)",
                        )
                        .bind(s.username)
                        .bind(ts(now))
                        .bind(new_id("u-"))
                        .bind(s.subject)
                        .bind(s.email.map(str::to_string))
                        .bind(s.display_name.map(str::to_string))
                        .execute(&mut **tx)
                        .await?;
                        (s.username.to_string(), false)
                    }
                }
            }
        };
        if disabled {
            return Ok(Err(SignInRefusal::Disabled(name)));
        }
        for g in s.governed {
            if s.member_of.contains(g) {
                sqlx::query(
                    "INSERT INTO groups (name, created_at, id, updated_at) VALUES ($1, $2, $3, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(g.as_str())
                .bind(ts(now))
                .bind(new_id("g-"))
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO user_groups (user_name, group_name) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(name.as_str())
                .bind(g.as_str())
                .execute(&mut **tx)
                .await?;
            } else {
                sqlx::query("DELETE FROM user_groups WHERE user_name = $1 AND group_name = $2")
                    .bind(name.as_str())
                    .bind(g.as_str())
                    .execute(&mut **tx)
                    .await?;
            }
        }
        // Brokers polling a shared SQLite store see membership changes by this (counts alone
        // may not move).
        sqlx::query(
            "UPDATE users SET updated_at = CASE WHEN updated_at >= $1 THEN updated_at + 1 \
             ELSE $1 END WHERE name = $2",
        )
        .bind(ts(now))
        .bind(name.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(Ok(name))
    }

    /// The device a sign-in is for: the one enrolled with `public_key` (re-authentication:
    /// it must be the user's and not revoked; no new credential), else a new device named
    /// `name` with the next free address of `range` and a credential. Either way the
    /// device's sign-in time becomes `signed_in_at`.
    #[allow(clippy::too_many_arguments)]
    async fn device_in(
        tx: &mut Tx<'_>,
        user: &str,
        name: &str,
        public_key: &str,
        signed_in_at: u64,
        now: u64,
        range: IpNet,
        reserved: &Reserved,
        class: sekisho_proto::policy::DeviceClass,
    ) -> Result<std::result::Result<(DeviceRecord, Option<(String, String)>), SignInRefusal>> {
        let existing = sqlx::query(
            "SELECT name, user_name, address, created_at, revoked_at FROM devices \
             WHERE public_key = $1",
        )
        .bind(public_key)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(r) = existing {
            let dev_name: String = r.try_get(0)?;
            let owner: String = r.try_get(1)?;
            if owner != user {
                return Ok(Err(SignInRefusal::Device(format!(
                    "this device's key is enrolled for another user ({owner:?})"
                ))));
            }
            if r.try_get::<Option<i64>, _>(4)?.is_some() {
                return Ok(Err(SignInRefusal::Device(format!(
                    "device {dev_name:?} is revoked: enroll it again with a new key"
                ))));
            }
            sqlx::query("UPDATE devices SET signed_in_at = $1 WHERE name = $2")
                .bind(ts(signed_in_at))
                .bind(dev_name.as_str())
                .execute(&mut **tx)
                .await?;
            let address: String = r.try_get(2)?;
            return Ok(Ok((
                DeviceRecord {
                    name: dev_name,
                    user: owner,
                    public_key: public_key.to_string(),
                    address: address.parse().context("stored device address")?,
                    created_at: r.try_get::<i64, _>(3)? as u64,
                    revoked_at: None,
                    class: Default::default(),
                },
                None,
            )));
        }
        if sqlx::query("SELECT name FROM devices WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?
            .is_some()
        {
            return Ok(Err(SignInRefusal::Device(format!(
                "a device named {name:?} is already enrolled; choose another name (--name)"
            ))));
        }
        if let Some(why) = reserved.clash(name, public_key) {
            return Ok(Err(SignInRefusal::Device(why)));
        }
        let mut used: Vec<IpAddr> = sqlx::query("SELECT address FROM devices")
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok()?.parse().ok())
            .collect();
        used.extend(reserved.addresses.iter().copied());
        let service = sekisho_proto::posture::service_address(&range);
        let Some(address) = range.hosts().find(|a| *a != service && !used.contains(a)) else {
            return Ok(Err(SignInRefusal::NoAddress(range)));
        };
        let cred_id = random_text(9);
        let cred_secret = random_text(24);
        sqlx::query(
            "INSERT INTO devices (name, user_name, public_key, address, credential_id, \
             credential_hash, created_at, signed_in_at, class) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(name)
        .bind(user)
        .bind(public_key)
        .bind(address.to_string())
        .bind(cred_id.as_str())
        .bind(hash_secret(&cred_secret))
        .bind(ts(now))
        .bind(ts(signed_in_at))
        .bind(class.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(Ok((
            DeviceRecord {
                name: name.to_string(),
                user: user.to_string(),
                public_key: public_key.to_string(),
                address,
                created_at: now,
                revoked_at: None,
                class,
            },
            Some((cred_id, cred_secret)),
        )))
    }

    /// A user's stable id (what SCIM calls them by; a re-created user gets a new one).
    pub async fn user_id(&self, name: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT id FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get(0)?,
            None => None,
        })
    }

    /// When the device's user last signed in through the identity provider on it.
    pub async fn device_signed_in_at(&self, device: &str) -> Result<Option<u64>> {
        let row = sqlx::query("SELECT signed_in_at FROM devices WHERE name = $1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => opt_u64(r.try_get(0)?),
            None => None,
        })
    }

    /// The user another system's signal names: by the identity provider's subject
    /// ("ISSUER SUB"), else by e-mail or name (ignoring case).
    pub async fn user_named_by(
        &self,
        subject: Option<&str>,
        email_or_name: Option<&str>,
    ) -> Result<Option<String>> {
        if let Some(s) = subject
            && let Some(r) = sqlx::query("SELECT name FROM users WHERE subject = $1")
                .bind(s)
                .fetch_optional(&self.pool)
                .await?
        {
            return Ok(Some(r.try_get(0)?));
        }
        if let Some(e) = email_or_name {
            let rows = sqlx::query(
                "SELECT name FROM users WHERE lower(email) = lower($1) OR lower(name) = lower($1) \
                 ORDER BY name",
            )
            .bind(e)
            .fetch_all(&self.pool)
            .await?;
            // Two users answering to one address: name nobody.
            if rows.len() == 1 {
                return Ok(Some(rows[0].try_get(0)?));
            }
        }
        Ok(None)
    }

    /// Forgets the sign-ins of `user`'s devices (the provider revoked the session or the
    /// credential changed): levels that want a recent sign-in close until they sign in again.
    /// Returns the devices touched.
    pub async fn forget_sign_ins(&self, user: &str) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE devices SET signed_in_at = NULL WHERE user_name = $1 AND revoked_at IS NULL \
             AND signed_in_at IS NOT NULL",
        )
        .bind(user)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sign_in_records(url: &str) {
        let store = Store::open(url).await.unwrap();
        let none = Reserved::default();
        let range: IpNet = "100.118.0.0/16".parse().unwrap();
        let governed = ["engineering".to_string(), "finance".to_string()];
        fn alice<'a>(create: bool, member: &'a [String], governed: &'a [String]) -> SignIn<'a> {
            SignIn {
                subject: "https://idp.example s-1",
                username: "alice",
                email: Some("alice@example.com"),
                display_name: Some("Alice"),
                member_of: member,
                governed,
                create,
                provider_ids: &["s-1"],
                link_by_name: true,
            }
        }
        let eng = ["engineering".to_string()];
        let fin = ["finance".to_string()];
        let nothing: [String; 0] = [];
        // Users must exist when the setting says so; nothing is created then.
        assert_eq!(
            store
                .sign_in_user(&alice(false, &eng, &governed), 10)
                .await
                .unwrap(),
            Err(SignInRefusal::NoUser("alice".into()))
        );
        assert!(store.users().await.unwrap().is_empty());
        // Created on first sign-in, in the mapped groups.
        assert_eq!(
            store
                .sign_in_user(&alice(true, &eng, &governed), 10)
                .await
                .unwrap(),
            Ok("alice".to_string())
        );
        // An admin's group outside the mapping stays; the mapped ones follow the provider.
        store.create_group("oncall", 11).await.unwrap();
        sqlx::query("INSERT INTO user_groups (user_name, group_name) VALUES ('alice', 'oncall')")
            .execute(&store.pool)
            .await
            .unwrap();
        store
            .sign_in_user(&alice(false, &fin, &governed), 12)
            .await
            .unwrap()
            .unwrap();
        let u = store.users().await.unwrap();
        assert_eq!(u[0].groups, ["finance", "oncall"]);
        store
            .sign_in_user(&alice(false, &nothing, &governed), 12)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.users().await.unwrap()[0].groups, ["oncall"]);
        // Another identity of the provider cannot take alice's name.
        let mallory = SignIn {
            subject: "https://idp.example s-2",
            ..alice(true, &nothing, &governed)
        };
        assert_eq!(
            store.sign_in_user(&mallory, 13).await.unwrap(),
            Err(SignInRefusal::Taken("alice".into()))
        );
        // A user an admin made is linked by name on their first sign-in.
        store.create_user("bob", &[], 14).await.unwrap();
        let bob = SignIn {
            subject: "https://idp.example s-3",
            username: "bob",
            ..alice(false, &nothing, &governed)
        };
        assert_eq!(
            store.sign_in_user(&bob, 15).await.unwrap(),
            Ok("bob".to_string())
        );
        // Without link_by_name, a name alone links nobody; the provider's id as SCIM's
        // externalId does.
        store.create_user("frank", &[], 14).await.unwrap();
        let frank = SignIn {
            subject: "https://idp.example s-6",
            username: "frank",
            provider_ids: &["s-6", "oid-6"],
            link_by_name: false,
            ..alice(false, &nothing, &governed)
        };
        assert_eq!(
            store.sign_in_user(&frank, 15).await.unwrap(),
            Err(SignInRefusal::NotLinked("frank".into()))
        );
        sqlx::query("UPDATE users SET external_id = 'oid-6' WHERE name = 'frank'")
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(
            store.sign_in_user(&frank, 16).await.unwrap(),
            Ok("frank".to_string())
        );
        // Names match ignoring case (SCIM's userName does): the stored name is kept.
        store.create_user("Dave", &[], 14).await.unwrap();
        let dave = SignIn {
            subject: "https://idp.example s-4",
            username: "dave",
            ..alice(false, &nothing, &governed)
        };
        assert_eq!(
            store.sign_in_user(&dave, 15).await.unwrap(),
            Ok("Dave".to_string())
        );
        store.set_user_disabled("bob", true).await.unwrap();
        assert_eq!(
            store.sign_in_user(&bob, 16).await.unwrap(),
            Err(SignInRefusal::Disabled("bob".into()))
        );

        // Devices: enrolled by the first sign-in, re-authenticated by the next (same key).
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let (dev, cred) = store
            .sign_in_device("alice", "alice-laptop", key, 100, 101, range, &none)
            .await
            .unwrap()
            .unwrap();
        assert!(cred.is_some());
        assert_eq!(
            store.device_signed_in_at("alice-laptop").await.unwrap(),
            Some(100)
        );
        let (again, cred) = store
            .sign_in_device("alice", "other-name", key, 200, 201, range, &none)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.name.as_str(), cred), ("alice-laptop", None));
        assert_eq!(again.address, dev.address);
        assert_eq!(
            store.device_signed_in_at("alice-laptop").await.unwrap(),
            Some(200)
        );
        // Someone else's key or a taken name: refused, nothing changed.
        assert!(matches!(
            store
                .sign_in_device("bob", "bob-laptop", key, 300, 301, range, &none)
                .await
                .unwrap(),
            Err(SignInRefusal::Device(_))
        ));
        let other = "HyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4=";
        assert!(matches!(
            store
                .sign_in_device("bob", "alice-laptop", other, 300, 301, range, &none)
                .await
                .unwrap(),
            Err(SignInRefusal::Device(_))
        ));
        // All or nothing: a new user whose device is refused (the key is alice's) is not
        // created either.
        let erin = SignIn {
            subject: "https://idp.example s-5",
            username: "erin",
            ..alice(true, &eng, &governed)
        };
        let refused = store
            .sign_in(
                &erin,
                Some(DeviceSignIn {
                    name: "erin-laptop",
                    public_key: key,
                    signed_in_at: 300,
                    range,
                    reserved: &none,
                    class: sekisho_proto::policy::DeviceClass::Personal,
                }),
                301,
            )
            .await
            .unwrap();
        assert!(
            matches!(refused, Err(SignInRefusal::Device(_))),
            "{refused:?}"
        );
        assert!(
            !store
                .users()
                .await
                .unwrap()
                .iter()
                .any(|u| u.name == "erin"),
            "a refused sign-in created its user"
        );
        // A revoked device does not come back by signing in.
        store.revoke_device("alice-laptop", 400).await.unwrap();
        assert!(matches!(
            store
                .sign_in_device("alice", "alice-laptop", key, 500, 501, range, &none)
                .await
                .unwrap(),
            Err(SignInRefusal::Device(_))
        ));
        assert_eq!(store.devices().await.unwrap().len(), 1);

        // A login session is used once.
        let s = LoginSession {
            id: "l1".into(),
            purpose: "device".into(),
            method: "code".into(),
            state: "st".into(),
            nonce: "no".into(),
            redirect_uri: Some("http://127.0.0.1:1/callback".into()),
            device_code: None,
            interval_s: 5,
            created_at: 1000,
            expires_at: 1600,
            used_at: None,
        };
        store.create_login(&s).await.unwrap();
        assert_eq!(store.login("l1").await.unwrap(), Some(s));
        assert!(store.use_login("l1", 1001).await.unwrap());
        assert!(!store.use_login("l1", 1002).await.unwrap());
        assert_eq!(
            store.login("l1").await.unwrap().unwrap().used_at,
            Some(1001)
        );
    }

    #[tokio::test]
    async fn sign_in_records_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("sekisho-signin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        sign_in_records(&format!("sqlite://{}/s.db", dir.display())).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn sign_in_records_on_postgres() {
        if std::env::var_os("SEKISHO_SKIP_POSTGRES").is_some() {
            return;
        }
        let pg = sekisho_tests::pg::Postgres::start().expect("a local PostgreSQL");
        sign_in_records(&pg.url()).await;
    }
}
