//! The store: posture signing keys.

use super::*;

impl Store {
    /// From now on, signing keys are sealed with `kek` when written and opened with it when
    /// read. Set once; a second call is ignored.
    pub fn set_kek(&self, kek: crate::kek::Kek) {
        let _ = self.kek.set(kek);
    }

    /// Whether some signing key in the store is sealed (by any KEK).
    pub async fn has_sealed_signing_keys(&self) -> Result<bool> {
        let rows = sqlx::query("SELECT seed FROM signing_keys")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().any(|r| {
            r.try_get::<String, _>(0)
                .is_ok_and(|s| crate::kek::Kek::is_sealed(&s))
        }))
    }

    /// Seals the seeds still stored in the clear (written before keys were sealed). Returns
    /// how many it sealed.
    pub async fn seal_plaintext_signing_keys(&self) -> Result<usize> {
        let kek = self.kek.get().context("no key-encryption key loaded")?;
        let rows = sqlx::query("SELECT kid, seed FROM signing_keys WHERE seed <> ''")
            .fetch_all(&self.pool)
            .await?;
        let mut sealed = 0;
        for r in &rows {
            let kid: String = r.try_get(0)?;
            let seed: String = r.try_get(1)?;
            if crate::kek::Kek::is_sealed(&seed) {
                continue;
            }
            let plain = URL_SAFE_NO_PAD
                .decode(&seed)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .context("bad signing key in the database")?;
            let n = sqlx::query("UPDATE signing_keys SET seed = $1 WHERE kid = $2 AND seed = $3")
                .bind(kek.seal(&kid, &plain))
                .bind(kid.as_str())
                .bind(seed.as_str())
                .execute(&self.pool)
                .await?
                .rows_affected();
            sealed += n as usize;
        }
        Ok(sealed)
    }

    /// The stored form of a seed: sealed when a KEK is set.
    fn stored_seed(&self, kid: &str, seed: &[u8; 32]) -> String {
        match self.kek.get() {
            Some(kek) => kek.seal(kid, seed),
            None => URL_SAFE_NO_PAD.encode(seed),
        }
    }

    /// A seed from its stored form.
    fn open_seed(&self, kid: &str, stored: &str) -> Result<[u8; 32]> {
        if crate::kek::Kek::is_sealed(stored) {
            let kek = self.kek.get().with_context(|| {
                format!("signing key {kid} is sealed, and no key-encryption key is loaded")
            })?;
            return kek.open(kid, stored);
        }
        URL_SAFE_NO_PAD
            .decode(stored)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .context("bad signing key in the database")
    }

    /// The active posture signing key (the newest), created on first use. Every broker
    /// sharing the database signs with it and verifies with it and the previous keys that
    /// are still in their window (see [`Store::signing_keys`]).
    pub async fn signing_key(&self, now: u64) -> Result<TokenSigner> {
        for _ in 0..3 {
            let keys = self.signing_keys(now, u64::MAX).await?;
            if let Some(active) = keys.first().and_then(SigningKeyRecord::signer) {
                return Ok(active);
            }
            // None yet (or, which never happens, only retired ones): make one. Two brokers
            // starting at once race here; the unique generation lets one of them win.
            let next = keys.first().map_or(1, |k| k.generation + 1);
            self.insert_signing_key(&TokenSigner::generate(), next, now)
                .await?;
        }
        anyhow::bail!("cannot create a posture signing key")
    }

    async fn insert_signing_key(
        &self,
        key: &TokenSigner,
        generation: i64,
        now: u64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO signing_keys (kid, seed, created_at, generation) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(key.kid())
        .bind(self.stored_seed(key.kid(), &key.seed()))
        .bind(ts(now))
        .bind(generation)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every signing key, newest first, with its state at `now`: the newest signs
    /// ("active"); an older key verifies ("previous") until `window` seconds after its
    /// successor was created (the posture token lifetime plus [`KEY_RETIRE_SLACK`]), then it
    /// is "retired" (also when a broker marked it so, see [`Store::retire_signing_keys`]).
    pub async fn signing_keys(&self, now: u64, window: u64) -> Result<Vec<SigningKeyRecord>> {
        let rows = sqlx::query(
            "SELECT kid, seed, created_at, generation, retired_at FROM signing_keys \
             ORDER BY generation DESC, created_at DESC, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut keys: Vec<SigningKeyRecord> = Vec::with_capacity(rows.len());
        for r in &rows {
            let created_at = opt_u64(Some(r.try_get(2)?)).unwrap_or(0);
            let retired_at = opt_u64(r.try_get(4)?);
            let seed: String = r.try_get(1)?;
            let kid: String = r.try_get(0)?;
            let seed = if retired_at.is_some() {
                None
            } else {
                Some(self.open_seed(&kid, &seed)?)
            };
            let verifies_until = keys
                .last()
                .map(|successor| successor.created_at.saturating_add(window));
            let state = match (retired_at, verifies_until) {
                (Some(_), _) => SigningKeyState::Retired,
                (None, None) => SigningKeyState::Active,
                (None, Some(until)) if now < until => SigningKeyState::Previous,
                (None, Some(_)) => SigningKeyState::Retired,
            };
            keys.push(SigningKeyRecord {
                kid,
                created_at,
                generation: r.try_get(3)?,
                retired_at,
                state,
                verifies_until,
                seed,
            });
        }
        Ok(keys)
    }

    /// Makes a new signing key the active one; the one it replaces keeps verifying for
    /// `window` (see [`Store::signing_keys`]). Returns the new key.
    pub async fn rotate_signing_key(&self, now: u64) -> Result<TokenSigner> {
        self.signing_key(now).await?;
        for _ in 0..5 {
            let next = sqlx::query("SELECT COALESCE(MAX(generation), 0) FROM signing_keys")
                .fetch_one(&self.pool)
                .await?
                .try_get::<i64, _>(0)?
                + 1;
            let fresh = TokenSigner::generate();
            // Another broker rotating at the same moment takes the same generation: one wins,
            // the other tries the next one.
            if self.insert_signing_key(&fresh, next, now).await? {
                self.announce("signing_key_rotated").await;
                return Ok(fresh);
            }
        }
        anyhow::bail!("cannot rotate the signing key: too many concurrent rotations")
    }

    /// Marks the keys whose window has passed at `now` as retired and erases their private
    /// seed (the record stays, for the key list and the audit trail). Returns their kids.
    pub async fn retire_signing_keys(&self, now: u64, window: u64) -> Result<Vec<String>> {
        let mut retired = Vec::new();
        for k in self.signing_keys(now, window).await? {
            if k.state != SigningKeyState::Retired || k.retired_at.is_some() {
                continue;
            }
            let r = sqlx::query(
                "UPDATE signing_keys SET retired_at = $1, seed = '' WHERE kid = $2 \
                 AND retired_at IS NULL",
            )
            .bind(ts(now))
            .bind(k.kid.as_str())
            .execute(&self.pool)
            .await?;
            if r.rows_affected() == 1 {
                retired.push(k.kid);
            }
        }
        if !retired.is_empty() {
            self.announce("signing_key_retired").await;
        }
        Ok(retired)
    }
}
