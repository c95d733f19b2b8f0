//! Which instruction set the kernels run on.

use std::str::FromStr;
use std::sync::OnceLock;

/// A kernel path. Every path computes the same numbers: the integer dot
/// products are exact and the float steps are done in the same order with
/// the same fused multiply-adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit registers and `vpdpbusd` (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512Vnni,
    /// 256-bit registers, `vpmaddubsw`, FMA and F16C (Haswell, Zen 1 and later).
    Avx2,
    /// Plain Rust for any other CPU.
    Scalar,
}

impl Isa {
    /// The best path this CPU runs, unless `INFERD_CPU_ISA` names a lesser
    /// one (`scalar`, `avx2`), which is honoured only when the CPU runs it.
    pub fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("INFERD_CPU_ISA").ok().and_then(|v| v.parse::<Isa>().ok()) {
                Some(want) if want.supported() && want.rank() <= best.rank() => want,
                _ => best,
            }
        })
    }

    fn best() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2].into_iter().find(|i| i.supported()).unwrap_or(Isa::Scalar)
    }

    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 => 1,
            Isa::Avx512Vnni => 2,
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
                Isa::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// Every path this CPU runs, best first.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar].into_iter().filter(|i| i.supported()).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

impl FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Isa, String> {
        match s.to_ascii_lowercase().as_str() {
            "avx512vnni" | "avx512" => Ok(Isa::Avx512Vnni),
            "avx2" => Ok(Isa::Avx2),
            "scalar" => Ok(Isa::Scalar),
            other => Err(format!("unknown CPU kernel path {other:?} (expected avx512vnni, avx2 or scalar)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_the_detected_path_runs_here() {
        for isa in [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar] {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
        }
        assert!("neon".parse::<Isa>().is_err());
        assert!(Isa::detected().supported());
        assert_eq!(Isa::all_supported().last(), Some(&Isa::Scalar), "scalar runs everywhere");
    }
}
