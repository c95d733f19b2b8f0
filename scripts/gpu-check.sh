#!/bin/sh
# inferd's GPU check, one command on a GPU host (no network, no Rust
# toolchain needed): `make gpu-bundle` builds dist/gpu/ on a build machine;
# this prints the host's GPU, driver and library facts, then runs
# inferd-gpu-check (kernels and models against the CPU, then benchmarks),
# which ends with a line `N passed, N failed`. Extra arguments go to it
# (--quick skips the 8B shape). Limit: 7 minutes.
set -u
here=$(dirname "$(readlink -f "$0")")
bundle=${INFERD_GPU_BUNDLE:-$here/../dist/gpu}
echo "== host"
uname -srm
nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv 2>&1 | head -9
# The CUDA 13 libraries beside the driver's libcuda: cuBLAS, cuBLASLt,
# cuRAND and cudart from a Python environment's nvidia wheels (PyTorch's),
# or wherever the system keeps them.
libdirs=""
for py in python3 python; do
    command -v "$py" >/dev/null 2>&1 || continue
    libdirs=$("$py" - <<'PY' 2>/dev/null
import glob, os, sys
seen = []
for p in sys.path:
    for d in glob.glob(os.path.join(p, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(p, "nvidia", "*", "lib")):
        if glob.glob(os.path.join(d, "lib*.so.1[0-3]*")) and d not in seen:
            seen.append(d)
print(":".join(seen))
PY
)
    [ -n "$libdirs" ] && break
done
if [ -z "$libdirs" ]; then
    found=$(find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
    [ -n "$found" ] && libdirs=$(dirname "$found")
fi
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=${TMPDIR:-/tmp}/inferd-gpu-check
if ! { xz -dc "$bundle/inferd-gpu-check.xz" > "$bin" && chmod +x "$bin"; }; then
    echo "no bundle at $bundle: run make gpu-bundle"; echo "0 passed, 1 failed"; exit 1
fi
echo "== libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|not found'
missing=$(ldd "$bin" | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
    echo "cannot run the check: missing $missing(the NVIDIA driver provides libcuda.so.1; a CUDA 13 Python environment's nvidia wheels the rest)"
    echo "0 passed, 1 failed"
    exit 1
fi
echo "== inferd-gpu-check"
timeout 420 "$bin" "$@"
status=$?
[ $status -eq 124 ] && echo "the check ran past 7 minutes" && echo "0 passed, 1 failed"
exit $status
