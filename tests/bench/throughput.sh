#!/usr/bin/env bash
# Throughput and latency benchmark: Sekisho next to references measured in the same run.
#
#   tests/bench/throughput.sh            (as root; builds release binaries if needed)
#
# On the quickstart's namespaces it measures, laptop -> app host:
#   1. raw veth     a direct veth pair between the laptop and app namespaces (the ceiling)
#   2. wireguard-go a plain WireGuard tunnel over that veth (Debian's wireguard-go)
#   3. sekisho      the real path: laptop -> internet router -> broker -> router -> connector
#                   -> app, every flow authorized, WireGuard then QUIC
# with iperf3 (one TCP stream, BENCH_SECONDS each, BENCH_RUNS times per path: the median is
# reported with the range, because a lossy path gives bimodal results) and ping RTT (BENCH_PINGS
# pings), and prints the figures and the ratios. Figures are only comparable within one run on
# one machine. Settings: BENCH_SECONDS (default 10), BENCH_RUNS (default 3), BENCH_PINGS
# (default 50), SK_BIN (prebuilt binaries).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SECS=${BENCH_SECONDS:-10}
PINGS=${BENCH_PINGS:-50}
RUNS=${BENCH_RUNS:-3}
export SK_PREFIX=${SK_PREFIX:-skb$$-}
export SK_STATE=${SK_STATE:-/tmp/sekisho-bench-$$}
P=$SK_PREFIX
ns() { printf '%s%s' "$P" "$1"; }
inns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
missing=()
for c in iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools ping:iputils-ping nft:nftables; do
    command -v "${c%%:*}" >/dev/null || missing+=("${c##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ -z "${SK_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --bins -q)
    export SK_BIN="$ROOT/target/release"
fi

WG_PIDS=()
cleanup() {
    for p in "${WG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    "$ROOT/deploy/quickstart.sh" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$ROOT/deploy/quickstart.sh" up >/dev/null

# Allow iperf3 (TCP 5201) for alice through Sekisho.
cat >>"$SK_STATE/policy.toml" <<'EOF'

[[applications]]
name = "iperf3"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = [5201]

[[rules]]
name = "bench-iperf3"
action = "allow"
users = ["alice"]
applications = ["iperf3"]
EOF
kill -HUP "$(cat "$SK_STATE/broker.pid")"
for _ in $(seq 50); do grep -q '"result":"applied"' "$SK_STATE/decisions.jsonl" 2>/dev/null && break; sleep 0.1; done

# The reference paths: a direct veth, and wireguard-go over it.
ip link add bv-laptop netns "$(ns laptop)" type veth peer name bv-app netns "$(ns app)"
inns laptop ip addr add 10.250.0.1/30 dev bv-laptop
inns app ip addr add 10.250.0.2/30 dev bv-app
inns laptop ip link set bv-laptop up
inns app ip link set bv-app up

export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
kl=$(wg genkey); ka=$(wg genkey)
# Interface names differ per namespace: wireguard-go's control sockets share /var/run/wireguard.
WL=wgl$$; WA=wga$$
WL=${WL:0:15}; WA=${WA:0:15}
inns laptop wireguard-go -f "$WL" >/dev/null 2>&1 & WG_PIDS+=($!)
inns app wireguard-go -f "$WA" >/dev/null 2>&1 & WG_PIDS+=($!)
for _ in $(seq 50); do [ -S "/var/run/wireguard/$WL.sock" ] && [ -S "/var/run/wireguard/$WA.sock" ] && break; sleep 0.1; done
inns laptop wg set "$WL" listen-port 51900 private-key <(echo "$kl") peer "$(echo "$ka" | wg pubkey)" endpoint 10.250.0.2:51901 allowed-ips 10.251.0.2/32
inns app wg set "$WA" listen-port 51901 private-key <(echo "$ka") peer "$(echo "$kl" | wg pubkey)" endpoint 10.250.0.1:51900 allowed-ips 10.251.0.1/32
inns laptop ip addr add 10.251.0.1/30 dev "$WL"
inns app ip addr add 10.251.0.2/30 dev "$WA"
inns laptop ip link set "$WL" mtu 1420 up
inns app ip link set "$WA" mtu 1420 up

measure() { # name address -> "name rtt gbps gbps ..."
    local name=$1 addr=$2 all="" gbps rtt
    inns app pkill -f "iperf3 -s" >/dev/null 2>&1 || true
    inns app iperf3 -s -D >/dev/null
    sleep 0.3
    for _ in $(seq "$RUNS"); do
        gbps=$(inns laptop iperf3 -c "$addr" -t "$SECS" -J 2>/dev/null |
            python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' || echo "nan")
        all="$all $gbps"
    done
    rtt=$(inns laptop ping -c "$PINGS" -i 0.02 -q "$addr" 2>/dev/null | awk -F/ '/^rtt/ {print $5}')
    printf '%s %s%s\n' "$name" "${rtt:-nan}" "$all"
}

results=$(
    measure raw-veth 10.250.0.2
    measure wireguard-go 10.251.0.2
    measure sekisho 10.20.0.10
)
inns app pkill -f "iperf3 -s" >/dev/null 2>&1 || true

python3 - "$results" "$SECS" "$PINGS" "$RUNS" <<'EOF'
import statistics, sys
rows = [l.split() for l in sys.argv[1].strip().splitlines()]
secs, pings, runs = sys.argv[2], sys.argv[3], sys.argv[4]
d, spread = {}, {}
for r in rows:
    g = [float(x) for x in r[2:]]
    d[r[0]] = (statistics.median(g), float(r[1]))
    spread[r[0]] = (min(g), max(g))
print(f"iperf3 one TCP stream laptop -> app, {runs} runs of {secs} s per path (median, min-max); ping RTT average of {pings}")
print(f"{'path':<14}{'Gbit/s':>10}{'min-max':>18}{'RTT ms':>10}")
for name, (g, r) in d.items():
    lo, hi = spread[name]
    print(f"{name:<14}{g:>10.3f}{f'{lo:.3f}-{hi:.3f}':>18}{r:>10.3f}")
s, w, v = d["sekisho"], d["wireguard-go"], d["raw-veth"]
print(f"sekisho / wireguard-go throughput: {s[0]/w[0]:.2f}x   RTT: {s[1]/w[1]:.2f}x")
print(f"sekisho / raw veth     throughput: {s[0]/v[0]:.3f}x   RTT: {s[1]/v[1]:.2f}x")
EOF
