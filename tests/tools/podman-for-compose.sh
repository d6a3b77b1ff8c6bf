#!/usr/bin/env bash
# podman, as Debian bookworm's podman-compose 1.0.3 should call it for services with a
# `network_mode`: given to it with `podman-compose --podman-path tests/tools/podman-for-compose.sh`
# by tests/tests/containers.rs, which starts deploy/compose/site-connector.yaml with an override
# file putting each connector into a test namespace (`network_mode: ns:/run/netns/NAME`).
#
# podman-compose 1.0.3 (with podman 4.3) gets three things wrong, which this wrapper corrects and
# logs; everything else reaches podman unchanged:
#
#  1. For every service it checks for (and, if missing, creates) the project's default network
#     `<project>_default` and adds `--net <project>_default --network-alias <service>` to
#     `podman run`, even after `--network ns:…` (or host, none) from `network_mode`. podman
#     refuses the pair ("cannot set multiple networks without bridge network mode"), so no
#     service with a network_mode can start. Here: `podman network exists` answers yes without
#     asking podman (no network is made), and those two options are dropped when a
#     `--network` other than a podman network came first. A podman network (a CNI bridge: it
#     turns on IPv4 forwarding and adds firewall tables in the machine's own namespace) is never
#     made or used: `podman network create` and a `run` that would join one are refused.
#  2. `sysctls` written as a map (`net.ipv4.ip_forward: "1"`, as docker compose documents it)
#     reaches podman as `--sysctl net.ipv4.ip_forward`, without its value, which podman refuses.
#     The compose file writes them as a list, which arrives whole; for a map-form file the value
#     is taken from SEKISHO_COMPOSE_SYSCTLS ("KEY=VALUE ..."), and a sysctl missing there is
#     refused.
#  3. (Not a correction: these machines' podman needs `--runtime runc`: crun refuses their
#     hybrid cgroups.)
#
# Port publishing (-p, -P) is refused too: nothing in these tests may change the machine's own
# network. SEKISHO_PODMAN_LOG, when set, gets one line per call: what podman-compose asked and
# what ran.
set -euo pipefail

log() {
    if [ -n "${SEKISHO_PODMAN_LOG:-}" ]; then printf '%s\n' "$*" >>"$SEKISHO_PODMAN_LOG"; fi
}
refuse() {
    log "refused: $*"
    printf 'podman-for-compose: refused: %s\n' "$*" >&2
    exit 1
}

log "asked: podman $*"

case ${1:-} in
    network)
        case ${2:-} in
            exists)
                log "answered: network ${3:-} exists (no network is made or used)"
                exit 0
                ;;
            ls | inspect) ;;
            *) refuse "podman network ${2:-} (a podman network would change the machine's own namespace)" ;;
        esac
        ;;
    run | create)
        out=("$1")
        shift
        joined=""
        while [ $# -gt 0 ]; do
            case $1 in
                --network)
                    case ${2:-} in
                        ns:* | host | none | container:*) joined=$2 ;;
                        *) refuse "--network ${2:-} (a podman network)" ;;
                    esac
                    out+=("$1" "$2")
                    shift 2
                    ;;
                --net | --network-alias)
                    [ -n "$joined" ] || refuse "$1 ${2:-} without a network_mode (a podman network)"
                    log "dropped: $1 ${2:-} (the container joins $joined)"
                    shift 2
                    ;;
                --sysctl)
                    s=${2:-}
                    if [ "${s#*=}" = "$s" ]; then
                        v=""
                        for kv in ${SEKISHO_COMPOSE_SYSCTLS:-}; do
                            if [ "${kv%%=*}" = "$s" ]; then v=${kv#*=}; fi
                        done
                        [ -n "$v" ] || refuse "--sysctl $s without a value (not in SEKISHO_COMPOSE_SYSCTLS)"
                        log "completed: --sysctl $s=$v"
                        s="$s=$v"
                    fi
                    out+=(--sysctl "$s")
                    shift 2
                    ;;
                -p | --publish | -P | --publish-all | --publish=* | -p=*)
                    refuse "$1 (port publishing)"
                    ;;
                *)
                    out+=("$1")
                    shift
                    ;;
            esac
        done
        set -- "${out[@]}"
        ;;
esac

log "ran: podman --runtime runc $*"
exec podman --runtime runc "$@"
