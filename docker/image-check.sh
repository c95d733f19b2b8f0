#!/usr/bin/env bash
# Builds docker/Dockerfile.cpu with buildah (no daemon, no registry) and runs
# the image: our machines reach Debian's mirror but no container registry, so
# the base is made here with debootstrap and the binary is one built for
# bookworm on this machine (BINARY=prebuilt). Then it checks what a container
# platform relies on: the image's user, stop signal and health check; the
# entrypoint finding the mounted model; the server ready and answering as
# uid 10001; its ledger written to the data volume; SIGTERM draining to exit 0.
#
# Usage: docker/image-check.sh PATH/TO/inferd   (as root; make image-check)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:?usage: image-check.sh PATH/TO/inferd}
work=${IMAGE_CHECK_DIR:-$root/target/image-check}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
port=${IMAGE_CHECK_PORT:-18080}
model_file=${MODEL_FILE:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
image=localhost/inferd:cpu-check
base=localhost/bookworm-base
B=(buildah --storage-driver vfs --root "$work/storage" --runroot "$work/run")

say() { printf 'image-check: %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }

mkdir -p "$work"
start=$(date +%s)

# 1. A Debian bookworm base image, made once and kept under $work.
if ! "${B[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    say "debootstrap bookworm from $mirror"
    rm -rf "$work/rootfs" "$work/base"
    mkdir -p "$work/base"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
    tar -C "$work/rootfs" -cf "$work/base/rootfs.tar" .
    rm -rf "$work/rootfs"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$work/base/Dockerfile"
    "${B[@]}" bud --quiet --isolation chroot -t "$base" "$work/base" >/dev/null
    rm -f "$work/base/rootfs.tar"
fi
say "base image ready after $(($(date +%s) - start)) s"

# 2. The image, from a context holding only what the Dockerfile copies.
ctx="$work/context"
rm -rf "$ctx"
mkdir -p "$ctx/target/release" "$ctx/models" "$ctx/docker"
strip -o "$ctx/target/release/inferd" "$bin"
cp "$root/models/catalog.toml" "$root/models/fetch.py" "$ctx/models/"
cp "$root/docker/entrypoint.sh" "$root/docker/Dockerfile.cpu" "$ctx/docker/"
"${B[@]}" bud --quiet --isolation chroot --format docker -f "$ctx/docker/Dockerfile.cpu" \
    --build-arg BASE="$base" --build-arg RUST_IMAGE="$base" --build-arg BINARY=prebuilt \
    -t "$image" "$ctx" >"$work/bud.log" 2>&1 || { tail -30 "$work/bud.log"; fail "buildah bud"; }
say "image built after $(($(date +%s) - start)) s"

# 3. The image's configuration.
config=$("${B[@]}" inspect --type image "$image")
python3 - "$config" <<'EOF' || fail "image configuration"
import json, sys
c = json.loads(sys.argv[1])["Docker"]["config"]
assert c["User"] == "10001", c["User"]
assert c["StopSignal"] == "SIGTERM", c.get("StopSignal")
test = " ".join(c["Healthcheck"]["Test"])
assert "http://127.0.0.1:8080/health" in test, test
env = dict(e.split("=", 1) for e in c["Env"])
assert env["INFERD_HOST"] == "0.0.0.0" and env["INFERD_LEDGER"] == "/var/lib/inferd/usage.db", env
assert set(c["Volumes"]) == {"/models", "/var/lib/inferd"}, c["Volumes"]
assert c["Entrypoint"] == ["/usr/local/bin/inferd-entrypoint"] and c["Cmd"] == ["serve"], c
print("image-check: config ok: user 10001, SIGTERM, health check on /health, volumes /models and /var/lib/inferd")
EOF

# 4. Run it: the model and the data volume mounted, as the image's user.
rm -rf "$work/models" "$work/data"
mkdir -p "$work/models" "$work/data"
cp "$model_file" "$work/models/"
chown -R 10001:10001 "$work/models" "$work/data"
ctr=$("${B[@]}" from --quiet "$image")
# buildah run gives an image's VOLUMEs scratch directories of its own, and
# which of those and a -v at the same path wins varies from run to run; so
# the working container drops the declarations (checked above) and the two
# directories are mounted at their paths as a platform's volumes would be.
"${B[@]}" config --volume /models- --volume /var/lib/inferd- "$ctr"
# The container and the image go afterwards (vfs stores whole copies); the
# base stays for the next run.
cleanup() {
    [ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null || true
    "${B[@]}" rm --all >/dev/null 2>&1 || true
    "${B[@]}" rmi "$image" >/dev/null 2>&1 || true
    "${B[@]}" rmi --prune >/dev/null 2>&1 || true
}
trap cleanup EXIT
"${B[@]}" run --isolation chroot \
    -v "$work/models:/models" -v "$work/data:/var/lib/inferd" \
    -e INFERD_HOST=127.0.0.1 -e INFERD_PORT="$port" -e INFERD_KV_CACHE_MEMORY=256MiB \
    -e INFERD_DRAIN_DELAY=1 -e INFERD_DRAIN_TIMEOUT=10 \
    "$ctr" -- /usr/local/bin/inferd-entrypoint serve >"$work/run.log" 2>&1 &
runner=$!
url="http://127.0.0.1:$port"
for _ in $(seq 1 240); do
    curl -fsS -o /dev/null "$url/ready" 2>/dev/null && break
    kill -0 "$runner" 2>/dev/null || { tail -20 "$work/run.log"; fail "the container exited before ready"; }
    sleep 0.5
done
curl -fsS -o /dev/null "$url/ready" || { tail -20 "$work/run.log"; fail "not ready within 120 s"; }
say "ready after $(($(date +%s) - start)) s"
pid=$(pgrep -f -n '^/usr/local/bin/inferd serve') || fail "no inferd process"
[ "$(stat -c %u "/proc/$pid")" = 10001 ] || fail "inferd runs as uid $(stat -c %u "/proc/$pid"), not 10001"

answer=$(curl -fsS "$url/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}')
python3 - "$answer" <<'EOF' || fail "completion"
import json, sys
a = json.loads(sys.argv[1])
assert a["usage"]["completion_tokens"] > 0 and a["choices"][0]["text"].strip(), a
print(f"image-check: completion ok: {a['choices'][0]['text']!r}")
EOF
curl -fsS "$url/" | grep -q '<title>inferd console</title>' || fail "the console at /"

# 5. SIGTERM: drains and exits 0; the ledger is on the data volume.
kill -TERM "$pid"
code=0
wait "$runner" || code=$?
pid=
[ "$code" = 0 ] || { tail -20 "$work/run.log"; fail "exit status $code after SIGTERM"; }
[ "$(stat -c %u "$work/data/usage.db")" = 10001 ] || fail "no ledger written by uid 10001"
python3 - "$work/data/usage.db" <<'EOF' || fail "the completion's usage record"
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute("SELECT completion_tokens FROM usage").fetchall()
assert len(rows) == 1 and rows[0][0] > 0, rows
print(f"image-check: drained and exited 0; the data volume's ledger holds the completion's record ({rows[0][0]} tokens)")
EOF
say "passed in $(($(date +%s) - start)) s"
