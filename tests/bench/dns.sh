#!/usr/bin/env bash
# DNS filter benchmark: the Sekisho stub next to dnsmasq and unbound, measured in the same run with
# the same 1,000,000-domain blocklist and the same query mix.
#
#   sudo tests/bench/dns.sh          (as root; needs the release sekisho-client, see SK_BIN)
#
# What it does:
#   1. Builds a list of 1,000,000 distinct domains: the real lists phishing.domains and
#      tracking.domains (~334k, from /work/shared/testdata/blocklists or BLOCKLISTS) plus names
#      generated with a fixed seed. Each resolver gets it in its own syntax, all answering NXDOMAIN
#      for a listed name and every name below it:
#        sekisho   the plain-domain file itself (`sekisho-client stub --list FILE`)
#        dnsmasq   `address=/domain/` lines
#        unbound   `local-zone: "domain." always_nxdomain` lines
#   2. Three network namespaces, nothing leaves them:
#        <p>up   "the internet": a dnsmasq authoritative for 1,000 public names (TTL 1 h)
#        <p>res  the resolver under test on 10.53.1.1:53, forwarding to <p>up (10.53.0.2)
#        <p>cli  dnsperf and dig (10.53.1.2)
#      Resolvers run one after the other, each alone, none under `nice`.
#   3. Per resolver: load time (start until a listed name answers NXDOMAIN, polled with dig),
#      resident memory (VmRSS) after loading and after the run, and its peak (VmHWM); the answers
#      to a listed name, a name below one, and a public name; one dnsperf pass over the public
#      names to warm the cache; then dnsperf for DURATION seconds over the query mix: 1/3 blocked
#      names (half listed names, half `www.` below listed names), 2/3 cached public names.
#      "App names" do not apply: the standalone stub has no broker to ask.
#   4. Prints a table: load time, RSS, queries per second, latency, lost queries, and the share of
#      NXDOMAIN answers (1/3 expected: a check that the run measured what it claims).
# Figures are only comparable within one run on one machine.
#
# Settings (environment):
#   DURATION      seconds of each measured dnsperf run (default 15)
#   CLIENTS       dnsperf -c, simulated clients (default 4)
#   OUTSTANDING   dnsperf -q, queries in flight (default 100)
#   RESOLVERS     which to run, in order (default "sekisho dnsmasq unbound")
#   UNBOUND_THREADS  unbound num-threads (default 1; dnsmasq has one thread)
#   LIST_SIZE     domains in the list (default 1000000)
#   BLOCKLISTS    folder holding phishing.domains and tracking.domains
#   SK_BIN        folder of the sekisho binaries (default target/release of this checkout)
#   LOAD_TIMEOUT  seconds a resolver may take to load the list (default 600)
#   KEEP=1        keep the temporary folder (lists, configs, logs, dnsperf output)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-100}
RESOLVERS=${RESOLVERS:-sekisho dnsmasq unbound}
UNBOUND_THREADS=${UNBOUND_THREADS:-1}
LIST_SIZE=${LIST_SIZE:-1000000}
BLOCKLISTS=${BLOCKLISTS:-/work/shared/testdata/blocklists}
SK_BIN=${SK_BIN:-$ROOT/target/release}
LOAD_TIMEOUT=${LOAD_TIMEOUT:-600}
P=${SK_PREFIX:-skd$$-}
ns() { printf '%s%s' "$P" "$1"; }
inns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
# Daemons are started as `ip netns exec NS CMD &` (not through inns): ip execs CMD, so $! is the
# daemon's own pid, the one whose memory is read and which is killed.
now_ms() { echo $(($(date +%s%N) / 1000000)); }
START=$(now_ms)

UP_IP=10.53.0.2     # upstream, in <p>up
RES_UP_IP=10.53.0.1 # resolver's side towards it
RES_IP=10.53.1.1    # where the resolver under test listens, in <p>res
CLI_IP=10.53.1.2    # dnsperf, in <p>cli

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
missing=()
for c in dnsperf:dnsperf dnsmasq:dnsmasq-base unbound:unbound dig:dnsutils python3:python3 ip:iproute2; do
    command -v "${c%%:*}" >/dev/null || missing+=("${c##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for f in phishing.domains tracking.domains; do
    [ -r "$BLOCKLISTS/$f" ] || { echo "missing $BLOCKLISTS/$f (set BLOCKLISTS)" >&2; exit 1; }
done

T=$(mktemp -d /tmp/sekisho-dnsbench.XXXXXX)
PIDS=()
NSES=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    # Anything still running inside our namespaces was started by this script.
    for n in "${NSES[@]}"; do
        for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "== $*" >&2; }

# --- 1. The list, the public zone and the query mix (deterministic) -------------------------
say "writing the $LIST_SIZE-domain list and the query mix to $T"
python3 - "$BLOCKLISTS" "$T" "$LIST_SIZE" <<'EOF'
import random, re, sys
src, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(20260718)
label = r'[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?'
valid = re.compile(rf'^{label}(?:\.{label})+$')
PUBLIC_ZONE = 'bench-public.example'
public = [f'www.site{i:04d}.{PUBLIC_ZONE}' for i in range(1000)]
# A list entry blocks itself and every name below it: none may be a public name or above one.
reserved = {PUBLIC_ZONE, 'example'} | set(public) | {p.split('.', 1)[1] for p in public}

seen, names, bad = set(), [], 0
for f in ('phishing.domains', 'tracking.domains'):
    for line in open(f'{src}/{f}', encoding='utf-8', errors='replace'):
        d = line.split('#', 1)[0].strip().lower().rstrip('.')
        if not d:
            continue
        if not valid.match(d) or len(d) > 240 or d in reserved:
            bad += 1
            continue
        if d not in seen:
            seen.add(d)
            names.append(d)
real = len(names)
names = names[:size]
alnum = 'abcdefghijklmnopqrstuvwxyz0123456789'
tlds = ['com', 'net', 'org', 'info', 'xyz', 'top', 'online', 'site', 'shop', 'io', 'co', 'ru',
        'de', 'cn', 'biz', 'club', 'live', 'app']
while len(names) < size:
    labels = [''.join(rng.choice(alnum) for _ in range(rng.randint(5, 14)))
              for _ in range(rng.choice((1, 1, 1, 2)))]
    d = '.'.join(labels + [rng.choice(tlds)])
    if d not in seen and d not in reserved:
        seen.add(d)
        names.append(d)

with open(f'{out}/domains.txt', 'w') as f:
    f.write(f'# Sekisho DNS benchmark list: {real} real domains, {size - min(real, size)} generated\n')
    f.writelines(d + '\n' for d in names)
with open(f'{out}/dnsmasq-block.conf', 'w') as f:
    f.writelines(f'address=/{d}/\n' for d in names)
with open(f'{out}/unbound-block.conf', 'w') as f:
    f.write('server:\n')
    f.writelines(f'local-zone: "{d}." always_nxdomain\n' for d in names)
with open(f'{out}/public.hosts', 'w') as f:
    f.writelines(f'198.18.{i // 250}.{i % 250 + 1} {p}\n' for i, p in enumerate(public))
with open(f'{out}/warm.txt', 'w') as f:
    f.writelines(f'{p} A\n' for p in public)

# Query mix: 10,000 blocked (5,000 listed names, 5,000 below listed names), 20,000 public.
sample = rng.sample(names, 10000)
blocked = [f'{d} A' for d in sample[:5000]] + [f'www.{d} A' for d in sample[5000:]]
queries = blocked + [f'{p} A' for p in public for _ in range(20)]
rng.shuffle(queries)
with open(f'{out}/queries.txt', 'w') as f:
    f.writelines(q + '\n' for q in queries)
with open(f'{out}/probe', 'w') as f:
    f.write(f'{sample[0]}\nwww.{sample[5000]}\n{public[0]}\n')
print(f'list: {real} real domains ({bad} invalid skipped), {size - min(real, size)} generated; '
      f'queries: {len(blocked)} blocked, {len(queries) - len(blocked)} public', file=sys.stderr)
EOF
{ read -r PROBE_BLOCKED; read -r PROBE_SUB; read -r PROBE_PUBLIC; } <"$T/probe"

# --- 2. Namespaces and the upstream ------------------------------------------------------------
for n in up res cli; do
    ip netns add "$(ns "$n")"
    NSES+=("$(ns "$n")")
    ip -n "$(ns "$n")" link set lo up
done
ip link add to-up netns "$(ns res)" type veth peer name eth0 netns "$(ns up)"
ip link add to-cli netns "$(ns res)" type veth peer name eth0 netns "$(ns cli)"
ip -n "$(ns res)" addr add "$RES_UP_IP/30" dev to-up
ip -n "$(ns up)" addr add "$UP_IP/30" dev eth0
ip -n "$(ns res)" addr add "$RES_IP/30" dev to-cli
ip -n "$(ns cli)" addr add "$CLI_IP/30" dev eth0
for l in res:to-up up:eth0 res:to-cli cli:eth0; do ip -n "$(ns "${l%%:*}")" link set "${l##*:}" up; done

ip netns exec "$(ns up)" dnsmasq --keep-in-foreground --conf-file=/dev/null --pid-file= --user=root \
    --no-resolv --no-hosts --addn-hosts="$T/public.hosts" --local-ttl=3600 \
    --listen-address="$UP_IP" --bind-interfaces --log-facility=- >"$T/upstream.log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")

# rcode NAME: the status of one query from the client namespace (or "timeout").
rcode() {
    inns cli dig +tries=1 +time=1 @"$RES_IP" "$1" A 2>/dev/null |
        awk '/status:/ {s=$6; sub(",", "", s); print s; found=1} END {if (!found) print "timeout"}'
}
answer_of() { inns cli dig +short +tries=1 +time=1 @"$RES_IP" "$1" A 2>/dev/null | head -1; }

for _ in $(seq 50); do
    [ "$(inns up dig +tries=1 +time=1 @"$UP_IP" "$PROBE_PUBLIC" A 2>/dev/null | awk '/status:/ {print $6}')" = "NOERROR," ] && break
    sleep 0.1
done

# --- 3. The resolvers ---------------------------------------------------------------------------
cat >"$T/unbound.conf" <<EOF
server:
    interface: $RES_IP
    port: 53
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$T"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: $UNBOUND_THREADS
    do-ip6: no
    access-control: 0.0.0.0/0 allow
    module-config: "iterator"
    include: "$T/unbound-block.conf"
forward-zone:
    name: "."
    forward-addr: $UP_IP@53
remote-control:
    control-enable: no
EOF

start_resolver() { # name -> starts it in <p>res, sets RPID; returns 2 when not available
    local log="$T/$1.log"
    case $1 in
        sekisho)
            if ! "$SK_BIN/sekisho-client" stub --help >/dev/null 2>&1; then
                echo "no 'stub' subcommand in $SK_BIN/sekisho-client" >"$log"
                return 2
            fi
            ip netns exec "$(ns res)" "$SK_BIN/sekisho-client" stub --listen "$RES_IP:53" --list "$T/domains.txt" \
                --upstream "udp://$UP_IP:53" --block-answer nxdomain >"$log" 2>&1 &
            ;;
        dnsmasq)
            ip netns exec "$(ns res)" dnsmasq --keep-in-foreground --conf-file="$T/dnsmasq-block.conf" --pid-file= \
                --user=root --no-resolv --no-hosts --server="$UP_IP" --cache-size=10000 \
                --dns-forward-max=1000 --listen-address="$RES_IP" --bind-interfaces \
                --log-facility=- >"$log" 2>&1 &
            ;;
        unbound)
            ip netns exec "$(ns res)" unbound -d -c "$T/unbound.conf" >"$log" 2>&1 &
            ;;
        *) echo "unknown resolver $1" >&2; exit 1 ;;
    esac
    RPID=$!
    PIDS+=("$RPID")
}

mem_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

stop_resolver() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

ROWS=""
ANSWERS=""
for r in $RESOLVERS; do
    say "$r: loading"
    t0=$(now_ms)
    set +e
    start_resolver "$r"
    st=$?
    set -e
    if [ "$st" = 2 ]; then
        say "$r: skipped ($(cat "$T/$r.log"))"
        ROWS+="$r skipped"$'\n'
        continue
    fi
    loaded=""
    while [ $(($(now_ms) - t0)) -lt $((LOAD_TIMEOUT * 1000)) ]; do
        kill -0 "$RPID" 2>/dev/null || break
        if [ "$(rcode "$PROBE_BLOCKED")" = NXDOMAIN ]; then loaded=1; break; fi
        sleep 0.05
    done
    load_ms=$(($(now_ms) - t0))
    if [ -z "$loaded" ]; then
        say "$r: did not answer within ${LOAD_TIMEOUT}s or exited; its log:"
        tail -20 "$T/$r.log" >&2
        stop_resolver "$RPID"
        ROWS+="$r failed"$'\n'
        continue
    fi
    rss_load=$(mem_kb "$RPID" VmRSS)
    say "$r: answered after ${load_ms} ms, RSS $((rss_load / 1024)) MiB"
    ANSWERS+="$r $(rcode "$PROBE_BLOCKED") $(rcode "$PROBE_SUB") $(rcode "$PROBE_PUBLIC") $(answer_of "$PROBE_PUBLIC")"$'\n'
    inns cli dnsperf -s "$RES_IP" -d "$T/warm.txt" -n 1 -c 1 -q 20 -t 2 >"$T/$r.warm" 2>&1 || true
    say "$r: dnsperf ${DURATION}s"
    inns cli dnsperf -s "$RES_IP" -d "$T/queries.txt" -l "$DURATION" -c "$CLIENTS" \
        -q "$OUTSTANDING" -t 2 >"$T/$r.dnsperf" 2>&1 || true
    rss_run=$(mem_kb "$RPID" VmRSS)
    hwm=$(mem_kb "$RPID" VmHWM)
    alive=yes
    kill -0 "$RPID" 2>/dev/null || alive=no
    stop_resolver "$RPID"
    ROWS+="$r ok $load_ms $rss_load $rss_run $hwm $alive $T/$r.dnsperf"$'\n'
done

# --- 4. The table -------------------------------------------------------------------------------
python3 - "$ROWS" "$ANSWERS" "$DURATION" "$CLIENTS" "$OUTSTANDING" "$LIST_SIZE" "$(($(now_ms) - START))" <<'EOF'
import re, sys
rows, answers, dur, clients, outstanding, size, total_ms = sys.argv[1:8]

def dnsperf(path):
    t = open(path).read()
    def num(pat, default=float('nan')):
        m = re.search(pat, t)
        return float(m.group(1)) if m else default
    codes = dict((c, int(n)) for c, n in re.findall(r'([A-Z]+) (\d+) \(', (re.search(r'Response codes:(.*)', t) or [None, ''])[1]))
    done = sum(codes.values())
    return {
        'qps': num(r'Queries per second:\s+([\d.]+)'),
        'avg': num(r'Average Latency \(s\):\s+([\d.]+)') * 1e3,
        'max': num(r'Average Latency \(s\):.*max ([\d.]+)') * 1e3,
        'sd': num(r'Latency StdDev \(s\):\s+([\d.]+)') * 1e3,
        'lost': num(r'Queries lost:\s+(\d+)'),
        'sent': num(r'Queries sent:\s+(\d+)'),
        'nx': 100.0 * codes.get('NXDOMAIN', 0) / done if done else float('nan'),
        'other': sum(n for c, n in codes.items() if c not in ('NOERROR', 'NXDOMAIN')),
    }

print(f"\nDNS filter benchmark: {int(size):,}-domain list; dnsperf {dur} s, {clients} clients, "
      f"{outstanding} outstanding; mix 1/3 blocked (half below listed names), 2/3 cached public names")
print()
print("answers before the run (listed name, name below a listed one, public name):")
for l in answers.strip().splitlines():
    f = l.split() + ['-'] * 5
    print(f"  {f[0]:<9} {f[1]:<9} {f[2]:<9} {f[3]:<9} {f[4]}")
print()
hdr = (f"{'resolver':<9}{'load s':>8}{'RSS load MiB':>14}{'RSS run MiB':>13}{'peak MiB':>10}"
       f"{'qps':>10}{'avg ms':>9}{'sd ms':>8}{'max ms':>9}{'lost':>8}{'NXDOMAIN %':>12}")
print(hdr)
print('-' * len(hdr))
for l in rows.strip().splitlines():
    f = l.split()
    if f[1] != 'ok':
        print(f"{f[0]:<9}  {f[1]} (see above)")
        continue
    name, _, load_ms, rl, rr, hwm, alive, path = f
    d = dnsperf(path)
    note = '' if alive == 'yes' else '  (exited during the run)'
    if d['other']:
        note += f"  ({d['other']} answers neither NOERROR nor NXDOMAIN)"
    print(f"{name:<9}{int(load_ms)/1000:>8.2f}{int(rl)/1024:>14.1f}{int(rr)/1024:>13.1f}{int(hwm)/1024:>10.1f}"
          f"{d['qps']:>10.0f}{d['avg']:>9.3f}{d['sd']:>8.3f}{d['max']:>9.2f}{d['lost']:>8.0f}{d['nx']:>12.1f}{note}")
print(f"\nload: start until a listed name answers NXDOMAIN; peak: VmHWM. Total run time {int(total_ms)/1000:.0f} s.")
EOF
