#!/bin/bash
# Checks the systemd unit and each backend's drop-in with systemd-analyze
# verify; any warning fails. The unit names /usr/local/bin/inferd, which a
# build machine lacks, so a copy points ExecStart at an executable that exists.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stand_in="$(command -v true)"
for backend in cpu cuda neuron; do
    dir="$work/$backend"
    mkdir -p "$dir"
    sed "s|/usr/local/bin/inferd|$stand_in|" "$here/systemd/inferd.service" > "$dir/inferd.service"
    if [ "$backend" != cpu ]; then
        mkdir -p "$dir/inferd.service.d"
        cp "$here/systemd/inferd.service.d-$backend/$backend.conf" "$dir/inferd.service.d/"
    fi
    out="$(systemd-analyze verify "$dir/inferd.service" 2>&1)" || { echo "$out"; exit 1; }
    if [ -n "$out" ]; then
        echo "systemd-analyze verify ($backend):"
        echo "$out"
        exit 1
    fi
    echo "inferd.service ($backend): ok"
done
