//! The exponential the kernels share (softmax in attention, SiLU in the
//! fused SwiGLU), in plain arithmetic so that a loop of it vectorizes:
//! libm's `expf` is a call per value, which made SwiGLU alone about 6 % of
//! a prefill step on AVX2.
//!
//! `e^x = 2^n * e^r`, `n` the integer nearest `x / ln 2` and `|r| <= ln 2 /
//! 2`, `e^r` by its Taylor polynomial to degree 7: within 1.2 ulp of the
//! true value over the whole range (libm: 0.5), and SiLU through it within
//! 2.2 ulp (through libm: 2.1), as the tests measure. Only multiplies and
//! adds, never fused, so every instruction set gets the same bits.

use crate::Isa;

/// Inputs are clamped to `[EXP_MIN, EXP_MAX]`: below, `e^x` is under f32's
/// normal range; above, over its largest value.
pub const EXP_MIN: f32 = -87.0;
pub const EXP_MAX: f32 = 88.0;
/// `ln 2` in two parts, so `x - n ln 2` loses nothing for the `n` that occur.
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;
/// The Taylor coefficients of `e^r`, highest degree first.
pub const EXP_POLY: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `e^x`, to about 1 ulp (see the module's description).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer and leaves it, two's
    // complement, in the low bits of the sum's mantissa.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let big = x * std::f32::consts::LOG2_E + ROUND;
    let n = big - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    // ROUND's low nine bits are zero, so those of `big` are n's, and
    // `n + 127` (1..=254 after the clamp) shifted into the exponent field
    // is 2^n.
    p * f32::from_bits(big.to_bits().wrapping_add(127) << 23)
}

/// `silu(x) = x / (1 + e^-x)`, in candle's order of operations.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// `out[i] = silu(gate[i]) * up[i]`, vectorized on the x86 paths, the same
/// bits on every path.
pub(crate) fn swiglu(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn wide(gate: &[f32], up: &[f32], out: &mut [f32]) {
            swiglu_body(gate, up, out)
        }
        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        unsafe fn narrow(gate: &[f32], up: &[f32], out: &mut [f32]) {
            swiglu_body(gate, up, out)
        }
        match isa {
            // SAFETY: the path was checked to be supported before it was chosen.
            Isa::Avx512Vnni => return unsafe { wide(gate, up, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { narrow(gate, up, out) },
            Isa::Scalar => {}
        }
    }
    swiglu_body(gate, up, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance from `got` to the exact `want` in units of f32's last place at `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = (want as f32).abs();
        let ulp = f32::from_bits(w.to_bits() + 1) - w;
        (got as f64 - want).abs() / ulp as f64
    }

    /// Largest and mean ulp error of `f` against `exact` on a fine grid of `[-80, 80]`.
    fn error(f: impl Fn(f32) -> f32, exact: impl Fn(f64) -> f64) -> (f64, f64) {
        let (mut max, mut sum, mut n) = (0f64, 0f64, 0usize);
        for i in 0..=400_000 {
            let x = -80.0 + i as f32 * 4e-4;
            let u = ulps(f(x), exact(x as f64));
            max = max.max(u);
            sum += u;
            n += 1;
        }
        (max, sum / n as f64)
    }

    #[test]
    fn exp_is_within_about_an_ulp_everywhere() {
        let (max, mean) = error(exp, f64::exp);
        assert!(max <= 1.25 && mean <= 0.3, "max {max} mean {mean} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e4) < 1e-37 && exp(-1e4) >= 0.0, "underflow goes to about zero");
        assert!(exp(1e4).is_finite() && exp(1e4) > 1e38, "overflow stops at the largest exponent");
    }

    #[test]
    fn silu_through_it_is_as_close_to_exact_as_through_libm() {
        let exact = |x: f64| x / (1.0 + (-x).exp());
        let (max, mean) = error(silu, exact);
        let (libm_max, libm_mean) = error(|x| x / (1.0 + (-x).exp()), exact);
        assert!(max <= libm_max + 0.25, "max {max} ulp against libm's {libm_max}");
        assert!(mean <= libm_mean * 1.1, "mean {mean} ulp against libm's {libm_mean}");
    }

    #[test]
    fn every_path_computes_the_same_swiglu_bits() {
        // Lengths that leave remainders after 8- and 16-wide vectors.
        let gate: Vec<f32> = (0..1_000).map(|i| (i as f32 * 0.731).sin() * 12.0).collect();
        let up: Vec<f32> = (0..1_000).map(|i| (i as f32 * 0.377).cos() * 3.0).collect();
        for n in [1_000, 37, 5] {
            let want: Vec<u32> = gate[..n].iter().zip(&up).map(|(&g, &u)| (silu(g) * u).to_bits()).collect();
            for isa in Isa::all_supported() {
                let mut out = vec![0f32; n];
                swiglu(isa, &gate[..n], &up[..n], &mut out);
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{isa:?}, {n} values");
            }
        }
    }
}
