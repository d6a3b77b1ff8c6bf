#!/bin/sh
# sekisho-connector entrypoint: enrolls the connector once (its key and certificate stay in the
# state folder, so a restart does not enroll again), then `exec`s `sekisho-connector run`, so
# the connector is the process that gets the signals: SIGTERM makes it stop taking new flows,
# let the flows it carries finish, remove its nftables table and TUN device and exit. Give it
# time for that (compose stop_grace_period, Kubernetes terminationGracePeriodSeconds, systemd
# TimeoutStopSec). Runs in the container image (deploy/container/Dockerfile.connector) and just
# as well on a plain host.
#
# Where the config comes from, in this order:
#   1. SEKISHO_CONFIG, or $SEKISHO_CONFIG_DIR/connector.toml, if that file exists (mounted, e.g.
#      a connector enrolled by hand): used as it is. ${NAME} placeholders in it are replaced by
#      environment variables, the result written to $SEKISHO_STATE_DIR/connector.run.toml.
#   2. Otherwise $SEKISHO_STATE_DIR/connector.toml, written by `sekisho-connector enroll` on
#      first start (SEKISHO_SERVER and SEKISHO_ENROLL_TOKEN needed then, and only then). At every
#      start it is copied to $SEKISHO_STATE_DIR/connector.run.toml with the settings below
#      (metrics address, interface name, drain timeout), which the connector runs with.
#
# Every setting is documented in deploy/README.md ("Connector entrypoint"). With arguments other
# than `run`, they are passed to sekisho-connector.
set -eu

PROG=connector-entrypoint
export PROG
# shellcheck source=SCRIPTDIR/sekisho-entrypoint-lib.sh
. "$(dirname "$0")/sekisho-entrypoint-lib.sh"

BIN_DIR=${SEKISHO_BIN_DIR:-/usr/local/bin}
STATE_DIR=${SEKISHO_STATE_DIR:-/var/lib/sekisho}
CONFIG_DIR=${SEKISHO_CONFIG_DIR:-/etc/sekisho}
CONNECTOR=$BIN_DIR/sekisho-connector

[ -x "$CONNECTOR" ] || die "$CONNECTOR is missing or not executable (SEKISHO_BIN_DIR=$BIN_DIR)"

if [ $# -gt 0 ] && [ "$1" != run ]; then
    exec "$CONNECTOR" "$@"
fi

# What the connector needs from its container; said here plainly rather than as an error from
# deep inside, and before enrolling (a failed start does not use up the one-time token).
[ -c /dev/net/tun ] || die "/dev/net/tun is missing: give the container the TUN device (docker run --device /dev/net/tun, compose \`devices: [/dev/net/tun]\`)"
# The device node comes with the host's owner and mode: 0666 where udev made it (the usual
# case), 0600 root on hosts without udev, which uid $(id -u) cannot open.
if [ ! -r /dev/net/tun ] || [ ! -w /dev/net/tun ]; then
    die "/dev/net/tun is not readable and writable by uid $(id -u) (it is $(stat -c '%A %U' /dev/net/tun 2>/dev/null || echo '?'), as on the host): make it 0666 on the host (chmod 0666 /dev/net/tun, as udev does; opening it grants nothing without CAP_NET_ADMIN), or run the container as root (--user 0, with a state volume owned by root)"
fi
capbnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status 2>/dev/null || true)
if [ -n "$capbnd" ] && [ $(((0x$capbnd >> 12) & 1)) = 0 ]; then
    die "CAP_NET_ADMIN is not in this container's capability set: add it (docker run --cap-add NET_ADMIN, compose \`cap_add: [NET_ADMIN]\`); nothing more (no --privileged) is needed"
fi
command -v nft >/dev/null 2>&1 || die "nft (nftables) is not on PATH: the connector's source NAT needs it"
if [ "$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo 0)" != 1 ] && [ ! -w /proc/sys/net/ipv4/ip_forward ]; then
    say "warning: IPv4 forwarding is off in this network namespace and /proc/sys is read-only here; unless connector.toml says enable_forwarding = false, set it for the container (docker run --sysctl net.ipv4.ip_forward=1, compose \`sysctls\`)"
fi

prepare_state_dir

MOUNTED=${SEKISHO_CONFIG:-$CONFIG_DIR/connector.toml}
ENROLLED=$STATE_DIR/connector.toml
CONFIG=$STATE_DIR/connector.run.toml

if [ -f "$MOUNTED" ] && [ "$MOUNTED" != "$ENROLLED" ] && [ "$MOUNTED" != "$CONFIG" ]; then
    # shellcheck disable=SC2016 # a literal ${
    if grep -q '\${[A-Za-z_][A-Za-z0-9_]*}' "$MOUNTED"; then
        expand_placeholders "$MOUNTED" "$CONFIG"
        say "config: $MOUNTED with its placeholders filled in, written to $CONFIG"
    else
        CONFIG=$MOUNTED
        say "config: $MOUNTED (mounted, used as it is; not enrolling)"
    fi
elif [ -n "${SEKISHO_CONFIG:-}" ] && [ "$SEKISHO_CONFIG" != "$ENROLLED" ]; then
    die "SEKISHO_CONFIG=$SEKISHO_CONFIG does not exist"
else
    if [ -f "$ENROLLED" ]; then
        say "already enrolled ($ENROLLED): not enrolling again$([ -n "${SEKISHO_ENROLL_TOKEN:-}${SEKISHO_ENROLL_TOKEN_FILE:-}" ] && echo '; the enrollment token is not used')"
    else
        [ -n "${SEKISHO_SERVER:-}" ] || die "SEKISHO_SERVER is not set: the broker's control API URL, like https://broker.example.net:8443 (needed once, to enroll: $ENROLLED does not exist yet)"
        TOKEN=$(from_env_or_file SEKISHO_ENROLL_TOKEN)
        [ -n "$TOKEN" ] || die "SEKISHO_ENROLL_TOKEN is not set (nor SEKISHO_ENROLL_TOKEN_FILE): this connector is not enrolled yet ($ENROLLED does not exist); an admin makes a one-time token with \`sekisho-broker admin token create --site SITE\`"
        [ -n "${SEKISHO_ALLOW:-}" ] || die "SEKISHO_ALLOW is not set: what this connector may reach on the site, whatever a broker asks (space-separated: networks like 10.20.0.0/24, hosts with ports like 10.20.0.10:80,443, DNS zones like corp.example)"
        dns_args=
        for ip in $(printf '%s' "${SEKISHO_DNS_SERVERS:-}" | tr ',' ' '); do
            dns_args="$dns_args --dns-server $ip"
        done
        for a in $SEKISHO_ALLOW; do
            dns_args="$dns_args --allow $a"
        done
        say "enrolling with $SEKISHO_SERVER"
        # The token goes through standard input, not the command line (visible in ps).
        # shellcheck disable=SC2086 # one word per option
        if ! printf '%s\n' "$TOKEN" | "$CONNECTOR" enroll --server "$SEKISHO_SERVER" --token - \
            --dir "$STATE_DIR" $dns_args >&2; then
            die "enrollment failed (see above); nothing was kept, fix the cause and start again"
        fi
    fi
    # What the connector runs with: the enrolled file, with this environment's settings.
    {
        # Top-level keys go first, before any [table]; the enrolled file's own lines for them
        # are left out.
        drop=
        if [ -n "${SEKISHO_TUN_NAME:-}" ]; then
            echo "tun_name = $(toml_str "$SEKISHO_TUN_NAME")"
            drop="$drop/^tun_name[[:space:]]*=/d;"
        fi
        if [ -n "${SEKISHO_DRAIN_TIMEOUT:-}" ]; then
            echo "drain_timeout = $(toml_str "$SEKISHO_DRAIN_TIMEOUT")"
            drop="$drop/^drain_timeout[[:space:]]*=/d;"
        fi
        sed "$drop" "$ENROLLED"
        # Unset: the default address; set but empty: no metrics endpoint. A [metrics] section
        # the enrolled file has already wins.
        if [ -n "${SEKISHO_METRICS_LISTEN-0.0.0.0:9465}" ] && ! grep -q '^\[metrics\]' "$ENROLLED"; then
            echo
            echo "[metrics]"
            echo "listen = $(toml_str "${SEKISHO_METRICS_LISTEN-0.0.0.0:9465}")"
        fi
    } >"$CONFIG.tmp"
    mv "$CONFIG.tmp" "$CONFIG"
    say "config: $CONFIG (from $ENROLLED)"
fi

exec "$CONNECTOR" run --config "$CONFIG"
