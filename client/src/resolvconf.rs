//! Points the system's DNS at the stub while the client runs, and puts the previous setting
//! back exactly when it stops — or, after a crash, when it starts again.
//!
//! Where systemd-resolved runs, the file is its stub file and resolved would be the right
//! place (per-link DNS over D-Bus); this client writes `/etc/resolv.conf` (or the file given)
//! in place, which also works when the file is a bind mount (`ip netns exec` mounts
//! `/etc/netns/NAME/resolv.conf` over it). The previous content is saved first, atomically, in
//! a backup file; a backup left behind means the last run did not stop cleanly.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracing::{info, warn};

/// First line of the file while the client manages it.
pub const MARKER: &str = "# Managed by sekisho-client";

pub struct SystemDns {
    pub path: PathBuf,
    pub backup: PathBuf,
}

impl SystemDns {
    /// Restores the setting a previous run left behind (crash or kill -9). True if it did.
    pub fn recover(&self) -> Result<bool> {
        if !self.backup.exists() {
            return Ok(false);
        }
        let current = std::fs::read_to_string(&self.path).unwrap_or_default();
        if current.starts_with(MARKER) {
            warn!(file = %self.path.display(), "the last run did not restore the DNS setting; restoring it now");
            self.restore()?;
        } else {
            // Someone changed the file since: theirs wins; the stale backup goes.
            warn!(file = %self.path.display(), "found a stale DNS backup but the file was changed since; keeping the file");
            std::fs::remove_file(&self.backup).ok();
        }
        Ok(true)
    }

    /// The name servers the system uses now (upstreams when the policy names none).
    pub fn current_servers(&self) -> Vec<IpAddr> {
        nameservers(&std::fs::read_to_string(&self.path).unwrap_or_default())
    }

    /// Saves the current setting and points the system at `server`.
    pub fn take_over(&self, server: IpAddr) -> Result<()> {
        let current = std::fs::read_to_string(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        if !current.starts_with(MARKER) {
            write_atomic(&self.backup, &current)?;
        }
        let text = format!(
            "{MARKER} while it runs; the previous file is saved in {} and comes back when it stops.\n\
             nameserver {server}\noptions edns0 trust-ad\n",
            self.backup.display()
        );
        write_in_place(&self.path, &text)?;
        info!(file = %self.path.display(), %server, "system DNS points at the stub");
        Ok(())
    }

    /// Puts the saved setting back, byte for byte, and removes the backup.
    pub fn restore(&self) -> Result<()> {
        let saved = std::fs::read_to_string(&self.backup)
            .with_context(|| format!("cannot read {}", self.backup.display()))?;
        write_in_place(&self.path, &saved)?;
        std::fs::remove_file(&self.backup).ok();
        info!(file = %self.path.display(), "system DNS setting restored");
        Ok(())
    }
}

/// `nameserver` lines of a resolv.conf.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse().ok())
        })
        .collect()
}

fn write_in_place(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_over_and_restore_exactly_also_after_a_crash() {
        let dir = std::env::temp_dir().join(format!("sk-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dns = SystemDns {
            path: dir.join("resolv.conf"),
            backup: dir.join("backup"),
        };
        let original = "# mine\nnameserver 10.99.1.53\nsearch home.example\n";
        std::fs::write(&dns.path, original).unwrap();
        assert_eq!(
            dns.current_servers(),
            vec!["10.99.1.53".parse::<IpAddr>().unwrap()]
        );
        dns.take_over("100.118.0.2".parse().unwrap()).unwrap();
        // Twice (a restart while managing) must not save our own file as "the previous".
        dns.take_over("100.118.0.2".parse().unwrap()).unwrap();
        let ours = std::fs::read_to_string(&dns.path).unwrap();
        assert!(ours.starts_with(MARKER) && ours.contains("nameserver 100.118.0.2"));
        dns.restore().unwrap();
        assert_eq!(std::fs::read_to_string(&dns.path).unwrap(), original);
        assert!(!dns.backup.exists());
        // Crash: the backup stays; the next start restores.
        dns.take_over("100.118.0.2".parse().unwrap()).unwrap();
        assert!(dns.recover().unwrap());
        assert_eq!(std::fs::read_to_string(&dns.path).unwrap(), original);
        assert!(!dns.recover().unwrap());
        std::fs::remove_dir_all(&dir).ok();
    }
}
