//! Internet egress for full-tunnel devices: a TUN device (offloads on) whose packets leave
//! with source NAT. One task reads it and hands each packet to the worker of its device; one
//! task writes what the workers send out, coalesced.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use sekisho_proto::broker::WorkerId;
use sekisho_sys::AsyncDevice;
use sekisho_sys::tun::{TunReader, TunWriter};

use super::{DataPlane, WorkerInput};

/// The egress device's MTU.
pub const EGRESS_MTU: u16 = 1500;
/// Batches of packets queued for the egress writer.
pub const EGRESS_QUEUE: usize = 1024;

/// nftables table of the egress interface `tun`.
pub fn egress_table(tun: &str) -> String {
    format!(
        "sekisho_{}",
        tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// Creates the egress TUN device, routes the device range into it (replies after the kernel
/// undid the NAT) and masquerades what leaves for the internet.
pub async fn egress_up(
    e: &crate::config::EgressConfig,
    device_range: IpNet,
) -> Result<AsyncDevice> {
    if sekisho_sys::enable_ipv4_forwarding()? {
        info!("enabled IPv4 forwarding");
    }
    let tun = sekisho_sys::create_tun(&e.interface, EGRESS_MTU)?;
    let netlink = sekisho_sys::Netlink::open()?;
    let index = netlink.link_index(&e.interface).await?;
    netlink.add_route(index, device_range).await?;
    let t = egress_table(&e.interface);
    let tun_name = &e.interface;
    let out = match &e.uplink {
        Some(u) => format!("oifname \"{u}\""),
        None => format!("oifname != \"{tun_name}\""),
    };
    sekisho_sys::nft(&format!(
        "{}table ip {t} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             iifname \"{tun_name}\" {out} masquerade\n\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             iifname \"{tun_name}\" {out} accept\n\
             oifname \"{tun_name}\" ct state established,related accept\n\
             oifname \"{tun_name}\" counter drop\n\
             iifname \"{tun_name}\" counter drop\n\
           }}\n\
         }}\n",
        sekisho_sys::nft_delete_table("ip", &t)
    ))
    .await?;
    info!(interface = %tun_name, "internet egress up (source NAT)");
    Ok(tun)
}

/// Reads packets from the internet and hands each to the worker of its device.
pub async fn read_loop(tun: Arc<AsyncDevice>, dp: DataPlane) {
    let mut reader = TunReader::new(EGRESS_MTU);
    let mut assignment = dp.assignment();
    let workers = dp.workers();
    let mut per_worker: Vec<Vec<Bytes>> = vec![Vec::new(); workers];
    loop {
        if let Err(e) = reader.recv(&tun).await {
            warn!(%e, "egress TUN read error");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        {
            let a = assignment.borrow_and_update();
            for p in reader.take_packets() {
                let w = sekisho_proto::packet::addresses(&p)
                    .ok()
                    .and_then(|(_, dst)| a.owner_of_address(dst))
                    .map_or(0, |w| w.0 as usize);
                per_worker[w.min(workers - 1)].push(p);
            }
        }
        for (w, packets) in per_worker.iter_mut().enumerate() {
            if !packets.is_empty() {
                let packets = std::mem::take(packets);
                dp.input(WorkerId(w as u16), WorkerInput::Egress(packets))
                    .await;
            }
        }
    }
}

/// Writes the workers' packets for the internet, coalesced.
pub async fn write_loop(
    tun: Arc<AsyncDevice>,
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    failed_writes: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut writer = TunWriter::default();
    while let Some(batch) = rx.recv().await {
        let mut next = Some(batch);
        let mut taken = 0;
        let mut failed = 0u64;
        while let Some(batch) = next.take() {
            for p in &batch {
                writer.push(p);
                if writer.full() {
                    failed += writer.flush(&tun).await.failed as u64;
                }
            }
            taken += 1;
            if taken < 32 {
                next = rx.try_recv().ok();
            }
        }
        failed += writer.flush(&tun).await.failed as u64;
        if failed > 0 {
            debug!(failed, "egress writes failed");
            failed_writes.fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
