#!/usr/bin/env python3
"""Link-time stubs of the CUDA libraries candle's `cuda` feature links
(libcuda, libcublas, libcublasLt, libcurand, libnvrtc), so a CUDA build links
on a machine with no driver and no full toolkit. One empty function per
symbol cudarc declares, with the real SONAMEs. For linking only: never put
them on a run-time library path or ship them.

usage: cuda-stubs.py CUDA_HOME   (writes CUDA_HOME/lib/stubs/*.so and the
libcudart.so link the linker looks for)
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

CUDARC = "cudarc-0.19.10"
LIBS = {  # cudarc module: (library file, SONAME)
    "driver": ("libcuda.so", "libcuda.so.1"),
    "cublas": ("libcublas.so", "libcublas.so.13"),
    "cublaslt": ("libcublasLt.so", "libcublasLt.so.13"),
    "curand": ("libcurand.so", "libcurand.so.10"),
    "nvrtc": ("libnvrtc.so", "libnvrtc.so.13"),
}
SKIP = {"culib", "is_culib_present"}


def cudarc_src():
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = glob.glob(os.path.join(home, "registry", "src", "*", CUDARC, "src"))
    if not found:
        sys.exit(f"{CUDARC} is not in the cargo registry: run `cargo fetch --locked` first")
    return found[0]


def main():
    cuda_home = sys.argv[1]
    stubs = os.path.join(cuda_home, "lib", "stubs")
    os.makedirs(stubs, exist_ok=True)
    src = cudarc_src()
    for module, (name, soname) in LIBS.items():
        text = open(os.path.join(src, module, "sys", "mod.rs")).read()
        symbols = sorted(set(re.findall(r"pub unsafe fn ([A-Za-z_0-9]+)", text)) - SKIP)
        with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as c:
            c.write("".join(f"void {s}(void) {{}}\n" for s in symbols))
        out = os.path.join(stubs, name)
        subprocess.run(["gcc", "-shared", "-fPIC", "-nostdlib", f"-Wl,-soname,{soname}", "-o", out, c.name], check=True)
        os.unlink(c.name)
        print(f"{out}: {len(symbols)} symbols ({soname})")
    cudart = os.path.join(cuda_home, "lib", "libcudart.so")
    if not os.path.exists(cudart):
        os.symlink("libcudart.so.13", cudart)


if __name__ == "__main__":
    main()
