//! A throw-away PostgreSQL server for tests: its own data folder, listening only on a Unix
//! socket in that folder, stopped and removed on drop. Needs the Debian `postgresql` package
//! (`.ci/run` installs it); nothing else is assumed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
}

fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool} as user postgres"))?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Postgres {
    /// Creates a cluster in a fresh folder and starts it.
    pub fn start() -> Result<Postgres> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "sekisho-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let uid = nix_id("-u")?;
        let gid = nix_id("-g")?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .context("cannot hand the data folder to user postgres")?;
        let data = dir.join("data");
        let d = data.to_string_lossy().to_string();
        as_postgres(
            &bin,
            "initdb",
            &["-D", &d, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        )?;
        let opts = format!("-k {} -c listen_addresses= -c fsync=off", dir.display());
        let log = dir.join("server.log").to_string_lossy().to_string();
        as_postgres(
            &bin,
            "pg_ctl",
            &["-D", &d, "-o", &opts, "-l", &log, "-w", "start"],
        )?;
        Ok(Postgres { dir, bin })
    }

    /// sqlx URL of the `postgres` database over the Unix socket.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}",
            self.dir.display()
        )
    }
}

fn nix_id(flag: &str) -> Result<u32> {
    let out = Command::new("id").args([flag, "postgres"]).output()?;
    if !out.status.success() {
        bail!("there is no user postgres (install the postgresql package)");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let d = self.dir.join("data").to_string_lossy().to_string();
        let _ = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &d, "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
