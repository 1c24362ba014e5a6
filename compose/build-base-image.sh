#!/usr/bin/env bash
# Build a local Debian bookworm base image with Python 3.11, for machines that reach no registry.
#
#   compose/build-base-image.sh [TAG]      (default TAG: dpumesh-base:bookworm)
#
# Why: `python:3.11-slim` cannot be pulled here (shared/DESIGN.md §7), but Debian's package
# mirror can be reached. debootstrap builds a minimal root file system from the mirror apt
# already uses on this machine, and `docker import` turns it into an image. Its python3 is
# bookworm's 3.11, so the cp311 manylinux wheels of compose/.wheelhouse install into it.
# Does nothing when TAG already exists (delete the image to rebuild). Needs root.
set -euo pipefail

tag=${1:-dpumesh-base:bookworm}
suite=bookworm

say() { echo "build-base-image: $*" >&2; }

if docker image inspect "$tag" >/dev/null 2>&1; then
    say "$tag exists"
    exit 0
fi

# The Debian archive apt is configured with (deb822 or one-line format), else Debian's default.
mirror() {
    local url
    url=$(awk '/^URIs:/ { uri = $2 } /^Suites:/ && uri && $0 ~ / '"$suite"'( |$)/ { print uri; exit }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$url" ]; then
        url=$(awk '$1 == "deb" && $3 == "'"$suite"'" { print $2; exit }' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    fi
    echo "${url:-http://deb.debian.org/debian}"
}

rootfs=$(mktemp -d /var/tmp/dpumesh-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

url=$(mirror)
say "debootstrap $suite from $url"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
    "$suite" "$rootfs" "$url" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    exit 1
}
rm -f "$rootfs.log"
# Package caches and lists are not needed at run time; they only make the image bigger.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

say "importing as $tag"
tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$tag" >/dev/null
say "$tag built"
