//! Device posture checks. The checks to run come from the control plane; the facts are read on
//! this device; only pass/fail per check leaves it.
//!
//! [`evaluate`] is pure (facts in, results out); [`gather`] reads the facts from the system.

use std::collections::{BTreeMap, BTreeSet};

use sekisho_proto::api::CheckSpec;
use sekisho_proto::policy::CheckKind;
use sekisho_proto::posture::version_at_least;

/// What the checks look at, read from this device. Never sent anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// os-release VERSION_ID.
    pub os_version: Option<String>,
    /// Kernel release (uname -r).
    pub kernel: Option<String>,
    /// The root file system sits on a dm-crypt device.
    pub root_encrypted: bool,
    /// A host firewall ruleset is loaded (nftables tables other than Sekisho's own).
    pub firewall_active: bool,
    /// The desktop locks the screen when idle (GNOME's lock-enabled), if known.
    pub screen_lock: bool,
    /// Names (comm) of the running processes.
    pub processes: BTreeSet<String>,
    /// This client's version.
    pub client_version: String,
}

/// Pass/fail of each check.
pub fn evaluate(checks: &[CheckSpec], facts: &Facts) -> BTreeMap<String, bool> {
    checks
        .iter()
        .map(|c| {
            let version = c.version.as_deref().unwrap_or("");
            let at_least = |have: &Option<String>| {
                have.as_deref()
                    .is_some_and(|h| version_at_least(h, version))
            };
            let pass = match c.kind {
                CheckKind::MinOsVersion => at_least(&facts.os_version),
                CheckKind::MinKernelVersion => at_least(&facts.kernel),
                CheckKind::DiskEncryption => facts.root_encrypted,
                CheckKind::FirewallActive => facts.firewall_active,
                CheckKind::ScreenLock => facts.screen_lock,
                CheckKind::ProcessRunning => c
                    .process
                    .as_deref()
                    .is_some_and(|p| facts.processes.contains(p)),
                CheckKind::MinClientVersion => version_at_least(&facts.client_version, version),
            };
            (c.name.clone(), pass)
        })
        .collect()
}

fn os_version() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim_matches('"').to_string())
}

fn kernel() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// True when the device mounted at / is a dm-crypt mapping (LUKS or plain).
fn root_encrypted() -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let Some(dev) = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (dev, mnt) = (f.next()?, f.next()?);
        (mnt == "/").then(|| dev.to_string())
    }) else {
        return false;
    };
    let Ok(real) = std::fs::canonicalize(&dev) else {
        return false;
    };
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    std::fs::read_to_string(format!("/sys/block/{name}/dm/uuid"))
        .is_ok_and(|u| u.starts_with("CRYPT-"))
}

fn firewall_active() -> bool {
    std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("table") && !l.contains("sekisho"))
        })
}

fn screen_lock() -> bool {
    std::process::Command::new("gsettings")
        .args(["get", "org.gnome.desktop.screensaver", "lock-enabled"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
}

/// The name of a process from its `/proc/PID/stat` line, unless it has exited (a zombie, or
/// dead, waiting for its parent): such a process no longer runs.
pub fn live_process_name(stat: &str) -> Option<&str> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    (!matches!(state, 'Z' | 'X' | 'x')).then(|| stat.get(open + 1..close))?
}

fn processes() -> BTreeSet<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| live_process_name(&stat).map(str::to_string))
        .collect()
}

/// Reads the facts the given checks need (and only those).
pub fn gather(checks: &[CheckSpec]) -> Facts {
    let needs = |k: CheckKind| checks.iter().any(|c| c.kind == k);
    Facts {
        os_version: needs(CheckKind::MinOsVersion).then(os_version).flatten(),
        kernel: needs(CheckKind::MinKernelVersion).then(kernel).flatten(),
        root_encrypted: needs(CheckKind::DiskEncryption) && root_encrypted(),
        firewall_active: needs(CheckKind::FirewallActive) && firewall_active(),
        screen_lock: needs(CheckKind::ScreenLock) && screen_lock(),
        processes: if needs(CheckKind::ProcessRunning) {
            processes()
        } else {
            BTreeSet::new()
        },
        client_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        name: &str,
        kind: CheckKind,
        version: Option<&str>,
        process: Option<&str>,
    ) -> CheckSpec {
        CheckSpec {
            name: name.into(),
            kind,
            version: version.map(Into::into),
            process: process.map(Into::into),
        }
    }

    #[test]
    fn checks_pass_and_fail_on_the_facts() {
        let checks = vec![
            spec("os", CheckKind::MinOsVersion, Some("12"), None),
            spec("kernel", CheckKind::MinKernelVersion, Some("6.1"), None),
            spec("disk", CheckKind::DiskEncryption, None, None),
            spec("edr", CheckKind::ProcessRunning, None, Some("edr-agent")),
            spec("client", CheckKind::MinClientVersion, Some("0.1"), None),
            spec(
                "future-client",
                CheckKind::MinClientVersion,
                Some("99"),
                None,
            ),
        ];
        let mut facts = Facts {
            os_version: Some("12".into()),
            kernel: Some("6.12.48+deb13-amd64".into()),
            root_encrypted: false,
            processes: ["sshd".to_string()].into(),
            client_version: "0.1.0".into(),
            ..Facts::default()
        };
        let r = evaluate(&checks, &facts);
        assert!(r["os"]);
        assert!(r["kernel"]);
        assert!(!r["disk"]);
        assert!(!r["edr"]);
        assert!(r["client"]);
        assert!(!r["future-client"]);
        facts.processes.insert("edr-agent".into());
        facts.os_version = Some("11".into());
        facts.kernel = None;
        let r = evaluate(&checks, &facts);
        assert!(r["edr"]);
        assert!(!r["os"]);
        assert!(!r["kernel"], "an unknown version never passes");
    }

    #[test]
    fn exited_processes_do_not_count() {
        assert_eq!(
            live_process_name("4242 (edr agent) S 1 4242 4242 0 -1"),
            Some("edr agent")
        );
        assert_eq!(live_process_name("4242 (a) b) R 1"), Some("a) b"));
        assert_eq!(live_process_name("4242 (edr-agent) Z 1 4242"), None);
        assert_eq!(live_process_name("garbage"), None);
    }

    #[test]
    fn gather_reads_only_what_is_asked() {
        let f = gather(&[]);
        assert!(f.processes.is_empty() && f.os_version.is_none());
        let f = gather(&[spec("p", CheckKind::ProcessRunning, None, Some("x"))]);
        assert!(!f.processes.is_empty(), "this test process itself runs");
    }
}
