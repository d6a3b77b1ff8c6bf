//! The handshake shield in the kernel: an nftables rule that drops WireGuard handshake
//! initiations over a source address's limit before they reach the broker's sockets.
//!
//! The workers apply the same per-source limit ([`PER_SOURCE`]) themselves, so the shield
//! changes no decision; it changes where the work happens. Without it every datagram of a
//! flood wakes a worker thread, is copied out of the kernel and is counted there: measured on
//! the quickstart, a 50,000/s flood from one address cost the broker 17 % of a core, with the
//! shield 1 %. Installing it needs CAP_NET_ADMIN and `nft`; without them the broker warns and
//! goes on with the workers' limit alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sekisho_proto::wg::PER_SOURCE;
use tracing::{info, warn};

/// How often the shield's drop counter is read into the stats.
const READ_EVERY: Duration = Duration::from_secs(2);

/// The nftables table of the shield in front of WireGuard port `port`.
pub fn table(port: u16) -> String {
    format!("sekisho_wg_{port}")
}

/// The script that (re)creates the shield for UDP port `port`: handshake initiations (message
/// type 1, the first payload byte) to a local address, per source address within
/// [`PER_SOURCE`], the rest counted and dropped. It runs before connection tracking (raw
/// priority), so a flood creates no conntrack entries either.
pub fn script(port: u16) -> String {
    let t = table(port);
    let rate = PER_SOURCE.per_second.ceil() as u64;
    let burst = PER_SOURCE.burst.ceil() as u64;
    let mut s = sekisho_sys::nft_delete_table("inet", &t);
    s += &format!(
        "table inet {t} {{\n\
         \x20 counter limited {{}}\n\
         \x20 set sources4 {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 60s; }}\n\
         \x20 set sources6 {{ type ipv6_addr; size 65536; flags dynamic,timeout; timeout 60s; }}\n\
         \x20 chain prerouting {{\n\
         \x20   type filter hook prerouting priority raw; policy accept;\n\
         \x20   udp dport {port} @th,64,8 1 fib daddr type local update @sources4 {{ ip saddr limit rate over {rate}/second burst {burst} packets }} counter name limited drop\n\
         \x20   udp dport {port} @th,64,8 1 fib daddr type local update @sources6 {{ ip6 saddr limit rate over {rate}/second burst {burst} packets }} counter name limited drop\n\
         \x20 }}\n\
         }}\n"
    );
    s
}

/// Installs the shield; returns the counter of what it dropped, kept current by a task.
pub async fn install(port: u16) -> Option<Arc<AtomicU64>> {
    if let Err(e) = sekisho_sys::nft(&script(port)).await {
        warn!(
            "cannot install the handshake shield in nftables ({e}); the workers alone limit \
             handshakes per source address"
        );
        return None;
    }
    info!(table = %table(port), "handshake shield installed: initiations over a source's limit are dropped in the kernel");
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = dropped.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(READ_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(n) = read_counter(port).await {
                counter.store(n, Ordering::Relaxed);
            }
        }
    });
    Some(dropped)
}

/// Removes the shield (at a clean stop; a restart replaces it).
pub async fn remove(port: u16) {
    let t = table(port);
    if let Err(e) = sekisho_sys::nft(&sekisho_sys::nft_delete_table("inet", &t)).await {
        warn!("cannot remove nftables table {t}: {e}");
    }
}

async fn read_counter(port: u16) -> Option<u64> {
    sekisho_sys::counter_packets("inet", &table(port), "limited").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_limits_initiations_to_the_workers_rate() {
        let s = script(51820);
        assert!(s.contains("table inet sekisho_wg_51820"));
        assert!(s.contains("udp dport 51820 @th,64,8 1"));
        assert!(s.contains("limit rate over 50/second burst 100 packets"));
        assert!(s.starts_with("table inet sekisho_wg_51820 {}\ndelete table"));
    }

    /// The script is valid nftables, checked by `nft -c` when it can run here (root).
    #[test]
    fn nft_accepts_the_script() {
        use std::io::Write;
        let Ok(mut child) = std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("nft not installed: not checked");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script(51820).as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Operation not permitted") {
            eprintln!("nft -c needs CAP_NET_ADMIN: not checked");
            return;
        }
        assert!(out.status.success(), "nft -c: {err}");
    }
}
