//! The QUIC link between broker and connector, as both ends set it up and use it: one set of
//! transport settings (with the MTU floor that keeps full overlay packets fitting), datagram
//! sending with admission control (every refusal named), and control messages on streams that
//! bulk datagrams cannot starve.
//!
//! Why the admission: quinn writes queued DATAGRAM frames into each packet before STREAM
//! frames, and full-size datagrams fill whole packets. While datagrams keep the queue busy, a
//! control message (health, a name mapping, a renewal) would wait for as long as the bulk
//! lasts. So while a control message is on its way, datagrams are queued only when the queue
//! is empty: the next packet carries the stream data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;

use sekisho_proto::mtu::quic_min_mtu;

/// Bytes of datagrams a link queues before it refuses more (drop-tail, counted): about 8 ms
/// of traffic at 2 Gbit/s, enough to ride out scheduling hiccups without building a queue
/// that TCP inside would feel as delay.
pub const DATAGRAM_QUEUE: usize = 2 << 20;
/// Received datagrams buffered for the reader.
pub const DATAGRAM_RECEIVE_BUFFER: usize = 8 << 20;
/// The UDP socket buffers of a link endpoint.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Transport settings of a link carrying overlay packets of up to `overlay_mtu` bytes.
pub fn transport(
    overlay_mtu: u16,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::TransportConfig, quinn::VarIntBoundsExceeded> {
    let floor = quic_min_mtu(overlay_mtu);
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(idle_timeout.try_into()?))
        // A full overlay packet must fit in one datagram from the start, and the path's
        // estimate must never fall below that, whatever a lossy burst makes black-hole
        // detection believe: below it, every full-size packet would be refused for good.
        .initial_mtu(floor)
        .min_mtu(floor)
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_QUEUE + 64 * 1024);
    Ok(t)
}

/// What became of a packet given to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The link's queue is full (or held for a control message).
    Congested,
    /// Larger than the link carries.
    TooLarge,
    /// The link is closed.
    Closed,
}

/// Counts of datagrams refused by one link, readable from any thread.
#[derive(Debug, Default)]
pub struct LinkDrops {
    pub congested: AtomicU64,
    pub too_large: AtomicU64,
    pub closed: AtomicU64,
}

/// The sending side of a link, cheap to clone; any thread may send.
#[derive(Debug, Clone)]
pub struct LinkSender {
    conn: quinn::Connection,
    /// Control messages on their way (see the module docs).
    control: Arc<AtomicUsize>,
    pub drops: Arc<LinkDrops>,
}

impl LinkSender {
    pub fn new(conn: quinn::Connection) -> LinkSender {
        LinkSender {
            conn,
            control: Arc::new(AtomicUsize::new(0)),
            drops: Arc::new(LinkDrops::default()),
        }
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The largest datagram the link carries now.
    pub fn max_datagram(&self) -> usize {
        self.conn.max_datagram_size().unwrap_or(0)
    }

    /// Queues one IP packet as a datagram.
    pub fn send(&self, packet: Bytes) -> Sent {
        let space = self.conn.datagram_send_buffer_space();
        let queued = (DATAGRAM_QUEUE + 64 * 1024).saturating_sub(space);
        let held = self.control.load(Ordering::Relaxed) > 0 && queued > 0;
        if held || queued + packet.len() > DATAGRAM_QUEUE {
            self.drops.congested.fetch_add(1, Ordering::Relaxed);
            return Sent::Congested;
        }
        match self.conn.send_datagram(packet) {
            Ok(()) => Sent::Queued,
            Err(quinn::SendDatagramError::TooLarge) => {
                self.drops.too_large.fetch_add(1, Ordering::Relaxed);
                Sent::TooLarge
            }
            Err(_) => {
                self.drops.closed.fetch_add(1, Ordering::Relaxed);
                Sent::Closed
            }
        }
    }

    /// Runs `message` (a control message on a stream) with datagrams held back while it is on
    /// its way, so bulk traffic cannot starve it.
    pub async fn control<T>(&self, message: impl Future<Output = T>) -> T {
        self.control.fetch_add(1, Ordering::Relaxed);
        let out = message.await;
        self.control.fetch_sub(1, Ordering::Relaxed);
        out
    }

    /// Sends `bytes` as one message on a unidirectional stream and waits (at most 5 s) until
    /// the peer has acknowledged it.
    pub async fn send_message(&self, bytes: &[u8]) -> Result<(), LinkError> {
        self.control(async {
            let mut s = self.conn.open_uni().await?;
            s.write_all(bytes).await?;
            s.finish()?;
            let _ = tokio::time::timeout(Duration::from_secs(5), s.stopped()).await;
            Ok(())
        })
        .await
    }
}

/// A control message that could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the link is gone: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("cannot write the message: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_carries_a_full_overlay_packet() {
        let t = transport(1360, Duration::from_secs(1), Duration::from_secs(8)).unwrap();
        // The settings are opaque; what matters is checked end to end. Here: it builds, and
        // the floor is what the MTU module says.
        drop(t);
        assert_eq!(quic_min_mtu(1360), 1400);
    }
}
