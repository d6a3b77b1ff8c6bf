//! The connector's local allowlist: the networks, ports and DNS zones it may reach on its site,
//! whatever a broker asks. Set at enrollment (`sekisho-connector enroll --allow …`), kept in
//! connector.toml (`allow = [...]`), enforced here in the core (packets, name translations,
//! routes, health probes) and again by the kernel (the nftables forward chain is built from
//! [`Allowlist::nft_sets`]). A taken-over broker can therefore only reach what the site's own
//! admin put in this list.
//!
//! Items, as text:
//!
//! - `10.20.0.0/24`, `10.20.0.10`, `fd00::/64`: a network (a bare address is a host), any
//!   protocol and port;
//! - `10.20.0.10:80`, `10.20.0.0/24:80,443,8000-8100`, `[fd00::1]:443`: TCP and UDP to those
//!   ports only (ICMP errors about such a flow included);
//! - `corp.example`: a DNS zone: names at or below it may be resolved for name-based
//!   applications (and the address a name resolves to must still be in a network above).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::packet::{self, FlowKey, PROTO_TCP, PROTO_UDP, PacketKind};

/// Shortest IPv4 (IPv6) prefix a broker may route into the tunnel: a broker asking to route
/// `0.0.0.0/1` would take the site's traffic.
pub const MIN_ROUTE_PREFIX_V4: u8 = 8;
pub const MIN_ROUTE_PREFIX_V6: u8 = 16;

/// One network and the ports allowed on it (none: every protocol and port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetItem {
    pub net: IpNet,
    pub ports: Vec<(u16, u16)>,
}

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Net(NetItem),
    /// A DNS zone, lower case, without a trailing dot.
    Zone(String),
}

impl FromStr for Item {
    type Err = String;

    fn from_str(text: &str) -> Result<Item, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty allowlist entry".into());
        }
        // "[v6 or v6/len]:ports"
        if let Some(rest) = t.strip_prefix('[') {
            let (addr, ports) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{t:?}: expected [IPv6 network]:ports"))?;
            return Ok(Item::Net(NetItem {
                net: parse_net(addr).ok_or_else(|| format!("{t:?}: {addr:?} is no network"))?,
                ports: parse_ports(ports).map_err(|e| format!("{t:?}: {e}"))?,
            }));
        }
        if let Some(net) = parse_net(t) {
            return Ok(Item::Net(NetItem {
                net,
                ports: Vec::new(),
            }));
        }
        // "v4 or v4/len:ports" (an IPv6 network with ports needs brackets).
        if let Some((addr, ports)) = t.rsplit_once(':')
            && !addr.contains(':')
            && let Some(net) = parse_net(addr)
        {
            return Ok(Item::Net(NetItem {
                net,
                ports: parse_ports(ports).map_err(|e| format!("{t:?}: {e}"))?,
            }));
        }
        let zone = t
            .trim_start_matches("*.")
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let valid = !zone.is_empty()
            && zone.len() <= 253
            && zone.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            && zone.bytes().any(|b| b.is_ascii_alphabetic());
        if !valid {
            return Err(format!(
                "{t:?} is neither a network (10.20.0.0/24, 10.20.0.10:443, [fd00::1]:443) nor a DNS zone (corp.example)"
            ));
        }
        Ok(Item::Zone(zone))
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Zone(z) => f.write_str(z),
            Item::Net(n) => {
                let net = if n.net.prefix_len() == n.net.max_prefix_len() {
                    n.net.addr().to_string()
                } else {
                    n.net.to_string()
                };
                if n.ports.is_empty() {
                    return f.write_str(&net);
                }
                let ports: Vec<String> = n
                    .ports
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                if n.net.addr().is_ipv6() {
                    write!(f, "[{net}]:{}", ports.join(","))
                } else {
                    write!(f, "{net}:{}", ports.join(","))
                }
            }
        }
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u16 = a.parse().map_err(|_| format!("{part:?} is no port"))?;
        let b: u16 = b.parse().map_err(|_| format!("{part:?} is no port"))?;
        if a == 0 || a > b {
            return Err(format!("{part:?} is no port range (1-65535, low-high)"));
        }
        out.push((a, b));
    }
    Ok(out)
}

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address is in no allowed network.
    Address,
    /// The network is allowed, but not this protocol or port.
    Port,
    /// The name is in no allowed zone.
    Zone,
    /// A route a broker asked for overlaps an allowed network or is too wide.
    Route,
    /// A name resolved at the site to an address the device's deny rules forbid.
    Denied,
}

impl Refusal {
    pub fn text(self) -> &'static str {
        match self {
            Refusal::Address => "address outside the connector's allowlist",
            Refusal::Port => "protocol or port outside the connector's allowlist",
            Refusal::Zone => "name outside the connector's allowed zones",
            Refusal::Route => "route overlapping the site's allowed networks, or too wide",
            Refusal::Denied => "the name resolved to an address a deny rule forbids this user",
        }
    }
}

/// The connector's allowlist. Serialized as the list of its items' texts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Allowlist {
    items: Vec<Item>,
}

impl TryFrom<Vec<String>> for Allowlist {
    type Error = String;
    fn try_from(v: Vec<String>) -> Result<Allowlist, String> {
        Allowlist::parse(&v)
    }
}

impl From<Allowlist> for Vec<String> {
    fn from(a: Allowlist) -> Vec<String> {
        a.items.iter().map(Item::to_string).collect()
    }
}

impl Allowlist {
    /// Parses the items; the error names the first bad one.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Allowlist, String> {
        let items = items
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<Item>, String>>()?;
        Ok(Allowlist { items })
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    fn nets(&self) -> impl Iterator<Item = &NetItem> {
        self.items.iter().filter_map(|i| match i {
            Item::Net(n) => Some(n),
            Item::Zone(_) => None,
        })
    }

    /// Whether a flow to `dst` with `proto` and destination port `dport` (TCP and UDP only) may
    /// leave into the site.
    pub fn permits(&self, dst: IpAddr, proto: u8, dport: Option<u16>) -> Result<(), Refusal> {
        let mut in_net = false;
        for n in self.nets().filter(|n| n.net.contains(&dst)) {
            in_net = true;
            if n.ports.is_empty() {
                return Ok(());
            }
            if let (PROTO_TCP | PROTO_UDP, Some(p)) = (proto, dport)
                && n.ports.iter().any(|(a, b)| (*a..=*b).contains(&p))
            {
                return Ok(());
            }
        }
        Err(if in_net {
            Refusal::Port
        } else {
            Refusal::Address
        })
    }

    fn permits_key(&self, key: &FlowKey, dst: IpAddr) -> Result<(), Refusal> {
        let port = matches!(key.proto, PROTO_TCP | PROTO_UDP).then_some(key.dport);
        self.permits(dst, key.proto, port)
    }

    /// Whether a packet from a device may go into the site. `real_dst` is the address a
    /// synthetic destination translates to (the kernel rewrites it on the way out); None for
    /// a packet to a real address. An ICMP error goes only where the flow it quotes may go.
    pub fn permits_packet(&self, pkt: &[u8], real_dst: Option<IpAddr>) -> Result<(), Refusal> {
        self.permits_kind(&packet::classify(pkt), pkt, real_dst)
    }

    /// [`Allowlist::permits_packet`] for a packet already classified as `kind`.
    pub fn permits_kind(
        &self,
        kind: &Result<PacketKind, packet::PacketError>,
        pkt: &[u8],
        real_dst: Option<IpAddr>,
    ) -> Result<(), Refusal> {
        match *kind {
            Ok(PacketKind::Flow(key)) => self.permits_key(&key, real_dst.unwrap_or(key.dst)),
            Ok(PacketKind::IcmpError { outer, about }) => {
                let flow = about.reversed();
                self.permits_key(&flow, real_dst.unwrap_or(outer.dst))
            }
            // Later fragments and anything that does not classify: by address alone, and only
            // where every protocol is allowed.
            Err(_) => match packet::addresses(pkt) {
                Ok((_, dst)) => self.permits(real_dst.unwrap_or(dst), 0, None),
                Err(_) => Err(Refusal::Address),
            },
        }
    }

    /// Whether `name` (lower case, no trailing dot) may be resolved for a broker.
    pub fn permits_name(&self, name: &str) -> Result<(), Refusal> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let ok = self.items.iter().any(|i| match i {
            Item::Zone(z) => crate::dns::in_zone(&name, z),
            Item::Net(_) => false,
        });
        if ok { Ok(()) } else { Err(Refusal::Zone) }
    }

    /// Whether the address a name resolved to may be reached at all (some protocol or port).
    pub fn permits_resolved(&self, addr: IpAddr) -> Result<(), Refusal> {
        if self.nets().any(|n| n.net.contains(&addr)) {
            Ok(())
        } else {
            Err(Refusal::Address)
        }
    }

    /// Whether a broker may route `net` into the tunnel (device and synthetic ranges): never
    /// over an allowed network (that would pull the site's own traffic into the tunnel), never
    /// wider than /8 (IPv4) or /16 (IPv6).
    pub fn permits_route(&self, net: &IpNet) -> Result<(), Refusal> {
        let min = match net {
            IpNet::V4(_) => MIN_ROUTE_PREFIX_V4,
            IpNet::V6(_) => MIN_ROUTE_PREFIX_V6,
        };
        let overlaps = self
            .nets()
            .any(|n| n.net.contains(net) || net.contains(&n.net));
        if net.prefix_len() < min || overlaps {
            Err(Refusal::Route)
        } else {
            Ok(())
        }
    }

    /// Whether a health probe to `host:port` (TCP) may be made; names are checked by
    /// [`Allowlist::permits_name`] and then their address here.
    pub fn permits_probe(&self, addr: IpAddr, port: u16) -> Result<(), Refusal> {
        self.permits(addr, PROTO_TCP, Some(port))
    }

    /// The nftables set elements the forward chain checks: networks for any protocol
    /// (overlaps are merged by the set's `auto-merge`), and network . port-range pairs made
    /// disjoint here (nftables refuses overlapping elements in a concatenated set, and cannot
    /// merge them): nested networks are cut into pieces, each piece gets the union of the
    /// port ranges of every entry covering it, merged.
    pub fn nft_sets(&self) -> NftSets {
        let mut s = NftSets::default();
        let any: Vec<IpNet> = self
            .nets()
            .filter(|n| n.ports.is_empty())
            .map(|n| n.net)
            .collect();
        for net in &any {
            match net {
                IpNet::V4(_) => s.any4.push(net.to_string()),
                IpNet::V6(_) => s.any6.push(net.to_string()),
            }
        }
        let with_ports: Vec<&NetItem> = self
            .nets()
            .filter(|n| !n.ports.is_empty())
            // Already allowed for everything: nothing to add.
            .filter(|n| !any.iter().any(|a| a.contains(&n.net)))
            .collect();
        let mut nets: Vec<IpNet> = with_ports.iter().map(|n| n.net).collect();
        nets.sort();
        nets.dedup();
        for piece in disjoint_pieces(&nets) {
            let mut ranges: Vec<(u16, u16)> = with_ports
                .iter()
                .filter(|n| n.net.contains(&piece))
                .flat_map(|n| n.ports.iter().copied())
                .collect();
            ranges.sort();
            let mut merged: Vec<(u16, u16)> = Vec::new();
            for (a, b) in ranges {
                match merged.last_mut() {
                    Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            let out = match piece {
                IpNet::V4(_) => &mut s.ports4,
                IpNet::V6(_) => &mut s.ports6,
            };
            for (a, b) in merged {
                let range = if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                };
                out.push(format!("{piece} . {range}"));
            }
        }
        s
    }
}

/// Disjoint networks covering exactly the union of `nets` (sorted, deduplicated), such that
/// every piece lies inside a net of the list and no net of the list cuts a piece: a net with
/// smaller nets inside it is split around them.
fn disjoint_pieces(nets: &[IpNet]) -> Vec<IpNet> {
    fn cut(net: IpNet, inner: &[IpNet], out: &mut Vec<IpNet>) {
        let inside: Vec<IpNet> = inner
            .iter()
            .copied()
            .filter(|i| net.contains(i) && *i != net)
            .collect();
        if inside.is_empty() {
            out.push(net);
            return;
        }
        let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
            out.push(net);
            return;
        };
        for half in halves {
            if inside.contains(&half) {
                // That inner net is a piece of its own (cut as a net of the list).
                continue;
            }
            cut(half, &inside, out);
        }
    }
    let mut out = Vec::new();
    for net in nets {
        cut(*net, nets, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// Set elements for the kernel's copy of the allowlist.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NftSets {
    pub any4: Vec<String>,
    pub ports4: Vec<String>,
    pub any6: Vec<String>,
    pub ports6: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(items: &[&str]) -> Allowlist {
        Allowlist::parse(items).unwrap()
    }

    #[test]
    fn items_parse_and_print_back() {
        for (text, back) in [
            ("10.20.0.0/24", "10.20.0.0/24"),
            ("10.20.0.7/24", "10.20.0.0/24"),
            ("10.20.0.10", "10.20.0.10"),
            ("10.20.0.10:80", "10.20.0.10:80"),
            (
                "10.20.0.0/24:80, 443,8000-8100",
                "10.20.0.0/24:80,443,8000-8100",
            ),
            ("fd00::/64", "fd00::/64"),
            ("[fd00::1]:443", "[fd00::1]:443"),
            ("Corp.Example.", "corp.example"),
            ("*.dev.corp.example", "dev.corp.example"),
        ] {
            let item: Item = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(item.to_string(), back, "{text}");
        }
        for bad in [
            "",
            "10.20.0.10:0",
            "10.20.0.10:90-80",
            "10.20.0.10:http",
            "fd00::1:443x",
            "a..b",
            "1.2.3.4/33",
            "123.456",
            "bad name",
        ] {
            assert!(bad.parse::<Item>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn packets_go_only_to_allowed_networks_protocols_and_ports() {
        let a = list(&["10.20.0.10:80,443", "10.20.1.0/24", "corp.example"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(a.permits(ip("10.20.0.10"), PROTO_TCP, Some(80)), Ok(()));
        assert_eq!(a.permits(ip("10.20.0.10"), PROTO_UDP, Some(443)), Ok(()));
        assert_eq!(
            a.permits(ip("10.20.0.10"), PROTO_TCP, Some(22)),
            Err(Refusal::Port)
        );
        assert_eq!(
            a.permits(ip("10.20.0.10"), packet::PROTO_ICMP, None),
            Err(Refusal::Port)
        );
        assert_eq!(
            a.permits(ip("10.20.0.53"), PROTO_UDP, Some(53)),
            Err(Refusal::Address)
        );
        assert_eq!(a.permits(ip("10.20.1.9"), packet::PROTO_ICMP, None), Ok(()));
        assert_eq!(a.permits_name("wiki.corp.example"), Ok(()));
        assert_eq!(a.permits_name("corp.example"), Ok(()));
        assert_eq!(a.permits_name("evilcorp.example"), Err(Refusal::Zone));
        assert_eq!(a.permits_resolved(ip("10.20.0.10")), Ok(()));
        assert_eq!(a.permits_resolved(ip("10.20.0.11")), Err(Refusal::Address));
        // Routes: not over an allowed network, not too wide.
        for (net, ok) in [
            ("100.118.0.0/16", true),
            ("10.20.0.0/16", false),
            ("10.20.0.10/32", false),
            ("0.0.0.0/0", false),
            ("64.0.0.0/2", false),
            ("fd7a::/48", true),
            ("::/0", false),
        ] {
            assert_eq!(a.permits_route(&net.parse().unwrap()).is_ok(), ok, "{net}");
        }
        // An empty list allows nothing.
        let none = Allowlist::default();
        assert!(none.permits(ip("10.20.0.10"), PROTO_TCP, Some(80)).is_err());
        assert!(none.permits_name("wiki.corp.example").is_err());
    }

    #[test]
    fn kernel_sets_hold_the_same_list() {
        let a = list(&[
            "10.20.0.10:80,8000-8100",
            "10.20.1.0/24",
            "[fd00::1]:443",
            "corp.example",
        ]);
        let s = a.nft_sets();
        assert_eq!(s.any4, vec!["10.20.1.0/24"]);
        assert_eq!(
            s.ports4,
            vec!["10.20.0.10/32 . 80", "10.20.0.10/32 . 8000-8100"]
        );
        assert!(s.any6.is_empty());
        assert_eq!(s.ports6, vec!["fd00::1/128 . 443"]);
    }

    /// Overlapping entries (a host inside a network, the same host twice with other ports)
    /// become disjoint set elements allowing exactly the same: nftables refuses overlaps in a
    /// concatenated set, which would stop the connector from starting.
    #[test]
    fn overlapping_entries_become_disjoint_kernel_elements() {
        let a = list(&[
            "10.20.0.0/30:80",
            "10.20.0.1:443",
            "10.20.0.1:80,81",
            "10.20.5.0/24:22",
            "10.20.5.0/24",
        ]);
        let s = a.nft_sets();
        assert_eq!(s.any4, vec!["10.20.5.0/24"]);
        assert_eq!(
            s.ports4,
            vec![
                "10.20.0.0/32 . 80",
                "10.20.0.1/32 . 80-81",
                "10.20.0.1/32 . 443",
                "10.20.0.2/31 . 80",
            ]
        );
        // The same decisions as the list itself, address by address.
        for host in 0..4u8 {
            let ip = IpAddr::from([10, 20, 0, host]);
            for port in [22, 80, 81, 443] {
                let listed = a.permits(ip, PROTO_TCP, Some(port)).is_ok();
                let kernel = s.ports4.iter().any(|e| {
                    let (net, range) = e.split_once(" . ").unwrap();
                    let net: IpNet = net.parse().unwrap();
                    let (lo, hi) = range
                        .split_once('-')
                        .map(|(l, h)| (l.parse::<u16>().unwrap(), h.parse::<u16>().unwrap()))
                        .unwrap_or_else(|| (range.parse().unwrap(), range.parse().unwrap()));
                    net.contains(&ip) && (lo..=hi).contains(&port)
                });
                assert_eq!(listed, kernel, "{ip}:{port}");
            }
        }
    }

    proptest! {
        /// The allowlist survives its own text form (as connector.toml keeps it).
        #[test]
        fn text_round_trip(a in 0u8..=255, b in 0u8..=255, len in 8u8..=32, p in 1u16..=65535, q in 0u16..100) {
            let items = vec![
                format!("10.{a}.{b}.0/{len}"),
                format!("172.16.{a}.{b}:{p}"),
                format!("192.168.{a}.0/24:{p}-{}", p.saturating_add(q)),
            ];
            let list = Allowlist::parse(&items).unwrap();
            let text: Vec<String> = list.clone().into();
            prop_assert_eq!(Allowlist::parse(&text).unwrap(), list);
        }
    }
}
