//! What the admin decides about a device's tunnel: split (include) or full, exclusions, local
//! network access, whether stopping the client opens the device, the captive-portal grace; the
//! broker's internet-egress check; and admin override codes that open a locked device for a
//! while. Pure: no sockets, no clocks.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::packet::{FlowKey, PROTO_TCP, PROTO_UDP};
use crate::posture::TokenSigner;

/// Which traffic goes through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// Only the applications' ranges and the broker's services (split tunnel).
    #[default]
    Include,
    /// Everything, with the broker as the way to the internet; fails closed.
    Full,
}

/// Whether the device may talk to its own local networks (home NAS, printer) in full mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LocalNetwork {
    #[default]
    Allow,
    Block,
}

/// The tunnel settings of one user's devices, pushed with the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTunnel {
    /// The `[[tunnels]]` entry that applies (empty: none, the defaults).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mode: TunnelMode,
    /// Networks that go direct, outside the tunnel (full mode).
    #[serde(default)]
    pub exclude: Vec<IpNet>,
    /// Names (and their subdomains) whose addresses go direct, as the DNS stub resolves them.
    #[serde(default)]
    pub exclude_domains: Vec<String>,
    #[serde(default)]
    pub local_network: LocalNetwork,
    /// The widest local network "allow" opens: an interface network wider than this (a hostile
    /// DHCP server handing out a /1) is narrowed to this many bits around the device's own
    /// address. IPv4 and IPv6.
    #[serde(default = "default_local_max_v4")]
    pub local_network_max_prefix: u8,
    #[serde(default = "default_local_max_v6")]
    pub local_network_max_prefix_v6: u8,
    /// Stopping the client removes the kill switch. When false, a stopped client leaves the
    /// device closed (full mode).
    #[serde(default = "yes")]
    pub allow_disable: bool,
    /// How long a user may open the device to sign in to a captive portal while the tunnel is
    /// down (seconds; 0: never).
    #[serde(default)]
    pub captive_grace_secs: u64,
}

fn yes() -> bool {
    true
}

/// Default widest local network a full tunnel lets through: a /24 (IPv4), a /64 (IPv6).
pub const DEFAULT_LOCAL_MAX_V4: u8 = 24;
pub const DEFAULT_LOCAL_MAX_V6: u8 = 64;

fn default_local_max_v4() -> u8 {
    DEFAULT_LOCAL_MAX_V4
}
fn default_local_max_v6() -> u8 {
    DEFAULT_LOCAL_MAX_V6
}

/// The local networks a full tunnel lets the device reach directly: each interface's network
/// (address with prefix), narrowed to at most `max_v4` / `max_v6` bits around the device's own
/// address, never wider. Loopback and duplicates are left out.
pub fn clamp_local_networks(nets: &[IpNet], max_v4: u8, max_v6: u8) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for n in nets {
        if n.addr().is_loopback() {
            continue;
        }
        let max = if n.addr().is_ipv4() {
            max_v4.min(32)
        } else {
            max_v6.min(128)
        };
        let clamped = if n.prefix_len() < max {
            IpNet::new(n.addr(), max).unwrap_or(*n).trunc()
        } else {
            n.trunc()
        };
        if !out.contains(&clamped) {
            out.push(clamped);
        }
    }
    out
}

impl Default for UserTunnel {
    fn default() -> Self {
        UserTunnel {
            name: String::new(),
            mode: TunnelMode::Include,
            exclude: Vec::new(),
            exclude_domains: Vec::new(),
            local_network: LocalNetwork::Allow,
            local_network_max_prefix: DEFAULT_LOCAL_MAX_V4,
            local_network_max_prefix_v6: DEFAULT_LOCAL_MAX_V6,
            allow_disable: true,
            captive_grace_secs: 0,
        }
    }
}

impl UserTunnel {
    /// True when `name` is one of the excluded domains or below one.
    pub fn domain_excluded(&self, name: &str) -> bool {
        in_any_zone(name, &self.exclude_domains)
    }
}

/// True when `name` (any case, trailing dot or not) is one of `zones` (normalized, as the
/// policy keeps them) or below one.
pub fn in_any_zone(name: &str, zones: &[String]) -> bool {
    if zones.is_empty() {
        return false;
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    zones.iter().any(|z| crate::dns::in_zone(&name, z))
}

/// Why the broker does not carry a full-tunnel flow to the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressRefusal {
    /// Private, shared, loopback, link-local, multicast or reserved destination: the broker's
    /// own networks are not the internet.
    PrivateAddress,
    /// DNS or DNS over TLS to a server of the user's choosing: names go through the device's
    /// filtering resolver.
    DnsBypass,
}

impl EgressRefusal {
    pub fn text(self) -> &'static str {
        match self {
            EgressRefusal::PrivateAddress => "internet egress refused: not a public address",
            EgressRefusal::DnsBypass => {
                "internet egress refused: DNS must go through the Sekisho resolver"
            }
        }
    }
}

/// True for destinations that are not the public internet.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared (CGNAT, overlays)
                || o[0] >= 240
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || a.to_ipv4_mapped().is_some()
        }
    }
}

/// May the broker carry `key` to the internet for a full-tunnel device? DNS (53, 853) only
/// to the policy's upstream resolvers `dns_servers`, which the device's stub uses (they may
/// be private: the admin named them); anything else only to public addresses.
pub fn egress_check(key: &FlowKey, dns_servers: &[IpAddr]) -> Result<(), EgressRefusal> {
    if (key.proto == PROTO_UDP || key.proto == PROTO_TCP) && (key.dport == 53 || key.dport == 853) {
        return if dns_servers.contains(&key.dst) {
            Ok(())
        } else {
            Err(EgressRefusal::DnsBypass)
        };
    }
    if is_private(key.dst) {
        return Err(EgressRefusal::PrivateAddress);
    }
    Ok(())
}

// ---- override codes ----

/// Prefix of admin override codes.
pub const OVERRIDE_PREFIX: &str = "SKO1";

/// What an override code says: this device may run open until `not_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideClaims {
    /// A random id, to find the code in the audit log.
    pub id: String,
    pub device: String,
    /// Unix seconds.
    pub not_after: u64,
    /// The admin who issued it.
    pub by: String,
    /// Key id of the signing key.
    pub kid: String,
}

/// Why an override code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("not an override code (they start with \"SKO1.\")")]
    Malformed,
    #[error("the code is not signed by this deployment")]
    BadSignature,
    #[error("the code is for device {0:?}, not this one")]
    WrongDevice(String),
    #[error("the code expired {0} s ago")]
    Expired(u64),
}

/// Signs an override code.
pub fn issue_override(signer: &TokenSigner, mut claims: OverrideClaims) -> String {
    claims.kid = signer.kid().to_string();
    let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let sig = signer.sign(body.as_bytes());
    format!("{OVERRIDE_PREFIX}.{body}.{}", B64.encode(sig.to_bytes()))
}

/// A public key override codes may be signed with: `kid` and the Ed25519 key (base64url).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideKey {
    pub kid: String,
    pub key: String,
}

impl OverrideKey {
    pub fn of(signer: &TokenSigner) -> Self {
        OverrideKey {
            kid: signer.kid().to_string(),
            key: B64.encode(signer.public().to_bytes()),
        }
    }
}

/// Checks `code` for `device` at Unix time `now` against `keys`; works offline.
pub fn verify_override(
    keys: &[OverrideKey],
    code: &str,
    device: &str,
    now: u64,
) -> Result<OverrideClaims, OverrideError> {
    let code = code.trim();
    if code.len() > 2048 {
        return Err(OverrideError::Malformed);
    }
    let rest = code
        .strip_prefix(OVERRIDE_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(OverrideError::Malformed)?;
    let (body, sig) = rest.split_once('.').ok_or(OverrideError::Malformed)?;
    let claims: OverrideClaims = B64
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(OverrideError::Malformed)?;
    let sig: [u8; 64] = B64
        .decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(OverrideError::Malformed)?;
    let key = keys
        .iter()
        .filter(|k| k.kid == claims.kid)
        .find_map(|k| {
            let bytes: [u8; 32] = B64.decode(&k.key).ok()?.try_into().ok()?;
            VerifyingKey::from_bytes(&bytes).ok()
        })
        .ok_or(OverrideError::BadSignature)?;
    key.verify(body.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| OverrideError::BadSignature)?;
    if claims.device != device {
        return Err(OverrideError::WrongDevice(claims.device));
    }
    if now >= claims.not_after {
        return Err(OverrideError::Expired(now - claims.not_after));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(dst: [u8; 4], proto: u8, dport: u16) -> FlowKey {
        FlowKey {
            proto,
            src: IpAddr::from([100, 118, 0, 2]),
            dst: IpAddr::from(dst),
            sport: 40000,
            dport,
        }
    }

    #[test]
    fn egress_is_public_addresses_only_and_no_dns() {
        assert_eq!(
            egress_check(&k([203, 0, 113, 80], PROTO_TCP, 80), &[]),
            Ok(())
        );
        assert_eq!(egress_check(&k([8, 8, 8, 8], PROTO_TCP, 443), &[]), Ok(()));
        for private in [
            [10, 20, 0, 10],
            [192, 168, 1, 5],
            [172, 16, 0, 1],
            [100, 118, 0, 1],
            [127, 0, 0, 1],
            [169, 254, 1, 1],
            [224, 0, 0, 251],
            [255, 255, 255, 255],
            [0, 1, 2, 3],
        ] {
            assert_eq!(
                egress_check(&k(private, PROTO_TCP, 80), &[]),
                Err(EgressRefusal::PrivateAddress),
                "{private:?}"
            );
        }
        assert_eq!(
            egress_check(&k([8, 8, 8, 8], PROTO_UDP, 53), &[]),
            Err(EgressRefusal::DnsBypass)
        );
        assert_eq!(
            egress_check(&k([8, 8, 8, 8], PROTO_TCP, 853), &[]),
            Err(EgressRefusal::DnsBypass)
        );
        // The policy's resolver is reachable for DNS, even a private one, and only for DNS.
        let ours = [IpAddr::from([10, 99, 0, 53])];
        assert_eq!(
            egress_check(&k([10, 99, 0, 53], PROTO_UDP, 53), &ours),
            Ok(())
        );
        assert_eq!(
            egress_check(&k([10, 99, 0, 53], PROTO_TCP, 80), &ours),
            Err(EgressRefusal::PrivateAddress)
        );
        assert!(is_private("fd00::1".parse().unwrap()));
        assert!(is_private("fe80::1".parse().unwrap()));
        assert!(!is_private("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn excluded_domains_cover_subdomains_at_label_boundaries() {
        let t = UserTunnel {
            exclude_domains: vec!["video.example".into()],
            ..Default::default()
        };
        assert!(t.domain_excluded("video.example"));
        assert!(t.domain_excluded("cdn.VIDEO.example."));
        assert!(!t.domain_excluded("badvideo.example"));
        assert!(!t.domain_excluded("example"));
    }

    #[test]
    fn override_codes_are_bound_to_device_key_and_time() {
        let signer = TokenSigner::generate();
        let keys = vec![OverrideKey::of(&signer)];
        let code = issue_override(
            &signer,
            OverrideClaims {
                id: "abc".into(),
                device: "alice-laptop".into(),
                not_after: 1000,
                by: "admin".into(),
                kid: String::new(),
            },
        );
        let ok = verify_override(&keys, &code, "alice-laptop", 999).unwrap();
        assert_eq!(ok.id, "abc");
        assert_eq!(
            verify_override(&keys, &code, "alice-laptop", 1000),
            Err(OverrideError::Expired(0))
        );
        assert_eq!(
            verify_override(&keys, &code, "bob-laptop", 10),
            Err(OverrideError::WrongDevice("alice-laptop".into()))
        );
        let other = vec![OverrideKey::of(&TokenSigner::generate())];
        assert_eq!(
            verify_override(&other, &code, "alice-laptop", 10),
            Err(OverrideError::BadSignature)
        );
        // A changed claim breaks the signature.
        let (_, rest) = code.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged = OverrideClaims {
            id: "abc".into(),
            device: "alice-laptop".into(),
            not_after: u64::MAX,
            by: "admin".into(),
            kid: signer.kid().into(),
        };
        let forged = format!(
            "SKO1.{}.{sig}",
            B64.encode(serde_json::to_vec(&forged).unwrap())
        );
        assert_eq!(
            verify_override(&keys, &forged, "alice-laptop", 10),
            Err(OverrideError::BadSignature)
        );
        for junk in ["", "SKO1", "SKO1.x.y", "SKD1.a.b", &"A".repeat(5000)] {
            assert!(verify_override(&keys, junk, "alice-laptop", 10).is_err());
        }
    }
}

/// Split-tunnel routes minus `hosts` (the brokers' endpoints and the control API): a route
/// that covers one of them is replaced by the smaller prefixes around it, so the tunnel's own
/// packets (and posture refreshes) never route into the tunnel. Routes not covering any host
/// are kept as they are; the result covers exactly the routes without the hosts.
pub fn routes_without(routes: &[IpNet], hosts: &[IpAddr]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = routes.iter().map(|n| n.trunc()).collect();
    for host in hosts {
        let mut next = Vec::with_capacity(out.len() + 32);
        for net in out {
            if net.contains(host) {
                next.extend(split_around(net, *host));
            } else {
                next.push(net);
            }
        }
        out = next;
    }
    out
}

/// `net` without the single address `host` (which it contains): the sibling of each half
/// down to the host.
fn split_around(net: IpNet, host: IpAddr) -> Vec<IpNet> {
    let mut out = Vec::new();
    let mut cur = net;
    while cur.prefix_len() < cur.max_prefix_len() {
        let Ok(mut halves) = cur.subnets(cur.prefix_len() + 1) else {
            break;
        };
        let (Some(a), Some(b)) = (halves.next(), halves.next()) else {
            break;
        };
        if a.contains(&host) {
            out.push(b);
            cur = a;
        } else {
            out.push(a);
            cur = b;
        }
    }
    out
}

#[cfg(test)]
mod local_tests {
    use super::*;

    /// A hostile DHCP server hands out a /1: "local network allowed" opens a /24 around the
    /// device's address, not half the internet.
    #[test]
    fn local_networks_are_never_wider_than_the_admins_maximum() {
        let nets: Vec<IpNet> = [
            "10.128.0.5/1",
            "192.168.1.20/24",
            "192.168.7.9/30",
            "127.0.0.1/8",
            "2001:db8::5/32",
            "fe80::1/64",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let got: Vec<String> = clamp_local_networks(&nets, 24, 64)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "10.128.0.0/24",
                "192.168.1.0/24",
                "192.168.7.8/30",
                "2001:db8::/64",
                "fe80::/64"
            ]
        );
        // An admin who wants only the device's own address.
        let got = clamp_local_networks(&nets[..1], 32, 128);
        assert_eq!(got, vec!["10.128.0.5/32".parse::<IpNet>().unwrap()]);
    }

    /// An application network covering a broker's own address (10.0.0.0/8 with the broker at
    /// 10.99.2.2) loses exactly that address: the tunnel's packets to the broker never loop
    /// into the tunnel, and everything else of the network still does.
    #[test]
    fn routes_leave_out_the_brokers_own_addresses() {
        let routes: Vec<IpNet> = ["10.0.0.0/8", "192.168.5.0/24", "10.20.0.10/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let broker: IpAddr = "10.99.2.2".parse().unwrap();
        let out = routes_without(&routes, &[broker]);
        assert!(out.iter().all(|n| !n.contains(&broker)), "{out:?}");
        assert_eq!(out.len(), 24 + 2, "{out:?}");
        for probe in [
            "10.20.0.10",
            "10.99.2.1",
            "10.99.2.3",
            "10.255.255.255",
            "10.0.0.0",
            "192.168.5.9",
        ] {
            let a: IpAddr = probe.parse().unwrap();
            assert!(out.iter().any(|n| n.contains(&a)), "{probe} lost: {out:?}");
        }
        assert_eq!(
            routes_without(&routes[1..], &[broker]),
            routes[1..].to_vec()
        );
        // A host route to the broker itself disappears; IPv6 works the same way.
        assert!(routes_without(&["10.99.2.2/32".parse().unwrap()], &[broker]).is_empty());
        let v6 = routes_without(
            &["fd00::/120".parse().unwrap()],
            &["fd00::7".parse().unwrap()],
        );
        assert_eq!(v6.len(), 8);
    }
}
