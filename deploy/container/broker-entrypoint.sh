#!/bin/sh
# sekisho-broker entrypoint: prepares the broker's config, key and certificates, then `exec`s
# `sekisho-broker run`, so the broker is the process that gets the signals (SIGTERM stops it,
# SIGHUP reloads the policy file). Runs in the container image (deploy/container/Dockerfile.broker)
# and just as well on a plain host.
#
# Where the config comes from, in this order:
#   1. SEKISHO_CONFIG, or $SEKISHO_CONFIG_DIR/broker.toml, if that file exists (mounted): used
#      as it is. If it contains ${NAME} placeholders, each is replaced by the environment
#      variable NAME (a missing one is an error) and the result is written to
#      $SEKISHO_STATE_DIR/broker.toml (mode 0600), which the broker runs with: use absolute
#      paths in such a file (relative ones would be taken from the state folder).
#   2. Otherwise it is generated from the environment at every start into
#      $SEKISHO_STATE_DIR/broker.toml (edits there are lost at the next start). The WireGuard
#      key, the CA and the broker certificate (unless given as files), an empty default-deny
#      policy (unless given) and the SQLite store are made once, on first start, in the state
#      folder.
#
# Every setting is documented in deploy/README.md ("Broker entrypoint"). With arguments other
# than `run`, they are passed to sekisho-broker (e.g. `genkey`, `admin ...`).
set -eu

PROG=broker-entrypoint
export PROG
# shellcheck source=SCRIPTDIR/sekisho-entrypoint-lib.sh
. "$(dirname "$0")/sekisho-entrypoint-lib.sh"

BIN_DIR=${SEKISHO_BIN_DIR:-/usr/local/bin}
STATE_DIR=${SEKISHO_STATE_DIR:-/var/lib/sekisho}
CONFIG_DIR=${SEKISHO_CONFIG_DIR:-/etc/sekisho}
BROKER=$BIN_DIR/sekisho-broker

[ -x "$BROKER" ] || die "$BROKER is missing or not executable (SEKISHO_BIN_DIR=$BIN_DIR)"

if [ $# -gt 0 ] && [ "$1" != run ]; then
    exec "$BROKER" "$@"
fi

# The ordinal of a StatefulSet pod (name-N), or SEKISHO_ORDINAL.
ordinal() {
    if [ -n "${SEKISHO_ORDINAL:-}" ]; then
        printf '%s' "$SEKISHO_ORDINAL"
        return
    fi
    _h=$(cat /proc/sys/kernel/hostname 2>/dev/null || true)
    _n=${_h##*-}
    case $_n in
        '' | *[!0-9]*) die "SEKISHO_PUBLIC_HOSTS is set but the host name \"$_h\" does not end in -N (a StatefulSet ordinal): set SEKISHO_ORDINAL" ;;
    esac
    printf '%s' "$_n"
}

# This broker's public host: SEKISHO_PUBLIC_HOST, or the ordinal-th word of SEKISHO_PUBLIC_HOSTS.
public_host() {
    if [ -n "${SEKISHO_PUBLIC_HOST:-}" ]; then
        printf '%s' "$SEKISHO_PUBLIC_HOST"
        return
    fi
    [ -n "${SEKISHO_PUBLIC_HOSTS:-}" ] || return 0
    _i=$(ordinal)
    # shellcheck disable=SC2046 # word splitting is the point
    set -- $(printf '%s' "$SEKISHO_PUBLIC_HOSTS" | tr ',' ' ')
    [ "$_i" -lt $# ] || die "SEKISHO_PUBLIC_HOSTS names $# host(s); this is broker number $_i (from 0)"
    shift "$_i"
    printf '%s' "$1"
}

prepare_state_dir

PUBLIC_HOST=$(public_host)
if [ -n "$PUBLIC_HOST" ]; then export SEKISHO_PUBLIC_HOST="$PUBLIC_HOST"; fi
if [ -n "${SEKISHO_PUBLIC_HOSTS:-}" ]; then
    SEKISHO_ORDINAL=$(ordinal)
    export SEKISHO_ORDINAL
fi
DATABASE_URL=$(from_env_or_file SEKISHO_DATABASE_URL)
[ -n "$DATABASE_URL" ] || DATABASE_URL="sqlite://$STATE_DIR/broker.db"
export SEKISHO_DATABASE_URL="$DATABASE_URL"

MOUNTED=${SEKISHO_CONFIG:-$CONFIG_DIR/broker.toml}
CONFIG=$STATE_DIR/broker.toml

# The broker's WireGuard key, made once (in a generated config always; with a mounted one when
# SEKISHO_PRIVATE_KEY_FILE names the file the config uses).
make_key() {
    if [ ! -s "$1" ]; then
        mkdir -p "$(dirname "$1")"
        "$BROKER" genkey >"$1.tmp"
        mv "$1.tmp" "$1"
        say "made the broker's WireGuard key $1 (public key $("$BROKER" pubkey <"$1"))"
    fi
}

if [ -f "$MOUNTED" ] && [ "$MOUNTED" != "$CONFIG" ]; then
    # shellcheck disable=SC2016 # a literal ${
    if grep -q '\${[A-Za-z_][A-Za-z0-9_]*}' "$MOUNTED"; then
        expand_placeholders "$MOUNTED" "$CONFIG"
        say "config: $MOUNTED with its placeholders filled in, written to $CONFIG"
    else
        CONFIG=$MOUNTED
        say "config: $MOUNTED (mounted, used as it is)"
    fi
    if [ -n "${SEKISHO_PRIVATE_KEY_FILE:-}" ]; then make_key "$SEKISHO_PRIVATE_KEY_FILE"; fi
elif [ -n "${SEKISHO_CONFIG:-}" ]; then
    die "SEKISHO_CONFIG=$SEKISHO_CONFIG does not exist"
else
    # Generated from the environment.
    [ -n "$PUBLIC_HOST" ] || die "SEKISHO_PUBLIC_HOST is not set: the host name or address devices and connectors use to reach this broker (or SEKISHO_PUBLIC_HOSTS, one per StatefulSet ordinal; or mount a config at $MOUNTED)"
    WG_ENDPOINT=${SEKISHO_WIREGUARD_ENDPOINT:-$PUBLIC_HOST:51820}
    QUIC_ENDPOINT=${SEKISHO_CONNECTOR_ENDPOINT:-$PUBLIC_HOST:4433}
    API_URL=${SEKISHO_API_URL:-https://$PUBLIC_HOST:8443}
    TLS_NAME=${SEKISHO_TLS_NAME:-broker.sekisho.internal}
    KEY_FILE=${SEKISHO_PRIVATE_KEY_FILE:-$STATE_DIR/broker.key}
    ADMIN_TOKEN_FILE=${SEKISHO_ADMIN_TOKEN_FILE:-$STATE_DIR/admin.token}

    make_key "$KEY_FILE"

    # Certificates: all four files given (e.g. mounted from a secret), or a CA made here once.
    if [ -n "${SEKISHO_TLS_CA:-}${SEKISHO_TLS_CERT:-}${SEKISHO_TLS_KEY:-}${SEKISHO_CA_KEY:-}" ]; then
        for v in SEKISHO_TLS_CA SEKISHO_TLS_CERT SEKISHO_TLS_KEY SEKISHO_CA_KEY; do
            eval "f=\${$v:-}"
            [ -n "$f" ] || die "$v is not set: SEKISHO_TLS_CA, SEKISHO_TLS_CERT, SEKISHO_TLS_KEY and SEKISHO_CA_KEY go together"
            [ -r "$f" ] || die "$v=$f cannot be read"
        done
        TLS_CA=$SEKISHO_TLS_CA TLS_CERT=$SEKISHO_TLS_CERT TLS_KEY=$SEKISHO_TLS_KEY CA_KEY=$SEKISHO_CA_KEY
    else
        PKI=${SEKISHO_PKI_DIR:-$STATE_DIR/pki}
        if [ ! -f "$PKI/ca.pem" ]; then
            api_host=${API_URL#*://}
            api_host=${api_host%%/*}
            case $api_host in
                \[*) api_host=${api_host%%]*}; api_host=${api_host#[} ;;
                *) api_host=${api_host%:*} ;;
            esac
            names="--name $TLS_NAME --name $PUBLIC_HOST"
            [ "$api_host" = "$PUBLIC_HOST" ] || names="$names --name $api_host"
            for n in $(printf '%s' "${SEKISHO_TLS_EXTRA_NAMES:-}" | tr ',' ' '); do
                names="$names --name $n"
            done
            # shellcheck disable=SC2086 # one word per name
            "$BROKER" pki init --dir "$PKI" $names >&2
            say "made a cluster CA and the broker certificate in $PKI"
        fi
        TLS_CA=$PKI/ca.pem TLS_CERT=$PKI/broker.pem TLS_KEY=$PKI/broker.key CA_KEY=$PKI/ca.key
    fi

    POLICY=${SEKISHO_POLICY_FILE:-}
    if [ -z "$POLICY" ]; then
        if [ -f "$CONFIG_DIR/policy.toml" ]; then
            POLICY=$CONFIG_DIR/policy.toml
        else
            POLICY=$STATE_DIR/policy.toml
            if [ ! -f "$POLICY" ]; then
                cat >"$POLICY" <<'EOF'
# Empty policy written by broker-entrypoint.sh: everything is denied. Apply yours with
# `sekisho-broker admin policy apply FILE` (see deploy/demo/policy.toml for an example).
EOF
                say "no policy given: wrote an empty (deny-all) one to $POLICY"
            fi
        fi
    fi
    [ -r "$POLICY" ] || die "SEKISHO_POLICY_FILE=$POLICY cannot be read"

    {
        echo "# Written by broker-entrypoint.sh from the environment at every start; edits are lost."
        echo "private_key_file = $(toml_str "$KEY_FILE")"
        echo "listen_wireguard = $(toml_str "${SEKISHO_LISTEN_WIREGUARD:-0.0.0.0:51820}")"
        echo "listen_connectors = $(toml_str "${SEKISHO_LISTEN_CONNECTORS:-0.0.0.0:4433}")"
        echo "policy = $(toml_str "$POLICY")"
        echo "decision_log = $(toml_str "${SEKISHO_DECISION_LOG:--}")"
        echo "control_socket = $(toml_str "${SEKISHO_CONTROL_SOCKET:-$STATE_DIR/broker.sock}")"
        echo
        echo "[tls]"
        echo "ca = $(toml_str "$TLS_CA")"
        echo "cert = $(toml_str "$TLS_CERT")"
        echo "key = $(toml_str "$TLS_KEY")"
        echo
        echo "[control]"
        echo "listen = $(toml_str "${SEKISHO_API_LISTEN:-0.0.0.0:8443}")"
        echo "url = $(toml_str "$API_URL")"
        echo "database = $(toml_str "$DATABASE_URL")"
        echo "ca_key = $(toml_str "$CA_KEY")"
        if [ -n "${SEKISHO_NAME:-}" ]; then echo "name = $(toml_str "$SEKISHO_NAME")"; fi
        echo "wireguard_endpoint = $(toml_str "$WG_ENDPOINT")"
        echo "connector_endpoint = $(toml_str "$QUIC_ENDPOINT")"
        echo "broker_name = $(toml_str "$TLS_NAME")"
        if [ -n "${SEKISHO_POSTURE_TOKEN_LIFETIME:-}" ]; then
            echo "posture_token_lifetime = $(toml_str "$SEKISHO_POSTURE_TOKEN_LIFETIME")"
        fi
        if [ -n "${SEKISHO_CONNECTOR_CERT_LIFETIME:-}" ]; then
            echo "connector_cert_lifetime = $(toml_str "$SEKISHO_CONNECTOR_CERT_LIFETIME")"
        fi
        echo "admin_token_file = $(toml_str "$ADMIN_TOKEN_FILE")"
        echo "audit_log = $(toml_str "${SEKISHO_AUDIT_LOG:--}")"
        if [ -n "${SEKISHO_EGRESS_UPLINK:-}" ]; then
            echo
            echo "[egress]"
            echo "interface = $(toml_str "${SEKISHO_EGRESS_INTERFACE:-sekisho-egress}")"
            echo "uplink = $(toml_str "$SEKISHO_EGRESS_UPLINK")"
        fi
        # Unset: the default address; set but empty: no metrics endpoint.
        if [ -n "${SEKISHO_METRICS_LISTEN-0.0.0.0:9464}" ]; then
            echo
            echo "[metrics]"
            echo "listen = $(toml_str "${SEKISHO_METRICS_LISTEN-0.0.0.0:9464}")"
        fi
    } >"$CONFIG.tmp"
    mv "$CONFIG.tmp" "$CONFIG"
    say "config: generated $CONFIG (public host $PUBLIC_HOST, store ${DATABASE_URL%%://*})"
fi

# The first admin token, written to the config's control.admin_token_file (once: an existing
# file is kept).
if [ "${SEKISHO_ADMIN_INIT:-0}" = 1 ]; then
    if out=$("$BROKER" admin --config "$CONFIG" init 2>&1); then
        say "$out"
    else
        case $out in
            *"already exists"*) ;;
            *) die "admin init failed: $out" ;;
        esac
    fi
fi

if [ -n "${SEKISHO_EGRESS_UPLINK:-}" ] && ! command -v nft >/dev/null 2>&1; then
    die "SEKISHO_EGRESS_UPLINK is set but nft (nftables) is not on PATH"
fi

exec "$BROKER" run --config "$CONFIG"
