#!/usr/bin/env python3
"""The measuring half of tests/bench/throughput.sh (which sets the hosts up): iperf3 runs in
every shape over every path, with Sekisho's and the kernel's drop counters and the CPU each
Sekisho process used, read before and after each run. Standard library only."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Namespaces whose kernel counters are read (UDP receive-buffer overflows, interface drops).
HOSTS = ["laptop", "laptop2", "inet", "broker", "site", "app", "web"]


class Bench:
    def __init__(self, a):
        self.a = a
        self.p = a.prefix

    def ns(self, host):
        return self.p + host

    def run(self, host, *cmd, check=True, timeout=None):
        r = subprocess.run(["ip", "netns", "exec", self.ns(host), *cmd], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} in {host} failed: {r.stderr.strip()}")
        return r.stdout

    # -- what is read before and after a run ----------------------------------------------

    def pids(self):
        out = {}
        for d in ["broker", "connector", "client-alice", "client-bob"]:
            try:
                with open(os.path.join(self.a.state, d + ".pid")) as f:
                    out[d] = int(f.read().strip())
            except (OSError, ValueError):
                pass
        return out

    def cpu(self):
        """CPU seconds (user + system, all threads) of each Sekisho process."""
        out = {}
        for name, pid in self.pids().items():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, IndexError, ValueError):
                pass
        return out

    def broker_drops(self):
        r = subprocess.run([os.path.join(self.a.bin, "sekisho-broker"), "stats", "--socket",
                            os.path.join(self.a.state, "broker.sock")], capture_output=True,
                           text=True)
        try:
            s = json.loads(r.stdout)
        except ValueError:
            return {}
        out = {f"broker.{k}": v for k, v in s["counters"]["drops"].items()}
        for k, v in s.get("kernel", {}).items():
            if isinstance(v, int):
                out[f"broker.kernel.{k}"] = v
        return out

    def connector_drops(self):
        text = self.run("site", "curl", "-s", "http://127.0.0.1:9465/metrics", check=False)
        out = {}
        for line in text.splitlines():
            for metric in ["sekisho_connector_dropped_packets_total",
                           "sekisho_connector_socket_dropped_packets_total",
                           "sekisho_connector_tun_dropped_packets_total"]:
                if line.startswith(metric):
                    name, value = line.rsplit(" ", 1)
                    reason = name.split('reason="')[1].split('"')[0] if "reason=" in name else metric.split("_")[2]
                    out[f"connector.{reason}"] = int(float(value))
        return out

    def client_drops(self):
        out = {}
        for who in ["alice", "bob"]:
            r = subprocess.run([os.path.join(self.a.bin, "sekisho-client"), "status", "--json",
                                "--socket", os.path.join(self.a.state, who, "client.sock")],
                               capture_output=True, text=True)
            try:
                s = json.loads(r.stdout)
            except ValueError:
                continue
            for k, v in s.get("counters", {}).get("drops", {}).items():
                out[f"client-{who}.{k}"] = v
        return out

    def kernel_drops(self):
        out = {}
        for h in HOSTS:
            text = self.run(h, "nstat", "-az", "UdpRcvbufErrors", "UdpSndbufErrors", check=False)
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0].startswith("Udp"):
                    out[f"kernel.{h}.{parts[0]}"] = int(parts[1])
            links = self.run(h, "ip", "-s", "-j", "link", check=False)
            try:
                total = sum(l["stats64"]["rx"]["dropped"] + l["stats64"]["tx"]["dropped"]
                            for l in json.loads(links))
                out[f"kernel.{h}.interface_drops"] = total
            except (ValueError, KeyError):
                pass
        return out

    def counters(self):
        c = {}
        c.update(self.broker_drops())
        c.update(self.connector_drops())
        c.update(self.client_drops())
        c.update(self.kernel_drops())
        return c

    # -- one measurement --------------------------------------------------------------------

    def iperf(self, host, addr, port, extra):
        args = ["iperf3", "-c", addr, "-p", str(port), "-t", str(self.a.seconds), "-J", *extra]
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def measure(self, clients):
        """Runs iperf3 clients [(host, addr, port, extra args)] at once; returns Gbit/s,
        retransmits, bytes moved, CPU per process and counter deltas."""
        c0, t0 = self.counters(), self.cpu()
        procs = [self.iperf(*c) for c in clients]
        gbps, retr, moved = 0.0, 0, 0
        for p in procs:
            out, err = p.communicate(timeout=self.a.seconds + 60)
            try:
                d = json.loads(out)
                end = d["end"]
                gbps += end["sum_received"]["bits_per_second"] / 1e9
                moved += end["sum_received"]["bytes"]
                retr += end["sum_sent"].get("retransmits", 0)
            except (ValueError, KeyError):
                gbps = float("nan")
                sys.stderr.write(f"bench: iperf3 failed: {err.strip() or out[:200]}\n")
        c1, t1 = self.counters(), self.cpu()
        deltas = {k: c1[k] - c0.get(k, 0) for k in c1 if c1[k] - c0.get(k, 0) != 0}
        cpu = {k: t1[k] - t0.get(k, 0) for k in t1}
        return gbps, retr, moved, cpu, deltas

    def rtt(self, host, addr):
        out = self.run(host, "ping", "-c", str(self.a.pings), "-i", "0.02", "-q", addr,
                       check=False)
        for line in out.splitlines():
            if line.startswith("rtt"):
                return float(line.split("=")[1].split("/")[1])
        return float("nan")


SHAPES = {
    # name: (description, [(host, path key, port, extra args)])
    "one": ("one stream", [("laptop", 5201, [])]),
    "four": ("four streams", [("laptop", 5201, ["-P", "4"])]),
    "reverse": ("reverse (-R)", [("laptop", 5201, ["-R"])]),
    "two": ("two laptops", [("laptop", 5201, []), ("laptop2", 5202, [])]),
}


def addr_of(path, host):
    """The app's address as `host` reaches it over `path`."""
    i = 0 if host == "laptop" else 1
    return {"raw-veth": f"10.250.{i}.2", "wireguard-go": f"10.251.{i}.2",
            "sekisho": "10.20.0.10", "egress": "203.0.113.80"}[path]


def full_tunnel(b):
    """Puts alice's group in full tunnel (egress at the broker) and waits until her client
    applies it."""
    state = b.a.state
    with open(os.path.join(state, "policy.toml")) as f:
        text = f.read()
    text = text.replace("[dns]\n", "[dns]\nupstreams = [\"udp://10.99.0.53\"]\n", 1)
    text += ('\n[[tunnels]]\nname = "bench-full"\ngroups = ["engineering"]\nmode = "full"\n'
             'local_network = "allow"\n')
    path = os.path.join(state, "policy-full.toml")
    with open(path, "w") as f:
        f.write(text)
    subprocess.run([os.path.join(b.a.root, "deploy/quickstart.sh"), "admin", "policy", "apply",
                    path], check=True, capture_output=True)
    for _ in range(100):
        out = b.run("laptop", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                    "http://203.0.113.80/", check=False)
        if out.strip() == "200":
            decisions = open(os.path.join(state, "decisions.jsonl")).read()
            if '"application":"internet"' in decisions:
                return True
        time.sleep(0.2)
    return False


def main():
    ap = argparse.ArgumentParser()
    for a in ["prefix", "state", "bin", "root", "shapes", "json"]:
        ap.add_argument("--" + a, default="")
    for a in ["seconds", "runs", "pings"]:
        ap.add_argument("--" + a, type=int)
    a = ap.parse_args()
    b = Bench(a)
    shapes = [s for s in a.shapes.split() if s in SHAPES]
    results = []  # (path, shape, [gbps], retr, moved, cpu, deltas)

    def shape_runs(path, shape):
        desc, spec = SHAPES[shape]
        clients = [(h, addr_of(path, h), port, extra) for h, port, extra in spec]
        runs = [b.measure(clients) for _ in range(a.runs)]
        g = [r[0] for r in runs]
        retr = sum(r[1] for r in runs)
        moved = sum(r[2] for r in runs)
        cpu = {}
        deltas = {}
        for r in runs:
            for k, v in r[3].items():
                cpu[k] = cpu.get(k, 0) + v
            for k, v in r[4].items():
                deltas[k] = deltas.get(k, 0) + v
        results.append({"path": path, "shape": shape, "gbps": g, "retransmits": retr,
                        "bytes": moved, "cpu_seconds": cpu, "drops": deltas})
        med = statistics.median(g)
        print(f"  {path:<13} {desc:<14} {med:7.3f} Gbit/s ({min(g):.3f}-{max(g):.3f}), "
              f"{retr} retransmits", file=sys.stderr, flush=True)

    print(f"bench: {a.runs} runs of {a.seconds} s per path and shape", file=sys.stderr)
    rtts = {}
    for path in ["raw-veth", "wireguard-go", "sekisho"]:
        rtts[path] = b.rtt("laptop", addr_of(path, "laptop"))
        for shape in shapes:
            if path == "raw-veth" and shape == "two":
                continue
            shape_runs(path, shape)
    if full_tunnel(b):
        rtts["egress"] = b.rtt("laptop", "203.0.113.80")
        for shape in ["one", "reverse"]:
            if shape in shapes:
                shape_runs("egress", shape)
    else:
        print("bench: the full tunnel did not come up; egress not measured", file=sys.stderr)

    def med(path, shape):
        for r in results:
            if r["path"] == path and r["shape"] == shape:
                return statistics.median(r["gbps"])
        return float("nan")

    print()
    print(f"iperf3 laptop -> app host, {a.runs} runs of {a.seconds} s per path and shape "
          f"(median, min-max); ping RTT average of {a.pings}")
    print(f"{'path':<14}{'shape':<15}{'Gbit/s':>9}{'min-max':>16}{'retrans':>9}"
          f"{'vs wg-go':>10}")
    for r in results:
        g = r["gbps"]
        ref = med("wireguard-go", "one" if r["path"] == "egress" else r["shape"])
        ratio = statistics.median(g) / ref if ref == ref and ref > 0 else float("nan")
        print(f"{r['path']:<14}{SHAPES[r['shape']][0]:<15}{statistics.median(g):>9.3f}"
              f"{f'{min(g):.3f}-{max(g):.3f}':>16}{r['retransmits']:>9}{ratio:>9.2f}x")
    print()
    print("RTT ms: " + "  ".join(f"{p} {v:.3f}" for p, v in rtts.items()))
    print()
    print("CPU seconds per GB moved, per Sekisho process (user + system, all threads):")
    for r in results:
        if r["path"] not in ("sekisho", "egress") or not r["bytes"]:
            continue
        gb = r["bytes"] / 1e9
        parts = "  ".join(f"{k} {v / gb:.2f}" for k, v in sorted(r["cpu_seconds"].items())
                          if v > 0)
        print(f"  {r['path']:<8} {SHAPES[r['shape']][0]:<14} {parts}")
    print()
    print("Drops during the runs (every counter that moved; kernel.* are the namespaces' own):")
    for r in results:
        d = r["drops"]
        if d:
            print(f"  {r['path']:<13} {SHAPES[r['shape']][0]:<14} "
                  + " ".join(f"{k}={v}" for k, v in sorted(d.items())))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "rtt_ms": rtts}, f, indent=1)


if __name__ == "__main__":
    main()
