//! nftables scripts, named counters, and forwarding switches (per namespace or per interface).

use crate::SysError;

/// The broker's key-encryption key may be in its environment: never handed to the tools run
/// here.
const SECRET_ENV: &str = "SEKISHO_KEY_ENCRYPTION_KEY";

/// Runs an nftables script (`nft -f -`), atomically: all of it applies or none.
pub async fn nft(script: &str) -> Result<(), SysError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .env_remove(SECRET_ENV)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(SysError::NftMissing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| SysError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| SysError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(SysError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// The script that removes table `family name` if it exists (and nothing else).
pub fn nft_delete_table(family: &str, name: &str) -> String {
    format!("table {family} {name} {{}}\ndelete table {family} {name}\n")
}

/// Turns on IPv4 forwarding in this network namespace; true when it was off.
pub fn enable_ipv4_forwarding() -> Result<bool, SysError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(false);
    }
    std::fs::write(path, "1").map_err(SysError::Forwarding)?;
    Ok(true)
}

/// The packets counted so far by the named counter `name` of table `family table`; None when
/// it cannot be read.
pub async fn counter_packets(family: &str, table: &str, name: &str) -> Option<u64> {
    let out = tokio::process::Command::new("nft")
        .env_remove(SECRET_ENV)
        .args(["-j", "list", "counter", family, table, name])
        .output()
        .await
        .ok()?;
    packets_of(&String::from_utf8_lossy(&out.stdout))
}

/// The packet count in `nft -j list counter` output.
pub fn packets_of(json: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["nftables"]
        .as_array()?
        .iter()
        .find_map(|o| o["counter"]["packets"].as_u64())
}

/// Turns on IPv4 forwarding for packets arriving on one interface only
/// (`net.ipv4.conf.<name>.forwarding`), leaving the namespace's other interfaces as they are.
/// True when it was off.
pub fn enable_ipv4_forwarding_on(interface: &str) -> Result<bool, SysError> {
    if interface.is_empty() || interface.contains('/') || interface.starts_with('.') {
        return Err(SysError::Forwarding(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad interface name {interface:?}"),
        )));
    }
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
    if std::fs::read_to_string(&path)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(false);
    }
    std::fs::write(&path, "1").map_err(SysError::Forwarding)?;
    Ok(true)
}

/// Turns IPv4 forwarding off again for packets arriving on `interface`.
pub fn disable_ipv4_forwarding_on(interface: &str) -> Result<(), SysError> {
    if interface.is_empty() || interface.contains('/') || interface.starts_with('.') {
        return Ok(());
    }
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
    std::fs::write(&path, "0").map_err(SysError::Forwarding)
}

/// The interface the kernel would send a packet to `addr` through (`ip route get`); None when
/// there is no route.
pub fn route_interface(addr: std::net::IpAddr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .env_remove(SECRET_ENV)
        .args(["-o", "route", "get", &addr.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words.next().map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_is_read_from_nft_json() {
        let j = r#"{"nftables": [{"metainfo": {"version": "1.0.9"}}, {"counter": {"family": "inet", "name": "limited", "table": "sekisho_wg_51820", "handle": 1, "packets": 846058, "bytes": 148906208}}]}"#;
        assert_eq!(packets_of(j), Some(846058));
        assert_eq!(packets_of("not json"), None);
    }

    #[test]
    fn loopback_routes_through_lo() {
        if let Some(dev) = route_interface("127.0.0.1".parse().unwrap()) {
            assert_eq!(dev, "lo");
        }
    }
}
