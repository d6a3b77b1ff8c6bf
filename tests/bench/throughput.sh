#!/usr/bin/env bash
# Throughput benchmark: Sekisho next to references measured in the same run, in the shapes
# users create.
#
#   tests/bench/throughput.sh            (as root; builds release binaries if needed)
#
# On the quickstart's namespaces it measures with iperf3, laptop -> app host unless said:
#   raw veth      a direct veth pair between the laptop and app namespaces (the ceiling)
#   wireguard-go  a plain WireGuard tunnel over that veth (Debian's wireguard-go), the
#                 reference; a second one between bob's laptop and the app for two laptops
#   sekisho       the real path: laptop -> internet router -> broker -> router -> connector
#                 -> app, every flow authorized, WireGuard then QUIC
#   egress        sekisho's internet egress: alice's laptop in full tunnel -> broker (source
#                 NAT) -> a web host (one WireGuard hop)
# each in these shapes: one TCP stream, four streams (-P 4), the reverse direction (-R), two
# laptops at once (alice and bob, each one stream). Every run reports throughput, TCP
# retransmits, the drop counters of Sekisho (broker, connector, client) and of the kernel
# (UDP receive-buffer overflows in every namespace, interface drops), and the CPU seconds
# each Sekisho process spent per gigabyte moved. Runs are BENCH_RUNS (default 3) of
# BENCH_SECONDS (default 10) each: the median is reported with the range, because a lossy
# path gives bimodal results. Figures are only comparable within one run on one machine.
# Settings: BENCH_SECONDS, BENCH_RUNS, BENCH_PINGS (default 50), BENCH_SHAPES (default
# "one four reverse two"), SK_BIN (prebuilt binaries), BENCH_JSON (also write the results
# there as JSON).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export SK_PREFIX=${SK_PREFIX:-skb$$-}
export SK_STATE=${SK_STATE:-/tmp/sekisho-bench-$$}
P=$SK_PREFIX
ns() { printf '%s%s' "$P" "$1"; }
inns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
missing=()
for c in iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools ping:iputils-ping nft:nftables nstat:iproute2; do
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

# iperf3 (TCP 5201-5202) for alice and bob through Sekisho.
cat >>"$SK_STATE/policy.toml" <<'EOF'

[[applications]]
name = "iperf3"
site = "dc1"
addresses = ["10.20.0.10"]
protocols = ["tcp"]
ports = ["5201-5202"]

[[rules]]
name = "bench-iperf3"
action = "allow"
users = ["alice", "bob"]
applications = ["iperf3"]
EOF
"$ROOT/deploy/quickstart.sh" admin policy apply "$SK_STATE/policy.toml" >/dev/null

# The reference paths: direct veths to the app host, and wireguard-go over them.
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
wg_pair() { # laptop-host index: veth 10.250.I.0/30, tunnel 10.251.I.0/30
    local host=$1 i=$2 kl ka wl wa
    ip link add "bv$i-l" netns "$(ns "$host")" type veth peer name "bv$i-a" netns "$(ns app)"
    inns "$host" ip addr add "10.250.$i.1/30" dev "bv$i-l"
    inns app ip addr add "10.250.$i.2/30" dev "bv$i-a"
    inns "$host" ip link set "bv$i-l" up
    inns app ip link set "bv$i-a" up
    kl=$(wg genkey); ka=$(wg genkey)
    # Interface names differ per namespace: wireguard-go's control sockets share /var/run/wireguard.
    wl="wl$i$$"; wa="wa$i$$"; wl=${wl:0:15}; wa=${wa:0:15}
    inns "$host" wireguard-go -f "$wl" >/dev/null 2>&1 & WG_PIDS+=($!)
    inns app wireguard-go -f "$wa" >/dev/null 2>&1 & WG_PIDS+=($!)
    for _ in $(seq 50); do [ -S "/var/run/wireguard/$wl.sock" ] && [ -S "/var/run/wireguard/$wa.sock" ] && break; sleep 0.1; done
    inns "$host" wg set "$wl" listen-port $((51900 + 2 * i)) private-key <(echo "$kl") \
        peer "$(echo "$ka" | wg pubkey)" endpoint "10.250.$i.2:$((51901 + 2 * i))" allowed-ips "10.251.$i.2/32"
    inns app wg set "$wa" listen-port $((51901 + 2 * i)) private-key <(echo "$ka") \
        peer "$(echo "$kl" | wg pubkey)" endpoint "10.250.$i.1:$((51900 + 2 * i))" allowed-ips "10.251.$i.1/32"
    inns "$host" ip addr add "10.251.$i.1/30" dev "$wl"
    inns app ip addr add "10.251.$i.2/30" dev "$wa"
    inns "$host" ip link set "$wl" mtu 1420 up
    inns app ip link set "$wa" mtu 1420 up
}
wg_pair laptop 0
wg_pair laptop2 1
inns app iperf3 -s -D -p 5201 >/dev/null
inns app iperf3 -s -D -p 5202 >/dev/null
inns web iperf3 -s -D -p 5201 >/dev/null
sleep 0.5

python3 "$HERE/throughput.py" --prefix "$P" --state "$SK_STATE" --bin "$SK_BIN" --root "$ROOT" \
    --seconds "${BENCH_SECONDS:-10}" --runs "${BENCH_RUNS:-3}" --pings "${BENCH_PINGS:-50}" \
    --shapes "${BENCH_SHAPES:-one four reverse two}" ${BENCH_JSON:+--json "$BENCH_JSON"}
