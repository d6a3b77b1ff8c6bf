//! Device posture checks. The checks to run come from the control plane; the facts are read on
//! this device; only pass/fail per check leaves it.
//!
//! [`evaluate`] is pure (facts in, results out); [`gather`] reads the facts from the system.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use sekisho_proto::api::CheckSpec;
use sekisho_proto::policy::CheckKind;
use sekisho_proto::posture::{normalize_dns_suffix, under_dns_suffix, version_at_least};

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
    /// MAC addresses (lowercase, colons) of the current default gateways, IPv4 and IPv6, not
    /// counting routes into Sekisho's own tunnel.
    pub gateway_macs: BTreeSet<String>,
    /// The network's DNS search domains (lowercase), from the resolver file the network set.
    pub dns_suffixes: Vec<String>,
}

/// This client's own settings the network facts depend on.
#[derive(Debug, Clone, Default)]
pub struct Local {
    /// Sekisho's tunnel interface: a default route through it is not the network's.
    pub tunnel: String,
    /// The system's resolver file.
    pub resolv_conf: PathBuf,
    /// Where the DNS stub keeps the network's resolver file while the system's points at the
    /// stub (None: no stub).
    pub resolv_backup: Option<PathBuf>,
}

/// A default route: the interface it leaves by and its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub interface: String,
    pub address: IpAddr,
}

/// A resolved neighbour-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub interface: String,
    pub address: IpAddr,
    /// Lowercase, colons.
    pub mac: String,
}

impl From<sekisho_sys::Neighbour> for Neighbour {
    fn from(n: sekisho_sys::Neighbour) -> Self {
        Neighbour {
            interface: n.interface,
            address: n.address,
            mac: n
                .lladdr
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        }
    }
}

/// Route flags (`RTF_*`, linux/route.h) as /proc/net/route and /proc/net/ipv6_route print them.
const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;
const RTF_REJECT: u32 = 0x200;

fn is_gateway_route(flags: u32) -> bool {
    flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY && flags & RTF_REJECT == 0
}

/// The IPv4 default routes with a gateway in `/proc/net/route` text (the main table).
/// Addresses are printed as the in-memory (network order) word read as a native integer.
pub fn default_gateways_v4(route: &str) -> Vec<Gateway> {
    route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(f.get(i)?, 16).ok();
            let (dest, gw, flags, mask) = (hex(1)?, hex(2)?, hex(3)?, hex(7)?);
            (dest == 0 && mask == 0 && gw != 0 && is_gateway_route(flags)).then(|| Gateway {
                interface: f[0].to_string(),
                address: IpAddr::V4(Ipv4Addr::from(gw.to_ne_bytes())),
            })
        })
        .collect()
}

/// The IPv6 default routes with a gateway in `/proc/net/ipv6_route` text (every table).
pub fn default_gateways_v6(route: &str) -> Vec<Gateway> {
    route
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [dest, plen, _, _, hop, _, _, _, flags, dev] = f[..] else {
                return None;
            };
            let dest = u128::from_str_radix(dest, 16).ok()?;
            let hop = u128::from_str_radix(hop, 16).ok()?;
            let flags = u32::from_str_radix(flags, 16).ok()?;
            (dest == 0 && plen == "00" && hop != 0 && is_gateway_route(flags)).then(|| Gateway {
                interface: dev.to_string(),
                address: IpAddr::V6(Ipv6Addr::from(hop)),
            })
        })
        .collect()
}

/// The resolved entries of `/proc/net/arp` text (flag ATF_COM; an incomplete entry has none).
pub fn arp_table(arp: &str) -> Vec<Neighbour> {
    const ATF_COM: u32 = 0x2;
    arp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [ip, _, flags, mac, _, dev] = f[..] else {
                return None;
            };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            let mac = sekisho_proto::posture::normalize_mac(mac).ok()?;
            let address = ip.parse().ok()?;
            (flags & ATF_COM != 0).then(|| Neighbour {
                interface: dev.to_string(),
                address,
                mac,
            })
        })
        .collect()
}

/// The MAC addresses of the default gateways: each gateway found in the neighbour table on the
/// interface its route leaves by. Routes through `tunnel` (Sekisho's own) do not count, nor do
/// gateways without a neighbour entry (a point-to-point link, or not resolved yet).
pub fn gateway_macs(
    gateways: &[Gateway],
    neighbours: &[Neighbour],
    tunnel: &str,
) -> BTreeSet<String> {
    gateways
        .iter()
        .filter(|g| g.interface != tunnel)
        .filter_map(|g| {
            neighbours
                .iter()
                .find(|n| n.interface == g.interface && n.address == g.address)
                .map(|n| n.mac.clone())
        })
        .collect()
}

/// The search domains of resolv.conf text: the last `search` or `domain` line wins (as the
/// resolver reads them); names are lowercased, invalid ones (like the root, `.`) left out.
pub fn dns_suffixes(resolv_conf: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if matches!(words.next(), Some("search" | "domain")) {
            out = words
                .take_while(|w| !w.starts_with(['#', ';']))
                .filter_map(|w| normalize_dns_suffix(w).ok())
                .collect();
        }
    }
    out
}

/// The resolver file as the network set it: the system's file, unless it is the one this
/// client wrote to point the system at its DNS stub (it starts with the marker) — then the
/// copy of the network's file the client saved before (`backup`).
pub fn network_resolv_conf(
    current: Option<String>,
    backup: impl FnOnce() -> Option<String>,
) -> Option<String> {
    match current {
        Some(text) if text.starts_with(crate::resolvconf::MARKER) => backup(),
        other => other,
    }
}

/// Whether the device is on one of the check's trusted networks.
fn on_trusted_network(c: &CheckSpec, facts: &Facts) -> bool {
    c.gateway_mac
        .iter()
        .any(|m| facts.gateway_macs.contains(&m.to_ascii_lowercase()))
        || facts.dns_suffixes.iter().any(|s| {
            c.dns_suffix
                .iter()
                .any(|want| under_dns_suffix(s, &want.to_ascii_lowercase()))
        })
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
                CheckKind::TrustedNetwork => on_trusted_network(c, facts),
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

/// Whether a check looks at the default gateway: only then is the neighbour table read (the
/// IPv6 one over netlink, by the caller, for [`gather`]).
pub fn needs_gateways(checks: &[CheckSpec]) -> bool {
    checks
        .iter()
        .any(|c| c.kind == CheckKind::TrustedNetwork && !c.gateway_mac.is_empty())
}

fn needs_dns_suffixes(checks: &[CheckSpec]) -> bool {
    checks
        .iter()
        .any(|c| c.kind == CheckKind::TrustedNetwork && !c.dns_suffix.is_empty())
}

/// Reads the facts the given checks need (and only those). `neighbours6`: the IPv6 neighbour
/// table, which the caller reads (netlink) when [`needs_gateways`].
pub fn gather(checks: &[CheckSpec], local: &Local, neighbours6: Vec<Neighbour>) -> Facts {
    let needs = |k: CheckKind| checks.iter().any(|c| c.kind == k);
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let gateway_macs = if needs_gateways(checks) {
        let mut gateways = default_gateways_v4(&read("/proc/net/route"));
        gateways.extend(default_gateways_v6(&read("/proc/net/ipv6_route")));
        let mut neighbours = arp_table(&read("/proc/net/arp"));
        neighbours.extend(neighbours6);
        gateway_macs(&gateways, &neighbours, &local.tunnel)
    } else {
        BTreeSet::new()
    };
    let dns_suffixes = if needs_dns_suffixes(checks) {
        network_resolv_conf(std::fs::read_to_string(&local.resolv_conf).ok(), || {
            std::fs::read_to_string(local.resolv_backup.as_ref()?).ok()
        })
        .map(|text| dns_suffixes(&text))
        .unwrap_or_default()
    } else {
        Vec::new()
    };
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
        gateway_macs,
        dns_suffixes,
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
            gateway_mac: Vec::new(),
            dns_suffix: Vec::new(),
        }
    }

    fn network(name: &str, macs: &[&str], suffixes: &[&str]) -> CheckSpec {
        CheckSpec {
            gateway_mac: macs.iter().map(|m| m.to_string()).collect(),
            dns_suffix: suffixes.iter().map(|s| s.to_string()).collect(),
            ..spec(name, CheckKind::TrustedNetwork, None, None)
        }
    }

    // As the kernel prints them (with the padding /proc/net/route has).
    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT   \n\
        sekisho0\t00000000\t00000000\t0001\t0\t0\t0\t00000080\t0\t0\t0   \n\
        eth0\t00000000\t0101630A\t0003\t0\t0\t100\t00000000\t0\t0\t0   \n\
        eth0\t0001630A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0   \n\
        wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0   \n\
        eth1\t00000000\t0102A8C0\t0203\t0\t0\t0\t00000000\t0\t0\t0   \n\
        tun9\t00000000\t0103A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0   \n";

    const IPV6_ROUTE: &str = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000003 00000000 00450003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 sekisho0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000009 00000400 00000001 00000000 00000003 sekisho0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    const ARP: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
10.99.1.1        0x1         0x2         5A:00:00:00:01:01     *        eth0
192.168.0.1      0x1         0x0         00:00:00:00:00:00     *        wlan0
192.168.3.1      0x1         0x2         02:00:00:00:03:01     *        tun9
10.99.1.7        0x1         0x2         02:00:00:00:01:07     *        eth0
";

    #[test]
    fn default_gateways_come_from_the_route_tables() {
        let v4 = default_gateways_v4(ROUTE);
        let gw = |i: &str, a: &str| Gateway {
            interface: i.into(),
            address: a.parse().unwrap(),
        };
        // Not the tunnel's half-default (mask 0x80), not eth1's reject route, not a network.
        assert_eq!(
            v4,
            [
                gw("eth0", "10.99.1.1"),
                gw("wlan0", "192.168.0.1"),
                gw("tun9", "192.168.3.1")
            ]
        );
        // The RA-learned default on eth0 and one into the tunnel; not the gateway-less one
        // nor the unreachable default on lo.
        assert_eq!(
            default_gateways_v6(IPV6_ROUTE),
            [gw("eth0", "fe80::1"), gw("sekisho0", "fe80::9")]
        );
        assert!(default_gateways_v4("").is_empty() && default_gateways_v6("garbage").is_empty());
    }

    #[test]
    fn gateway_macs_need_a_resolved_neighbour_on_the_route_s_interface() {
        let arp = arp_table(ARP);
        assert_eq!(arp.len(), 3, "the incomplete entry is left out: {arp:?}");
        assert_eq!(arp[0].mac, "5a:00:00:00:01:01");
        let mut gateways = default_gateways_v4(ROUTE);
        gateways.extend(default_gateways_v6(IPV6_ROUTE));
        let mut neighbours = arp.clone();
        let six = |i: &str, a: &str, mac: &str| Neighbour {
            interface: i.into(),
            address: a.parse().unwrap(),
            mac: mac.into(),
        };
        neighbours.push(six("eth0", "fe80::1", "5a:00:00:00:06:01"));
        neighbours.push(six("sekisho0", "fe80::9", "5a:00:00:00:06:09"));
        // The same address on another interface is another neighbour.
        neighbours.push(six("wlan0", "10.99.1.1", "5a:00:00:00:09:09"));
        let macs = gateway_macs(&gateways, &neighbours, "sekisho0");
        assert_eq!(
            macs,
            [
                "5a:00:00:00:01:01",
                "5a:00:00:00:06:01",
                "02:00:00:00:03:01"
            ]
            .map(String::from)
            .into(),
            "eth0's v4 and v6 gateways and tun9's; not wlan0's unresolved one, nor the tunnel's"
        );
        let lladdr = sekisho_sys::Neighbour {
            interface: "eth0".into(),
            address: "fe80::1".parse().unwrap(),
            lladdr: vec![0x5a, 0, 0, 0, 6, 1],
        };
        assert_eq!(Neighbour::from(lladdr).mac, "5a:00:00:00:06:01");
    }

    #[test]
    fn dns_suffixes_come_from_the_network_s_resolver_file() {
        assert_eq!(
            dns_suffixes(
                "# dhcp\nnameserver 10.99.0.53\nsearch Office.Corp.Example. lab.example # x\n"
            ),
            ["office.corp.example", "lab.example"]
        );
        assert_eq!(
            dns_suffixes("domain corp.example\nsearch home.example\n"),
            ["home.example"],
            "the last of search/domain wins"
        );
        assert_eq!(
            dns_suffixes("search home.example\ndomain corp.example\n"),
            ["corp.example"]
        );
        assert!(dns_suffixes("nameserver 1.1.1.1\nsearch .\n").is_empty());
        // While the client points the system at its stub, the network's own file is its backup.
        let ours = format!("{}\nnameserver 100.118.0.2\n", crate::resolvconf::MARKER);
        let saved = || Some("search corp.example\n".to_string());
        assert_eq!(
            network_resolv_conf(Some(ours.clone()), saved).as_deref(),
            Some("search corp.example\n")
        );
        assert_eq!(network_resolv_conf(Some(ours), || None), None);
        // A file the network (a DHCP client, say) wrote since is the network's.
        assert_eq!(
            network_resolv_conf(Some("search new.example\n".into()), saved).as_deref(),
            Some("search new.example\n")
        );
    }

    #[test]
    fn trusted_network_passes_on_a_listed_gateway_or_suffix() {
        let by_mac = network("mac", &["5a:00:00:00:01:01", "02:00:00:00:00:09"], &[]);
        let by_suffix = network("dns", &[], &["corp.example"]);
        let either = network("either", &["02:00:00:00:00:09"], &["corp.example"]);
        let checks = [by_mac, by_suffix, either];
        let mut facts = Facts::default();
        let r = evaluate(&checks, &facts);
        assert!(
            !r["mac"] && !r["dns"] && !r["either"],
            "nothing known passes nothing"
        );
        facts.gateway_macs.insert("5a:00:00:00:01:01".into());
        facts.dns_suffixes = vec!["home.example".into(), "notcorp.example".into()];
        let r = evaluate(&checks, &facts);
        assert!(r["mac"] && !r["dns"] && !r["either"], "{r:?}");
        facts.dns_suffixes.push("office.corp.example".into());
        let r = evaluate(&checks, &facts);
        assert!(r["mac"] && r["dns"] && r["either"], "{r:?}");
        facts.gateway_macs.clear();
        facts.dns_suffixes = vec!["corp.example".into()];
        let r = evaluate(&checks, &facts);
        assert!(!r["mac"] && r["dns"] && r["either"], "{r:?}");
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
        let local = Local {
            tunnel: "sekisho0".into(),
            resolv_conf: "/nonexistent/resolv.conf".into(),
            resolv_backup: None,
        };
        let f = gather(&[], &local, Vec::new());
        assert!(f.processes.is_empty() && f.os_version.is_none());
        let f = gather(
            &[spec("p", CheckKind::ProcessRunning, None, Some("x"))],
            &local,
            Vec::new(),
        );
        assert!(!f.processes.is_empty(), "this test process itself runs");
        assert!(f.gateway_macs.is_empty() && f.dns_suffixes.is_empty());
        assert!(!needs_gateways(&[network("n", &[], &["corp.example"])]));
        assert!(needs_gateways(&[network("n", &["02:00:00:00:00:01"], &[])]));
    }
}
