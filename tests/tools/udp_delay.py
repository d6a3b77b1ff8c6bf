#!/usr/bin/env python3
"""Userspace UDP relay that adds latency (and optional loss) in both directions.

The end-to-end tests use it inside network namespaces instead of `tc netem`, which the test
kernel may not have:

    python3 udp_delay.py --listen 10.99.0.1:51821 --to 10.30.0.2:51820 --delay-ms 40 \
        [--loss 0.0] [--loss-file PATH] [--ready-file PATH] [--verbose]

Every datagram that arrives on --listen from a client address C is sent to --to from an
upstream socket of C's own (created on C's first datagram, connected to --to), so the target
sees one source port per client and its replies map back to C without ambiguity. Datagrams the
target sends to that upstream socket go back to C from the listen socket. Each direction is
delayed by --delay-ms (a round trip grows by twice that), order preserved; --loss drops that
fraction of datagrams at random, in each direction. With --loss-file, the loss is read again
from that file (a number from 0 to 1) every 0.2 s, so a test can start and end a lossy period
while traffic flows; "P above N" drops that fraction of the datagrams larger than N bytes only
(a path that lost its large packets: what MTU black-hole detection reacts to).

One thread, one `selectors` loop, one FIFO of (due, socket, data, address): the delay is the
same for every datagram, so due times are already in order and a deque serves as the timer
queue. ICMP errors (ECONNREFUSED while the target is down) are counted and ignored; the relay
keeps running while the target goes away and comes back. Client mappings idle for
--idle-secs (default 120) are closed. SIGTERM and SIGINT stop it with exit status 0. The ready
file (the relay's pid) is written once the listen socket is bound, and removed on exit.

Standard library only (Python 3.11).
"""

import argparse
import collections
import os
import random
import selectors
import signal
import socket
import sys
import time

# Largest UDP payload; datagrams are read whole.
MAX_DATAGRAM = 65535
# Datagrams read from one socket per wake-up before the others get their turn.
READ_BATCH = 256
# Socket buffers asked for (the kernel caps them at net.core.{r,w}mem_max without privileges).
SOCK_BUF = 4 << 20
# Bytes allowed in flight inside the relay; beyond that, datagrams are dropped and counted.
MAX_QUEUED_BYTES = 256 << 20
# A datagram due within this much is sent now (epoll waits in whole milliseconds).
EARLY = 0.0005
# How often idle mappings are looked for.
SWEEP_EVERY = 1.0
# Verbose counter line period.
REPORT_EVERY = 10.0
# How often --loss-file is read.
LOSS_FILE_EVERY = 0.2


def parse_addr(text, what):
    """host:port or [v6]:port -> (family, sockaddr), resolved once."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"udp_delay: {what} must be HOST:PORT or [V6]:PORT, got {text!r}")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise SystemExit(f"udp_delay: cannot resolve {what} {text!r}: {e}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def tune(sock):
    sock.setblocking(False)
    for force, opt in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                       (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except PermissionError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            except OSError:
                pass
        except OSError:
            pass


class Mapping:
    __slots__ = ("client", "sock", "last")

    def __init__(self, client, sock, now):
        self.client = client
        self.sock = sock
        self.last = now


class Relay:
    def __init__(self, args):
        self.delay = args.delay_ms / 1000.0
        self.loss = args.loss
        # Loss applies only to datagrams larger than this (0: to all).
        self.loss_above = 0
        self.loss_file = args.loss_file
        self.idle = args.idle_secs
        self.verbose = args.verbose
        self.lfamily, self.laddr = parse_addr(args.listen, "--listen")
        self.tfamily, self.taddr = parse_addr(args.to, "--to")
        self.sel = selectors.DefaultSelector()
        self.listen = socket.socket(self.lfamily, socket.SOCK_DGRAM)
        self.listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune(self.listen)
        self.listen.bind(self.laddr)
        self.sel.register(self.listen, selectors.EVENT_READ, None)
        self.by_client = {}  # client address -> Mapping
        # (due, socket, data, address or None for a connected upstream socket)
        self.queue = collections.deque()
        self.queued_bytes = 0
        self.stop = False
        self.c = collections.Counter()

    # -- receiving -----------------------------------------------------------------------------

    def enqueue(self, now, sock, data, addr, direction):
        if self.loss and len(data) > self.loss_above and random.random() < self.loss:
            self.c[direction + "_lost"] += 1
            return
        if self.queued_bytes + len(data) > MAX_QUEUED_BYTES:
            self.c[direction + "_overflow"] += 1
            return
        self.queued_bytes += len(data)
        self.queue.append((now + self.delay, sock, data, addr))

    def upstream_for(self, client, now):
        m = self.by_client.get(client)
        if m is not None:
            m.last = now
            return m
        s = socket.socket(self.tfamily, socket.SOCK_DGRAM)
        try:
            tune(s)
            # Connected: only the target's datagrams are accepted, and ICMP errors are reported.
            s.connect(self.taddr)
        except OSError:
            s.close()
            raise
        m = Mapping(client, s, now)
        self.by_client[client] = m
        self.sel.register(s, selectors.EVENT_READ, m)
        self.c["mappings_opened"] += 1
        return m

    def read_listen(self, now):
        recvfrom = self.listen.recvfrom
        for _ in range(READ_BATCH):
            try:
                data, client = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.c["icmp_errors"] += 1
                continue
            except OSError:
                self.c["recv_errors"] += 1
                return
            self.c["up_in"] += 1
            try:
                m = self.upstream_for(client, now)
            except OSError:
                self.c["upstream_socket_errors"] += 1
                continue
            self.enqueue(now, m.sock, data, None, "up")

    def read_upstream(self, m, now):
        recv = m.sock.recv
        for _ in range(READ_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # The target was not there (ICMP port unreachable); it may come back.
                self.c["icmp_errors"] += 1
                continue
            except OSError:
                self.c["recv_errors"] += 1
                return
            self.c["down_in"] += 1
            m.last = now
            self.enqueue(now, self.listen, data, m.client, "down")

    # -- sending -------------------------------------------------------------------------------

    def flush(self, now):
        """Sends every datagram that is due. Returns False when a socket buffer is full."""
        q = self.queue
        horizon = now + EARLY
        while q:
            due, sock, data, addr = q[0]
            if due > horizon:
                return True
            try:
                if addr is None:
                    sock.send(data)
                    self.c["up_out"] += 1
                else:
                    sock.sendto(data, addr)
                    self.c["down_out"] += 1
            except BlockingIOError:
                # Keep it (and everything behind it, so order holds); try again shortly.
                self.c["send_again"] += 1
                return False
            except ConnectionRefusedError:
                self.c["icmp_errors"] += 1
            except OSError:
                # Closed mapping, unreachable network, ...: dropped and counted.
                self.c["send_errors"] += 1
            q.popleft()
            self.queued_bytes -= len(data)
        return True

    # -- housekeeping --------------------------------------------------------------------------

    def sweep(self, now):
        for client, m in list(self.by_client.items()):
            if now - m.last > self.idle:
                del self.by_client[client]
                try:
                    self.sel.unregister(m.sock)
                except (KeyError, ValueError):
                    pass
                m.sock.close()
                self.c["mappings_expired"] += 1

    def reread_loss(self):
        """Takes the loss from --loss-file when it holds a valid fraction."""
        try:
            with open(self.loss_file) as f:
                words = f.read().split()
            v = float(words[0]) if words else 0.0
            above = int(words[2]) if len(words) == 3 and words[1] == "above" else 0
        except (OSError, ValueError):
            return
        if 0.0 <= v <= 1.0 and (v, above) != (self.loss, self.loss_above):
            self.loss, self.loss_above = v, above
            self.c["loss_changes"] += 1
            if self.verbose:
                print(f"udp_delay: loss now {v} above {above} bytes", file=sys.stderr,
                      flush=True)

    def report(self):
        fields = " ".join(f"{k}={v}" for k, v in sorted(self.c.items()))
        print(f"udp_delay: mappings={len(self.by_client)} queued={len(self.queue)} {fields}",
              file=sys.stderr, flush=True)

    # -- loop ----------------------------------------------------------------------------------

    def run(self, wakeup):
        self.sel.register(wakeup, selectors.EVENT_READ, "wakeup")
        now = time.monotonic()
        next_sweep = now + SWEEP_EVERY
        next_report = now + REPORT_EVERY
        next_loss = now
        blocked = False
        while not self.stop:
            now = time.monotonic()
            if blocked:
                timeout = 0.001
            elif self.queue:
                timeout = max(0.0, self.queue[0][0] - now)
            else:
                timeout = SWEEP_EVERY
            timeout = min(timeout, max(0.0, next_sweep - now))
            if self.loss_file:
                timeout = min(timeout, max(0.0, next_loss - now))
            events = self.sel.select(timeout)
            now = time.monotonic()
            for key, _ in events:
                d = key.data
                if d is None:
                    self.read_listen(now)
                elif d == "wakeup":
                    try:
                        while wakeup.recv(64):
                            pass
                    except OSError:
                        pass
                else:
                    self.read_upstream(d, now)
            blocked = not self.flush(time.monotonic())
            if self.loss_file and now >= next_loss:
                next_loss = now + LOSS_FILE_EVERY
                self.reread_loss()
            if now >= next_sweep:
                next_sweep = now + SWEEP_EVERY
                self.sweep(now)
                if self.verbose and now >= next_report:
                    next_report = now + REPORT_EVERY
                    self.report()

    def close(self):
        for m in self.by_client.values():
            m.sock.close()
        self.listen.close()
        self.sel.close()


def main():
    p = argparse.ArgumentParser(description="UDP relay that adds latency and loss (tests).")
    p.add_argument("--listen", required=True, help="HOST:PORT the clients send to")
    p.add_argument("--to", required=True, help="HOST:PORT of the target")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability, each direction")
    p.add_argument("--loss-file", help="file with the drop probability, read every 0.2 s")
    p.add_argument("--idle-secs", type=float, default=120.0, help="idle mapping lifetime")
    p.add_argument("--ready-file", help="written with the pid once the listen socket is bound")
    p.add_argument("--verbose", action="store_true", help="counters on stderr every 10 s")
    args = p.parse_args()
    if args.delay_ms < 0 or not 0.0 <= args.loss <= 1.0 or args.idle_secs <= 0:
        p.error("--delay-ms >= 0, 0 <= --loss <= 1 and --idle-secs > 0")

    relay = Relay(args)

    # Signals only set a flag; the wakeup socket makes select() return at once.
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)
    signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)

    def on_signal(_signum, _frame):
        relay.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.ready_file:
        tmp = f"{args.ready_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.ready_file)
    if args.verbose:
        print(f"udp_delay: pid {os.getpid()} relaying {args.listen} -> {args.to}, "
              f"{args.delay_ms} ms each way, loss {args.loss}", file=sys.stderr, flush=True)
    try:
        relay.run(rsock)
    finally:
        if args.verbose:
            relay.report()
        relay.close()
        if args.ready_file:
            try:
                with open(args.ready_file) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(args.ready_file)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
