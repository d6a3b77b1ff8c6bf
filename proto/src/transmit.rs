//! Outgoing UDP datagrams, written once into one buffer and handed out as GSO trains: runs of
//! datagrams to the same address, all of one size but the last, that the I/O shell sends with
//! a single system call. A core encrypts straight into [`DatagramQueue::reserve`] and commits;
//! nothing is copied afterwards.

use std::collections::VecDeque;
use std::net::SocketAddr;

/// The largest UDP payload one GSO send may carry in all (IPv6 header and UDP header taken
/// from 65,535; IPv4 would allow 20 bytes more).
pub const MAX_TRAIN_BYTES: usize = 65_535 - 40 - 8;
/// Datagrams per train unless the shell says otherwise (the kernel's UDP_MAX_SEGMENTS).
pub const DEFAULT_MAX_SEGMENTS: usize = 64;

/// One send: `contents` to `to`, a train of `segment_size` datagrams when set.
#[derive(Debug, PartialEq, Eq)]
pub struct Datagrams<'a> {
    pub to: SocketAddr,
    pub contents: &'a [u8],
    pub segment_size: Option<usize>,
}

#[derive(Debug)]
struct Train {
    to: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
    /// A shorter datagram ended the train: nothing more may join it.
    closed: bool,
}

impl Train {
    fn count(&self) -> usize {
        (self.end - self.start).div_ceil(self.segment)
    }
}

/// Datagrams waiting to be sent, in order.
#[derive(Debug)]
pub struct DatagramQueue {
    buf: Vec<u8>,
    end: usize,
    trains: VecDeque<Train>,
    max_segments: usize,
}

impl Default for DatagramQueue {
    fn default() -> Self {
        DatagramQueue {
            buf: Vec::new(),
            end: 0,
            trains: VecDeque::new(),
            max_segments: DEFAULT_MAX_SEGMENTS,
        }
    }
}

impl DatagramQueue {
    /// Caps trains at `n` datagrams (1: no GSO).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.max(1);
    }

    pub fn is_empty(&self) -> bool {
        self.trains.is_empty()
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.trains.iter().map(Train::count).sum()
    }

    /// Space for the next datagram, at least `n` bytes; [`DatagramQueue::commit`] then takes
    /// the first `len` of them.
    pub fn reserve(&mut self, n: usize) -> &mut [u8] {
        if self.trains.is_empty() {
            self.end = 0;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize((self.end + n).max(2 * self.buf.len()), 0);
        }
        &mut self.buf[self.end..self.end + n]
    }

    /// Takes `len` bytes written at the start of the last [`DatagramQueue::reserve`] as one
    /// datagram to `to`. It joins the last train when it can.
    pub fn commit(&mut self, to: SocketAddr, len: usize) {
        debug_assert!(self.end + len <= self.buf.len());
        if len == 0 {
            return;
        }
        let (start, end) = (self.end, self.end + len);
        self.end = end;
        let max_segments = self.max_segments;
        if let Some(t) = self.trains.back_mut()
            && t.to == to
            && !t.closed
            && t.end == start
            && len <= t.segment
            && t.count() < max_segments
            && end - t.start <= MAX_TRAIN_BYTES
        {
            t.end = end;
            t.closed = len < t.segment;
            return;
        }
        self.trains.push_back(Train {
            to,
            start,
            end,
            segment: len,
            closed: false,
        });
    }

    /// Copies `datagram` in as one datagram to `to`.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.reserve(datagram.len()).copy_from_slice(datagram);
        self.commit(to, datagram.len());
    }

    /// The next send, oldest first.
    pub fn pop(&mut self) -> Option<Datagrams<'_>> {
        let t = self.trains.pop_front()?;
        let contents = &self.buf[t.start..t.end];
        Some(Datagrams {
            to: t.to,
            contents,
            segment_size: (contents.len() > t.segment).then_some(t.segment),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn sizes(q: &mut DatagramQueue) -> Vec<(u16, usize, Option<usize>)> {
        let mut out = Vec::new();
        while let Some(d) = q.pop() {
            out.push((d.to.port(), d.contents.len(), d.segment_size));
        }
        out
    }

    #[test]
    fn equal_datagrams_to_one_address_form_a_train_and_a_short_one_ends_it() {
        let mut q = DatagramQueue::default();
        for _ in 0..3 {
            q.push(a(1), &[1; 100]);
        }
        q.push(a(1), &[2; 60]);
        q.push(a(1), &[3; 60]);
        q.push(a(2), &[4; 100]);
        q.push(a(2), &[5; 120]);
        assert_eq!(q.len(), 7);
        assert_eq!(
            sizes(&mut q),
            vec![
                (1, 360, Some(100)),
                (1, 60, None),
                (2, 100, None),
                (2, 120, None)
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn trains_respect_the_segment_and_byte_limits() {
        let mut q = DatagramQueue::default();
        q.set_max_segments(4);
        for _ in 0..10 {
            q.push(a(1), &[0; 1000]);
        }
        assert_eq!(
            sizes(&mut q),
            vec![
                (1, 4000, Some(1000)),
                (1, 4000, Some(1000)),
                (1, 2000, Some(1000))
            ]
        );
        let mut q = DatagramQueue::default();
        for _ in 0..50 {
            q.push(a(1), &[0; 1392]);
        }
        let s = sizes(&mut q);
        assert_eq!(s[0], (1, 47 * 1392, Some(1392)));
        assert_eq!(s[1], (1, 3 * 1392, Some(1392)));
    }

    #[test]
    fn contents_survive_in_order() {
        let mut q = DatagramQueue::default();
        q.push(a(1), b"abc");
        q.push(a(1), b"def");
        let d = q.pop().unwrap();
        assert_eq!(d.contents, b"abcdef");
        assert_eq!(d.segment_size, Some(3));
        // Reused from the start once empty.
        q.push(a(9), b"xy");
        assert_eq!(q.pop().unwrap().contents, b"xy");
    }

    proptest::proptest! {
        /// Whatever is pushed comes out whole, in order, and every train is a valid GSO send.
        #[test]
        fn trains_reassemble_to_the_pushed_datagrams(
            pushes in proptest::collection::vec((0u16..3, 1usize..200, proptest::prelude::any::<u8>()), 0..200),
            max in 1usize..70,
        ) {
            let mut q = DatagramQueue::default();
            q.set_max_segments(max);
            let mut expect = Vec::new();
            for (port, len, byte) in &pushes {
                let d = vec![*byte; *len];
                q.push(a(*port), &d);
                expect.push((*port, d));
            }
            let mut got = Vec::new();
            while let Some(d) = q.pop() {
                let seg = d.segment_size.unwrap_or(d.contents.len());
                let chunks: Vec<&[u8]> = d.contents.chunks(seg).collect();
                proptest::prop_assert!(chunks.len() <= max);
                proptest::prop_assert!(d.contents.len() <= MAX_TRAIN_BYTES);
                for c in &chunks[..chunks.len() - 1] {
                    proptest::prop_assert_eq!(c.len(), seg);
                }
                for c in chunks {
                    got.push((d.to.port(), c.to_vec()));
                }
            }
            proptest::prop_assert_eq!(got, expect);
        }
    }
}
