//! nftables scripts and the namespace's forwarding switch.

use crate::SysError;

/// Runs an nftables script (`nft -f -`), atomically: all of it applies or none.
pub async fn nft(script: &str) -> Result<(), SysError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
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
