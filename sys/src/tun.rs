//! TUN devices with the kernel's offloads (the virtio-net header): the kernel hands over TCP
//! segments of up to 64 KiB at once (TSO) and takes coalesced ones (GRO), so one system call
//! moves dozens of packets. [`TunReader`] splits what arrives into packets of the device's MTU;
//! [`TunWriter`] gathers packets and writes them coalesced.

use std::io;

use bytes::{Bytes, BytesMut};
pub use tun_rs::AsyncDevice;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::SysError;

/// Creates a TUN device (no packet-information header) with offloads, sets its MTU and brings
/// it up. Every read and write of it goes through [`TunReader`] and [`TunWriter`].
pub fn create_tun(name: &str, mtu: u16) -> Result<AsyncDevice, SysError> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .enable(true)
        .build_async()
        .map_err(|source| SysError::Tun {
            name: name.to_string(),
            source,
        })
}

/// Packets one read may yield (a 64 KiB segment split at the smallest MTU we allow).
pub const READ_BATCH: usize = IDEAL_BATCH_SIZE;
/// Each read slot is a block this large; a packet read into it becomes a [`Bytes`] slice of
/// the block (no copy), and the slot goes on with the rest until too little is left.
const BLOCK: usize = 64 * 1024;

/// Reads a TUN device in batches.
pub struct TunReader {
    raw: Vec<u8>,
    slots: Vec<BytesMut>,
    sizes: Vec<usize>,
    filled: usize,
    /// The largest packet a slot must hold (the device's MTU, with slack).
    room: usize,
}

impl TunReader {
    /// A reader for a device of this MTU.
    pub fn new(mtu: u16) -> TunReader {
        let room = usize::from(mtu) + 64;
        TunReader {
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65535],
            slots: (0..READ_BATCH)
                .map(|_| BytesMut::zeroed(BLOCK.max(room)))
                .collect(),
            sizes: vec![0; READ_BATCH],
            filled: 0,
            room,
        }
    }

    /// Waits for the next read and splits it into packets; returns how many.
    pub async fn recv(&mut self, dev: &AsyncDevice) -> io::Result<usize> {
        self.filled = 0;
        let n = dev
            .recv_multiple(&mut self.raw, &mut self.slots, &mut self.sizes, 0)
            .await?;
        self.filled = n;
        Ok(n)
    }

    /// A read without waiting (`WouldBlock` when nothing is there).
    pub fn try_recv(&mut self, dev: &AsyncDevice) -> io::Result<usize> {
        self.filled = 0;
        let n = dev.try_recv_multiple(&mut self.raw, &mut self.slots, &mut self.sizes, 0)?;
        self.filled = n;
        Ok(n)
    }

    /// The packets of the last read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.slots[..self.filled]
            .iter()
            .zip(&self.sizes)
            .map(|(s, &n)| &s[..n])
    }

    /// The packets of the last read as owned buffers, without copying them.
    pub fn take_packets(&mut self) -> impl Iterator<Item = Bytes> + '_ {
        let filled = std::mem::take(&mut self.filled);
        let room = self.room;
        self.slots[..filled]
            .iter_mut()
            .zip(&self.sizes)
            .map(move |(slot, &n)| {
                let pkt = slot.split_to(n).freeze();
                if slot.len() < room {
                    *slot = BytesMut::zeroed(BLOCK.max(room));
                }
                pkt
            })
    }
}

/// Gathers packets for a TUN device and writes them coalesced (GRO).
#[derive(Default)]
pub struct TunWriter {
    gro: GROTable,
    bufs: Vec<Vec<u8>>,
    used: usize,
    /// Packets given to [`TunWriter::push`] and not yet flushed.
    pending: usize,
}

/// What a flush wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub packets: usize,
    /// Packets the device refused (the write failed).
    pub failed: usize,
}

impl TunWriter {
    /// Queues a copy of `pkt`.
    pub fn push(&mut self, pkt: &[u8]) {
        if self.used == self.bufs.len() {
            // Room for a whole coalesced train: GRO appends the flow's later segments to its
            // first buffer, and only where that fits without reallocating.
            self.bufs
                .push(Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65535));
        }
        let b = &mut self.bufs[self.used];
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(pkt);
        self.used += 1;
        self.pending += 1;
    }

    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// True when enough is queued that it should be written now.
    pub fn full(&self) -> bool {
        self.used >= READ_BATCH
    }

    /// Writes everything queued, coalescing what can be.
    pub async fn flush(&mut self, dev: &AsyncDevice) -> Flushed {
        if self.used == 0 {
            return Flushed::default();
        }
        let packets = std::mem::take(&mut self.pending);
        let n = std::mem::take(&mut self.used);
        let failed = match dev
            .send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            Ok(_) => 0,
            Err(e) => {
                tracing::debug!("TUN write failed: {e}");
                // send_multiple reports only the last failure; count the batch as lost.
                packets
            }
        };
        Flushed { packets, failed }
    }
}

/// The kernel's counters of an interface (`/sys/class/net/NAME/statistics`): packets it
/// dropped in each direction. For a TUN device, `tx_dropped` counts packets for the daemon that
/// the kernel dropped because the daemon did not read fast enough.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InterfaceDrops {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

pub fn interface_drops(name: &str) -> Option<InterfaceDrops> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(InterfaceDrops {
        rx_dropped: read("rx_dropped")?,
        tx_dropped: read("tx_dropped")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment of one flow (ACK, timestamps option), `len` bytes of payload.
    fn segment(seq: u32, len: usize, psh: bool) -> Vec<u8> {
        let tcp_len = 32 + len;
        let total = 20 + tcp_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 63;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 118, 0, 2]);
        p[16..20].copy_from_slice(&[10, 20, 0, 10]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = if psh { 0x18 } else { 0x10 };
        t[14..16].copy_from_slice(&500u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        // Checksums: IPv4 header, then TCP over the pseudo header.
        let sum = |data: &[u8], mut s: u32| {
            for c in data.chunks(2) {
                s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        let ip = sum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        let mut pseudo = 0u32;
        for c in p[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        pseudo += 6 + tcp_len as u32;
        let tcp = sum(&p[20..], pseudo);
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        p
    }

    #[test]
    fn consecutive_segments_of_a_flow_coalesce() {
        let mut w = TunWriter::default();
        for i in 0..20u32 {
            w.push(&segment(1000 + i * 1308, 1308, i == 19));
        }
        let n = w.used;
        w.gro
            .apply_gro(&mut w.bufs[..n], VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        // Coalesced into the first buffer: header plus every payload.
        assert_eq!(w.bufs[0].len(), VIRTIO_NET_HDR_LEN + 20 + 32 + 20 * 1308);
    }
}
