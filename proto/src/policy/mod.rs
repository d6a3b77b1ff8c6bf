//! The admin's policy: users, groups, devices, sites, applications and rules.
//!
//! A policy file is TOML (see `deploy/demo/policy.toml` for a commented example). It is checked
//! as a whole on load; every error names the file, line and field. Evaluation is default deny:
//! a flow is allowed when an allow rule covers the user (directly or by group) and an application
//! that matches the flow, unless a deny rule covers them, which wins.

mod index;
pub mod risk;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::{ConfigError, Source, parse_toml};
use crate::keys::PublicKeyBytes;
use crate::packet::{FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::posture::PostureClaims;
pub use risk::DeviceClass;

/// Device addresses come from here unless the policy says otherwise. Chosen inside the shared
/// address space 100.64.0.0/10 but away from the ranges other overlays are known to use
/// (Tailscale's 100.100.100.100 service address, Firezone's 100.64.0.0/11 and 100.96.0.0/11,
/// Cloudflare WARP's 100.96.0.0/12), so Sekisho can run beside them.
pub const DEFAULT_DEVICE_RANGE: &str = "100.118.0.0/16";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    device_range: Option<Spanned<IpNet>>,
    /// The policy's time zone, for rules' `hours` and `days` and hours of the week ("+09:00").
    #[serde(default)]
    utc_offset: Option<Spanned<String>>,
    #[serde(default)]
    groups: Vec<RawGroup>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    devices: Vec<RawDevice>,
    #[serde(default)]
    sites: Vec<RawSite>,
    #[serde(default)]
    applications: Vec<RawApp>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    posture_checks: Vec<RawCheck>,
    #[serde(default)]
    sensitivity: RawSensitivity,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    risk: risk::RawRisk,
    #[serde(default)]
    device_classes: risk::RawClasses,
    #[serde(default)]
    tests: Vec<RawTest>,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    tunnels: Vec<RawTunnel>,
}

/// `[[tunnels]]`: split or full tunnel per group (the first entry naming one of the user's
/// groups applies; an entry without groups applies to everyone).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    name: Spanned<String>,
    #[serde(default)]
    groups: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default)]
    exclude_domains: Vec<Spanned<String>>,
    #[serde(default)]
    local_network: Option<Spanned<String>>,
    #[serde(default)]
    local_network_max_prefix: Option<Spanned<u8>>,
    #[serde(default)]
    local_network_max_prefix_v6: Option<Spanned<u8>>,
    #[serde(default)]
    allow_disable: Option<bool>,
    #[serde(default)]
    captive_grace: Option<Spanned<String>>,
}

/// A checked `[[tunnels]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRule {
    /// Empty: everyone.
    pub groups: Vec<GroupId>,
    pub settings: crate::tunnel::UserTunnel,
}

/// `[dns]`: synthetic addresses for name-based applications and the DNS filter.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    /// Synthetic addresses of name-based applications come from here.
    #[serde(default)]
    app_range: Option<Spanned<String>>,
    /// How blocked names are answered, unless a filter says otherwise.
    #[serde(default)]
    block_answer: Option<Spanned<String>>,
    /// Names (and their subdomains) never blocked, for everyone.
    #[serde(default)]
    allowlist: Vec<Spanned<String>>,
    /// How often clients look for new list contents.
    #[serde(default)]
    refresh: Option<Spanned<String>>,
    /// Upstream resolvers for clients: `udp://IP`, `tcp://IP`, `tls://IP#NAME`,
    /// `https://IP/PATH#NAME` (port optional). Empty: the system's resolvers.
    #[serde(default)]
    upstreams: Vec<Spanned<String>>,
    #[serde(default)]
    blocklists: Vec<RawBlocklist>,
    #[serde(default)]
    filters: Vec<RawDnsFilter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlocklist {
    name: Spanned<String>,
    category: Spanned<String>,
    /// A file on the broker (relative to the broker's policy file).
    #[serde(default)]
    path: Option<Spanned<String>>,
    /// Or a URL the broker fetches.
    #[serde(default)]
    url: Option<Spanned<String>>,
    /// `domains`, `hosts` or `adblock`; detected when absent.
    #[serde(default)]
    format: Option<Spanned<String>>,
}

/// Who gets which categories blocked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsFilter {
    /// For the admin's reference.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    /// Groups this filter applies to; absent means everyone.
    #[serde(default)]
    groups: Option<Vec<Spanned<String>>>,
    /// Categories of lists to block.
    block: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    block_answer: Option<Spanned<String>>,
}

/// Where a blocklist comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListSource {
    Path(String),
    Url(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocklist {
    pub name: String,
    pub category: String,
    pub source: ListSource,
    /// None: detected from the content.
    pub format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsFilterRule {
    /// Empty: everyone.
    pub groups: Vec<GroupId>,
    pub block: Vec<String>,
    pub allow: Vec<String>,
    pub block_answer: Option<crate::dns::BlockAnswer>,
}

/// The checked `[dns]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPolicy {
    pub app_range: ipnet::Ipv4Net,
    pub block_answer: crate::dns::BlockAnswer,
    pub allowlist: Vec<String>,
    pub refresh_secs: u64,
    pub upstreams: Vec<String>,
    /// The upstreams' addresses (full-tunnel devices reach only these for DNS).
    pub upstream_addrs: Vec<IpAddr>,
    pub blocklists: Vec<Blocklist>,
    pub filters: Vec<DnsFilterRule>,
}

/// What one user's clients get: the zones the broker answers, the lists to block, the
/// allowlist and the block answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserDns {
    pub private_zones: Vec<String>,
    /// Names of the blocklists to load (their categories are blocked for this user).
    pub blocklists: Vec<String>,
    pub allowlist: Vec<String>,
    pub block_answer: String,
    pub upstreams: Vec<String>,
    pub refresh_secs: u64,
}

/// A policy test: a scenario and the decision the admin expects. A policy whose tests fail is
/// not accepted by `admin policy apply`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    #[serde(default)]
    name: Option<String>,
    user: Spanned<String>,
    /// `ADDRESS:PORT` or, for ICMP, `ADDRESS`.
    destination: Spanned<String>,
    #[serde(default)]
    protocol: Option<Protocol>,
    expect: Action,
    /// Rule expected to decide (optional).
    #[serde(default)]
    rule: Option<String>,
    /// Posture checks that fail in this scenario (the others pass).
    #[serde(default)]
    failing_checks: Vec<Spanned<String>>,
}

/// One policy test, checked for syntax; users are resolved when it runs, since they may live in
/// the control plane's directory rather than the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyTest {
    pub name: String,
    pub user: String,
    pub destination: String,
    #[serde(skip)]
    pub key: FlowKey,
    pub expect: Action,
    pub rule: Option<String>,
    pub failing_checks: Vec<String>,
}

/// The result of one policy test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestOutcome {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Users, groups and devices kept by the control plane (enrolled devices, users created with the
/// admin CLI). They are merged with the policy file's own before it is checked, so rules may
/// name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    pub groups: Vec<String>,
    pub users: Vec<DirectoryUser>,
    pub devices: Vec<DirectoryDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryUser {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryDevice {
    pub name: String,
    pub user: String,
    pub public_key: String,
    pub address: IpAddr,
    pub class: DeviceClass,
}

/// A device check the client evaluates; only its pass/fail result leaves the device.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Spanned<String>,
    kind: CheckKind,
    #[serde(default)]
    version: Option<Spanned<String>>,
    #[serde(default)]
    process: Option<Spanned<String>>,
    /// `trusted_network`: MAC addresses of the gateways of trusted networks.
    #[serde(default)]
    gateway_mac: Option<Spanned<Vec<Spanned<String>>>>,
    /// `trusted_network`: DNS suffixes of trusted networks.
    #[serde(default)]
    dns_suffix: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

/// Which checks each application sensitivity level requires.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSensitivity {
    #[serde(default)]
    level1: Vec<Spanned<String>>,
    #[serde(default)]
    level2: Vec<Spanned<String>>,
    #[serde(default)]
    level3: Vec<Spanned<String>>,
    /// `[sensitivity.sign_in_max_age]`: per level, how old the user's last sign-in through
    /// the identity provider may be ("12h").
    #[serde(default)]
    sign_in_max_age: RawLevelAges,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLevelAges {
    #[serde(default)]
    level1: Option<Spanned<String>>,
    #[serde(default)]
    level2: Option<Spanned<String>>,
    #[serde(default)]
    level3: Option<Spanned<String>>,
}

/// `[identity]`: how the identity provider's groups (the ID token's groups claim) map onto
/// Sekisho groups and admin roles.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    /// Provider group → Sekisho group.
    #[serde(default)]
    groups: BTreeMap<String, Spanned<String>>,
    /// Provider group → admin role (`admin`, `operator`, `auditor`) for `admin login`.
    #[serde(default)]
    admin_roles: BTreeMap<String, Spanned<String>>,
}

/// A rule's `hours` and `days`, checked.
fn rule_schedule(
    src: &Source<'_>,
    i: usize,
    r: &RawRule,
) -> Result<Option<schedule::Schedule>, ConfigError> {
    if r.hours.is_none() && r.days.is_empty() {
        return Ok(None);
    }
    let (from, to) = match &r.hours {
        None => (0, 1440),
        Some(h) => schedule::parse_hours(h.get_ref()).ok_or_else(|| {
            src.error(
                Some(h.span()),
                format!("rules[{i}].hours"),
                "hours like \"08:00-19:00\" (\"22:00-06:00\" spans midnight)",
            )
        })?,
    };
    let mut days = 0;
    for (j, d) in r.days.iter().enumerate() {
        days |= schedule::parse_day(d.get_ref()).ok_or_else(|| {
            src.error(
                Some(d.span()),
                format!("rules[{i}].days[{j}]"),
                "a day: mon, tue, wed, thu, fri, sat or sun",
            )
        })?;
    }
    Ok(Some(schedule::Schedule {
        days: if days == 0 { schedule::ALL_DAYS } else { days },
        from,
        to,
    }))
}

/// A Sekisho group name as the directory accepts it (letters, digits, `-`, `_`, `.`).
fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The time policy tests and `explain` with assumed posture are evaluated at: every rule
/// applies whatever its `hours` and `days` (a test checks what a rule allows, not when), and
/// the assumed sign-in is fresh.
pub const ANY_TIME: u64 = u64::MAX;

/// What a rule scan found: the allowing rule, and an allow rule that matched but not at this
/// time (the denial then says so).
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    allow: Option<(RuleId, AppId)>,
    outside: Option<(RuleId, AppId)>,
}

/// The checked `[identity]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityMapping {
    /// Provider group → Sekisho group.
    pub groups: BTreeMap<String, String>,
    /// Provider group → admin role.
    pub admin_roles: BTreeMap<String, crate::roles::Role>,
}

impl IdentityMapping {
    /// The Sekisho groups a user in the provider's `claimed` groups belongs to, and the
    /// groups the mapping governs (membership in those follows the claim; others are left
    /// alone: they are managed by admins or SCIM).
    pub fn map_groups(&self, claimed: &[String]) -> (Vec<String>, Vec<String>) {
        let mut member: Vec<String> = claimed
            .iter()
            .filter_map(|c| self.groups.get(c).cloned())
            .collect();
        member.sort();
        member.dedup();
        let mut governed: Vec<String> = self.groups.values().cloned().collect();
        governed.sort();
        governed.dedup();
        (member, governed)
    }

    /// The strongest admin role the provider's `claimed` groups grant, if any.
    pub fn admin_role(&self, claimed: &[String]) -> Option<crate::roles::Role> {
        claimed
            .iter()
            .filter_map(|c| self.admin_roles.get(c).copied())
            .max_by_key(|r| r.rank())
    }
}

/// Kinds of device posture checks.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// `version`: the OS release (os-release VERSION_ID) is at least this.
    MinOsVersion,
    /// `version`: the kernel release is at least this.
    MinKernelVersion,
    /// The root file system is on an encrypted device.
    DiskEncryption,
    /// A host firewall ruleset is loaded.
    FirewallActive,
    /// The session locks itself when idle.
    ScreenLock,
    /// `process`: a process of this name runs (an EDR agent, say).
    ProcessRunning,
    /// `version`: the Sekisho client is at least this version.
    MinClientVersion,
    /// `gateway_mac` and/or `dns_suffix`: the device is on a trusted network, by the MAC
    /// address of its default gateway or by the network's DNS search domain.
    TrustedNetwork,
}

impl CheckKind {
    fn parameter(self) -> Option<&'static str> {
        match self {
            CheckKind::MinOsVersion | CheckKind::MinKernelVersion | CheckKind::MinClientVersion => {
                Some("version")
            }
            CheckKind::ProcessRunning => Some("process"),
            // (TrustedNetwork takes two lists, one at least: checked on their own.)
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    disabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Spanned<String>,
    user: Spanned<String>,
    public_key: Spanned<String>,
    address: Spanned<IpAddr>,
    #[serde(default)]
    class: Option<Spanned<DeviceClass>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Spanned<String>,
    site: Spanned<String>,
    #[serde(default)]
    addresses: Option<Spanned<Vec<Spanned<String>>>>,
    /// Host names (`wiki.corp.example`) or wildcards (`*.corp.example`): clients get synthetic
    /// addresses for them and the connector resolves the real name on its site.
    #[serde(default)]
    names: Option<Spanned<Vec<Spanned<String>>>>,
    protocols: Spanned<Vec<Spanned<Protocol>>>,
    #[serde(default)]
    ports: Vec<Spanned<RawPort>>,
    /// 1 (low) to 3 (high): which posture checks a flow to it needs (see `[sensitivity]`).
    #[serde(default)]
    sensitivity: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    /// The protocol of an IP protocol number (ICMP and ICMPv6 are both `Icmp`).
    pub fn of(ip_proto: u8) -> Option<Protocol> {
        match ip_proto {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            PROTO_ICMP | PROTO_ICMPV6 => Some(Protocol::Icmp),
            _ => None,
        }
    }

    /// The IP protocol number of this protocol towards an address of this family.
    pub fn number(self, ipv4: bool) -> u8 {
        match (self, ipv4) {
            (Protocol::Tcp, _) => PROTO_TCP,
            (Protocol::Udp, _) => PROTO_UDP,
            (Protocol::Icmp, true) => PROTO_ICMP,
            (Protocol::Icmp, false) => PROTO_ICMPV6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

/// Reads a destination as policy tests and `explain` write it: `ADDRESS:PORT`, or `ADDRESS`
/// for ICMP.
pub fn parse_destination(text: &str, protocol: Protocol) -> Option<(IpAddr, u16)> {
    let text = text.trim();
    match protocol {
        Protocol::Icmp => text.parse::<IpAddr>().ok().map(|a| (a, 0)),
        _ => text
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|s| (s.ip(), s.port())),
    }
}

/// The flow a what-if question is about (policy tests, `explain`): any device address (the
/// source does not take part in decisions) to `dst`.
pub fn probe_flow(protocol: Protocol, dst: IpAddr, dport: u16) -> FlowKey {
    let src = if dst.is_ipv4() {
        IpAddr::from([0, 0, 0, 0])
    } else {
        IpAddr::from([0u16; 8])
    };
    FlowKey {
        proto: protocol.number(dst.is_ipv4()),
        src,
        dst,
        sport: 40000,
        dport,
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    action: Action,
    #[serde(default)]
    users: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    applications: Spanned<Vec<Spanned<String>>>,
    /// "08:00-19:00": the rule applies only then (the policy's `utc_offset`).
    #[serde(default)]
    hours: Option<Spanned<String>>,
    /// ["mon", "tue", ...]: the rule applies only on these days.
    #[serde(default)]
    days: Vec<Spanned<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

pub type UserId = u32;
pub type GroupId = u32;
pub type DeviceId = u32;
pub type SiteId = u32;
pub type AppId = u32;
pub type RuleId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<GroupId>,
    pub disabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub user: UserId,
    pub public_key: PublicKeyBytes,
    pub address: IpAddr,
    pub class: DeviceClass,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub name: String,
    pub site: SiteId,
    pub networks: Vec<IpNet>,
    /// Name patterns (lower case; `*.zone` for wildcards).
    pub names: Vec<String>,
    pub protocols: Vec<Protocol>,
    /// Inclusive port ranges; empty means every port.
    pub ports: Vec<(u16, u16)>,
    /// 1 to 3.
    pub sensitivity: u8,
}

pub type CheckId = u32;

/// A posture check as the policy declares it; the client evaluates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostureCheck {
    pub name: String,
    pub kind: CheckKind,
    pub version: Option<String>,
    pub process: Option<String>,
    /// `trusted_network`: gateway MAC addresses, lowercase with colons.
    pub gateway_mac: Vec<String>,
    /// `trusted_network`: DNS suffixes, lowercase without a trailing dot.
    pub dns_suffix: Vec<String>,
}

impl Application {
    pub fn matches(&self, key: &FlowKey) -> bool {
        self.matches_target(key, false)
    }

    /// Like [`Application::matches`]; `named` says the destination is a synthetic address
    /// standing for one of this application's names.
    fn matches_target(&self, key: &FlowKey, named: bool) -> bool {
        let Some(proto) = Protocol::of(key.proto) else {
            return false;
        };
        if !self.protocols.contains(&proto) {
            return false;
        }
        if !named && !self.networks.iter().any(|n| n.contains(&key.dst)) {
            return false;
        }
        proto == Protocol::Icmp
            || self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&key.dport))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub users: Vec<UserId>,
    pub groups: Vec<GroupId>,
    pub applications: Vec<AppId>,
    /// When it applies (always without).
    pub when: Option<schedule::Schedule>,
}

/// What is known about a device when one of its flows is decided, besides the policy.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Its verified posture (None: no valid token).
    pub posture: Option<&'a PostureClaims>,
    /// Its risk now (the risk engine's level for its user and itself).
    pub risk: crate::risk::Level,
    /// Its class; [`Policy::evaluate`] takes it from the policy's device.
    pub class: DeviceClass,
    /// Unix seconds (rule hours and the age of the sign-in count), or [`ANY_TIME`].
    pub now: u64,
}

impl<'a> Facts<'a> {
    /// A device with `posture` at `now`, at low risk.
    pub fn new(posture: Option<&'a PostureClaims>, now: u64) -> Facts<'a> {
        Facts {
            posture,
            risk: crate::risk::Level::Low,
            class: DeviceClass::Managed,
            now,
        }
    }

    pub fn at_risk(self, risk: crate::risk::Level) -> Facts<'a> {
        Facts { risk, ..self }
    }
}

/// A checked policy, ready for evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub device_range: IpNet,
    pub groups: Vec<String>,
    pub users: Vec<User>,
    pub devices: Vec<Device>,
    pub sites: Vec<String>,
    pub applications: Vec<Application>,
    pub rules: Vec<Rule>,
    pub posture_checks: Vec<PostureCheck>,
    /// Checks required by sensitivity level 1, 2, 3.
    pub levels: [Vec<CheckId>; 3],
    /// The longest a user's sign-in through the identity provider may date back, in seconds,
    /// for applications of sensitivity level 1, 2, 3 (`[sensitivity.sign_in_max_age]`).
    pub sign_in_max_age: [Option<u64>; 3],
    /// Identity-provider groups and what they become here (`[identity]`).
    pub identity: IdentityMapping,
    /// What risk each sensitivity level tolerates (`[risk]`).
    pub risk: risk::RiskPolicy,
    /// The highest sensitivity level each class of device may use (`[device_classes]`).
    pub classes: risk::ClassLevels,
    /// The policy's time zone: seconds east of UTC.
    pub utc_offset: i64,
    pub tests: Vec<PolicyTest>,
    pub dns: DnsPolicy,
    pub tunnels: Vec<TunnelRule>,
    device_by_key: HashMap<PublicKeyBytes, DeviceId>,
    /// Rules and destinations compiled for the decision of new flows.
    index: index::PolicyIndex,
}

/// Why a flow was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A rule decided.
    Rule(RuleId),
    /// No allow rule covers this user and a matching application.
    DefaultDeny,
    /// The user is disabled in the policy.
    UserDisabled,
    /// The device is not (or no longer) in the policy.
    UnknownDevice,
    /// A rule allows it, but the application's sensitivity needs posture checks and the device
    /// has no valid posture token.
    NoPosture,
    /// A rule allows it, but this required posture check fails.
    PostureCheck(CheckId),
    /// An allow rule would have let it through, but not at this time (its `hours`, `days`).
    OutsideHours(RuleId),
    /// A rule allows it, but the application's sensitivity level wants a more recent sign-in
    /// through the identity provider than the device's (or the device never signed in).
    SignInTooOld,
    /// A rule allows it, but devices of this class may not use the application's sensitivity
    /// level (`[device_classes]`).
    DeviceClass(DeviceClass),
    /// A rule allows it, but the device's risk is above what the application's sensitivity
    /// level tolerates, and `[risk]` says deny.
    RiskTooHigh(crate::risk::Level),
    /// No application: internet egress for a full-tunnel user, by this `[[tunnels]]` entry.
    Egress(u32),
    /// No application, and the broker does not carry this to the internet.
    EgressRefused(crate::tunnel::EgressRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The application the deciding rule refers to, or the first application the flow matches.
    pub application: Option<AppId>,
    pub reason: Reason,
    /// Allowed although the device's risk is above what the application's sensitivity level
    /// tolerates (`[risk] levelN.above = "log"`): its records carry the full detail.
    pub risk_logged: bool,
}

impl Decision {
    /// A denial naming `application` (when known) and why.
    pub fn deny(application: Option<AppId>, reason: Reason) -> Decision {
        Decision {
            action: Action::Deny,
            application,
            reason,
            risk_logged: false,
        }
    }

    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

impl Policy {
    /// Loads and checks a policy file.
    pub fn load(path: &Path) -> Result<Policy, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read policy: {e}"),
        })?;
        Policy::parse(path, &text)
    }

    /// Checks only what can be checked without the control plane's directory: TOML syntax and
    /// the type of every field (errors name the file, line and field). Names of users and
    /// groups the directory holds are resolved where the policy is applied.
    pub fn check_syntax(path: &Path, text: &str) -> Result<(), ConfigError> {
        parse_toml::<RawPolicy>(path, text).map(|_| ())
    }

    /// Parses and checks policy text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Policy, ConfigError> {
        Policy::parse_with(path, text, &Directory::default())
    }

    /// Parses policy text merged with the control plane's directory. A user or device defined
    /// both in the file and in the directory is an error naming both places.
    pub fn parse_with(path: &Path, text: &str, dir: &Directory) -> Result<Policy, ConfigError> {
        let mut raw: RawPolicy = parse_toml(path, text)?;
        let src = Source { file: path, text };
        let here = |name: &str| Spanned::new(0..0, name.to_string());
        for g in &dir.groups {
            if !raw.groups.iter().any(|r| r.name.get_ref() == g) {
                raw.groups.push(RawGroup {
                    name: here(g),
                    description: String::new(),
                });
            }
        }
        for u in &dir.users {
            if let Some(r) = raw.users.iter().find(|r| r.name.get_ref() == &u.name) {
                return Err(src.error(
                    Some(r.name.span()),
                    "users",
                    format!(
                        "user {:?} is defined in this file and in the control plane's directory; keep one",
                        u.name
                    ),
                ));
            }
            raw.users.push(RawUser {
                name: here(&u.name),
                groups: u.groups.iter().map(|g| here(g)).collect(),
                disabled: u.disabled,
            });
        }
        for d in &dir.devices {
            if let Some(r) = raw.devices.iter().find(|r| r.name.get_ref() == &d.name) {
                return Err(src.error(
                    Some(r.name.span()),
                    "devices",
                    format!(
                        "device {:?} is defined in this file and enrolled in the control plane; keep one",
                        d.name
                    ),
                ));
            }
            raw.devices.push(RawDevice {
                name: here(&d.name),
                user: here(&d.user),
                public_key: here(&d.public_key),
                address: Spanned::new(0..0, d.address),
                class: Some(Spanned::new(0..0, d.class)),
            });
        }
        compile(&src, raw)
    }

    /// Like [`Policy::parse_with`], but a directory entry that clashes with the text's own
    /// users and devices (a user of the same name; a device of the same name, key or address),
    /// or a device whose user is missing, is left out instead of failing the whole merge: one
    /// bad directory entry must not stop later changes (revocations above all) from taking
    /// effect. Returns the policy and what was left out, described.
    pub fn parse_with_lenient(
        path: &Path,
        text: &str,
        dir: &Directory,
    ) -> Result<(Policy, Vec<String>), ConfigError> {
        let raw: RawPolicy = parse_toml(path, text)?;
        let mut left_out = Vec::new();
        let mut kept = Directory {
            groups: dir.groups.clone(),
            users: Vec::new(),
            devices: Vec::new(),
        };
        let mut clashing_users = Vec::new();
        for u in &dir.users {
            if raw.users.iter().any(|r| r.name.get_ref() == &u.name) {
                left_out.push(format!(
                    "directory user {:?}: also defined in the policy file",
                    u.name
                ));
                clashing_users.push(u.name.clone());
            } else {
                kept.users.push(u.clone());
            }
        }
        // A directory device of a left-out user is left out too: it must not become a device
        // of the file's user of that name (other groups, never disabled by the directory).
        let user_known = |name: &str| {
            !clashing_users.iter().any(|c| c == name)
                && (raw.users.iter().any(|r| r.name.get_ref() == name)
                    || kept.users.iter().any(|u| u.name == name))
        };
        for d in &dir.devices {
            let clash = raw.devices.iter().find(|r| {
                r.name.get_ref() == &d.name
                    || r.public_key.get_ref().trim() == d.public_key.trim()
                    || *r.address.get_ref() == d.address
            });
            let twin = kept.devices.iter().find(|k| {
                k.name == d.name || k.public_key == d.public_key || k.address == d.address
            });
            if let Some(r) = clash {
                left_out.push(format!(
                    "directory device {:?}: its name, key or address is also device {:?} of the policy file",
                    d.name,
                    r.name.get_ref()
                ));
            } else if let Some(k) = twin {
                left_out.push(format!(
                    "directory device {:?}: its name, key or address is also directory device {:?}",
                    d.name, k.name
                ));
            } else if !user_known(&d.user) {
                left_out.push(format!(
                    "directory device {:?}: its user {:?} is not in the policy",
                    d.name, d.user
                ));
            } else {
                kept.devices.push(d.clone());
            }
        }
        Ok((Policy::parse_with(path, text, &kept)?, left_out))
    }

    pub fn user_by_name(&self, name: &str) -> Option<UserId> {
        self.users
            .iter()
            .position(|u| u.name == name)
            .map(|u| u as UserId)
    }

    pub fn check_by_name(&self, name: &str) -> Option<CheckId> {
        self.posture_checks
            .iter()
            .position(|c| c.name == name)
            .map(|c| c as CheckId)
    }

    /// The networks of the applications some allow rule opens to `user`: the split-tunnel
    /// routes of the user's devices.
    pub fn networks_for_user(&self, user: UserId) -> Vec<IpNet> {
        let mut nets: Vec<IpNet> = self
            .rules
            .iter()
            .filter(|r| r.action == Action::Allow && self.subject_matches(r, user))
            .flat_map(|r| r.applications.iter())
            .flat_map(|&a| self.applications[a as usize].networks.iter().copied())
            .collect();
        if self
            .applications
            .iter()
            .enumerate()
            .any(|(a, app)| !app.names.is_empty() && self.user_may_use(user, a as AppId))
        {
            nets.push(IpNet::V4(self.dns.app_range));
        }
        nets.sort();
        nets.dedup();
        nets
    }

    /// Claims of a device of `user` whose checks all pass except `failing` (for policy tests and
    /// `explain`).
    pub fn assumed_posture(&self, user: UserId, failing: &[String]) -> PostureClaims {
        let u = &self.users[user as usize];
        PostureClaims {
            device: String::new(),
            device_key: String::new(),
            user: u.name.clone(),
            groups: u
                .groups
                .iter()
                .map(|&g| self.groups[g as usize].clone())
                .collect(),
            checks: self
                .posture_checks
                .iter()
                .map(|c| (c.name.clone(), !failing.contains(&c.name)))
                .collect(),
            iat: 0,
            exp: u64::MAX,
            kid: String::new(),
            // A fresh sign-in (policy tests and `explain` are evaluated at [`ANY_TIME`]).
            auth_time: Some(ANY_TIME),
        }
    }

    /// Runs the policy's tests.
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        self.tests
            .iter()
            .map(|t| {
                let Some(user) = self.user_by_name(&t.user) else {
                    return TestOutcome {
                        name: t.name.clone(),
                        passed: false,
                        detail: format!("unknown user {:?}", t.user),
                    };
                };
                let claims = self.assumed_posture(user, &t.failing_checks);
                let d =
                    self.evaluate_user(user, &t.key, &Facts::new(Some(&claims), ANY_TIME), None);
                let rule = self.rule_name(d.reason);
                let mut passed = d.action == t.expect;
                if let Some(want) = &t.rule {
                    passed &= rule == Some(want.as_str());
                }
                let got = match d.action {
                    Action::Allow => "allow",
                    Action::Deny => "deny",
                };
                let detail = format!(
                    "{} -> {} {}: {got} ({}{})",
                    t.user,
                    t.destination,
                    Protocol::of(t.key.proto).map_or("?", Protocol::name),
                    self.reason_text(d.reason),
                    match (rule, self.check_name(d.reason)) {
                        (Some(r), _) => format!(" {r:?}"),
                        (None, Some(c)) => format!(" {c:?}"),
                        _ => String::new(),
                    }
                );
                TestOutcome {
                    name: t.name.clone(),
                    passed,
                    detail,
                }
            })
            .collect()
    }

    pub fn device_by_key(&self, key: &PublicKeyBytes) -> Option<DeviceId> {
        self.device_by_key.get(key).copied()
    }

    pub fn device(&self, id: DeviceId) -> &Device {
        &self.devices[id as usize]
    }

    pub fn user_of(&self, device: DeviceId) -> &User {
        &self.users[self.devices[device as usize].user as usize]
    }

    pub fn app_name(&self, app: Option<AppId>) -> Option<&str> {
        app.map(|a| self.applications[a as usize].name.as_str())
    }

    pub fn rule_name(&self, reason: Reason) -> Option<&str> {
        match reason {
            Reason::Rule(r) | Reason::OutsideHours(r) => Some(self.rules[r as usize].name.as_str()),
            Reason::Egress(t) => Some(self.tunnels[t as usize].settings.name.as_str()),
            _ => None,
        }
    }

    pub fn reason_text(&self, reason: Reason) -> &'static str {
        match reason {
            Reason::Rule(r) => match self.rules[r as usize].action {
                Action::Allow => "allowed by rule",
                Action::Deny => "denied by rule",
            },
            Reason::DefaultDeny => "default deny: no allow rule covers this user and application",
            Reason::UserDisabled => "user disabled",
            Reason::UnknownDevice => "device not in policy",
            Reason::NoPosture => {
                "no valid posture token for an application that requires posture checks"
            }
            Reason::PostureCheck(_) => "posture check failed",
            Reason::SignInTooOld => "sign-in too old",
            Reason::DeviceClass(DeviceClass::Personal) => {
                "personal device: this sensitivity level needs a managed one"
            }
            Reason::DeviceClass(DeviceClass::Managed) => {
                "managed device: this sensitivity level is closed to its class"
            }
            Reason::RiskTooHigh(_) => "risk too high for this application's sensitivity",
            Reason::OutsideHours(_) => "outside the rule's hours",
            Reason::Egress(_) => "internet egress (full tunnel)",
            Reason::EgressRefused(r) => r.text(),
        }
    }

    /// The failing posture check a decision names, if any.
    pub fn check_name(&self, reason: Reason) -> Option<&str> {
        match reason {
            Reason::PostureCheck(c) => Some(self.posture_checks[c as usize].name.as_str()),
            _ => None,
        }
    }

    /// Whether `rule` applies at `now` (its `hours` and `days`, in the policy's time zone);
    /// at [`ANY_TIME`] every rule does.
    fn in_time(&self, rule: &Rule, now: u64) -> bool {
        now == ANY_TIME || rule.when.is_none_or(|w| w.contains(now, self.utc_offset))
    }

    /// Whether a flow to `app` at `now` is refused because the user's last sign-in on this
    /// device is older than the application's sensitivity level allows (or unknown).
    pub fn sign_in_too_old(&self, app: AppId, posture: Option<&PostureClaims>, now: u64) -> bool {
        let level = self.applications[app as usize].sensitivity.clamp(1, 3);
        let Some(max) = self.sign_in_max_age[usize::from(level - 1)] else {
            return false;
        };
        match posture.and_then(|p| p.auth_time) {
            Some(t) => now.saturating_sub(t) > max,
            None => true,
        }
    }

    /// The checks a flow to `app` needs.
    pub fn required_checks(&self, app: AppId) -> &[CheckId] {
        let level = self.applications[app as usize].sensitivity.clamp(1, 3);
        &self.levels[usize::from(level - 1)]
    }

    /// What address-based deny rules forbid `device`, in the connector's allowlist syntax
    /// (`10.20.0.10:5432`, `10.20.0.0/24`): sent with a name translation, so a name that
    /// resolves at the site to a denied address is refused there. Only applications of
    /// `site` count (an address means another host elsewhere). Ports apply to TCP and UDP
    /// alike (stricter than a rule naming one of them); ICMP-only deny rules are left out.
    pub fn site_denials(&self, device: DeviceId, site: SiteId) -> Vec<String> {
        let Some(dev) = self.devices.get(device as usize) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in self.rules.iter().filter(|r| r.action == Action::Deny) {
            if !self.subject_matches(r, dev.user) {
                continue;
            }
            for &a in &r.applications {
                let app = &self.applications[a as usize];
                if app.site != site {
                    continue;
                }
                let transport = app.protocols.is_empty()
                    || app
                        .protocols
                        .iter()
                        .any(|p| matches!(p, Protocol::Tcp | Protocol::Udp));
                if !transport {
                    continue;
                }
                for net in &app.networks {
                    let host = if net.prefix_len() == net.max_prefix_len() {
                        net.addr().to_string()
                    } else {
                        net.to_string()
                    };
                    let host = if net.addr().is_ipv6() && !app.ports.is_empty() {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    if app.ports.is_empty() {
                        out.push(host);
                    } else {
                        let ports: Vec<String> = app
                            .ports
                            .iter()
                            .map(|(lo, hi)| {
                                if lo == hi {
                                    lo.to_string()
                                } else {
                                    format!("{lo}-{hi}")
                                }
                            })
                            .collect();
                        out.push(format!("{host}:{}", ports.join(",")));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn subject_matches(&self, rule: &Rule, user_id: UserId) -> bool {
        let user = &self.users[user_id as usize];
        rule.users.contains(&user_id) || rule.groups.iter().any(|g| user.groups.contains(g))
    }

    fn rule_app(&self, rule: &Rule, key: &FlowKey, named: Option<AppId>) -> Option<AppId> {
        rule.applications.iter().copied().find(|&a| match named {
            Some(n) => a == n && self.applications[a as usize].matches_target(key, true),
            None => self.applications[a as usize].matches(key),
        })
    }

    /// The application a host name belongs to: an exact name wins over wildcards, a longer
    /// wildcard over a shorter one. `name` is lower case without a trailing dot.
    pub fn app_for_name(&self, name: &str) -> Option<AppId> {
        let mut best: Option<(usize, AppId)> = None;
        for (i, app) in self.applications.iter().enumerate() {
            for p in &app.names {
                if crate::dns::name_matches(p, name) {
                    let score = if p.starts_with("*.") {
                        p.len()
                    } else {
                        usize::MAX
                    };
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i as AppId));
                    }
                }
            }
        }
        best.map(|(_, a)| a)
    }

    pub fn app_by_name(&self, name: &str) -> Option<AppId> {
        self.applications
            .iter()
            .position(|a| a.name == name)
            .map(|a| a as AppId)
    }

    /// Whether some allow rule gives `user` the application `app` (posture aside; a failing
    /// check denies the flow later, with its reason) and no deny rule takes all of it away.
    pub fn user_may_use(&self, user: UserId, app: AppId) -> bool {
        if self.users[user as usize].disabled {
            return false;
        }
        let mut allowed = false;
        for r in &self.rules {
            if r.applications.contains(&app) && self.subject_matches(r, user) {
                match r.action {
                    Action::Deny => return false,
                    Action::Allow => allowed = true,
                }
            }
        }
        allowed
    }

    /// The DNS settings of `user`'s clients.
    pub fn dns_for_user(&self, user: UserId) -> UserDns {
        let u = &self.users[user as usize];
        let filters: Vec<&DnsFilterRule> = self
            .dns
            .filters
            .iter()
            .filter(|f| f.groups.is_empty() || f.groups.iter().any(|g| u.groups.contains(g)))
            .collect();
        let categories: Vec<&str> = filters
            .iter()
            .flat_map(|f| f.block.iter().map(String::as_str))
            .collect();
        let mut allowlist = self.dns.allowlist.clone();
        allowlist.extend(filters.iter().flat_map(|f| f.allow.iter().cloned()));
        allowlist.sort();
        allowlist.dedup();
        let mut zones: Vec<String> = self
            .applications
            .iter()
            .flat_map(|a| a.names.iter().map(|p| crate::dns::private_zone(p)))
            .collect();
        zones.sort();
        zones.dedup();
        UserDns {
            private_zones: zones,
            blocklists: self
                .dns
                .blocklists
                .iter()
                .filter(|l| categories.contains(&l.category.as_str()))
                .map(|l| l.name.clone())
                .collect(),
            allowlist,
            block_answer: filters
                .iter()
                .find_map(|f| f.block_answer.clone())
                .unwrap_or_else(|| self.dns.block_answer.clone())
                .to_string(),
            upstreams: self.dns.upstreams.clone(),
            refresh_secs: self.dns.refresh_secs,
        }
    }

    /// Decides a flow of `user` to a synthetic address that stands for a name of `app`.
    pub fn evaluate_named(
        &self,
        device: DeviceId,
        key: &FlowKey,
        facts: &Facts<'_>,
        app: AppId,
    ) -> Decision {
        let Some(dev) = self.devices.get(device as usize) else {
            return Decision::deny(None, Reason::UnknownDevice);
        };
        let facts = Facts {
            class: dev.class,
            ..*facts
        };
        self.decide(dev.user, key, &facts, Some(app))
    }

    /// Decides a new flow from `device` given what is known about it now ([`Facts`]: its
    /// verified posture, its risk, the time). The device's class comes from the policy. Pure:
    /// same policy and inputs, same answer.
    pub fn evaluate(&self, device: DeviceId, key: &FlowKey, facts: &Facts<'_>) -> Decision {
        let Some(dev) = self.devices.get(device as usize) else {
            return Decision::deny(None, Reason::UnknownDevice);
        };
        let facts = Facts {
            class: dev.class,
            ..*facts
        };
        self.decide(dev.user, key, &facts, None)
    }

    /// Decides a flow of `user_id` on a device of `facts.class` (see [`Policy::evaluate`]);
    /// with `app`, a flow to a name of that application (as [`Policy::evaluate_named`]).
    pub fn evaluate_user(
        &self,
        user_id: UserId,
        key: &FlowKey,
        facts: &Facts<'_>,
        app: Option<AppId>,
    ) -> Decision {
        self.decide(user_id, key, facts, app)
    }

    /// The straightforward evaluation: every rule in order. The reference the compiled
    /// evaluation ([`Policy::decide`]) is held against in the property test and the benchmark.
    pub fn decide_scan(
        &self,
        user_id: UserId,
        key: &FlowKey,
        facts: &Facts<'_>,
        named: Option<AppId>,
    ) -> Decision {
        let now = facts.now;
        if self.users[user_id as usize].disabled {
            return Decision {
                action: Action::Deny,
                application: None,
                reason: Reason::UserDisabled,
                risk_logged: false,
            };
        }
        let mut found = Found::default();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.action == Action::Allow && found.allow.is_some() {
                continue;
            }
            if !self.subject_matches(rule, user_id) {
                continue;
            }
            if let Some(app) = self.rule_app(rule, key, named) {
                if !self.in_time(rule, now) {
                    if rule.action == Action::Allow {
                        found.outside.get_or_insert((i as RuleId, app));
                    }
                    continue;
                }
                match rule.action {
                    Action::Deny => {
                        return Decision {
                            action: Action::Deny,
                            application: Some(app),
                            reason: Reason::Rule(i as RuleId),
                            risk_logged: false,
                        };
                    }
                    Action::Allow => found.allow = Some((i as RuleId, app)),
                }
            }
        }
        let first_app = self
            .applications
            .iter()
            .position(|a| a.matches(key))
            .map(|a| a as AppId);
        self.conclude(user_id, key, facts, found, named.or(first_app))
    }

    /// Decides a flow through the compiled index: only the rules that name an application the
    /// flow matches are looked at, in rule order. Same answers as [`Policy::decide_scan`].
    fn decide(
        &self,
        user_id: UserId,
        key: &FlowKey,
        facts: &Facts<'_>,
        named: Option<AppId>,
    ) -> Decision {
        let now = facts.now;
        if self.users[user_id as usize].disabled {
            return Decision {
                action: Action::Deny,
                application: None,
                reason: Reason::UserDisabled,
                risk_logged: false,
            };
        }
        let mut apps: Vec<AppId> = Vec::new();
        match named {
            Some(n) => {
                if self.applications[n as usize].matches_target(key, true) {
                    apps.push(n);
                }
            }
            None => index::matching_apps(&self.index, &self.applications, key, &mut apps),
        }
        let mut rules: Vec<RuleId> = Vec::new();
        self.index.rules_naming(&apps, &mut rules);
        let mut found = Found::default();
        for &r in &rules {
            let rule = &self.rules[r as usize];
            if rule.action == Action::Allow && found.allow.is_some() {
                continue;
            }
            if !self.subject_matches(rule, user_id) {
                continue;
            }
            // The rule's first application (in its own order) that the flow matches.
            let Some(app) = rule
                .applications
                .iter()
                .copied()
                .find(|a| apps.binary_search(a).is_ok())
            else {
                continue;
            };
            if !self.in_time(rule, now) {
                if rule.action == Action::Allow {
                    found.outside.get_or_insert((r, app));
                }
                continue;
            }
            match rule.action {
                Action::Deny => {
                    return Decision {
                        action: Action::Deny,
                        application: Some(app),
                        reason: Reason::Rule(r),
                        risk_logged: false,
                    };
                }
                Action::Allow => found.allow = Some((r, app)),
            }
        }
        self.conclude(user_id, key, facts, found, named.or(apps.first().copied()))
    }

    /// The end of a decision: the allowing rule (if any) against the posture, else default
    /// deny or, for a full-tunnel user and no application, the internet.
    fn conclude(
        &self,
        user_id: UserId,
        key: &FlowKey,
        facts: &Facts<'_>,
        found: Found,
        // The application a denial names: the one a synthetic address stands for, else the
        // first the flow matches.
        application: Option<AppId>,
    ) -> Decision {
        if found.allow.is_none()
            && let Some((rule, app)) = found.outside
        {
            return Decision::deny(Some(app), Reason::OutsideHours(rule));
        }
        match found.allow {
            Some((rule, app)) => {
                let posture = facts.posture;
                let required = self.required_checks(app);
                let failing = match posture {
                    None if !required.is_empty() => Some(Reason::NoPosture),
                    None => None,
                    Some(p) => required
                        .iter()
                        .find(|&&c| !p.passes(&self.posture_checks[c as usize].name))
                        .map(|&c| Reason::PostureCheck(c)),
                };
                let level = self.applications[app as usize].sensitivity.clamp(1, 3);
                let failing = failing
                    .or_else(|| {
                        self.sign_in_too_old(app, posture, facts.now)
                            .then_some(Reason::SignInTooOld)
                    })
                    .or_else(|| {
                        (level > self.classes.highest(facts.class))
                            .then_some(Reason::DeviceClass(facts.class))
                    });
                let response = self.risk.response(level, facts.risk);
                match (failing, response) {
                    (Some(reason), _) => Decision::deny(Some(app), reason),
                    (None, Some(risk::Response::Deny)) => {
                        Decision::deny(Some(app), Reason::RiskTooHigh(facts.risk))
                    }
                    (None, response) => Decision {
                        action: Action::Allow,
                        application: Some(app),
                        reason: Reason::Rule(rule),
                        risk_logged: response == Some(risk::Response::Log),
                    },
                }
            }
            None => {
                // Not an application at all: the internet, for a full-tunnel user.
                if application.is_none()
                    && let Some(t) = self.tunnel_rule_for_user(user_id)
                    && self.tunnels[t as usize].settings.mode == crate::tunnel::TunnelMode::Full
                    && !self.device_range.contains(&key.dst)
                    && !IpNet::V4(self.dns.app_range).contains(&key.dst)
                {
                    return match crate::tunnel::egress_check(key, &self.dns.upstream_addrs) {
                        Ok(()) => Decision {
                            action: Action::Allow,
                            application: None,
                            reason: Reason::Egress(t),
                            risk_logged: false,
                        },
                        Err(r) => Decision {
                            action: Action::Deny,
                            application: None,
                            reason: Reason::EgressRefused(r),
                            risk_logged: false,
                        },
                    };
                }
                Decision::deny(application, Reason::DefaultDeny)
            }
        }
    }

    /// The `[[tunnels]]` entry for `user`: the first naming one of their groups, or one
    /// without groups.
    fn tunnel_rule_for_user(&self, user: UserId) -> Option<u32> {
        let u = &self.users[user as usize];
        self.tunnels
            .iter()
            .position(|t| t.groups.is_empty() || t.groups.iter().any(|g| u.groups.contains(g)))
            .map(|t| t as u32)
    }

    /// The tunnel settings of `user`'s devices (defaults: split tunnel, no lock).
    pub fn tunnel_for_user(&self, user: UserId) -> crate::tunnel::UserTunnel {
        self.tunnel_rule_for_user(user)
            .map(|t| self.tunnels[t as usize].settings.clone())
            .unwrap_or_default()
    }
}

fn parse_port(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let p = text.trim().parse().ok()?;
            (p, p)
        }
    };
    (lo <= hi && lo > 0).then_some((lo, hi))
}

/// Looks names up in a list, reporting unknown and duplicate names with their place.
struct Names<'a> {
    kind: &'static str,
    index: HashMap<&'a str, u32>,
}

impl<'a> Names<'a> {
    fn build(
        src: &Source,
        kind: &'static str,
        section: &str,
        names: impl Iterator<Item = &'a Spanned<String>>,
    ) -> Result<Self, ConfigError> {
        let mut index = HashMap::new();
        for (i, name) in names.enumerate() {
            let field = format!("{section}[{i}].name");
            if name.get_ref().trim().is_empty() {
                return Err(src.error(Some(name.span()), field, format!("{kind} name is empty")));
            }
            if index.insert(name.get_ref().as_str(), i as u32).is_some() {
                return Err(src.error(
                    Some(name.span()),
                    field,
                    format!("duplicate {kind} name {:?}", name.get_ref()),
                ));
            }
        }
        Ok(Names { kind, index })
    }

    fn get(&self, src: &Source, field: String, name: &Spanned<String>) -> Result<u32, ConfigError> {
        self.index
            .get(name.get_ref().as_str())
            .copied()
            .ok_or_else(|| {
                let mut known: Vec<&str> = self.index.keys().copied().collect();
                known.sort_unstable();
                src.error(
                    Some(name.span()),
                    field,
                    format!(
                        "unknown {} {:?} (known: {})",
                        self.kind,
                        name.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })
    }

    fn get_all(
        &self,
        src: &Source,
        field: &str,
        names: &[Spanned<String>],
    ) -> Result<Vec<u32>, ConfigError> {
        names
            .iter()
            .enumerate()
            .map(|(j, n)| self.get(src, format!("{field}[{j}]"), n))
            .collect()
    }
}

fn compile(src: &Source, raw: RawPolicy) -> Result<Policy, ConfigError> {
    let device_range = match &raw.device_range {
        Some(r) => *r.get_ref(),
        None => DEFAULT_DEVICE_RANGE
            .parse()
            .map_err(|_| src.error(None, "device_range", "bad default"))?,
    };
    let groups = Names::build(src, "group", "groups", raw.groups.iter().map(|g| &g.name))?;
    let users_n = Names::build(src, "user", "users", raw.users.iter().map(|u| &u.name))?;
    Names::build(
        src,
        "device",
        "devices",
        raw.devices.iter().map(|d| &d.name),
    )?;
    let sites = Names::build(src, "site", "sites", raw.sites.iter().map(|s| &s.name))?;
    let apps_n = Names::build(
        src,
        "application",
        "applications",
        raw.applications.iter().map(|a| &a.name),
    )?;
    Names::build(src, "rule", "rules", raw.rules.iter().map(|r| &r.name))?;

    let users = raw
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            Ok(User {
                name: u.name.get_ref().clone(),
                groups: groups.get_all(src, &format!("users[{i}].groups"), &u.groups)?,
                disabled: u.disabled,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;

    let mut devices = Vec::new();
    let mut device_by_key = HashMap::new();
    let mut addresses: HashMap<IpAddr, usize> = HashMap::new();
    for (i, d) in raw.devices.iter().enumerate() {
        let user = users_n.get(src, format!("devices[{i}].user"), &d.user)?;
        let public_key = PublicKeyBytes::parse(d.public_key.get_ref()).map_err(|e| {
            src.error(
                Some(d.public_key.span()),
                format!("devices[{i}].public_key"),
                e.to_string(),
            )
        })?;
        let address = *d.address.get_ref();
        let addr_field = format!("devices[{i}].address");
        if !device_range.contains(&address) {
            return Err(src.error(
                Some(d.address.span()),
                addr_field,
                format!("address {address} is outside the device range {device_range}"),
            ));
        }
        if address == crate::posture::service_address(&device_range) {
            return Err(src.error(
                Some(d.address.span()),
                addr_field,
                format!("address {address} is reserved for the broker (the device range's first address)"),
            ));
        }
        if let Some(other) = addresses.insert(address, i) {
            return Err(src.error(
                Some(d.address.span()),
                addr_field,
                format!(
                    "address {address} is already used by device {:?}",
                    raw.devices[other].name.get_ref()
                ),
            ));
        }
        if device_by_key.insert(public_key, i as DeviceId).is_some() {
            return Err(src.error(
                Some(d.public_key.span()),
                format!("devices[{i}].public_key"),
                "public key is already used by another device",
            ));
        }
        devices.push(Device {
            name: d.name.get_ref().clone(),
            user,
            public_key,
            address,
            class: d.class.as_ref().map(|c| *c.get_ref()).unwrap_or_default(),
        });
    }

    let mut applications = Vec::new();
    for (i, a) in raw.applications.iter().enumerate() {
        let f = |name: &str| format!("applications[{i}].{name}");
        let site = sites.get(src, f("site"), &a.site)?;
        let no_addresses: Vec<Spanned<String>> = Vec::new();
        let address_list = a.addresses.as_ref().map_or(&no_addresses, |v| v.get_ref());
        let name_list = a.names.as_ref().map_or(&no_addresses, |v| v.get_ref());
        if address_list.is_empty() && name_list.is_empty() {
            let span = a
                .addresses
                .as_ref()
                .map(|v| v.span())
                .or(a.names.as_ref().map(|v| v.span()))
                .unwrap_or(a.name.span());
            return Err(src.error(
                Some(span),
                f("addresses"),
                "an application needs at least one address or name",
            ));
        }
        let mut names = Vec::new();
        for (j, n) in name_list.iter().enumerate() {
            names.push(crate::dns::normalize_pattern(n.get_ref()).map_err(|e| {
                src.error(Some(n.span()), format!("applications[{i}].names[{j}]"), e)
            })?);
        }
        let mut networks = Vec::new();
        for (j, addr) in address_list.iter().enumerate() {
            let text = addr.get_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    src.error(
                        Some(addr.span()),
                        format!("applications[{i}].addresses[{j}]"),
                        format!("{text:?} is not an address or CIDR (like \"10.20.0.10\" or \"10.20.0.0/24\")"),
                    )
                })?;
            if net.contains(&device_range.network()) || device_range.contains(&net.network()) {
                return Err(src.error(
                    Some(addr.span()),
                    format!("applications[{i}].addresses[{j}]"),
                    format!("{net} overlaps the device range {device_range}"),
                ));
            }
            networks.push(net.trunc());
        }
        if a.protocols.get_ref().is_empty() {
            return Err(src.error(
                Some(a.protocols.span()),
                f("protocols"),
                "list at least one of \"tcp\", \"udp\", \"icmp\"",
            ));
        }
        let mut ports = Vec::new();
        for (j, p) in a.ports.iter().enumerate() {
            let parsed = match p.get_ref() {
                RawPort::Number(n) => u16::try_from(*n).ok().filter(|&n| n > 0).map(|n| (n, n)),
                RawPort::Text(t) => parse_port(t),
            };
            ports.push(parsed.ok_or_else(|| {
                src.error(
                    Some(p.span()),
                    format!("applications[{i}].ports[{j}]"),
                    "a port is a number 1-65535 or a range like \"8000-8100\"",
                )
            })?);
        }
        let sensitivity = match &a.sensitivity {
            None => 1,
            Some(v) => u8::try_from(*v.get_ref())
                .ok()
                .filter(|l| (1..=3).contains(l))
                .ok_or_else(|| {
                    src.error(Some(v.span()), f("sensitivity"), "sensitivity is 1, 2 or 3")
                })?,
        };
        applications.push(Application {
            name: a.name.get_ref().clone(),
            site,
            networks,
            names,
            protocols: a.protocols.get_ref().iter().map(|p| *p.get_ref()).collect(),
            ports,
            sensitivity,
        });
    }

    let mut rules = Vec::new();
    for (i, r) in raw.rules.iter().enumerate() {
        if r.users.is_empty() && r.groups.is_empty() {
            return Err(src.error(
                Some(r.name.span()),
                format!("rules[{i}]"),
                "a rule must name at least one user or group",
            ));
        }
        if r.applications.get_ref().is_empty() {
            return Err(src.error(
                Some(r.applications.span()),
                format!("rules[{i}].applications"),
                "a rule must name at least one application",
            ));
        }
        rules.push(Rule {
            name: r.name.get_ref().clone(),
            action: r.action,
            users: users_n.get_all(src, &format!("rules[{i}].users"), &r.users)?,
            groups: groups.get_all(src, &format!("rules[{i}].groups"), &r.groups)?,
            applications: apps_n.get_all(
                src,
                &format!("rules[{i}].applications"),
                r.applications.get_ref(),
            )?,
            when: rule_schedule(src, i, r)?,
        });
    }

    let checks_n = Names::build(
        src,
        "posture check",
        "posture_checks",
        raw.posture_checks.iter().map(|c| &c.name),
    )?;
    let mut posture_checks = Vec::new();
    for (i, c) in raw.posture_checks.iter().enumerate() {
        let field = |n: &str| format!("posture_checks[{i}].{n}");
        let (version, process) = (c.version.as_ref(), c.process.as_ref());
        match c.kind.parameter() {
            Some("version") => match version {
                Some(v) if crate::posture::parse_version(v.get_ref()).is_some() => {}
                Some(v) => {
                    return Err(src.error(
                        Some(v.span()),
                        field("version"),
                        "a version is dotted numbers, like \"5.10\"",
                    ));
                }
                None => {
                    return Err(src.error(
                        Some(c.name.span()),
                        field("version"),
                        "this kind of check needs `version`",
                    ));
                }
            },
            Some(_) if process.is_none_or(|p| p.get_ref().trim().is_empty()) => {
                return Err(src.error(
                    Some(c.name.span()),
                    field("process"),
                    "this kind of check needs `process`",
                ));
            }
            _ => {}
        }
        // `trusted_network` takes `gateway_mac` and/or `dns_suffix`; other kinds neither.
        type List = Option<Spanned<Vec<Spanned<String>>>>;
        let list = |l: &List, name: &str, normalize: fn(&str) -> Result<String, String>| {
            let Some(l) = l else {
                return Ok(Vec::new());
            };
            if c.kind != CheckKind::TrustedNetwork {
                return Err(src.error(
                    Some(l.span()),
                    field(name),
                    format!("`{name}` is for checks of kind \"trusted_network\""),
                ));
            }
            l.get_ref()
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    normalize(v.get_ref()).map_err(|e| {
                        src.error(
                            Some(v.span()),
                            format!("posture_checks[{i}].{name}[{j}]"),
                            e,
                        )
                    })
                })
                .collect::<Result<Vec<String>, ConfigError>>()
        };
        let gateway_mac = list(&c.gateway_mac, "gateway_mac", crate::posture::normalize_mac)?;
        let dns_suffix = list(
            &c.dns_suffix,
            "dns_suffix",
            crate::posture::normalize_dns_suffix,
        )?;
        if c.kind == CheckKind::TrustedNetwork && gateway_mac.is_empty() && dns_suffix.is_empty() {
            let span = (c.gateway_mac.as_ref().map(|l| l.span()))
                .or(c.dns_suffix.as_ref().map(|l| l.span()))
                .unwrap_or(c.name.span());
            return Err(src.error(
                Some(span),
                field("gateway_mac"),
                "this kind of check needs `gateway_mac` or `dns_suffix` (a list of gateway MAC \
                 addresses or of DNS suffixes, one entry at least)",
            ));
        }
        posture_checks.push(PostureCheck {
            name: c.name.get_ref().clone(),
            kind: c.kind,
            version: version.map(|v| v.get_ref().clone()),
            process: process.map(|p| p.get_ref().clone()),
            gateway_mac,
            dns_suffix,
        });
    }
    let s = &raw.sensitivity;
    let levels = [
        checks_n.get_all(src, "sensitivity.level1", &s.level1)?,
        checks_n.get_all(src, "sensitivity.level2", &s.level2)?,
        checks_n.get_all(src, "sensitivity.level3", &s.level3)?,
    ];
    let age = |field: &str, v: &Option<Spanned<String>>| -> Result<Option<u64>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d.as_secs() > 0 => Ok(Some(d.as_secs())),
            _ => Err(src.error(
                Some(v.span()),
                format!("sensitivity.sign_in_max_age.{field}"),
                "a duration like \"12h\" or \"30m\" (more than zero)",
            )),
        }
    };
    let ages = &s.sign_in_max_age;
    let sign_in_max_age = [
        age("level1", &ages.level1)?,
        age("level2", &ages.level2)?,
        age("level3", &ages.level3)?,
    ];
    let mut identity = IdentityMapping::default();
    for (from, to) in &raw.identity.groups {
        if from.trim().is_empty() || !valid_group_name(to.get_ref()) {
            return Err(src.error(
                Some(to.span()),
                format!("identity.groups.{from}"),
                "maps a provider group (a non-empty key) to a Sekisho group name",
            ));
        }
        identity.groups.insert(from.clone(), to.get_ref().clone());
    }
    for (from, role) in &raw.identity.admin_roles {
        let r: crate::roles::Role = role.get_ref().parse().map_err(|e: String| {
            src.error(Some(role.span()), format!("identity.admin_roles.{from}"), e)
        })?;
        identity.admin_roles.insert(from.clone(), r);
    }

    let mut tests = Vec::new();
    for (i, t) in raw.tests.iter().enumerate() {
        let field = |n: &str| format!("tests[{i}].{n}");
        let protocol = t.protocol.unwrap_or(Protocol::Tcp);
        let text = t.destination.get_ref().trim();
        let Some((addr, port)) = parse_destination(text, protocol) else {
            return Err(src.error(
                Some(t.destination.span()),
                field("destination"),
                "a destination is \"ADDRESS:PORT\" (or an address for ICMP)",
            ));
        };
        for (j, c) in t.failing_checks.iter().enumerate() {
            checks_n.get(src, format!("tests[{i}].failing_checks[{j}]"), c)?;
        }
        let key = probe_flow(protocol, addr, port);
        tests.push(PolicyTest {
            name: t.name.clone().unwrap_or_else(|| format!("tests[{i}]")),
            user: t.user.get_ref().clone(),
            destination: text.to_string(),
            key,
            expect: t.expect,
            rule: t.rule.clone(),
            failing_checks: t
                .failing_checks
                .iter()
                .map(|c| c.get_ref().clone())
                .collect(),
        });
    }

    let dns = compile_dns(src, &raw.dns, &groups, device_range)?;
    let tunnels = compile_tunnels(src, &raw.tunnels, &groups)?;
    if let Some((i, t)) = raw
        .tunnels
        .iter()
        .enumerate()
        .find(|(i, _)| tunnels[*i].settings.mode == crate::tunnel::TunnelMode::Full)
        && dns.upstreams.is_empty()
    {
        return Err(src.error(
            t.mode.as_ref().map(|m| m.span()),
            format!("tunnels[{i}].mode"),
            "a full tunnel needs [dns].upstreams: full-tunnel devices reach DNS servers only \
             through the broker, and only those",
        ));
    }

    Ok(Policy {
        tests,
        dns,
        tunnels,
        device_range,
        posture_checks,
        levels,
        sign_in_max_age,
        identity,
        risk: risk::check(src, &raw.risk)?,
        classes: risk::check_classes(src, &raw.device_classes)?,
        utc_offset: match &raw.utc_offset {
            None => 0,
            Some(o) => risk::parse_offset(o.get_ref()).ok_or_else(|| {
                src.error(
                    Some(o.span()),
                    "utc_offset",
                    "an offset from UTC like \"+09:00\" or \"-05:30\"",
                )
            })?,
        },
        groups: raw
            .groups
            .iter()
            .map(|g| g.name.get_ref().clone())
            .collect(),
        users,
        devices,
        sites: raw.sites.iter().map(|s| s.name.get_ref().clone()).collect(),
        index: index::PolicyIndex::build(&applications, &rules),
        rules,
        applications,
        device_by_key,
    })
}

fn compile_tunnels(
    src: &Source,
    raw: &[RawTunnel],
    groups: &Names,
) -> Result<Vec<TunnelRule>, ConfigError> {
    use crate::tunnel::{LocalNetwork, TunnelMode, UserTunnel};
    Names::build(src, "tunnel", "tunnels", raw.iter().map(|t| &t.name))?;
    let mut out = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        let f = |n: &str| format!("tunnels[{i}].{n}");
        let gs = match &t.groups {
            None => Vec::new(),
            Some(g) => groups.get_all(src, &f("groups"), g)?,
        };
        let mode = match t.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "include")) => TunnelMode::Include,
            Some((_, "full")) => TunnelMode::Full,
            Some((m, _)) => {
                return Err(src.error(Some(m.span()), f("mode"), "\"include\" or \"full\""));
            }
        };
        let local_network = match t.local_network.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "allow")) => LocalNetwork::Allow,
            Some((_, "block")) => LocalNetwork::Block,
            Some((m, _)) => {
                return Err(src.error(
                    Some(m.span()),
                    f("local_network"),
                    "\"allow\" or \"block\"",
                ));
            }
        };
        let prefix = |v: &Option<Spanned<u8>>, field: &str, max: u8, default: u8| match v {
            None => Ok(default),
            Some(p) if *p.get_ref() <= max => Ok(*p.get_ref()),
            Some(p) => Err(src.error(
                Some(p.span()),
                f(field),
                format!("a prefix length from 0 to {max}"),
            )),
        };
        let local_network_max_prefix = prefix(
            &t.local_network_max_prefix,
            "local_network_max_prefix",
            32,
            crate::tunnel::DEFAULT_LOCAL_MAX_V4,
        )?;
        let local_network_max_prefix_v6 = prefix(
            &t.local_network_max_prefix_v6,
            "local_network_max_prefix_v6",
            128,
            crate::tunnel::DEFAULT_LOCAL_MAX_V6,
        )?;
        let mut exclude = Vec::new();
        for (j, c) in t.exclude.iter().enumerate() {
            let net: IpNet = c.get_ref().trim().parse().map_err(|_| {
                src.error(
                    Some(c.span()),
                    format!("tunnels[{i}].exclude[{j}]"),
                    "a network like \"198.51.100.0/24\"",
                )
            })?;
            exclude.push(net.trunc());
        }
        let mut exclude_domains = Vec::new();
        for (j, d) in t.exclude_domains.iter().enumerate() {
            let text = d.get_ref().trim().trim_start_matches("*.");
            let n = crate::dns::normalize_pattern(text).map_err(|e| {
                src.error(
                    Some(d.span()),
                    format!("tunnels[{i}].exclude_domains[{j}]"),
                    e,
                )
            })?;
            exclude_domains.push(n);
        }
        let captive_grace_secs = match &t.captive_grace {
            None => 0,
            Some(g) => humantime::parse_duration(g.get_ref())
                .map(|d| d.as_secs())
                .map_err(|_| {
                    src.error(
                        Some(g.span()),
                        f("captive_grace"),
                        "a duration like \"5m\" (or \"0s\" for none)",
                    )
                })?,
        };
        out.push(TunnelRule {
            groups: gs,
            settings: UserTunnel {
                name: t.name.get_ref().clone(),
                mode,
                exclude,
                exclude_domains,
                local_network,
                local_network_max_prefix,
                local_network_max_prefix_v6,
                // A full tunnel stays closed when the client stops, unless the admin says so.
                allow_disable: t.allow_disable.unwrap_or(mode == TunnelMode::Include),
                captive_grace_secs,
            },
        });
    }
    Ok(out)
}

fn compile_dns(
    src: &Source,
    raw: &RawDns,
    groups: &Names,
    device_range: IpNet,
) -> Result<DnsPolicy, ConfigError> {
    use crate::dns::BlockAnswer;
    let app_range: ipnet::Ipv4Net = match &raw.app_range {
        None => crate::dns::DEFAULT_APP_RANGE
            .parse()
            .map_err(|_| src.error(None, "dns.app_range", "bad default"))?,
        Some(r) => r
            .get_ref()
            .parse::<ipnet::Ipv4Net>()
            .ok()
            .filter(|n| n.prefix_len() <= 30)
            .ok_or_else(|| {
                src.error(
                    Some(r.span()),
                    "dns.app_range",
                    "an IPv4 CIDR of at least four addresses, like \"100.119.0.0/16\"",
                )
            })?
            .trunc(),
    };
    if let Some(r) = &raw.app_range
        && (IpNet::V4(app_range).contains(&device_range.network())
            || device_range.contains(&IpAddr::V4(app_range.network())))
    {
        return Err(src.error(
            Some(r.span()),
            "dns.app_range",
            format!("{app_range} overlaps the device range {device_range}"),
        ));
    }
    let answer =
        |v: &Option<Spanned<String>>, field: &str| -> Result<Option<BlockAnswer>, ConfigError> {
            v.as_ref()
                .map(|a| {
                    a.get_ref()
                        .parse::<BlockAnswer>()
                        .map_err(|e| src.error(Some(a.span()), field, e))
                })
                .transpose()
        };
    let domain = |d: &Spanned<String>, field: String| -> Result<String, ConfigError> {
        let t = d
            .get_ref()
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let t = t.strip_prefix("*.").unwrap_or(&t).to_string();
        crate::dns::normalize_pattern(&t)
            .or_else(|e| {
                if !t.is_empty()
                    && !t.contains('.')
                    && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    Ok(t.clone())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| src.error(Some(d.span()), field, e))
    };
    let block_answer =
        answer(&raw.block_answer, "dns.block_answer")?.unwrap_or(BlockAnswer::NxDomain);
    let allowlist = raw
        .allowlist
        .iter()
        .enumerate()
        .map(|(i, d)| domain(d, format!("dns.allowlist[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let refresh_secs = match &raw.refresh {
        None => 3600,
        Some(r) => humantime::parse_duration(r.get_ref())
            .ok()
            .map(|d| d.as_secs())
            .filter(|&s| s >= 1)
            .ok_or_else(|| {
                src.error(
                    Some(r.span()),
                    "dns.refresh",
                    "a duration like \"1h\" or \"30s\"",
                )
            })?,
    };
    let mut upstreams = Vec::new();
    let mut upstream_addrs = Vec::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let up = crate::dns::Upstream::parse(u.get_ref())
            .map_err(|e| src.error(Some(u.span()), format!("dns.upstreams[{i}]"), e))?;
        upstreams.push(u.get_ref().trim().to_string());
        upstream_addrs.push(up.addr.ip());
    }
    // Names must be unique.
    Names::build(
        src,
        "blocklist",
        "dns.blocklists",
        raw.blocklists.iter().map(|l| &l.name),
    )?;
    let mut blocklists = Vec::new();
    for (i, l) in raw.blocklists.iter().enumerate() {
        let f = |n: &str| format!("dns.blocklists[{i}].{n}");
        let source = match (&l.path, &l.url) {
            (Some(p), None) => ListSource::Path(p.get_ref().clone()),
            (None, Some(u))
                if u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://") =>
            {
                ListSource::Url(u.get_ref().clone())
            }
            (None, Some(u)) => {
                return Err(src.error(
                    Some(u.span()),
                    f("url"),
                    "a URL starts with http:// or https://",
                ));
            }
            _ => {
                return Err(src.error(
                    Some(l.name.span()),
                    f("path"),
                    "a blocklist needs exactly one of `path` and `url`",
                ));
            }
        };
        if let Some(fm) = &l.format
            && fm
                .get_ref()
                .parse::<crate::dnsfilter::ListFormat>()
                .is_err()
        {
            return Err(src.error(
                Some(fm.span()),
                f("format"),
                "\"domains\", \"hosts\" or \"adblock\"",
            ));
        }
        if l.category.get_ref().trim().is_empty() {
            return Err(src.error(
                Some(l.category.span()),
                f("category"),
                "a category is a word, like \"phishing\"",
            ));
        }
        blocklists.push(Blocklist {
            name: l.name.get_ref().clone(),
            category: l.category.get_ref().trim().to_string(),
            source,
            format: l.format.as_ref().map(|f| f.get_ref().clone()),
        });
    }
    let mut filters = Vec::new();
    for (i, fl) in raw.filters.iter().enumerate() {
        let gs = match &fl.groups {
            None => Vec::new(),
            Some(g) => groups.get_all(src, &format!("dns.filters[{i}].groups"), g)?,
        };
        for (j, c) in fl.block.iter().enumerate() {
            if !blocklists.iter().any(|l| &l.category == c.get_ref()) {
                return Err(src.error(
                    Some(c.span()),
                    format!("dns.filters[{i}].block[{j}]"),
                    format!("no blocklist has the category {:?}", c.get_ref()),
                ));
            }
        }
        filters.push(DnsFilterRule {
            groups: gs,
            block: fl.block.iter().map(|c| c.get_ref().clone()).collect(),
            allow: fl
                .allow
                .iter()
                .enumerate()
                .map(|(j, d)| domain(d, format!("dns.filters[{i}].allow[{j}]")))
                .collect::<Result<Vec<_>, _>>()?,
            block_answer: answer(&fl.block_answer, &format!("dns.filters[{i}].block_answer"))?,
        });
    }
    Ok(DnsPolicy {
        app_range,
        block_answer,
        allowlist,
        refresh_secs,
        upstreams,
        upstream_addrs,
        blocklists,
        filters,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_syntax_check_leaves_directory_names_to_the_control_plane() {
        let p = Path::new("policy.toml");
        let text = "[[sites]]\nname = \"dc1\"\n[[applications]]\nname = \"a\"\nsite = \"dc1\"\naddresses = [\"10.0.0.1\"]\nprotocols = [\"tcp\"]\n[[rules]]\nname = \"r\"\naction = \"allow\"\nusers = [\"alice\"]\napplications = [\"a\"]\n";
        assert!(Policy::check_syntax(p, text).is_ok());
        assert!(
            Policy::parse(p, text).is_err(),
            "alice is only in the directory"
        );
        let e = Policy::check_syntax(p, &text.replace("allow", "alow")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (10, "rules[0].action"));
    }

    use super::*;
    use crate::keys::PrivateKey;
    use crate::packet::PROTO_TCP;

    pub(crate) fn demo_text(alice_key: &str, bob_key: &str) -> String {
        format!(
            r#"
[[groups]]
name = "engineering"
[[groups]]
name = "finance"

[[users]]
name = "alice"
groups = ["engineering"]
[[users]]
name = "bob"
groups = ["finance"]

[[devices]]
name = "alice-laptop"
user = "alice"
public_key = "{alice_key}"
address = "100.118.0.2"
[[devices]]
name = "bob-laptop"
user = "bob"
public_key = "{bob_key}"
address = "100.118.0.3"

[[sites]]
name = "dc1"

[[applications]]
name = "intranet"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [80, "8000-8100"]

[[applications]]
name = "app-host"
site = "dc1"
addresses = ["10.20.0.0/24"]
protocols = ["tcp", "udp", "icmp"]

[[rules]]
name = "eng-intranet"
action = "allow"
groups = ["engineering"]
applications = ["intranet"]

[[rules]]
name = "everyone-host"
action = "allow"
groups = ["engineering", "finance"]
applications = ["app-host"]

[[rules]]
name = "no-db-for-finance"
action = "deny"
users = ["bob"]
applications = ["intranet"]
"#
        )
    }

    fn keys() -> (String, String) {
        (
            PrivateKey::generate().public().to_string(),
            PrivateKey::generate().public().to_string(),
        )
    }

    fn tcp(dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey {
            proto: PROTO_TCP,
            src: IpAddr::from([100, 118, 0, 2]),
            dst: IpAddr::from(dst),
            sport: 40000,
            dport,
        }
    }

    #[test]
    fn allow_deny_and_default() {
        let (a, b) = keys();
        let p = Policy::parse(Path::new("p.toml"), &demo_text(&a, &b)).unwrap();
        let alice = 0;
        let bob = 1;
        let d = p.evaluate(alice, &tcp([10, 20, 0, 10], 80), &Facts::new(None, 0));
        assert_eq!(d.action, Action::Allow);
        assert_eq!(p.rule_name(d.reason), Some("eng-intranet"));
        // Bob: the deny rule on intranet wins over the allow on the whole host.
        let d = p.evaluate(bob, &tcp([10, 20, 0, 10], 80), &Facts::new(None, 0));
        assert_eq!(d.action, Action::Deny);
        assert_eq!(p.rule_name(d.reason), Some("no-db-for-finance"));
        // Outside every application: default deny, no application.
        let d = p.evaluate(alice, &tcp([10, 30, 0, 1], 80), &Facts::new(None, 0));
        assert_eq!(
            (d.action, d.reason, d.application),
            (Action::Deny, Reason::DefaultDeny, None)
        );
        assert_eq!(
            p.evaluate(7, &tcp([10, 20, 0, 10], 80), &Facts::new(None, 0))
                .reason,
            Reason::UnknownDevice
        );
    }

    #[test]
    fn port_ranges() {
        let (a, b) = keys();
        let p = Policy::parse(Path::new("p.toml"), &demo_text(&a, &b)).unwrap();
        let intranet = &p.applications[0];
        assert!(intranet.matches(&tcp([10, 20, 0, 10], 8050)));
        assert!(!intranet.matches(&tcp([10, 20, 0, 10], 8101)));
        assert!(!intranet.matches(&tcp([10, 20, 0, 11], 80)));
    }

    fn posture_policy(a: &str, b: &str) -> Policy {
        Policy::parse(Path::new("p.toml"), &posture_policy_text(a, b)).unwrap()
    }

    fn posture_policy_text(a: &str, b: &str) -> String {
        demo_text(a, b).replace(
            "protocols = [\"tcp\"]\nports = [80, \"8000-8100\"]",
            "protocols = [\"tcp\"]\nports = [80, \"8000-8100\"]\nsensitivity = 3",
        ) + r#"
[[posture_checks]]
name = "client"
kind = "min_client_version"
version = "0.1"
[[posture_checks]]
name = "edr"
kind = "process_running"
process = "edr-agent"
[sensitivity]
level1 = ["client"]
level3 = ["client", "edr"]
"#
    }

    fn claims(checks: &[(&str, bool)]) -> PostureClaims {
        PostureClaims {
            device: "alice-laptop".into(),
            device_key: String::new(),
            user: "alice".into(),
            groups: vec![],
            checks: checks.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            iat: 0,
            exp: 1,
            kid: String::new(),
            auth_time: None,
        }
    }

    #[test]
    fn sensitivity_levels_require_their_checks() {
        let (a, b) = keys();
        let p = posture_policy(&a, &b);
        let web = tcp([10, 20, 0, 10], 80); // intranet, level 3
        let host = tcp([10, 20, 0, 11], 22); // app-host, level 1
        let ok = claims(&[("client", true), ("edr", true)]);
        let no_edr = claims(&[("client", true), ("edr", false)]);
        assert_eq!(
            p.evaluate(0, &web, &Facts::new(Some(&ok), 0)).action,
            Action::Allow
        );
        let d = p.evaluate(0, &web, &Facts::new(Some(&no_edr), 0));
        assert_eq!(
            (d.action, p.check_name(d.reason)),
            (Action::Deny, Some("edr"))
        );
        assert_eq!(p.reason_text(d.reason), "posture check failed");
        // The level-1 app needs only the client check.
        assert_eq!(
            p.evaluate(0, &host, &Facts::new(Some(&no_edr), 0)).action,
            Action::Allow
        );
        // No token at all: denied where checks are required.
        assert_eq!(
            p.evaluate(0, &host, &Facts::new(None, 0)).reason,
            Reason::NoPosture
        );
        // A check missing from the token counts as failing.
        assert_eq!(
            p.evaluate(0, &host, &Facts::new(Some(&claims(&[])), 0))
                .reason,
            Reason::PostureCheck(0)
        );
    }

    #[test]
    fn risk_degrades_access_by_sensitivity() {
        use crate::risk::Level;
        let (a, b) = keys();
        let text = posture_policy_text(&a, &b)
            + "[risk]\nlevel3 = { max = \"low\", above = \"deny\" }\n\
               level1 = { max = \"medium\", above = \"log\" }\n";
        let p = Policy::parse(Path::new("p.toml"), &text).unwrap();
        let web = tcp([10, 20, 0, 10], 80); // level 3
        let host = tcp([10, 20, 0, 11], 22); // level 1
        let c = claims(&[("client", true), ("edr", true)]);
        let at = |risk| Facts::new(Some(&c), 0).at_risk(risk);
        let d = p.evaluate(0, &web, &at(Level::Low));
        assert_eq!((d.action, d.risk_logged), (Action::Allow, false));
        // Medium: level 3 closes, with the risk as the reason; level 1 tolerates it.
        let d = p.evaluate(0, &web, &at(Level::Medium));
        assert_eq!(
            (d.action, d.reason),
            (Action::Deny, Reason::RiskTooHigh(Level::Medium))
        );
        assert_eq!(
            p.reason_text(d.reason),
            "risk too high for this application's sensitivity"
        );
        let d = p.evaluate(0, &host, &at(Level::Medium));
        assert_eq!((d.action, d.risk_logged), (Action::Allow, false));
        // High: level 1 is still allowed, marked for full records.
        let d = p.evaluate(0, &host, &at(Level::High));
        assert_eq!((d.action, d.risk_logged), (Action::Allow, true));
        assert!(matches!(d.reason, Reason::Rule(_)));
        // A failing posture check is named before the risk.
        let no_edr = claims(&[("client", true), ("edr", false)]);
        let d = p.evaluate(0, &web, &Facts::new(Some(&no_edr), 0).at_risk(Level::High));
        assert_eq!(d.reason, Reason::PostureCheck(1));
        // Policy tests and explain by user evaluate at low risk unless told.
        assert!(
            p.run_tests().iter().all(|t| t.passed),
            "{:?}",
            p.run_tests()
        );
    }

    #[test]
    fn personal_devices_stay_below_level_3_by_default() {
        let (a, b) = keys();
        let text = posture_policy_text(&a, &b);
        let text = text.replacen(
            "address = \"100.118.0.2\"",
            "address = \"100.118.0.2\"\nclass = \"personal\"",
            1,
        );
        let p = Policy::parse(Path::new("p.toml"), &text).unwrap();
        assert_eq!(p.devices[0].class, DeviceClass::Personal, "{text}");
        assert_eq!(p.classes.highest(DeviceClass::Personal), 2);
        let c = claims(&[("client", true), ("edr", true)]);
        let d = p.evaluate(0, &tcp([10, 20, 0, 10], 80), &Facts::new(Some(&c), 0));
        assert_eq!(
            (d.action, d.reason),
            (Action::Deny, Reason::DeviceClass(DeviceClass::Personal))
        );
        assert_eq!(
            p.reason_text(d.reason),
            "personal device: this sensitivity level needs a managed one"
        );
        let d = p.evaluate(0, &tcp([10, 20, 0, 11], 22), &Facts::new(Some(&c), 0));
        assert_eq!(d.action, Action::Allow, "level 1 from a personal device");
        // The policy may open level 3 to personal devices, or close more to them.
        let open = Policy::parse(
            Path::new("p.toml"),
            &format!("{text}\n[device_classes]\npersonal = 3\n"),
        )
        .unwrap();
        let d = open.evaluate(0, &tcp([10, 20, 0, 10], 80), &Facts::new(Some(&c), 0));
        assert_eq!(d.action, Action::Allow);
        let e = Policy::parse(
            Path::new("p.toml"),
            &format!("{text}\n[device_classes]\npersonal = 4\n"),
        )
        .unwrap_err();
        assert_eq!(e.field, "device_classes.personal", "{e}");
        assert!(e.line > 0, "{e}");
        let e = Policy::parse(
            Path::new("p.toml"),
            &text.replacen("class = \"personal\"", "class = \"mine\"", 1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("class"), "{e}");
    }

    #[test]
    fn sign_in_age_limits_only_its_level() {
        let (a, b) = keys();
        let text =
            posture_policy_text(&a, &b) + "[sensitivity.sign_in_max_age]\nlevel3 = \"12h\"\n";
        let p = Policy::parse(Path::new("p.toml"), &text).unwrap();
        assert_eq!(p.sign_in_max_age, [None, None, Some(12 * 3600)]);
        let web = tcp([10, 20, 0, 10], 80); // level 3
        let host = tcp([10, 20, 0, 11], 22); // level 1
        let mut c = claims(&[("client", true), ("edr", true)]);
        let t0 = 1_800_000_000;
        c.auth_time = Some(t0);
        // Within 12 hours (the bound itself included) both levels are allowed.
        for now in [t0, t0 + 12 * 3600] {
            assert_eq!(
                p.evaluate(0, &web, &Facts::new(Some(&c), now)).action,
                Action::Allow
            );
        }
        // A second past it, level 3 says why; level 1 goes on.
        let d = p.evaluate(0, &web, &Facts::new(Some(&c), t0 + 12 * 3600 + 1));
        assert_eq!((d.action, d.reason), (Action::Deny, Reason::SignInTooOld));
        assert_eq!(p.reason_text(d.reason), "sign-in too old");
        let d = p.evaluate(0, &host, &Facts::new(Some(&c), t0 + 12 * 3600 + 1));
        assert_eq!(d.action, Action::Allow);
        // A device that never signed in through the provider has no sign-in to be fresh.
        c.auth_time = None;
        assert_eq!(
            p.evaluate(0, &web, &Facts::new(Some(&c), t0)).reason,
            Reason::SignInTooOld
        );
        // A failing posture check is named first: it is what the user can fix on the device.
        let mut no_edr = claims(&[("client", true), ("edr", false)]);
        no_edr.auth_time = Some(0);
        assert_eq!(
            p.evaluate(0, &web, &Facts::new(Some(&no_edr), t0)).reason,
            Reason::PostureCheck(1)
        );
        // Policy tests assume a fresh sign-in.
        assert!(p.run_tests().iter().all(|t| t.passed));
        let e = err_of(
            &(posture_policy_text(&a, &b) + "[sensitivity.sign_in_max_age]\nlevel2 = \"soon\"\n"),
        );
        assert_eq!(e.field, "sensitivity.sign_in_max_age.level2", "{e}");
    }

    #[test]
    fn rules_apply_in_their_hours_and_say_so_outside() {
        let (a, b) = keys();
        let text = demo_text(&a, &b);
        // engineering's intranet rule: weekdays 08:00-19:00 in Tokyo.
        let text = text.replacen(
            "name = \"eng-intranet\"",
            "name = \"eng-intranet\"\nhours = \"08:00-19:00\"\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]",
            1,
        );
        // (everyone-host would allow the same destination: it keeps office hours too.)
        let text = text.replacen(
            "name = \"everyone-host\"",
            "name = \"everyone-host\"\nhours = \"08:00-19:00\"",
            1,
        );
        let text = format!("utc_offset = \"+09:00\"\n{text}");
        let p = Policy::parse(Path::new("p.toml"), &text).unwrap();
        assert_eq!(p.utc_offset, 9 * 3600);
        let alice = 0;
        let web = tcp([10, 20, 0, 10], 80);
        // Monday 2026-11-30 10:00 in Tokyo is 01:00 UTC.
        let monday_10 = 1_795_996_800 + 3600;
        let d = p.evaluate(alice, &web, &Facts::new(None, monday_10));
        assert_eq!(d.action, Action::Allow, "{d:?}");
        // 20:00 in Tokyo: outside, and the denial names the rule and why.
        let d = p.evaluate(alice, &web, &Facts::new(None, monday_10 + 10 * 3600));
        let rule = p
            .rules
            .iter()
            .position(|r| r.name == "eng-intranet")
            .unwrap() as RuleId;
        assert_eq!(
            (d.action, d.reason),
            (Action::Deny, Reason::OutsideHours(rule))
        );
        assert_eq!(p.reason_text(d.reason), "outside the rule's hours");
        assert_eq!(p.rule_name(d.reason), Some("eng-intranet"));
        // Saturday noon in Tokyo: eng-intranet keeps weekdays, everyone-host every day.
        let d = p.evaluate(
            alice,
            &web,
            &Facts::new(None, monday_10 + 5 * 86_400 + 2 * 3600),
        );
        assert_eq!(p.rule_name(d.reason), Some("everyone-host"), "{d:?}");
        assert_eq!(d.action, Action::Allow);
        // The compiled evaluation and the plain scan agree.
        for t in [monday_10, monday_10 + 10 * 3600, monday_10 + 5 * 86_400] {
            let user = p.device(alice).user;
            assert_eq!(
                p.decide(user, &web, &Facts::new(None, t), None),
                p.decide_scan(user, &web, &Facts::new(None, t), None)
            );
        }
        // Policy tests check what a rule allows, whatever its hours.
        assert!(p.run_tests().iter().all(|t| t.passed));
        let e = err_of(&text.replacen("08:00-19:00", "8 to 7", 1));
        assert!(e.field.ends_with(".hours"), "{e}");
        let e = err_of(&text.replacen("\"tue\"", "\"tuesday\"", 1));
        assert!(e.field.ends_with(".days[1]"), "{e}");
        let e = err_of(&format!("utc_offset = \"JST\"\n{}", demo_text(&a, &b)));
        assert_eq!(e.field, "utc_offset", "{e}");
    }

    #[test]
    fn risk_grades_parse_and_name_their_errors() {
        let (a, b) = keys();
        let p = Policy::parse(
            Path::new("p.toml"),
            &("utc_offset = \"+09:00\"\n".to_string()
                + &demo_text(&a, &b)
                + "[risk]\nlevel3 = { max = \"low\", above = \"deny\" }\n\
                   level2 = { max = \"medium\", above = \"log\" }\nmonitor_from = 3\n"),
        )
        .unwrap();
        use crate::risk::Level;
        use risk::Response;
        assert_eq!(p.risk.response(3, Level::Medium), Some(Response::Deny));
        assert_eq!(p.risk.response(2, Level::High), Some(Response::Log));
        assert_eq!(p.risk.response(1, Level::High), None);
        assert_eq!((p.risk.monitor_from, p.utc_offset), (3, 9 * 3600));
        for (bad, field) in [
            (
                "level3 = { max = \"extreme\", above = \"deny\" }",
                "risk.level3.max",
            ),
            (
                "level1 = { max = \"low\", above = \"shout\" }",
                "risk.level1.above",
            ),
            ("monitor_from = 4", "risk.monitor_from"),
        ] {
            let e = err_of(&(demo_text(&a, &b) + "[risk]\n" + bad + "\n"));
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn identity_groups_and_roles_map_from_the_provider() {
        let (a, b) = keys();
        let text = demo_text(&a, &b)
            + "[identity]\ngroups = { engineering = \"engineering\", \"Finance Team\" = \"finance\" }\n\
               admin_roles = { \"sekisho-admins\" = \"admin\", auditors = \"auditor\", ops = \"operator\" }\n";
        let p = Policy::parse(Path::new("p.toml"), &text).unwrap();
        let claimed = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (member, governed) =
            p.identity
                .map_groups(&claimed(&["Finance Team", "unmapped", "engineering"]));
        assert_eq!(member, ["engineering", "finance"]);
        assert_eq!(governed, ["engineering", "finance"]);
        assert_eq!(p.identity.map_groups(&[]).0, Vec::<String>::new());
        use crate::roles::Role;
        assert_eq!(
            p.identity.admin_role(&claimed(&["auditors"])),
            Some(Role::Auditor)
        );
        assert_eq!(
            p.identity
                .admin_role(&claimed(&["auditors", "sekisho-admins", "ops"])),
            Some(Role::Admin)
        );
        assert_eq!(p.identity.admin_role(&claimed(&["engineering"])), None);
        let e = err_of(&(demo_text(&a, &b) + "[identity]\nadmin_roles = { x = \"king\" }\n"));
        assert_eq!(e.field, "identity.admin_roles.x", "{e}");
        let e = err_of(&(demo_text(&a, &b) + "[identity]\ngroups = { x = \"no spaces\" }\n"));
        assert_eq!(e.field, "identity.groups.x", "{e}");
    }

    #[test]
    fn posture_declarations_are_checked() {
        let (a, b) = keys();
        let base = demo_text(&a, &b);
        let e = err_of(
            &(base.clone() + "[[posture_checks]]\nname = \"k\"\nkind = \"min_kernel_version\"\n"),
        );
        assert_eq!(e.field, "posture_checks[0].version", "{e}");
        let e = err_of(
            &(base.clone()
                + "[[posture_checks]]\nname = \"k\"\nkind = \"min_kernel_version\"\nversion = \"new\"\n"),
        );
        assert_eq!(e.field, "posture_checks[0].version", "{e}");
        let e =
            err_of(&(base.clone() + "[[posture_checks]]\nname = \"k\"\nkind = \"blood_type\"\n"));
        assert_eq!(e.field, "posture_checks[0].kind", "{e}");
        let e = err_of(&(base.clone() + "[sensitivity]\nlevel2 = [\"nope\"]\n"));
        assert_eq!(e.field, "sensitivity.level2[0]", "{e}");
        let e = err_of(&base.replace(
            "ports = [80, \"8000-8100\"]",
            "ports = [80]\nsensitivity = 4",
        ));
        assert_eq!(e.field, "applications[0].sensitivity", "{e}");
    }

    #[test]
    fn trusted_network_checks_take_macs_and_suffixes_checked_and_normalized() {
        let (a, b) = keys();
        let base = demo_text(&a, &b);
        let check = |body: &str| format!("{base}[[posture_checks]]\nname = \"office\"\n{body}");
        let p = Policy::parse(
            Path::new("policy.toml"),
            &check(
                "kind = \"trusted_network\"\ngateway_mac = [\"AA-BB-CC-00-11-22\", \"02:00:00:00:00:01\"]\n\
                 dns_suffix = [\"Corp.Example.\"]\n",
            ),
        )
        .unwrap();
        let c = &p.posture_checks[0];
        assert_eq!(c.kind, CheckKind::TrustedNetwork);
        assert_eq!(c.gateway_mac, ["aa:bb:cc:00:11:22", "02:00:00:00:00:01"]);
        assert_eq!(c.dns_suffix, ["corp.example"]);
        // Either list alone is enough.
        let p = Policy::parse(
            Path::new("policy.toml"),
            &check("kind = \"trusted_network\"\ndns_suffix = [\"corp.example\"]\n"),
        )
        .unwrap();
        assert!(p.posture_checks[0].gateway_mac.is_empty());

        // The line of the error is the line of the bad entry (or of the check's name).
        let line = |n: usize| base.lines().count() + n;
        let e = err_of(&check("kind = \"trusted_network\"\n"));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("posture_checks[0].gateway_mac", line(2)),
            "{e}"
        );
        assert!(e.message.contains("dns_suffix"), "{e}");
        let e = err_of(&check(
            "kind = \"trusted_network\"\ngateway_mac = []\ndns_suffix = []\n",
        ));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("posture_checks[0].gateway_mac", line(4)),
            "{e}"
        );
        let e = err_of(&check(
            "kind = \"trusted_network\"\ngateway_mac = [\n  \"aa:bb:cc:dd:ee:ff\",\n  \"aa:bb:cc:dd:ee\",\n]\n",
        ));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("posture_checks[0].gateway_mac[1]", line(6)),
            "{e}"
        );
        assert!(e.to_string().contains("policy.toml"), "{e}");
        let e = err_of(&check(
            "kind = \"trusted_network\"\ndns_suffix = [\"corp example\"]\n",
        ));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("posture_checks[0].dns_suffix[0]", line(4)),
            "{e}"
        );
        let e = err_of(&check(
            "kind = \"trusted_network\"\ndns_suffix = [\"*.corp.example\"]\n",
        ));
        assert_eq!(e.field, "posture_checks[0].dns_suffix[0]", "{e}");
        // Other kinds take neither list.
        let e = err_of(&check(
            "kind = \"firewall_active\"\ngateway_mac = [\"aa:bb:cc:dd:ee:ff\"]\n",
        ));
        assert_eq!(e.field, "posture_checks[0].gateway_mac", "{e}");
    }

    fn err_of(text: &str) -> ConfigError {
        Policy::parse(Path::new("policy.toml"), text).unwrap_err()
    }

    const DNS_POLICY: &str = r#"
[[groups]]
name = "eng"
[[groups]]
name = "fin"
[[users]]
name = "alice"
groups = ["eng"]
[[users]]
name = "bob"
groups = ["fin"]
[[sites]]
name = "dc1"
[[applications]]
name = "wiki"
site = "dc1"
names = ["Wiki.Corp.Example"]
protocols = ["tcp"]
ports = [80]
[[applications]]
name = "dev"
site = "dc1"
names = ["*.dev.corp.example", "*.corp.example"]
protocols = ["tcp"]
[[applications]]
name = "payroll"
site = "dc1"
names = ["payroll.corp.example"]
protocols = ["tcp"]
[[rules]]
name = "eng"
action = "allow"
groups = ["eng"]
applications = ["wiki", "dev", "payroll"]
[[rules]]
name = "no-payroll"
action = "deny"
users = ["alice"]
applications = ["payroll"]
[[rules]]
name = "fin"
action = "allow"
groups = ["fin"]
applications = ["payroll"]
[dns]
block_answer = "nxdomain"
allowlist = ["ok.example"]
refresh = "30s"
upstreams = ["tls://9.9.9.9#dns.quad9.net"]
[[dns.blocklists]]
name = "ph"
category = "phishing"
path = "lists/ph.domains"
[[dns.blocklists]]
name = "tr"
category = "tracking"
url = "https://lists.example/tr.txt"
format = "hosts"
[[dns.filters]]
block = ["phishing"]
[[dns.filters]]
groups = ["fin"]
block = ["tracking"]
allow = ["partner.example"]
block_answer = "null"
"#;

    #[test]
    fn names_resolve_to_the_most_specific_application_and_rights_follow_rules() {
        let p = Policy::parse(Path::new("p.toml"), DNS_POLICY).unwrap();
        let app = |n: &str| {
            p.app_for_name(n)
                .map(|a| p.applications[a as usize].name.as_str())
        };
        assert_eq!(app("wiki.corp.example"), Some("wiki"));
        assert_eq!(app("x.dev.corp.example"), Some("dev"));
        assert_eq!(app("other.corp.example"), Some("dev"));
        assert_eq!(app("payroll.corp.example"), Some("payroll"));
        assert_eq!(app("corp.example"), None);
        assert_eq!(app("wiki.corp.example.evil"), None);
        let (alice, bob) = (
            p.user_by_name("alice").unwrap(),
            p.user_by_name("bob").unwrap(),
        );
        let payroll = p.app_by_name("payroll").unwrap();
        assert!(!p.user_may_use(alice, payroll), "an explicit deny wins");
        assert!(p.user_may_use(bob, payroll));
        assert!(!p.user_may_use(bob, p.app_by_name("wiki").unwrap()));
        // Synthetic addresses are routed into the tunnel for users with name-based apps.
        assert!(
            p.networks_for_user(bob)
                .contains(&"100.119.0.0/16".parse().unwrap())
        );
        // A flow to a synthetic address is decided as the named application.
        let key = probe_flow(Protocol::Tcp, "100.119.0.9".parse().unwrap(), 80);
        let d = p.decide(
            alice,
            &key,
            &Facts::new(None, 0),
            Some(p.app_by_name("wiki").unwrap()),
        );
        assert_eq!(
            (d.action, p.rule_name(d.reason)),
            (Action::Allow, Some("eng"))
        );
        let d = p.decide(alice, &key, &Facts::new(None, 0), Some(payroll));
        assert_eq!(
            (d.action, p.rule_name(d.reason)),
            (Action::Deny, Some("no-payroll"))
        );
        // Without the binding the same address is nobody's application.
        assert_eq!(
            p.evaluate_user(alice, &key, &Facts::new(None, 0), None)
                .action,
            Action::Deny
        );
    }

    #[test]
    fn dns_settings_follow_the_user_groups() {
        let p = Policy::parse(Path::new("p.toml"), DNS_POLICY).unwrap();
        let (alice, bob) = (
            p.user_by_name("alice").unwrap(),
            p.user_by_name("bob").unwrap(),
        );
        let a = p.dns_for_user(alice);
        assert_eq!(a.blocklists, ["ph"]);
        assert_eq!(a.allowlist, ["ok.example"]);
        assert_eq!(a.block_answer, "nxdomain");
        assert_eq!(a.private_zones, ["corp.example", "dev.corp.example"]);
        assert_eq!(a.upstreams, ["tls://9.9.9.9#dns.quad9.net"]);
        assert_eq!(a.refresh_secs, 30);
        let b = p.dns_for_user(bob);
        assert_eq!(b.blocklists, ["ph", "tr"]);
        assert_eq!(b.allowlist, ["ok.example", "partner.example"]);
        assert_eq!(b.block_answer, "null");
    }

    #[test]
    fn dns_errors_are_located() {
        let cases = [
            (
                "block_answer = \"nxdomain\"",
                "block_answer = \"sometimes\"",
                "dns.block_answer",
            ),
            (
                "names = [\"Wiki.Corp.Example\"]",
                "names = [\"wiki\"]",
                "applications[0].names[0]",
            ),
            (
                "block = [\"phishing\"]",
                "block = [\"phishng\"]",
                "dns.filters[0].block[0]",
            ),
            (
                "format = \"hosts\"",
                "format = \"json\"",
                "dns.blocklists[1].format",
            ),
            (
                "upstreams = [\"tls://9.9.9.9#dns.quad9.net\"]",
                "upstreams = [\"tls://9.9.9.9\"]",
                "dns.upstreams[0]",
            ),
            (
                "url = \"https://lists.example/tr.txt\"",
                "url = \"ftp://x\"",
                "dns.blocklists[1].url",
            ),
            ("refresh = \"30s\"", "refresh = \"soon\"", "dns.refresh"),
        ];
        for (from, to, field) in cases {
            assert!(DNS_POLICY.contains(from), "{from}");
            let text = DNS_POLICY.replace(from, to);
            let e = err_of(&text);
            assert_eq!(e.field, field, "{e}");
            let line = text.lines().position(|l| l.contains(to)).unwrap() + 1;
            assert_eq!(e.line, line, "{e}");
        }
        let e = err_of(&DNS_POLICY.replace("names = [\"payroll.corp.example\"]", ""));
        assert!(e.message.contains("at least one address or name"), "{e}");
    }

    #[test]
    fn unknown_group_is_located() {
        let (a, b) = keys();
        let text = demo_text(&a, &b).replace("groups = [\"finance\"]", "groups = [\"fnance\"]");
        let e = err_of(&text);
        assert_eq!(e.field, "users[1].groups[0]");
        assert!(e.message.contains("unknown group \"fnance\""), "{e}");
        let line = text.lines().position(|l| l.contains("fnance")).unwrap() + 1;
        assert_eq!(e.line, line, "{e}");
    }

    #[test]
    fn bad_action_and_bad_port_are_located() {
        let (a, b) = keys();
        let text = demo_text(&a, &b).replace("action = \"deny\"", "action = \"dney\"");
        let e = err_of(&text);
        assert_eq!(e.field, "rules[2].action", "{e}");
        let text = demo_text(&a, &b).replace("\"8000-8100\"", "\"9000-8000\"");
        let e = err_of(&text);
        assert_eq!(e.field, "applications[0].ports[1]", "{e}");
    }

    #[test]
    fn device_address_outside_range_and_bad_key() {
        let (a, b) = keys();
        let e = err_of(&demo_text(&a, &b).replace("100.118.0.3", "10.0.0.3"));
        assert_eq!(e.field, "devices[1].address", "{e}");
        let e = err_of(&demo_text(&a, "not-a-key"));
        assert_eq!(e.field, "devices[1].public_key", "{e}");
        let e = err_of(&demo_text(&a, &a));
        assert!(e.message.contains("already used"), "{e}");
    }

    const DIR_POLICY: &str = r#"
[[groups]]
name = "engineering"
[[sites]]
name = "hq"
[[applications]]
name = "web"
site = "hq"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [80]
[[rules]]
name = "eng-web"
action = "allow"
groups = ["engineering"]
applications = ["web"]
[[tests]]
user = "carol"
destination = "10.20.0.10:80"
expect = "allow"
rule = "eng-web"
[[tests]]
name = "no ssh"
user = "carol"
destination = "10.20.0.10:22"
expect = "deny"
"#;

    fn directory() -> Directory {
        Directory {
            groups: vec!["engineering".into(), "ops".into()],
            users: vec![DirectoryUser {
                name: "carol".into(),
                groups: vec!["engineering".into()],
                disabled: false,
            }],
            devices: vec![DirectoryDevice {
                name: "carol-laptop".into(),
                user: "carol".into(),
                public_key: PrivateKey::generate().public().to_string(),
                address: "100.118.0.9".parse().unwrap(),
                class: DeviceClass::Managed,
            }],
        }
    }

    #[test]
    fn directory_users_and_devices_merge_and_tests_run() {
        let p = Policy::parse_with(Path::new("p.toml"), DIR_POLICY, &directory()).unwrap();
        assert_eq!(p.groups, vec!["engineering", "ops"]);
        let carol = p.user_by_name("carol").unwrap();
        assert_eq!(
            p.networks_for_user(carol),
            vec!["10.20.0.10/32".parse::<IpNet>().unwrap()]
        );
        let outcomes = p.run_tests();
        assert!(outcomes.iter().all(|t| t.passed), "{outcomes:?}");
        assert_eq!(outcomes[0].name, "tests[0]");
        // Without the directory carol is unknown: the tests fail, naming her.
        let alone = Policy::parse(Path::new("p.toml"), DIR_POLICY).unwrap();
        let outcomes = alone.run_tests();
        assert!(!outcomes[0].passed && outcomes[0].detail.contains("unknown user"));
        // A wrong expectation fails with the actual decision in the detail.
        let wrong = DIR_POLICY.replace("expect = \"deny\"", "expect = \"allow\"");
        let p = Policy::parse_with(Path::new("p.toml"), &wrong, &directory()).unwrap();
        let t = &p.run_tests()[1];
        assert!(!t.passed && t.detail.contains("deny"), "{t:?}");
    }

    /// A directory entry that clashes with the file is left out of the merge, named, and the
    /// rest of the directory still applies (a revocation elsewhere is not held up by it).
    #[test]
    fn a_lenient_merge_leaves_out_only_the_clashing_entries() {
        let mut dir = directory();
        let bob_key = PrivateKey::generate().public().to_string();
        dir.users.push(DirectoryUser {
            name: "bob".into(),
            groups: vec![],
            disabled: false,
        });
        dir.devices.push(DirectoryDevice {
            name: "bob-laptop".into(),
            user: "bob".into(),
            public_key: PrivateKey::generate().public().to_string(),
            address: "100.118.0.20".parse().unwrap(),
            class: DeviceClass::Managed,
        });
        dir.devices.push(DirectoryDevice {
            name: "ghost-laptop".into(),
            user: "ghost".into(),
            public_key: PrivateKey::generate().public().to_string(),
            address: "100.118.0.21".parse().unwrap(),
            class: DeviceClass::Managed,
        });
        let text = format!(
            "{DIR_POLICY}\n[[users]]\nname = \"bob\"\n[[devices]]\nname = \"bob-file\"\nuser = \"bob\"\n\
             public_key = \"{bob_key}\"\naddress = \"100.118.0.9\"\n"
        );
        assert!(Policy::parse_with(Path::new("p.toml"), &text, &dir).is_err());
        let (p, left_out) = Policy::parse_with_lenient(Path::new("p.toml"), &text, &dir).unwrap();
        assert_eq!(left_out.len(), 4, "{left_out:?}");
        assert!(
            left_out[0].contains("directory user \"bob\""),
            "{left_out:?}"
        );
        assert!(
            left_out[1].contains("\"carol-laptop\"") && left_out[1].contains("bob-file"),
            "same address as the file's device: {left_out:?}"
        );
        assert!(left_out[2].contains("bob-laptop"), "{left_out:?}");
        assert!(left_out[3].contains("ghost"), "{left_out:?}");
        // bob's directory device does not become a device of the file's bob.
        let names: Vec<&str> = p.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bob-file"]);
        assert!(p.user_by_name("carol").is_some());
    }

    #[test]
    fn directory_conflicts_and_bad_tests_are_errors() {
        let mut dir = directory();
        let text = format!("{DIR_POLICY}\n[[users]]\nname = \"carol\"\n");
        let e = Policy::parse_with(Path::new("p.toml"), &text, &dir).unwrap_err();
        assert!(
            e.message
                .contains("defined in this file and in the control plane"),
            "{e}"
        );
        dir.devices[0].address = "100.118.0.1".parse().unwrap();
        let e = Policy::parse_with(Path::new("p.toml"), DIR_POLICY, &dir).unwrap_err();
        assert!(e.message.contains("reserved for the broker"), "{e}");
        let e = err_of(&DIR_POLICY.replace("10.20.0.10:22", "nowhere"));
        assert_eq!(e.field, "tests[1].destination", "{e}");
        let e = err_of(&format!("{DIR_POLICY}failing_checks = [\"nope\"]\n"));
        assert_eq!(e.field, "tests[1].failing_checks[0]", "{e}");
    }
}
