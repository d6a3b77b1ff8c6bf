//! Name-based applications at the connector, the I/O half: the site's resolver and the
//! nftables destination-NAT elements. Which packets wait for a translation is decided in
//! `sekisho_proto::connector::names`.

use std::net::{IpAddr, Ipv4Addr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tracing::{info, warn};

pub use sekisho_proto::connector::Key;

/// The site's resolver: the configured servers, or the system's (`/etc/resolv.conf`).
pub fn resolver(servers: &[IpAddr]) -> anyhow::Result<TokioResolver> {
    let builder = if servers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let ns = servers
            .iter()
            .map(|ip| NameServerConfig::udp_and_tcp(*ip))
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(ns),
            TokioRuntimeProvider::default(),
        )
    };
    Ok(builder.build()?)
}

/// Resolves `name` to its first IPv4 address.
pub async fn resolve(resolver: &TokioResolver, name: &str) -> Result<Ipv4Addr, String> {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    let answer = resolver
        .lookup_ip(fqdn.as_str())
        .await
        .map_err(|e| e.to_string())?;
    answer
        .iter()
        .find_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .ok_or_else(|| "no IPv4 address".to_string())
}

/// nftables commands that put `key → real` into the translation map (replacing `previous`).
pub fn map_script(table: &str, key: &Key, real: Ipv4Addr, previous: Option<Ipv4Addr>) -> String {
    let (device, synthetic) = key;
    let mut s = String::new();
    if let Some(old) = previous {
        s.push_str(&format!(
            "delete element inet {table} synth4 {{ {device} . {synthetic} : {old} }}\n"
        ));
    }
    s.push_str(&format!(
        "add element inet {table} synth4 {{ {device} . {synthetic} : {real} }}\n"
    ));
    s
}

/// The fallback of [`map_script`] when the kernel does not hold what the core believed: with
/// `exists`, the pair's element (whatever its address) is deleted first; without, it is only
/// added.
pub fn replace_script(table: &str, key: &Key, real: Ipv4Addr, exists: bool) -> String {
    let (device, synthetic) = key;
    let mut s = String::new();
    if exists {
        s.push_str(&format!(
            "delete element inet {table} synth4 {{ {device} . {synthetic} }}\n"
        ));
    }
    s.push_str(&format!(
        "add element inet {table} synth4 {{ {device} . {synthetic} : {real} }}\n"
    ));
    s
}

pub fn log_installed(name: &str, key: &Key, real: Ipv4Addr) {
    info!(%name, synthetic = %key.1, %real, "name translation installed");
}

pub fn log_failed(name: &str, e: &str) {
    warn!(%name, "cannot resolve application name on this site: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_scripts_replace_old_elements() {
        let key: Key = (
            "100.118.0.2".parse().unwrap(),
            "100.119.0.9".parse().unwrap(),
        );
        let s = map_script(
            "t",
            &key,
            Ipv4Addr::new(10, 0, 0, 2),
            Some(Ipv4Addr::new(10, 0, 0, 1)),
        );
        assert_eq!(
            s,
            "delete element inet t synth4 { 100.118.0.2 . 100.119.0.9 : 10.0.0.1 }\n\
             add element inet t synth4 { 100.118.0.2 . 100.119.0.9 : 10.0.0.2 }\n"
        );
    }
}
