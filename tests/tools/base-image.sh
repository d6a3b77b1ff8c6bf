#!/usr/bin/env bash
# Makes the container base image localhost/debian:bookworm-slim on this machine, once: no
# registry serves images here, so the images' runtime stage (deploy/container/Dockerfile.*,
# build argument BASE) starts from a Debian bookworm root file system made with debootstrap
# from the same Debian mirror apt uses, imported into podman's image store.
#
#   tests/tools/base-image.sh            # nothing to do when the image exists
#   SEKISHO_BASE_IMAGE=NAME tests/tools/base-image.sh
#   SEKISHO_DEBIAN_MIRROR=http://deb.debian.org/debian tests/tools/base-image.sh
#
# Needs root, podman and debootstrap (Debian packages; .ci/run installs them). The image's apt
# uses the same mirror (and security mirror, if the host has one), so Dockerfiles can
# `apt-get install` in it. It is kept between runs: remove it (`podman rmi IMAGE`) to make it
# again, e.g. for newer packages.
set -euo pipefail

IMAGE=${SEKISHO_BASE_IMAGE:-localhost/debian:bookworm-slim}
SUITE=bookworm

say() { printf 'base-image: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
if podman image exists "$IMAGE"; then
    say "$IMAGE exists: nothing to do"
    exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

# The first URI apt uses for the suite named $1 (one-line sources.list or deb822 .sources).
mirror_for() {
    local suite=$1 f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        case $f in
            *.sources)
                # deb822: paragraphs with URIs: and Suites: lines.
                awk -v want="$suite" '
                    /^[[:space:]]*$/ { if (uri != "" && hit) { print uri; exit } uri = ""; hit = 0; next }
                    /^URIs:/ { uri = $2 }
                    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
                    END { if (uri != "" && hit) print uri }
                ' "$f"
                ;;
            *)
                awk -v want="$suite" '
                    $1 == "deb" {
                        i = 2
                        if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                        if ($(i + 1) == want) { print $i; exit }
                    }
                ' "$f"
                ;;
        esac
    done | head -n 1
}

MIRROR=${SEKISHO_DEBIAN_MIRROR:-$(mirror_for "$SUITE")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=$(mirror_for "$SUITE-security")

DIR=$(mktemp -d /var/tmp/sekisho-base.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
start=$(date +%s)
say "debootstrap --variant=minbase $SUITE from $MIRROR (takes a minute or two)"
debootstrap --variant=minbase "$SUITE" "$DIR/root" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 || {
    tail -n 30 "$DIR/debootstrap.log" >&2
    die "debootstrap failed"
}

# apt inside the image: the same mirror, with updates and security if the host has them.
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    if [ -n "$SECURITY" ]; then echo "deb $SECURITY $SUITE-security main"; fi
} >"$DIR/root/etc/apt/sources.list"
# Like the official slim image: no apt caches, documentation or man pages kept by later installs.
cat >"$DIR/root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
CONF
cat >"$DIR/root/etc/dpkg/dpkg.cfg.d/docker-nodoc" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CONF
# Slim like the official image: documentation (but the copyright files), manuals and
# translations go.
find "$DIR/root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$DIR/root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$DIR/root/usr/share/man/"* "$DIR/root/usr/share/info/"*
find "$DIR/root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
# What the container runtime provides, and what debootstrap leaves behind.
rm -rf "$DIR/root/var/cache/apt/archives/"*.deb "$DIR/root/var/lib/apt/lists/"* \
    "$DIR/root/var/log/"*.log "$DIR/root/etc/hostname" "$DIR/root/etc/resolv.conf" \
    "$DIR/root/debootstrap"
: >"$DIR/root/etc/resolv.conf"

tar --numeric-owner --xattrs -C "$DIR/root" -c . |
    podman import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$IMAGE" >/dev/null
say "made $IMAGE in $(($(date +%s) - start)) s ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
