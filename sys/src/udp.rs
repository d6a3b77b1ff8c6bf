//! Batched UDP: many datagrams per system call in both directions (recvmmsg with GRO, sendmsg
//! with GSO), through quinn-udp, the implementation quinn itself uses. Buffers are sized on
//! purpose (forced past the sysctl limits when running as root) and the kernel's own count of
//! datagrams it dropped for want of buffer space is readable at any time ([`BatchUdp::drops`]).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

/// Datagrams one receive call may return (recvmmsg batch; each may be a GRO train).
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Room for one GRO train: the largest UDP payload.
const TRAIN: usize = 65536;

/// How to set a socket up.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpOptions {
    /// Share the port with other sockets of this process (one per data-plane worker).
    pub reuse_port: bool,
    /// Receive and send buffer size in bytes (0: the system's default).
    pub buffer: usize,
    /// Firewall mark on every packet sent (policy routing).
    pub mark: Option<u32>,
}

/// A UDP socket read and written in batches.
pub struct BatchUdp {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl BatchUdp {
    /// Binds `addr` with `opts`; must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, opts: UdpOptions) -> io::Result<BatchUdp> {
        let domain = socket2::Domain::for_address(addr);
        let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if opts.reuse_port {
            s.set_reuse_port(true)?;
        }
        if let Some(mark) = opts.mark {
            s.set_mark(mark)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        let std: std::net::UdpSocket = s.into();
        BatchUdp::from_std(std, opts.buffer)
    }

    /// Takes over a bound socket (`buffer`: wanted buffer size, 0 for the default).
    pub fn from_std(std: std::net::UdpSocket, buffer: usize) -> io::Result<BatchUdp> {
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        if buffer > 0 {
            set_buffers(&std, buffer);
        }
        Ok(BatchUdp {
            io: tokio::net::UdpSocket::from_std(std)?,
            state,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// The tokio socket (for plain single-datagram calls off the hot path).
    pub fn socket(&self) -> &tokio::net::UdpSocket {
        &self.io
    }

    /// The most datagrams one GSO send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Waits for datagrams and reads a batch into `batch`; returns how many buffers it filled.
    pub async fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            self.io.readable().await?;
            match self.try_recv(batch) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Reads a batch if one is waiting (`WouldBlock` otherwise).
    pub fn try_recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let RecvBatch { buf, meta, filled } = batch;
        let mut slices: Vec<IoSliceMut<'_>> = buf.chunks_mut(TRAIN).map(IoSliceMut::new).collect();
        let n = self.io.try_io(Interest::READABLE, || {
            self.state.recv((&self.io).into(), &mut slices, meta)
        })?;
        *filled = n;
        Ok(n)
    }

    /// Sends `contents` to `to`: one datagram, or (with `segment_size`) a GSO train of datagrams
    /// of that size (the last may be shorter). Waits while the socket's buffer is full.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment_size.filter(|&s| s < contents.len()),
            src_ip: None,
        };
        loop {
            match self.io.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.io).into(), &t)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                r => return r,
            }
        }
    }

    /// Datagrams the kernel dropped on this socket because its receive buffer was full (or a
    /// filter refused them), since the socket was made.
    pub fn drops(&self) -> Option<u64> {
        socket_drops(&self.io)
    }
}

/// Receive buffers for one batch (about 2 MiB: one GRO train per slot).
pub struct RecvBatch {
    buf: Vec<u8>,
    meta: [RecvMeta; RECV_BATCH],
    filled: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; TRAIN * RECV_BATCH],
            meta: [RecvMeta::default(); RECV_BATCH],
            filled: 0,
        }
    }
}

impl RecvBatch {
    /// Every datagram of the last batch with its sender, GRO trains split at their stride.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta[..self.filled]
            .iter()
            .zip(self.buf.chunks(TRAIN))
            .flat_map(|(m, b)| {
                let stride = m.stride.max(1);
                b[..m.len].chunks(stride).map(move |d| (m.addr, d))
            })
    }
}

/// Sets both buffers to `bytes`, past `net.core.{r,w}mem_max` when allowed (root); a smaller
/// buffer than asked is logged, not fatal.
pub fn set_buffers(socket: &impl std::os::fd::AsFd, bytes: usize) {
    let fd = socket.as_fd().as_raw_fd();
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, force, v).is_err() {
            let _ = setsockopt_int(fd, plain, v);
        }
    }
    let s = socket2::SockRef::from(socket);
    let got = s.recv_buffer_size().unwrap_or(0);
    if got < bytes {
        tracing::info!(
            wanted = bytes,
            got,
            "UDP receive buffer smaller than configured (not root, and net.core.rmem_max is lower)"
        );
    }
}

fn setsockopt_int(fd: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid descriptor, an int option and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's drop counter of a socket (`SO_MEMINFO`, `SK_MEMINFO_DROPS`): datagrams that
/// arrived while the receive buffer was full. Any UDP socket, quinn's included.
pub fn socket_drops(socket: &impl std::os::fd::AsFd) -> Option<u64> {
    const SK_MEMINFO_VARS: usize = 9;
    const SK_MEMINFO_DROPS: usize = 8;
    let fd = socket.as_fd().as_raw_fd();
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the buffer and its length are passed together; the kernel writes at most `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize > SK_MEMINFO_DROPS * 4).then(|| u64::from(info[SK_MEMINFO_DROPS]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gso_train_arrives_as_datagrams_and_overflow_is_counted() {
        let rx = BatchUdp::bind("127.0.0.1:0".parse().unwrap(), UdpOptions::default()).unwrap();
        let tx = BatchUdp::bind("127.0.0.1:0".parse().unwrap(), UdpOptions::default()).unwrap();
        let to = rx.local_addr().unwrap();
        // Three datagrams of 100 bytes and one of 40, as one train.
        let mut train = Vec::new();
        for i in 0..3u8 {
            train.extend(std::iter::repeat_n(i, 100));
        }
        train.extend(std::iter::repeat_n(9u8, 40));
        tx.send(to, &train, Some(100)).await.unwrap();
        let mut got = Vec::new();
        let mut batch = RecvBatch::default();
        while got.len() < 4 {
            rx.recv(&mut batch).await.unwrap();
            got.extend(batch.datagrams().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got.len(), 4);
        assert_eq!(got[1], vec![1u8; 100]);
        assert_eq!(got[3], vec![9u8; 40]);
        assert_eq!(rx.drops(), Some(0));

        // A receiver that never reads, with the smallest buffer: the kernel drops and counts.
        let small = BatchUdp::bind("127.0.0.1:0".parse().unwrap(), UdpOptions::default()).unwrap();
        let s = socket2::SockRef::from(small.socket());
        s.set_recv_buffer_size(1).unwrap();
        for _ in 0..64 {
            tx.send(small.local_addr().unwrap(), &[0u8; 1000], None)
                .await
                .unwrap();
        }
        assert!(small.drops().unwrap() > 0);
    }
}

/// Steers datagrams among the `workers` sockets sharing one port (`SO_REUSEPORT`, sockets
/// bound in worker order) by the WireGuard session index they carry: a data message or cookie
/// reply names the receiver's index at bytes 4..8, a handshake response at 8..12, and the
/// low byte of the index (bytes 5 and 9: the engine's own 8 bits come first, little-endian)
/// modulo the workers is the owning worker (`sekisho_proto::broker::owner_of_index`). Anything
/// else (handshake initiations, garbage) falls back to the kernel's hash. Attach to any one
/// socket of the group.
pub fn steer_by_session(socket: &impl std::os::fd::AsFd, workers: u16) -> io::Result<()> {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
    const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let n = u32::from(workers.max(1));
    let f = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    let program = [
        f(LDB_ABS, 0, 0, 0),      // 0: A = message type
        f(JEQ_K, 3, 0, 4),        // 1: data -> 5
        f(JEQ_K, 2, 0, 3),        // 2: cookie reply -> 5
        f(JEQ_K, 4, 0, 2),        // 3: handshake response -> 8
        f(RET_K, 0, 0, u32::MAX), // 4: anything else: the kernel's hash
        f(LDB_ABS, 0, 0, 5),      // 5: A = low byte of the session index
        f(MOD_K, 0, 0, n),        // 6
        f(RET_A, 0, 0, 0),        // 7: that worker's socket
        f(LDB_ABS, 0, 0, 9),      // 8: A = low byte of the receiver's index
        f(MOD_K, 0, 0, n),        // 9
        f(RET_A, 0, 0, 0),        // 10
    ];
    let prog = SockFprog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    // SAFETY: a valid descriptor and a filter program that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const SockFprog).cast(),
            std::mem::size_of::<SockFprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod steering_tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_reach_the_worker_their_session_index_names() {
        let workers = 3u16;
        let first = BatchUdp::bind(
            "127.0.0.1:0".parse().unwrap(),
            UdpOptions {
                reuse_port: true,
                ..Default::default()
            },
        )
        .unwrap();
        let addr = first.local_addr().unwrap();
        let mut socks = vec![first];
        for _ in 1..workers {
            socks.push(
                BatchUdp::bind(
                    addr,
                    UdpOptions {
                        reuse_port: true,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
        }
        steer_by_session(socks[0].socket(), workers).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // A data message for session index 0x0105 (low byte 5: worker 2 of 3), a handshake
        // response for index 0x0104 (worker 1), a cookie reply for index 0x0003 (worker 0).
        let mut data = vec![4u8, 0, 0, 0, 0x77, 0x05, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        data.extend([0u8; 32]);
        let mut resp = vec![2u8, 0, 0, 0, 9, 9, 9, 9, 0x11, 0x04, 0x01, 0];
        resp.extend([0u8; 80]);
        let mut cookie = vec![3u8, 0, 0, 0, 0x01, 0x03, 0, 0];
        cookie.extend([0u8; 56]);
        for (msg, want) in [(&data, 2usize), (&resp, 1), (&cookie, 0)] {
            tx.send_to(msg, addr).unwrap();
            let mut batch = RecvBatch::default();
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                socks[want].recv(&mut batch),
            )
            .await
            .expect("arrives at the worker its index names")
            .unwrap();
            assert_eq!(got, 1);
            assert_eq!(batch.datagrams().next().unwrap().1, &msg[..]);
        }
    }
}
