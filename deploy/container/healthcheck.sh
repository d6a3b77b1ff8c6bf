#!/bin/bash
# sekisho-healthcheck [PATH] [HOST:PORT]: exits 0 when `GET PATH` on the daemon's metrics
# endpoint answers 200, 1 otherwise (with the reason on stderr). For container health checks
# in images without curl: it uses bash's /dev/tcp.
#
#   PATH       /healthz (the process serves), /readyz (broker: store answers and policy loaded;
#              connector: at least one broker link up). Default /readyz.
#   HOST:PORT  default SEKISHO_METRICS_LISTEN (an unspecified address 0.0.0.0 or [::] means
#              this host; set but empty means metrics are off, and the check fails), else
#              127.0.0.1:9464.
#   SEKISHO_HEALTHCHECK_TIMEOUT  seconds to wait for the answer (default 5).
set -u

path=${1:-/readyz}
# Unset: the broker's default; set but empty (as the entrypoints read it): metrics are off.
addr=${2:-${SEKISHO_METRICS_LISTEN-127.0.0.1:9464}}
if [ -z "$addr" ]; then
    echo "sekisho-healthcheck: no address: SEKISHO_METRICS_LISTEN is empty (metrics are off)" >&2
    exit 1
fi
host=${addr%:*}
port=${addr##*:}
host=${host#[}
host=${host%]}
case $host in
    0.0.0.0 | '') host=127.0.0.1 ;;
    ::) host=::1 ;;
esac
timeout=${SEKISHO_HEALTHCHECK_TIMEOUT:-5}

if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
    echo "sekisho-healthcheck: cannot connect to $host:$port" >&2
    exit 1
fi
printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
if ! IFS= read -r -t "$timeout" status <&3; then
    echo "sekisho-healthcheck: no answer from $host:$port$path within ${timeout}s" >&2
    exit 1
fi
status=${status%$'\r'}
case $status in
    "HTTP/1."?" 200"*) exit 0 ;;
    *)
        echo "sekisho-healthcheck: $host:$port$path answered: $status" >&2
        exit 1
        ;;
esac
