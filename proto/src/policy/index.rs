//! The compiled form of a policy's rules: which applications a destination can be (networks
//! by prefix length, so a lookup is one hash probe per length in use) and which rules name each
//! application (in rule order). A new flow's decision looks only at the rules that name an
//! application the flow matches, instead of every rule, and decides exactly as the
//! straightforward evaluation does (a property test holds them side by side).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{AppId, Application, Rule, RuleId};
use crate::packet::FlowKey;

/// Networks of one IP family with one prefix length: masked network → applications.
type Prefixes<T> = Vec<(u8, HashMap<T, Vec<AppId>>)>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyIndex {
    v4: Prefixes<u32>,
    v6: Prefixes<u128>,
    /// For each application, the rules that name it, in rule order.
    rules_by_app: Vec<Vec<RuleId>>,
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

fn insert<T: std::hash::Hash + Eq>(table: &mut Prefixes<T>, len: u8, net: T, app: AppId) {
    let at = match table.iter().position(|(l, _)| *l == len) {
        Some(i) => i,
        None => {
            table.push((len, HashMap::new()));
            table.len() - 1
        }
    };
    let apps = table[at].1.entry(net).or_default();
    if apps.last() != Some(&app) {
        apps.push(app);
    }
}

impl PolicyIndex {
    pub fn build(applications: &[Application], rules: &[Rule]) -> PolicyIndex {
        let mut ix = PolicyIndex {
            rules_by_app: vec![Vec::new(); applications.len()],
            ..Default::default()
        };
        for (a, app) in applications.iter().enumerate() {
            let a = a as AppId;
            for net in &app.networks {
                match net {
                    IpNet::V4(n) => {
                        let len = n.prefix_len();
                        insert(&mut ix.v4, len, mask4(n.network().to_bits(), len), a);
                    }
                    IpNet::V6(n) => {
                        let len = n.prefix_len();
                        insert(&mut ix.v6, len, mask6(n.network().to_bits(), len), a);
                    }
                }
            }
        }
        for (r, rule) in rules.iter().enumerate() {
            for &a in &rule.applications {
                let list = &mut ix.rules_by_app[a as usize];
                if list.last() != Some(&(r as RuleId)) {
                    list.push(r as RuleId);
                }
            }
        }
        ix
    }

    /// The applications whose networks contain `dst`, in ascending order (ports and protocol
    /// are checked by the caller).
    pub fn apps_at(&self, dst: IpAddr, out: &mut Vec<AppId>) {
        out.clear();
        match dst {
            IpAddr::V4(a) => {
                let a = a.to_bits();
                for (len, nets) in &self.v4 {
                    if let Some(apps) = nets.get(&mask4(a, *len)) {
                        out.extend_from_slice(apps);
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = a.to_bits();
                for (len, nets) in &self.v6 {
                    if let Some(apps) = nets.get(&mask6(a, *len)) {
                        out.extend_from_slice(apps);
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
    }

    /// The rules naming any of `apps` (ascending), in rule order, without repeats.
    pub fn rules_naming(&self, apps: &[AppId], out: &mut Vec<RuleId>) {
        out.clear();
        for &a in apps {
            out.extend_from_slice(&self.rules_by_app[a as usize]);
        }
        out.sort_unstable();
        out.dedup();
    }
}

/// The applications a flow matches (network, protocol, port), ascending.
pub(super) fn matching_apps(
    ix: &PolicyIndex,
    applications: &[Application],
    key: &FlowKey,
    out: &mut Vec<AppId>,
) {
    ix.apps_at(key.dst, out);
    out.retain(|&a| applications[a as usize].matches(key));
}

#[cfg(test)]
mod tests {
    use super::super::{Policy, UserId};
    use crate::packet::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
    use crate::posture::PostureClaims;
    use proptest::prelude::*;
    use std::net::IpAddr;

    const NETS: [&str; 8] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3/32",
        "192.168.0.0/16",
        "203.0.0.0/8",
        "fd00::/8",
        "fd00:1::/32",
    ];
    const DSTS: [&str; 8] = [
        "10.1.2.3",
        "10.1.2.4",
        "10.1.9.9",
        "10.200.0.1",
        "192.168.1.1",
        "203.0.113.5",
        "fd00:1::5",
        "fd00:2::5",
    ];
    const PROTOS: [(&str, u8); 3] = [("tcp", PROTO_TCP), ("udp", PROTO_UDP), ("icmp", PROTO_ICMP)];

    #[derive(Debug, Clone)]
    struct App {
        nets: Vec<usize>,
        protos: Vec<usize>,
        ports: Vec<(u16, u16)>,
        sensitivity: u8,
    }

    #[derive(Debug, Clone)]
    struct RuleSpec {
        deny: bool,
        users: Vec<usize>,
        groups: Vec<usize>,
        apps: Vec<usize>,
    }

    fn app() -> impl Strategy<Value = App> {
        (
            proptest::collection::vec(0..NETS.len(), 1..3),
            proptest::collection::vec(0..3usize, 1..3),
            proptest::collection::vec((1u16..100, 1u16..100), 0..3),
            1u8..4,
        )
            .prop_map(|(nets, protos, ports, sensitivity)| App {
                nets,
                protos,
                ports: ports
                    .into_iter()
                    .map(|(a, b)| (a.min(b), a.max(b)))
                    .collect(),
                sensitivity,
            })
    }

    fn rule(apps: usize) -> impl Strategy<Value = RuleSpec> {
        (
            proptest::bool::weighted(0.3),
            proptest::collection::vec(0..4usize, 0..2),
            proptest::collection::vec(0..3usize, 0..2),
            proptest::collection::vec(0..apps, 1..4),
        )
            .prop_map(|(deny, users, groups, apps)| RuleSpec {
                deny,
                users,
                groups,
                apps,
            })
    }

    fn policy_text(apps: &[App], rules: &[RuleSpec], full_tunnel: bool) -> String {
        let mut t = String::new();
        for g in 0..3 {
            t += &format!("[[groups]]\nname = \"g{g}\"\n");
        }
        for u in 0..4 {
            t += &format!(
                "[[users]]\nname = \"u{u}\"\ngroups = [\"g{}\"]\ndisabled = {}\n",
                u % 3,
                u == 3
            );
        }
        t += "[[posture_checks]]\nname = \"c1\"\nkind = \"firewall_active\"\n";
        t += "[[posture_checks]]\nname = \"c2\"\nkind = \"screen_lock\"\n";
        t += "[sensitivity]\nlevel2 = [\"c1\"]\nlevel3 = [\"c1\", \"c2\"]\n";
        t += "[[sites]]\nname = \"s\"\n";
        for (i, a) in apps.iter().enumerate() {
            let nets: Vec<String> = a.nets.iter().map(|&n| format!("\"{}\"", NETS[n])).collect();
            let protos: Vec<String> = a
                .protos
                .iter()
                .map(|&p| format!("\"{}\"", PROTOS[p].0))
                .collect();
            let ports: Vec<String> = a
                .ports
                .iter()
                .map(|(l, h)| format!("\"{l}-{h}\""))
                .collect();
            t += &format!(
                "[[applications]]\nname = \"a{i}\"\nsite = \"s\"\naddresses = [{}]\nprotocols = [{}]\nports = [{}]\nsensitivity = {}\n",
                nets.join(", "),
                protos.join(", "),
                ports.join(", "),
                a.sensitivity
            );
        }
        for (i, r) in rules.iter().enumerate() {
            let users: Vec<String> = r.users.iter().map(|u| format!("\"u{u}\"")).collect();
            let mut groups: Vec<String> = r.groups.iter().map(|g| format!("\"g{g}\"")).collect();
            if users.is_empty() && groups.is_empty() {
                groups.push("\"g0\"".into());
            }
            let apps: Vec<String> = r.apps.iter().map(|a| format!("\"a{a}\"")).collect();
            t += &format!(
                "[[rules]]\nname = \"r{i}\"\naction = \"{}\"\nusers = [{}]\ngroups = [{}]\napplications = [{}]\n",
                if r.deny { "deny" } else { "allow" },
                users.join(", "),
                groups.join(", "),
                apps.join(", ")
            );
        }
        if full_tunnel {
            t += "[dns]\nupstreams = [\"udp://192.168.1.1\"]\n";
            t += "[[tunnels]]\nname = \"full\"\ngroups = [\"g1\"]\nmode = \"full\"\n";
        }
        t
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The compiled decision is the straightforward one, for any policy and flow.
        #[test]
        fn the_index_decides_exactly_as_the_scan(
            apps in proptest::collection::vec(app(), 1..8),
            rules_seed in proptest::collection::vec(rule(8), 0..12),
            full_tunnel in any::<bool>(),
            flows in proptest::collection::vec(
                (0u32..4, 0..DSTS.len(), 0..3usize, 0u16..110, proptest::option::of((any::<bool>(), any::<bool>())), proptest::option::of(0u32..8)),
                1..40,
            ),
        ) {
            let n = apps.len();
            let rules: Vec<RuleSpec> = rules_seed
                .into_iter()
                .map(|mut r| { r.apps.retain(|&a| a < n); if r.apps.is_empty() { r.apps.push(0); } r })
                .collect();
            let text = policy_text(&apps, &rules, full_tunnel);
            let p = Policy::parse(std::path::Path::new("p.toml"), &text)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            for (user, dst, proto, port, posture, named) in flows {
                let dst: IpAddr = DSTS[dst].parse().unwrap();
                let src: IpAddr = if dst.is_ipv4() { "100.118.0.2".parse().unwrap() } else { "fd77::2".parse().unwrap() };
                let key = FlowKey { proto: PROTOS[proto].1, src, dst, sport: 40000, dport: port };
                let claims = posture.map(|(c1, c2)| PostureClaims {
                    device: String::new(),
                    device_key: String::new(),
                    user: String::new(),
                    groups: Vec::new(),
                    checks: [("c1".to_string(), c1), ("c2".to_string(), c2)].into(),
                    iat: 0,
                    exp: 0,
                    kid: String::new(),
                    auth_time: None,
                });
                let named = named.filter(|&a| (a as usize) < n);
                let u = user as UserId;
                prop_assert_eq!(
                    p.decide(u, &key, &crate::policy::Facts::new(claims.as_ref(), 0), named),
                    p.decide_scan(u, &key, &crate::policy::Facts::new(claims.as_ref(), 0), named),
                    "user {} flow {:?} named {:?}\n{}", user, key, named, text
                );
            }
        }
    }
}
