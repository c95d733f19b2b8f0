//! With the `cuda` feature: compiles cuda/inferd_kernels.cu with nvcc into
//! one fatbin (SASS for sm_80, sm_86, sm_89 and sm_90, PTX for newer GPUs),
//! warnings as errors. nvcc is found through $NVCC, $CUDA_HOME/bin, the
//! toolkit `make cuda-toolkit` installs in .cuda/, or PATH.
//! INFERD_CUDA_ARCHS (e.g. "90") narrows the SASS list for a quicker build.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 6] = [
    "inferd_kernels.cu",
    "common.cuh",
    "cache_write.cuh",
    "attention_simple.cuh",
    "attention_tiled.cuh",
    "sample.cuh",
];

fn nvcc(manifest: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        return Path::new(&home).join("bin/nvcc");
    }
    let pip = manifest.join("../.cuda/pip/nvidia/cu13/bin/nvcc");
    if pip.exists() { pip } else { "nvcc".into() }
}

fn main() {
    for f in SOURCES {
        println!("cargo:rerun-if-changed=cuda/{f}");
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=INFERD_CUDA_ARCHS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("inferd_kernels.fatbin");
    let archs = std::env::var("INFERD_CUDA_ARCHS").unwrap_or_else(|_| "80,86,89,90".into());
    let mut cmd = Command::new(nvcc(&manifest));
    cmd.args(["--fatbin", "-O3", "-std=c++17", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]);
    let mut newest = 0;
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
        newest = newest.max(a.parse::<u32>().expect("INFERD_CUDA_ARCHS lists numbers such as 86,90"));
    }
    // PTX of the newest architecture, for GPUs newer than the list.
    cmd.arg("-gencode").arg(format!("arch=compute_{newest},code=compute_{newest}"));
    cmd.arg("-o").arg(&out).arg(manifest.join("cuda/inferd_kernels.cu"));
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run nvcc ({e}): run `make cuda-toolkit`, or set NVCC or CUDA_HOME")
    });
    assert!(status.success(), "nvcc failed to compile kernels/cuda/inferd_kernels.cu");
}
