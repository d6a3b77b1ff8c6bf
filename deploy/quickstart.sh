#!/usr/bin/env bash
# Sekisho quickstart: a whole deployment on one machine, in network namespaces.
#
#   deploy/quickstart.sh up       build, configure and start everything; print what to try
#   deploy/quickstart.sh down     stop everything this script started and remove the namespaces
#   deploy/quickstart.sh status   show processes and the broker's counters
#   deploy/quickstart.sh start|stop|kill NAME
#                                 one daemon: broker, connector, client-alice, client-bob, app,
#                                 edr (the stand-in EDR agent alice's posture check looks for),
#                                 site-dns, inet-dns (dnsmasq: the site's and the internet's DNS),
#                                 idp (the OpenID provider, with SK_IDP=1), rsyslog and otlp
#                                 (the SIEM's receivers, with SK_SIEM=1)
#   deploy/quickstart.sh admin ARGS...
#                                 the admin CLI (`sekisho-broker admin`) on the broker host
#
# Nothing is keyed by hand: the broker's control plane (SQLite in the state folder) gets an
# admin token, users alice and bob, the policy (with its tests), and one-time enrollment
# tokens; each laptop and the connector enroll with theirs and make their own keys.
#
# Hosts (namespaces): sk-laptop (alice) and sk-laptop2 (bob) on the "internet" router sk-inet,
# which also reaches sk-broker and the site's connector host sk-site; behind sk-site, on a
# private network nothing else can reach, the app host sk-app (10.20.0.10: HTTP on 80, UDP echo
# on 7, and a "database" on TCP 5432 that the policy denies) and the site's DNS server
# (10.20.0.53, dnsmasq: wiki.corp.example, *.dev.corp.example, payroll.corp.example). The
# "internet" DNS server (10.99.0.53 on sk-inet, dnsmasq) is what the laptops' resolv.conf names
# before the client takes over (/etc/netns/NS/resolv.conf, which `ip netns exec` mounts over
# /etc/resolv.conf inside the namespace).
#
# Run as root. Traffic stays inside these namespaces. Settings (environment):
#   SK_PREFIX   namespace name prefix (default "sk-"); tests use a per-run prefix
#   SK_STATE    folder for keys, configs, logs and pid files (default /run/sekisho-quickstart)
#   SK_BIN      folder with the three binaries; if unset, `cargo build --release` builds them
#   SK_SKIP_PACKAGES=1  do not install Debian packages
#   SK_CHECK_INTERVAL   how often clients run posture checks (default 2s)
#   SK_TOKEN_LIFETIME   posture token lifetime (default 5m); SK_CERT_LIFETIME connector
#                       certificate lifetime (default 30d)
#   SK_EDR_NAME         process name of the stand-in EDR agent (default sk-edr-agent)
#   SK_DNS_REFRESH      how often clients look for new DNS settings and lists (default 1h)
#   SK_CONFIG_REFRESH   how often clients fetch their configuration (default here 5s)
#   SK_BROKERS=2        a second broker (sk-broker2, 10.99.8.2) sharing the first one's
#                       SQLite store: devices and the connector use both
#   SK_CONNECTORS=2     a second connector for site dc1 (host sk-site2, 10.99.9.2) on the
#                       same private network: flows are spread over both
#   SK_DATABASE         the brokers' store (default sqlite://broker.db in SK_STATE); a
#                       postgres://… URL makes the brokers a cluster on PostgreSQL
#   SK_CONNECTOR_ALLOW  the connectors' allowlist, space-separated `--allow` entries
#                       (default "10.20.0.0/24 corp.example")
#   SK_LOAD=1           a host for load tests (sk-load) on the internet router, with the
#                       addresses 10.99.16.1-10.99.18.254 (tests/src/bin/sekisho-load.rs)
#   SK_LINK_RELAY       "DELAY_MS LOSS": connectors reach the first broker through a userspace
#                       UDP relay on the internet router (10.99.0.61:4433) that delays each
#                       datagram and drops that fraction of them; $SK_STATE/link-loss, when
#                       written, changes the loss while it runs (tests of a lossy link)
#   SK_BROKER_DELAY_MS  one-way delays to the brokers, like "30 0": each nonzero one puts a
#                       userspace UDP delay relay (tests/tools/udp_delay.py) on the internet
#                       router, at 10.99.0.(51+i):51820, and that is the endpoint devices get
#   SK_IDP=1            an OpenID provider "on the internet": host sk-idp (10.99.5.2), named
#                       idp.example on the internet DNS (which the broker hosts then use too),
#                       https://idp.example (tests/tools/oidc: oidc-provider on Node, its
#                       node_modules from `npm ci --prefix tests/tools/oidc`). In $SK_STATE/idp:
#                       the CA (ca.pem) and server certificate, users.json (alice: engineering
#                       and sekisho-admins, bob: finance, carol: auditors; their passwords),
#                       clients.json with the confidential native client "sekisho" (any
#                       loopback port of http://127.0.0.1/callback, PKCE, device flow) and its
#                       secret in client_secret, the signing keys (jwks.json; replace the file
#                       and restart idp to rotate), and `tamper` (see tests/tools/oidc)
#   SK_SSO=1            sign-in through that provider (implies SK_IDP=1): the control plane
#                       is its relying party ([control.oidc] in broker.toml); no user is made
#                       and no laptop enrolled by the script: people sign in with
#                       `sekisho-client login` (see the README, "Sign-in").
#   SK_SIEM=1           a SIEM "on the internet": host sk-siem (10.99.7.2), named siem.example
#                       on the internet DNS (which the broker and connector hosts then use
#                       too), with two receivers: daemon rsyslog (rsyslogd with its own config,
#                       no system inputs: syslog over TLS, RFC 5425, on 6514 and over plain TCP
#                       on 514, octet-counted or LF-framed) and daemon otlp (OTLP/HTTP logs,
#                       http://siem.example:4318/v1/logs, tests/tools/otlp_receiver.py). In
#                       $SK_STATE/siem: ca.pem, cert.pem and key.pem (siem.example and
#                       10.99.7.2), an unrelated wrong-ca.pem; what arrived: syslog-tls.log and
#                       syslog-tcp.log (each message as received, one a line: check them with
#                       tests/tools/syslog_check.py), syslog-tls.meta.jsonl and
#                       syslog-tcp.meta.jsonl (receive time, sender address, message),
#                       rsyslogd.log (rsyslogd's own messages: TLS errors), otlp.jsonl (one
#                       JSON line per log record); write a status such as 503 into otlp-status
#                       and the OTLP receiver answers it (remove the file to end that)
#   SK_BROKER_EXTRA     TOML appended to every broker's config (tables such as [risk_engine])
set -euo pipefail

P=${SK_PREFIX:-sk-}
STATE=${SK_STATE:-/run/sekisho-quickstart}
if [ "${SK_SSO:-0}" = 1 ]; then SK_IDP=1; fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

say() { printf '%s\n' "$*" >&2; }
die() { say "quickstart: $*"; exit 1; }
ns() { printf '%s%s' "$P" "$1"; }
inns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces)"; }

install_packages() {
    [ "${SK_SKIP_PACKAGES:-0}" = 1 ] && return 0
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nft >/dev/null || missing+=(nftables)
    command -v curl >/dev/null || missing+=(curl)
    command -v ping >/dev/null || missing+=(iputils-ping)
    command -v python3 >/dev/null || missing+=(python3)
    command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
    command -v dig >/dev/null || missing+=(dnsutils)
    if [ "${SK_IDP:-0}" = 1 ] || [ "${SK_SIEM:-0}" = 1 ]; then
        command -v openssl >/dev/null || missing+=(openssl)
    fi
    if [ "${SK_SIEM:-0}" = 1 ]; then
        command -v rsyslogd >/dev/null || missing+=(rsyslog)
        dpkg -s rsyslog-gnutls >/dev/null 2>&1 || missing+=(rsyslog-gnutls)
    fi
    if [ "${SK_IDP:-0}" = 1 ]; then
        # Debian's Node only where there is none: a newer one on the PATH stays.
        command -v node >/dev/null || missing+=(nodejs npm)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The OpenID provider's Node packages (tests/tools/oidc/package-lock.json).
idp_packages() {
    [ "${SK_IDP:-0}" = 1 ] || return 0
    local dir="$ROOT/tests/tools/oidc"
    [ -d "$dir/node_modules/oidc-provider" ] && return 0
    if [ "${SK_SKIP_PACKAGES:-0}" = 1 ] || ! command -v npm >/dev/null; then
        die "SK_IDP=1 needs the provider's packages: run 'npm ci --prefix tests/tools/oidc'"
    fi
    say "installing the OpenID provider's packages (npm ci --prefix tests/tools/oidc)"
    npm ci --prefix "$dir" --no-audit --no-fund >/dev/null
}

# The OTLP receiver's Python package (opentelemetry-proto, with the protobuf runtime).
siem_packages() {
    [ "${SK_SIEM:-0}" = 1 ] || return 0
    python3 -c 'import opentelemetry.proto.collector.logs.v1.logs_service_pb2' 2>/dev/null && return 0
    if [ "${SK_SKIP_PACKAGES:-0}" = 1 ]; then
        die "SK_SIEM=1 needs opentelemetry-proto: run 'python3 -m pip install opentelemetry-proto'"
    fi
    say "installing opentelemetry-proto (pip)"
    python3 -m pip install -q --root-user-action=ignore opentelemetry-proto >/dev/null \
        || die "could not install opentelemetry-proto with pip"
}

binaries() {
    if [ -z "${SK_BIN:-}" ]; then
        say "building release binaries (first time: several minutes)"
        (cd "$ROOT" && cargo build --release --bins -q)
        SK_BIN="$ROOT/target/release"
    fi
    BIN=$(cd "$SK_BIN" && pwd)
    for b in sekisho-broker sekisho-client sekisho-connector; do
        [ -x "$BIN/$b" ] || die "$BIN/$b is missing"
    done
}

# link A IFA ADDRA B IFB ADDRB: a veth pair between two namespaces, created inside them.
link() {
    ip link add "$2" netns "$(ns "$1")" type veth peer name "$5" netns "$(ns "$4")"
    ip -n "$(ns "$1")" addr add "$3" dev "$2"
    ip -n "$(ns "$4")" addr add "$6" dev "$5"
    ip -n "$(ns "$1")" link set "$2" up
    ip -n "$(ns "$4")" link set "$5" up
}

NBROKERS=${SK_BROKERS:-1}
BROKERS="broker"
if [ "$NBROKERS" -ge 2 ]; then BROKERS="broker broker2"; fi
NCONNECTORS=${SK_CONNECTORS:-1}
SITES="site"
if [ "$NCONNECTORS" -ge 2 ]; then SITES="site site2"; fi
HOSTS="laptop laptop2 inet $BROKERS $SITES app nas web"
if [ "${SK_LOAD:-0}" = 1 ]; then HOSTS="$HOSTS load"; fi
if [ "${SK_IDP:-0}" = 1 ]; then HOSTS="$HOSTS idp"; fi
if [ "${SK_SIEM:-0}" = 1 ]; then HOSTS="$HOSTS siem"; fi
# Every host this script may have made (down removes what exists of them).
ALL_HOSTS="laptop laptop2 inet broker broker2 site site2 app nas web load idp siem"

# Broker i (1 or 2): its host, address, and the WireGuard endpoint devices are given.
broker_host() { if [ "$1" = 1 ]; then echo broker; else echo "broker$1"; fi; }
broker_addr() { if [ "$1" = 1 ]; then echo 10.99.2.2; else echo 10.99.8.2; fi; }
broker_delay() { local d; read -r -a d <<<"${SK_BROKER_DELAY_MS:-}"; echo "${d[$(($1 - 1))]:-0}"; }
# The QUIC endpoint connectors are given: the link relay's for the first broker when there is one.
broker_link_endpoint() {
    if [ "$1" = 1 ] && [ -n "${SK_LINK_RELAY:-}" ]; then echo "10.99.0.61:4433"; else echo "$(broker_addr "$1"):4433"; fi
}
broker_wg_endpoint() {
    if [ "$(broker_delay "$1")" != 0 ]; then echo "10.99.0.$((50 + $1)):51820"; else echo "$(broker_addr "$1"):51820"; fi
}

topology() {
    for h in $HOSTS; do
        ip netns add "$(ns "$h")"
        ip -n "$(ns "$h")" link set lo up
    done
    # alice's home network: the laptop and a NAS on one bridge, the router's side of it.
    ip -n "$(ns inet)" link add lan0 type bridge
    ip -n "$(ns inet)" addr add 10.99.1.1/24 dev lan0
    ip -n "$(ns inet)" link set lan0 up
    ip link add to-laptop netns "$(ns inet)" type veth peer name eth0 netns "$(ns laptop)"
    ip link add to-nas netns "$(ns inet)" type veth peer name eth0 netns "$(ns nas)"
    ip -n "$(ns laptop)" addr add 10.99.1.2/24 dev eth0
    ip -n "$(ns nas)" addr add 10.99.1.50/24 dev eth0
    for p in to-laptop to-nas; do
        ip -n "$(ns inet)" link set "$p" master lan0
        ip -n "$(ns inet)" link set "$p" up
    done
    ip -n "$(ns laptop)" link set eth0 up
    ip -n "$(ns nas)" link set eth0 up
    ip -n "$(ns nas)" route add default via 10.99.1.1
    # Public web servers "on the internet" (documentation ranges, only inside these namespaces).
    link inet to-web 203.0.113.1/24 web eth0 203.0.113.80/24
    ip -n "$(ns inet)" addr add 198.51.100.1/24 dev to-web
    ip -n "$(ns inet)" addr add 192.0.2.1/24 dev to-web
    ip -n "$(ns web)" addr add 198.51.100.80/24 dev eth0
    ip -n "$(ns web)" addr add 192.0.2.80/24 dev eth0
    ip -n "$(ns web)" route add default via 203.0.113.1
    link inet to-laptop2 10.99.4.1/24 laptop2 eth0 10.99.4.2/24
    link inet to-broker 10.99.2.1/24 broker eth0 10.99.2.2/24
    if [ "$NBROKERS" -ge 2 ]; then
        link inet to-broker2 10.99.8.1/24 broker2 eth0 10.99.8.2/24
        ip -n "$(ns broker2)" route add default via 10.99.8.1
    fi
    for i in 1 2; do
        if [ "$(broker_delay $i)" != 0 ]; then ip -n "$(ns inet)" addr add "10.99.0.$((50 + i))/32" dev lo; fi
    done
    if [ -n "${SK_LINK_RELAY:-}" ]; then ip -n "$(ns inet)" addr add 10.99.0.61/32 dev lo; fi
    if [ "${SK_LOAD:-0}" = 1 ]; then
        link inet to-load 10.99.19.254/22 load eth0 10.99.16.1/22
        local a b
        for b in 16 17 18; do
            for a in $(seq 1 254); do
                [ "$b.$a" = 16.1 ] || echo "address add 10.99.$b.$a/22 dev eth0"
            done
        done | ip -n "$(ns load)" -batch -
        ip -n "$(ns load)" route add default via 10.99.19.254
    fi
    if [ "${SK_IDP:-0}" = 1 ]; then
        link inet to-idp 10.99.5.1/24 idp eth0 10.99.5.2/24
        ip -n "$(ns idp)" route add default via 10.99.5.1
    fi
    if [ "${SK_SIEM:-0}" = 1 ]; then
        link inet to-siem 10.99.7.1/24 siem eth0 10.99.7.2/24
        ip -n "$(ns siem)" route add default via 10.99.7.1
    fi
    link inet to-site 10.99.3.1/24 site eth0 10.99.3.2/24
    # The site's private network: a bridge on the app host; each connector host has a leg.
    ip -n "$(ns app)" link add br0 type bridge
    ip -n "$(ns app)" addr add 10.20.0.10/24 dev br0
    ip -n "$(ns app)" link set br0 up
    local c=1 h
    for h in $SITES; do
        ip link add priv0 netns "$(ns "$h")" type veth peer name "to-$h" netns "$(ns app)"
        ip -n "$(ns "$h")" addr add "10.20.0.$c/24" dev priv0
        ip -n "$(ns "$h")" link set priv0 up
        ip -n "$(ns app)" link set "to-$h" master br0
        ip -n "$(ns app)" link set "to-$h" up
        c=$((c + 1))
    done
    if [ "$NCONNECTORS" -ge 2 ]; then
        link inet to-site2 10.99.9.1/24 site2 eth0 10.99.9.2/24
        ip -n "$(ns site2)" route add default via 10.99.9.1
    fi
    ip -n "$(ns laptop)" route add default via 10.99.1.1
    ip -n "$(ns laptop2)" route add default via 10.99.4.1
    ip -n "$(ns broker)" route add default via 10.99.2.1
    ip -n "$(ns site)" route add default via 10.99.3.1
    inns inet sysctl -qw net.ipv4.ip_forward=1
    # The app host has no default route: only its own network reaches it.
    ip -n "$(ns app)" addr add 10.20.0.53/24 dev br0
    ip -n "$(ns inet)" addr add 10.99.0.53/32 dev lo
    # What the laptops' system resolver uses before the client takes over.
    local resolving="laptop laptop2"
    # The brokers find the OpenID provider (idp.example) and the SIEM (siem.example) through
    # the internet DNS too; so do, with a SIEM, the connectors' hosts and the SIEM's own.
    if [ "${SK_IDP:-0}" = 1 ] || [ "${SK_SIEM:-0}" = 1 ]; then resolving="$resolving $BROKERS"; fi
    if [ "${SK_SIEM:-0}" = 1 ]; then resolving="$resolving $SITES siem"; fi
    for h in $resolving; do
        mkdir -p "/etc/netns/$(ns "$h")"
        printf 'nameserver 10.99.0.53\n' >"/etc/netns/$(ns "$h")/resolv.conf"
    done
}

# Name of the stand-in "EDR agent" process the demo's posture check looks for. Processes are
# machine-wide, so parallel deployments (tests) each use their own name (at most 15 characters).
EDR=${SK_EDR_NAME:-sk-edr-agent}

configure() {
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    local pki="$STATE/pki"
    "$BIN/sekisho-broker" genkey >"$STATE/broker.key"
    chmod 600 "$STATE/broker.key"
    # The CA signs the broker's certificate (for connectors and the HTTPS control API) and,
    # at enrollment, the connectors' certificates.
    "$BIN/sekisho-broker" pki init --dir "$pki" --name broker.sekisho.internal --name 10.99.2.2 \
        --name 10.99.8.2
    if [ "$NBROKERS" -ge 2 ]; then
        "$BIN/sekisho-broker" genkey >"$STATE/broker2.key"
        chmod 600 "$STATE/broker2.key"
    fi
    sed -e "s|@EDR@|$EDR|" -e "s|@DNS_REFRESH@|${SK_DNS_REFRESH:-1h}|" \
        "$HERE/demo/policy.toml" >"$STATE/policy.toml"
    mkdir -p "$STATE/lists"
    cp "$HERE/demo/lists/demo.domains" "$STATE/lists/"
    cp "$ROOT/proto/testdata/blocklists/scam.adblock" "$STATE/lists/"
    # The internet's names: a few web names, and one name with 100 addresses (an answer too
    # large for UDP). Any other name does not exist (NXDOMAIN).
    {
        echo "10.99.5.80 www.public.example blocked.example partner.example later.example"
        echo "203.0.113.80 web.public.example"
        echo "192.0.2.80 cdn.video.example"
        for i in $(seq 1 100); do echo "10.99.6.$i big.public.example"; done
        if [ "${SK_IDP:-0}" = 1 ]; then echo "10.99.5.2 idp.example"; fi
        if [ "${SK_SIEM:-0}" = 1 ]; then echo "10.99.7.2 siem.example"; fi
    } >"$STATE/inet-hosts"
    if [ "${SK_IDP:-0}" = 1 ]; then idp_config; fi
    if [ "${SK_SIEM:-0}" = 1 ]; then siem_config; fi
    local i
    for i in $(seq 1 "$NBROKERS"); do
        broker_config "$i"
    done
    mkdir -p "$STATE/www" "$STATE/edr" "$STATE/tokens" "$STATE/www-nas" "$STATE/www-web"
    echo "Hello from the private app behind Sekisho" >"$STATE/www/index.html"
    echo "Hello from the NAS on alice's home network" >"$STATE/www-nas/index.html"
    echo "Hello from a public web server" >"$STATE/www-web/index.html"
    head -c 10485760 /dev/urandom >"$STATE/www-web/10mb.bin"
    head -c 10485760 /dev/urandom >"$STATE/www/10mb.bin"
    cp "$(command -v sleep)" "$STATE/edr/$EDR"
}

# The OpenID provider's files (SK_IDP=1), in $STATE/idp: its own CA and the server certificate
# for idp.example, the users with random passwords, the client "sekisho" with a random secret.
idp_config() {
    local idp="$STATE/idp"
    mkdir -p "$idp"
    chmod 700 "$idp"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=Sekisho quickstart IdP CA" -keyout "$idp/ca.key" -out "$idp/ca.pem" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=idp.example" \
        -keyout "$idp/key.pem" -out "$idp/cert.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:idp.example,IP:10.99.5.2" "extendedKeyUsage=serverAuth" \
        "basicConstraints=critical,CA:FALSE" >"$idp/cert.ext"
    openssl x509 -req -in "$idp/cert.csr" -CA "$idp/ca.pem" -CAkey "$idp/ca.key" -CAcreateserial \
        -days 30 -extfile "$idp/cert.ext" -out "$idp/cert.pem" 2>/dev/null
    rm -f "$idp/cert.csr" "$idp/cert.ext" "$idp/ca.srl"
    chmod 600 "$idp/ca.key" "$idp/key.pem"
    local secret
    secret=$(openssl rand -hex 32)
    (umask 077 && printf '%s' "$secret" >"$idp/client_secret")
    SECRET=$secret python3 - "$idp" <<'PY'
import json, os, secrets, sys
d = sys.argv[1]
users = [
    {"sub": "sub-" + secrets.token_hex(8), "username": name, "password": secrets.token_hex(8),
     "email": f"{name}@corp.example", "name": full, "groups": groups}
    for name, full, groups in [
        ("alice", "Alice Example", ["engineering", "sekisho-admins"]),
        ("bob", "Bob Example", ["finance"]),
        ("carol", "Carol Example", ["auditors"]),
    ]
]
clients = [{
    "client_id": "sekisho",
    "client_secret": os.environ["SECRET"],
    "client_name": "Sekisho",
    "application_type": "native",
    # The CLI's loopback redirect, and each broker's admin console.
    "redirect_uris": ["http://127.0.0.1/callback", "https://10.99.2.2:8443/console/callback",
                      "https://10.99.8.2:8443/console/callback"],
    "response_types": ["code"],
    "grant_types": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
    "token_endpoint_auth_method": "client_secret_basic",
    "id_token_signed_response_alg": "RS256",
    "require_auth_time": True,
}]
for name, value in (("users.json", users), ("clients.json", clients)):
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
PY
}

# The SIEM's files (SK_SIEM=1), in $STATE/siem: its CA and the server certificate for
# siem.example and 10.99.7.2, an unrelated CA (wrong-ca.pem: a client trusting it must refuse
# the server), and rsyslogd's config: no system inputs (no /dev/log, no kernel log), its own
# messages processed here (not sent to the machine's log), its own work directory and pid file;
# TLS on 6514 and plain TCP on 514, each input its ruleset and files. Clients are not asked
# for certificates (anon): the server presents its own.
siem_config() {
    local sd="$STATE/siem"
    mkdir -p "$sd/rsyslog"
    chmod 700 "$sd"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=Sekisho quickstart SIEM CA" -keyout "$sd/ca.key" -out "$sd/ca.pem" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=siem.example" \
        -keyout "$sd/key.pem" -out "$sd/cert.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:siem.example,IP:10.99.7.2" "extendedKeyUsage=serverAuth" \
        "basicConstraints=critical,CA:FALSE" >"$sd/cert.ext"
    openssl x509 -req -in "$sd/cert.csr" -CA "$sd/ca.pem" -CAkey "$sd/ca.key" -CAcreateserial \
        -days 30 -extfile "$sd/cert.ext" -out "$sd/cert.pem" 2>/dev/null
    # Same name, other key: only the signature tells it apart.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=Sekisho quickstart SIEM CA" -keyout "$sd/wrong-ca.key" -out "$sd/wrong-ca.pem" \
        2>/dev/null
    rm -f "$sd/cert.csr" "$sd/cert.ext" "$sd/ca.srl" "$sd/wrong-ca.key"
    chmod 600 "$sd/ca.key" "$sd/key.pem"
    # Each message as received (%rawmsg%: without its octet count), one a line; and a JSON
    # line with rsyslog's receive time and the sender's address.
    cat >"$sd/rsyslog.conf" <<EOF
global(
    workDirectory="$sd/rsyslog"
    processInternalMessages="on"
    maxMessageSize="256k"
    net.enableDNS="off"
    defaultNetstreamDriverCAFile="$sd/ca.pem"
    defaultNetstreamDriverCertFile="$sd/cert.pem"
    defaultNetstreamDriverKeyFile="$sd/key.pem"
)
module(load="imtcp" maxSessions="500")
template(name="raw" type="string" string="%rawmsg%\n")
template(name="meta" type="string"
    string="{\"received\":\"%timegenerated:::date-rfc3339%\",\"from\":\"%fromhost-ip%\",\"raw\":\"%rawmsg:::json%\"}\n")
ruleset(name="tls") {
    action(type="omfile" file="$sd/syslog-tls.log" template="raw")
    action(type="omfile" file="$sd/syslog-tls.meta.jsonl" template="meta")
}
ruleset(name="tcp") {
    action(type="omfile" file="$sd/syslog-tcp.log" template="raw")
    action(type="omfile" file="$sd/syslog-tcp.meta.jsonl" template="meta")
}
# TLS 1.2 and 1.3 (gnutls' default for anon mode would be 1.2 at most).
input(type="imtcp" port="6514" ruleset="tls" streamDriver.name="gtls" streamDriver.mode="1"
    streamDriver.authMode="anon" gnutlsPriorityString="NORMAL:-VERS-TLS1.0:-VERS-TLS1.1")
input(type="imtcp" port="514" ruleset="tcp")
# rsyslogd's own messages (start, TLS handshake errors, ...): the default ruleset.
*.* action(type="omfile" file="$sd/rsyslogd.log")
EOF
}

# A TCP port listens in a namespace.
listening() { inns "$1" ss -Hltn "sport = :$2" | grep -q LISTEN; }
rsyslog_ready() { listening siem 6514 && listening siem 514; }
otlp_ready() { listening siem 4318; }

# The provider answers discovery, seen from the first broker's host (name, route, certificate).
idp_ready() {
    inns broker curl -sf --noproxy '*' -m 2 --cacert "$STATE/idp/ca.pem" \
        https://idp.example/.well-known/openid-configuration
}

# broker_config I: the config of broker I. Brokers share the store (one SQLite file here;
# PostgreSQL for a real cluster), the CA and so the devices and policy; each has its own
# WireGuard key and registers itself, so devices and the connector learn every broker.
broker_config() {
    local i=$1 addr name conf key sock
    addr=$(broker_addr "$i")
    if [ "$i" = 1 ]; then name=broker; else name="broker$i"; fi
    conf="$STATE/$name.toml"; key="$name.key"; sock="$name.sock"
    cat >"$conf" <<EOF
private_key_file = "$key"
listen_wireguard = "0.0.0.0:51820"
listen_connectors = "0.0.0.0:4433"
policy = "policy.toml"
decision_log = "decisions-$name.jsonl"
control_socket = "$sock"

[tls]
ca = "pki/ca.pem"
cert = "pki/broker.pem"
key = "pki/broker.key"

[control]
name = "region-$i"
listen = "$addr:8443"
url = "https://$addr:8443"
database = "${SK_DATABASE:-sqlite://broker.db}"
ca_key = "pki/ca.key"
wireguard_endpoint = "$(broker_wg_endpoint "$i")"
connector_endpoint = "$(broker_link_endpoint "$i")"
posture_token_lifetime = "${SK_TOKEN_LIFETIME:-5m}"
connector_cert_lifetime = "${SK_CERT_LIFETIME:-30d}"
admin_token_file = "admin.token"
audit_log = "audit.jsonl"

# Internet egress for full-tunnel devices (source NAT through eth0).
[egress]
interface = "sekisho-egress"
uplink = "eth0"

# Prometheus metrics, liveness and readiness: on loopback, inside the broker's host only.
[metrics]
listen = "127.0.0.1:9464"
EOF
    if [ "${SK_SIEM:-0}" = 1 ]; then siem_sinks broker >>"$conf"; fi
    # Extra broker settings (TOML tables) for tests and experiments, like a [risk_engine].
    if [ -n "${SK_BROKER_EXTRA:-}" ]; then printf '\n%s\n' "$SK_BROKER_EXTRA" >>"$conf"; fi
    if [ "${SK_SSO:-0}" = 1 ]; then
        cat >>"$conf" <<EOF

# Sign-in through the company's OpenID provider: devices with sekisho-client login,
# admins with sekisho-broker admin login.
[control.oidc]
issuer = "https://idp.example"
client_id = "sekisho"
client_secret_file = "$STATE/idp/client_secret"
ca_file = "$STATE/idp/ca.pem"
# The quickstart's laptops are the company's: devices they enroll by signing in are managed
# (the default, personal, keeps them below level 3).
device_class = "managed"
EOF
    fi
    # The first broker's decision log keeps its historical name.
    if [ "$i" = 1 ]; then sed -i 's|decisions-broker.jsonl|decisions.jsonl|' "$conf"; fi
}

# The admin CLI, on the broker host (the API listens on the broker's address).
admin() { inns broker "$BIN/sekisho-broker" admin --config "$STATE/broker.toml" "$@"; }

# Enrollment as an admin and the devices' owners would do it: users, one-time tokens, and
# `enroll` on each machine, which makes its own key. No key is written by hand.
enroll_all() {
    admin init >/dev/null
    if [ "${SK_SSO:-0}" = 1 ]; then
        # People sign in; only the connectors enroll with tokens.
        enroll_connectors
        return
    fi
    admin user add alice --group engineering >/dev/null
    admin user add bob --group finance >/dev/null
    # Now that its users exist, apply the policy with its tests.
    admin policy apply "$STATE/policy.toml" >/dev/null
    local who t
    for who in alice:laptop bob:laptop2; do
        t=$(admin token create --user "${who%%:*}" --ttl 10m)
        echo "$t" >"$STATE/tokens/${who%%:*}.token"
        inns "${who##*:}" "$BIN/sekisho-client" enroll --server https://10.99.2.2:8443 \
            --token "$t" --name "${who%%:*}-laptop" --dir "$STATE/${who%%:*}" \
            --check-interval "${SK_CHECK_INTERVAL:-2s}" >/dev/null
        # Two clients on one machine: each its own control socket.
        client_settings "${who%%:*}"
    done
    enroll_connectors
}

# Two clients on one machine: each its own control socket; the quickstart's refresh period;
# with SK_SIEM=1, the laptop's records to the SIEM.
client_settings() {
    sed -i -e "s|^control_socket = .*|control_socket = \"$STATE/$1/client.sock\"|" \
        -e "s|^config_refresh = .*|config_refresh = \"${SK_CONFIG_REFRESH:-5s}\"|" \
        "$STATE/$1/client.toml"
    if [ "${SK_SIEM:-0}" = 1 ] && ! grep -q '^\[\[log_sinks\]\]' "$STATE/$1/client.toml"; then
        siem_sinks client >>"$STATE/$1/client.toml"
    fi
}

# The [[log_sinks]] of a broker, client or connector config with SK_SIEM=1: syslog over TLS
# and OTLP/HTTP to the SIEM host; the broker also has a sink that trusts the wrong CA (it must
# never connect) and a syslog sink with a small queue (SK_SIEM_QUEUE) for the outage test.
siem_sinks() {
    local records
    case $1 in
        broker) records='["flows", "dns", "audit", "posture", "admin", "risk"]' ;;
        client) records='["flows", "dns"]' ;;
        connector) records='["events"]' ;;
    esac
    cat <<EOF

[[log_sinks]]
name = "siem-tls"
kind = "syslog"
url = "tls://siem.example:6514"
ca = "$STATE/siem/ca.pem"
records = $records
queue = ${SK_SIEM_QUEUE:-10000}

[[log_sinks]]
name = "siem-otlp"
kind = "otlp"
url = "http://siem.example:4318/v1/logs"
records = $records
EOF
    if [ "$1" = broker ]; then
        cat <<EOF

[[log_sinks]]
name = "wrong-ca"
kind = "syslog"
url = "tls://siem.example:6514"
ca = "$STATE/siem/wrong-ca.pem"
records = ["admin"]
queue = 100
EOF
    fi
}

enroll_connectors() {
    local h dir
    for h in $SITES; do
        dir=$(connector_dir "$h")
        t=$(admin token create --site dc1 --ttl 10m)
        echo "$t" >"$STATE/tokens/dc1-$h.token"
        # The connector's own allowlist: whatever the brokers ask, it reaches only these.
        local allow=() a
        for a in ${SK_CONNECTOR_ALLOW:-10.20.0.0/24 corp.example}; do allow+=(--allow "$a"); done
        inns "$h" "$BIN/sekisho-connector" enroll --server https://10.99.2.2:8443 --token "$t" \
            --dir "$STATE/$dir" --dns-server 10.20.0.53 "${allow[@]}" >/dev/null
        # The connector accepts no connections from the network: its metrics endpoint listens
        # on loopback only (scrape it from the connector's host).
        printf '\n[metrics]\nlisten = "127.0.0.1:9465"\n' >>"$STATE/$dir/connector.toml"
        if [ "${SK_SIEM:-0}" = 1 ]; then siem_sinks connector >>"$STATE/$dir/connector.toml"; fi
    done
    cp "$STATE/tokens/dc1-site.token" "$STATE/tokens/dc1.token"
}

# The state folder of the connector on host site (connector) or site2 (connector2).
connector_dir() { if [ "$1" = site ]; then echo connector; else echo connector2; fi; }

daemon_ns() {
    case $1 in
        broker) echo broker ;;
        broker2) echo broker2 ;;
        relay1 | relay2 | link-relay) echo inet ;;
        nas) echo nas ;;
        web) echo web ;;
        connector) echo site ;;
        connector2) echo site2 ;;
        client-alice) echo laptop ;;
        client-bob) echo laptop2 ;;
        app) echo app ;;
        edr) echo laptop ;;
        site-dns) echo app ;;
        inet-dns) echo inet ;;
        idp) echo idp ;;
        rsyslog | otlp) echo siem ;;
        *) die "unknown daemon $1" ;;
    esac
}

daemon_cmd() {
    case $1 in
        broker) echo "$BIN/sekisho-broker run --config $STATE/broker.toml" ;;
        broker2) echo "$BIN/sekisho-broker run --config $STATE/broker2.toml" ;;
        relay1 | relay2)
            local i=${1#relay}
            echo "python3 $ROOT/tests/tools/udp_delay.py --listen 10.99.0.$((50 + i)):51820 \
--to $(broker_addr "$i"):51820 --delay-ms $(broker_delay "$i")" ;;
        link-relay)
            local r
            read -r -a r <<<"$SK_LINK_RELAY"
            echo "python3 $ROOT/tests/tools/udp_delay.py --listen 10.99.0.61:4433 \
--to 10.99.2.2:4433 --delay-ms ${r[0]:-0} --loss ${r[1]:-0} --loss-file $STATE/link-loss --verbose" ;;
        nas) echo "python3 $HERE/demo/app-services.py $STATE/www-nas" ;;
        web) echo "python3 $HERE/demo/app-services.py $STATE/www-web" ;;
        connector) echo "$BIN/sekisho-connector run --config $STATE/connector/connector.toml" ;;
        connector2) echo "$BIN/sekisho-connector run --config $STATE/connector2/connector.toml" ;;
        client-alice) echo "$BIN/sekisho-client run --config $STATE/alice/client.toml" ;;
        client-bob) echo "$BIN/sekisho-client run --config $STATE/bob/client.toml" ;;
        app) echo "python3 $HERE/demo/app-services.py $STATE/www" ;;
        edr) echo "$STATE/edr/$EDR infinity" ;;
        site-dns) echo "dnsmasq --keep-in-foreground --user=root --no-resolv --no-hosts \
--bind-interfaces --listen-address=10.20.0.53 --log-queries --log-facility=- \
--address=/wiki.corp.example/10.20.0.10 --address=/dev.corp.example/10.20.0.10 \
--address=/payroll.corp.example/10.20.0.10" ;;
        inet-dns) echo "dnsmasq --keep-in-foreground --user=root --no-resolv --no-hosts \
--bind-interfaces --listen-address=10.99.0.53 --log-queries --log-facility=- \
--addn-hosts=$STATE/inet-hosts --address=/#/" ;;
        idp) echo "node $ROOT/tests/tools/oidc/provider.mjs --issuer https://idp.example \
--listen 10.99.5.2:443 --tls-cert $STATE/idp/cert.pem --tls-key $STATE/idp/key.pem \
--state-dir $STATE/idp" ;;
        rsyslog) echo "rsyslogd -n -f $STATE/siem/rsyslog.conf -i $STATE/siem/rsyslogd.pid" ;;
        otlp) echo "python3 $ROOT/tests/tools/otlp_receiver.py --listen 0.0.0.0:4318 \
--out $STATE/siem/otlp.jsonl --status-file $STATE/siem/otlp-status" ;;
    esac
}

start() {
    local name=$1 n
    n=$(daemon_ns "$name")
    # rsyslogd will not start over its own pid file, which a kill -9 leaves behind.
    if [ "$name" = rsyslog ]; then rm -f "$STATE/siem/rsyslogd.pid"; fi
    # shellcheck disable=SC2046
    setsid ip netns exec "$(ns "$n")" $(daemon_cmd "$name") >>"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

# Whether a process still runs: an exited one waiting to be reaped by init (state Z) does not.
alive() { [ -r "/proc/$1/stat" ] && ! sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | grep -q '^[ZXx]'; }

stop() {
    local name=$1 sig=${2:-TERM} pid
    [ -f "$STATE/$name.pid" ] || return 0
    pid=$(cat "$STATE/$name.pid")
    if alive "$pid"; then
        kill -"$sig" "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
}

broker_stats() { "$BIN/sekisho-broker" stats --socket "$STATE/broker.sock" 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll until the command succeeds.
wait_for() {
    local what=$1 secs=$2; shift 2
    for _ in $(seq $((secs * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out waiting for $what (logs in $STATE)"
}

# Every connector of dc1 linked to the first broker.
linked() {
    broker_stats | NC=$NCONNECTORS python3 -c 'import json,os,sys; c=json.load(sys.stdin)["connectors"]; sys.exit(0 if sum(l["site"] == "dc1" for l in c) >= int(os.environ["NC"]) else 1)'
}
admin_ready() { inns broker python3 -c 'import socket; socket.create_connection(("10.99.2.2", 8443), 1)'; }
postured() {
    broker_stats | python3 -c 'import json,sys; p=json.load(sys.stdin)["peers"]; sys.exit(0 if len(p) == 2 and all(x["posture_expires"] for x in p) else 1)'
}
handshaken() {
    broker_stats | python3 -c 'import json,sys; p=json.load(sys.stdin)["peers"]; sys.exit(0 if all(x["seconds_since_handshake"] is not None for x in p) else 1)'
}

up() {
    need_root
    install_packages
    idp_packages
    siem_packages
    binaries
    if ip netns list | grep -q "^$(ns broker)\b"; then
        die "namespace $(ns broker) exists: run '$0 down' first"
    fi
    rm -rf "$STATE"
    configure
    topology
    start app
    start edr
    start site-dns
    start inet-dns
    start nas
    start web
    if [ "${SK_IDP:-0}" = 1 ]; then
        start idp
        wait_for "the OpenID provider (https://idp.example)" 30 idp_ready
    fi
    if [ "${SK_SIEM:-0}" = 1 ]; then
        start rsyslog
        start otlp
        wait_for "rsyslogd (siem.example:6514 and :514)" 20 rsyslog_ready
        wait_for "the OTLP receiver (siem.example:4318)" 20 otlp_ready
    fi
    start broker
    wait_for "the broker" 20 test -S "$STATE/broker.sock"
    wait_for "the control API" 20 admin_ready
    if [ "$NBROKERS" -ge 2 ]; then
        start broker2
        wait_for "the second broker" 20 test -S "$STATE/broker2.sock"
        # Both brokers read the registry every 2 s: let the first one see the second.
        sleep 3
    fi
    for i in 1 2; do
        if [ "$(broker_delay $i)" != 0 ]; then start "relay$i"; fi
    done
    if [ -n "${SK_LINK_RELAY:-}" ]; then start link-relay; fi
    enroll_all
    start connector
    if [ "$NCONNECTORS" -ge 2 ]; then start connector2; fi
    if [ "${SK_SSO:-0}" = 1 ]; then
        wait_for "the connector link" 30 linked
        cat <<EOF
Sekisho is up, with sign-in through https://idp.example (users and passwords in
$STATE/idp/users.json). Sign alice's laptop in (the browser here is a script that types
her password; a real one opens from \$BROWSER or xdg-open):

  ip netns exec $(ns laptop) env BROWSER="python3 $ROOT/tests/tools/oidc_browser.py --ca $STATE/idp/ca.pem --user alice --password \$(python3 -c 'import json;print([u for u in json.load(open("$STATE/idp/users.json")) if u["username"]=="alice"][0]["password"])')" \
    $BIN/sekisho-client login --server https://10.99.2.2:8443 --ca $STATE/pki/ca.pem --name alice-laptop --dir $STATE/alice
  $0 client-settings alice && $0 start client-alice
  ip netns exec $(ns laptop) curl http://10.20.0.10/

Without a browser, add --device-code: it prints a code to enter at https://idp.example/device.
EOF
        return
    fi
    start client-alice
    start client-bob
    wait_for "the connector link" 30 linked
    wait_for "the clients' handshakes" 30 handshaken
    wait_for "the devices' posture tokens" 30 postured
    wait_for "alice's DNS stub" 30 inns laptop dig +time=1 +tries=1 @100.118.0.2 www.public.example
    cat <<EOF
Sekisho is up. Things to try:

  # alice (engineering) reaches the app; a denied port is refused at once
  ip netns exec $(ns laptop) curl http://10.20.0.10/
  ip netns exec $(ns laptop) ping -c 2 10.20.0.10
  ip netns exec $(ns laptop) curl http://10.20.0.10:5432/
  # bob (finance) gets a different answer from the same app
  ip netns exec $(ns laptop2) curl http://10.20.0.10/
  # names: an application by name (synthetic address from 100.119.0.0/16), a wildcard one,
  # one alice may not use (NXDOMAIN), a blocked domain, a public name (through the upstream)
  ip netns exec $(ns laptop) curl http://wiki.corp.example/
  ip netns exec $(ns laptop) curl http://build.dev.corp.example/
  ip netns exec $(ns laptop) dig payroll.corp.example
  ip netns exec $(ns laptop) dig blocked.example
  ip netns exec $(ns laptop) dig www.public.example
  ip netns exec $(ns laptop2) dig blocked.example      # bob's group gets 0.0.0.0
  cat $STATE/client-alice.log | grep '"dns"'        # blocked queries: list and entry
  # the app is private: the internet namespace cannot reach it
  ip netns exec $(ns inet) curl -m 3 http://10.20.0.10/
  # device posture: stop the stand-in EDR agent and alice's UDP echo (sensitivity 3) is cut,
  # while the web app (sensitivity 1) keeps working; start it again and echo comes back
  $0 stop edr; $0 start edr
  # the admin CLI (users, tokens, devices, connectors, policy, explain)
  $0 admin device list
  $0 admin explain --user alice --to 10.20.0.10:7 --protocol udp --failing-check edr-running
  # every decision, with the rule that made it; counters, peers and links
  tail -f $STATE/decisions.jsonl
  $BIN/sekisho-broker stats --socket $STATE/broker.sock
  # remove everything
  $0 down
EOF
    if [ "${SK_IDP:-0}" = 1 ]; then
        cat <<EOF

The OpenID provider https://idp.example (host $(ns idp)) signs in alice, bob and carol with the
passwords in $STATE/idp/users.json; the client "sekisho" has its secret in
$STATE/idp/client_secret; its CA is $STATE/idp/ca.pem; its log $STATE/idp.log.
  ip netns exec $(ns broker) curl --cacert $STATE/idp/ca.pem https://idp.example/.well-known/openid-configuration
EOF
    fi
}

down() {
    need_root
    for d in client-alice client-bob connector connector2 broker broker2 relay1 relay2 link-relay \
        nas web app edr site-dns inet-dns idp rsyslog otlp; do stop "$d"; done
    for h in $ALL_HOSTS; do
        local n
        n=$(ns "$h")
        if ip netns list | grep -q "^$n\b"; then
            # Anything else still running inside our namespaces, by its own pid.
            for pid in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$n"
        fi
        rm -rf "/etc/netns/$n"
    done
    [ "${SK_KEEP_STATE:-0}" = 1 ] || rm -rf "$STATE"
}

status() {
    SK_BIN=${SK_BIN:-$ROOT/target/release}
    binaries
    for d in broker broker2 relay1 relay2 link-relay connector connector2 client-alice client-bob \
        app nas web edr site-dns inet-dns idp rsyslog otlp; do
        if [ -f "$STATE/$d.pid" ] && kill -0 "$(cat "$STATE/$d.pid")" 2>/dev/null; then
            say "$d: running (pid $(cat "$STATE/$d.pid"))"
        else
            say "$d: stopped"
        fi
    done
    broker_stats || say "broker: no answer on $STATE/broker.sock"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    start) need_root; SK_BIN=${SK_BIN:-$ROOT/target/release}; binaries; start "${2:?daemon name}" ;;
    stop) need_root; stop "${2:?daemon name}" TERM ;;
    kill) need_root; stop "${2:?daemon name}" KILL ;;
    admin) need_root; SK_BIN=${SK_BIN:-$ROOT/target/release}; binaries; shift; admin "$@" ;;
    client-settings) client_settings "${2:?user (alice or bob)}" ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
