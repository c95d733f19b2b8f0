//! Linear layers in the weight format and compute dtype chosen at load.
//! Kernels differ widely in speed by weight format, so the format is a load
//! option: `native` keeps the file's quantization, `q8_0` requantizes
//! (candle's AVX-512 VNNI path on the CPU needs inner dimensions that are
//! multiples of 256), `dense` dequantizes to the compute dtype for the
//! batched GEMM, and `auto` keeps Q8_0 and Q4_1 as stored and requantizes
//! anything else to Q8_0. Quantized matmuls take activations in any float
//! dtype.
//!
//! On the CPU, Q8_0 and Q4_1 matrices run on inferd's own kernels
//! (`inferd-cpu`): packed once here, at load, for int8 dot products, with
//! each input quantized once per matmul. `INFERD_CPU_MATMUL=candle` keeps candle's
//! kernels instead (to compare the two).

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Module, Result, Shape, Tensor};
use inferd_cpu::{PackedMatrix, RowSource};

/// How weights are held for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored: GGUF quantizations stay quantized; dense weights take the compute dtype.
    #[default]
    Native,
    /// Every matrix requantized to Q8_0 (dense ones quantized from f32).
    Q8_0,
    /// Every matrix dequantized to the compute dtype (`f32` on the CPU).
    Dense,
    /// The formats inferd's CPU kernels run: Q8_0 and Q4_1 matrices as
    /// stored, every other one requantized to Q8_0. On another device, as
    /// [`Native`](WeightFormat::Native).
    Auto,
}

impl WeightFormat {
    /// The format one matrix on `device` takes: [`Auto`](WeightFormat::Auto)
    /// resolved, any other format as it is.
    pub fn resolve(self, w: &RawWeight, device: &Device) -> WeightFormat {
        match (self, w) {
            (WeightFormat::Auto, _) if !device.is_cpu() => WeightFormat::Native,
            (WeightFormat::Auto, RawWeight::Quantized(q))
                if matches!(q.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4_1) =>
            {
                WeightFormat::Native
            }
            (WeightFormat::Auto, _) => WeightFormat::Q8_0,
            (f, _) => f,
        }
    }
}

impl FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "native" => Ok(WeightFormat::Native),
            "q8_0" | "q8" => Ok(WeightFormat::Q8_0),
            "dense" | "f32" => Ok(WeightFormat::Dense),
            "auto" => Ok(WeightFormat::Auto),
            other => Err(format!("unknown weight format {other:?} (expected auto, native, q8_0 or dense)")),
        }
    }
}

/// A weight matrix as read from a file, before the compute format is applied.
// A few hundred of these exist briefly while a model loads; boxing the large
// variant (candle's QTensor grows with the cuda feature) would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RawWeight {
    Quantized(QTensor),
    Dense(Tensor),
}

impl RawWeight {
    /// `(out_features, in_features)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            RawWeight::Quantized(q) => q.shape().dims2(),
            RawWeight::Dense(t) => t.dims2(),
        }
    }

    /// The matrix in `dtype`, dequantized if need be.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        match self {
            RawWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            RawWeight::Dense(t) => t.to_dtype(dtype),
        }
    }

    /// The matrix on `device`, in the same format.
    pub fn to_device(self, device: &Device) -> Result<RawWeight> {
        match self {
            RawWeight::Dense(t) => Ok(RawWeight::Dense(t.to_device(device)?)),
            RawWeight::Quantized(q) => {
                let storage = QStorage::from_data(Cow::Owned(q.data()?.into_owned()), device, q.dtype())?;
                Ok(RawWeight::Quantized(QTensor::new(storage, q.shape())?))
            }
        }
    }

    /// The device the matrix lives on.
    pub fn device(&self) -> Device {
        match self {
            RawWeight::Quantized(q) => q.device(),
            RawWeight::Dense(t) => t.device().clone(),
        }
    }

    /// Converts to the weight format; dense results take `dtype`.
    pub fn into_matmul(self, format: WeightFormat, dtype: DType) -> Result<QMatMul> {
        self.into_matmul_padded(format, dtype, 0)
    }

    /// Converts to the weight format with `pad` zero columns appended (the
    /// input then needs `pad` zeros appended too). Only q8_0 pads.
    pub fn into_matmul_padded(self, format: WeightFormat, dtype: DType, pad: usize) -> Result<QMatMul> {
        let format = format.resolve(&self, &self.device());
        if pad > 0 && format == WeightFormat::Q8_0 {
            let w = self.to_dtype(DType::F32)?.pad_with_zeros(1, 0, pad)?;
            return QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        }
        let (_, k) = self.dims2()?;
        let m = match (format, self) {
            (WeightFormat::Native, RawWeight::Quantized(q)) => QMatMul::from_qtensor(q)?,
            (WeightFormat::Q8_0, RawWeight::Quantized(q)) if q.dtype() == GgmlDType::Q8_0 => {
                QMatMul::from_qtensor(q)?
            }
            (WeightFormat::Q8_0, w) if k % GgmlDType::Q8_0.block_size() == 0 => {
                QMatMul::from_qtensor(QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?)?
            }
            (_, w) => QMatMul::Tensor(w.to_dtype(dtype)?),
        };
        // candle dequantizes f32/f16/bf16 "quantized" tensors to f32 itself.
        match m {
            QMatMul::Tensor(t) => Ok(QMatMul::Tensor(t.to_dtype(dtype)?)),
            m => Ok(m),
        }
    }
}

/// Zero columns to append to a q8_0 matrix of inner dimension `k` so that
/// candle's repacked AVX-512 VNNI kernel takes it: that kernel needs `k` to be
/// a multiple of 256 and runs several times faster than the plain Q8_0 dot,
/// which more than pays for the zeros (SmolLM2's 576 becomes 768). A CPU
/// kernel's layout: weights on any other device are never padded.
pub fn repack_padding(format: WeightFormat, k: usize, n: usize, device: &Device) -> usize {
    const QK_K: usize = 256;
    const TILE_N: usize = 16;
    #[cfg(target_arch = "x86_64")]
    let vnni =
        std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    let cpu = device.is_cpu();
    if format != WeightFormat::Q8_0 || !cpu || !vnni || k.is_multiple_of(QK_K) || !n.is_multiple_of(TILE_N) {
        return 0;
    }
    k.next_multiple_of(QK_K) - k
}

/// Stacks the rows of several matrices into one, so a single matmul computes
/// them all (Q, K and V; gate and up). Quantized matrices of one type stack
/// without requantizing: a row is a run of whole blocks.
pub fn stack_rows(parts: Vec<QMatMul>) -> Result<Option<QMatMul>> {
    let all_q = parts.iter().all(|p| matches!(p, QMatMul::QTensor(_)));
    let all_dense = parts.iter().all(|p| matches!(p, QMatMul::Tensor(_)));
    if all_dense {
        let ts: Vec<&Tensor> =
            parts.iter().filter_map(|p| if let QMatMul::Tensor(t) = p { Some(t) } else { None }).collect();
        return Ok(Some(QMatMul::Tensor(Tensor::cat(&ts, 0)?)));
    }
    if !all_q {
        return Ok(None);
    }
    let qs: Vec<&QTensor> = parts
        .iter()
        .filter_map(|p| if let QMatMul::QTensor(q) = p { Some(q.as_ref()) } else { None })
        .collect();
    let dtype = qs[0].dtype();
    let k = qs[0].shape().dims2()?.1;
    let mut rows = 0;
    let mut bytes = Vec::new();
    for q in &qs {
        let (n, qk) = q.shape().dims2()?;
        if q.dtype() != dtype || qk != k {
            return Ok(None);
        }
        rows += n;
        bytes.extend_from_slice(&q.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &qs[0].device(), dtype)?;
    Ok(Some(QMatMul::from_qtensor(QTensor::new(storage, (rows, k))?)?))
}

/// A linear layer whose output is the concatenation of several projections,
/// computed by one matmul when the weights could be stacked.
#[derive(Debug, Clone)]
pub struct FusedLinear {
    /// One stacked matrix, or one matrix per projection (none when packed).
    weights: Vec<QMatMul>,
    /// The stacked matrix packed for inferd's CPU kernels.
    packed: Option<PackedMatmul>,
    bias: Option<Tensor>,
    out_sizes: Vec<usize>,
    /// Zero columns appended to the weights (see [`repack_padding`]).
    pad: usize,
}

impl FusedLinear {
    /// Builds from per-projection weights and optional per-projection
    /// biases; dense weights and biases take the compute `dtype`.
    pub fn new(
        parts: Vec<RawWeight>,
        biases: Option<Vec<Tensor>>,
        format: WeightFormat,
        dtype: DType,
    ) -> Result<Self> {
        let out_sizes = parts.iter().map(|p| p.dims2().map(|d| d.0)).collect::<Result<Vec<_>>>()?;
        let k = parts.first().map(|p| p.dims2()).transpose()?.map_or(0, |d| d.1);
        let device = parts.first().map_or(Device::Cpu, RawWeight::device);
        let own = device.is_cpu() && own_cpu_kernels();
        let pad = if own {
            0
        } else {
            let formats = parts.iter().map(|p| format.resolve(p, &device));
            out_sizes.iter().zip(formats).map(|(&n, f)| repack_padding(f, k, n, &device)).min().unwrap_or(0)
        };
        let mats = parts
            .into_iter()
            .map(|p| p.into_matmul_padded(format, dtype, pad))
            .collect::<Result<Vec<_>>>()?;
        let weights = if mats.len() > 1 {
            match stack_rows(mats.clone())? {
                Some(stacked) => vec![stacked],
                None => mats,
            }
        } else {
            mats
        };
        let (weights, packed) = match weights.as_slice() {
            [QMatMul::QTensor(q)] if own && matches!(q.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4_1) => {
                let (n, k) = q.shape().dims2()?;
                let bytes = q.data()?;
                let p = if q.dtype() == GgmlDType::Q8_0 {
                    PackedMatrix::from_q8_0(&bytes, n, k)
                } else {
                    PackedMatrix::from_q4_1(&bytes, n, k)
                };
                (Vec::new(), Some(PackedMatmul(Arc::new(p.map_err(candle_core::Error::msg)?))))
            }
            _ => (weights, None),
        };
        let bias = match biases {
            Some(b) => {
                Some(Tensor::cat(&b.iter().map(|t| t.to_dtype(dtype)).collect::<Result<Vec<_>>>()?, 0)?)
            }
            None => None,
        };
        Ok(FusedLinear { weights, packed, bias, out_sizes, pad })
    }

    /// `x: (T, in)` to one `(T, out_i)` tensor per projection.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let y = self.joined(x, None)?;
        self.split(y)
    }

    /// As [`forward`](Self::forward), of `rms_norm(x, weight, eps)`. On
    /// inferd's CPU kernels with f32 activations the norm is computed row by
    /// row as the input is quantized, with the same arithmetic as candle's
    /// `rms_norm`, so the result is the same either way.
    pub fn forward_normed(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Vec<Tensor>> {
        let y = self.joined(x, Some((weight, eps)))?;
        self.split(y)
    }

    /// As [`forward_normed`](Self::forward_normed), with the projections'
    /// outputs left side by side in one `(T, sum of out_i)` tensor (for a
    /// fused gate and up ahead of [`forward_swiglu`](Self::forward_swiglu)).
    pub fn forward_normed_joined(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        self.joined(x, Some((weight, eps)))
    }

    /// This projection of `silu(gate) * up`, where `gate_up` is `(T, 2 *
    /// in)`, gate then up. On inferd's CPU kernels with f32 activations
    /// SwiGLU is computed row by row as the input is quantized, with the
    /// same arithmetic as candle's `silu` and multiply (the packed path with
    /// `inferd_cpu::exp` in place of libm's).
    pub fn forward_swiglu(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (_, two_k) = gate_up.dims2()?;
        if let Some(p) = self.packed_for(gate_up) {
            if two_k != 2 * p.0.k() {
                candle_core::bail!("SwiGLU input has {two_k} columns, the matrix takes {}", p.0.k());
            }
            let y = gate_up.contiguous()?.apply_op1_no_bwd(&SwiGluMatmul(p.clone()))?;
            return self.finish(y, gate_up.dtype());
        }
        let k = two_k / 2;
        let act = (candle_nn::ops::silu(&gate_up.narrow(1, 0, k)?)? * gate_up.narrow(1, k, k)?)?;
        self.forward_one(&act)
    }

    /// `residual + ` this (single) projection of `x`: a decoder layer's
    /// residual connection. On inferd's CPU kernels the add runs on their
    /// compute threads as the output is finished (same bits as adding the
    /// tensors; see `PackedMatrix::forward_residual`).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.residual_packed(x, residual) {
            Some(p) => x.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, &ResidualMatmul(p, false)),
            None => residual + self.forward_one(x)?,
        }
    }

    /// `residual + ` [`forward_swiglu`](Self::forward_swiglu)`(gate_up)`,
    /// the add on the compute threads as in
    /// [`forward_residual`](Self::forward_residual).
    pub fn forward_swiglu_residual(&self, gate_up: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.residual_packed(gate_up, residual) {
            Some(p) => {
                gate_up.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, &ResidualMatmul(p, true))
            }
            None => residual + self.forward_swiglu(gate_up)?,
        }
    }

    /// The packed matrix, when it takes `x` and its output is the whole
    /// result (one projection, no bias, no padding), with an f32 residual.
    fn residual_packed(&self, x: &Tensor, residual: &Tensor) -> Option<PackedMatmul> {
        let plain = self.out_sizes.len() == 1 && self.bias.is_none() && self.pad == 0;
        let fits = residual.dtype() == DType::F32 && residual.device().is_cpu();
        self.packed_for(x).filter(|_| plain && fits).cloned()
    }

    /// The packed matrix, when `x` is an f32 CPU tensor it can take.
    fn packed_for(&self, x: &Tensor) -> Option<&PackedMatmul> {
        self.packed.as_ref().filter(|_| x.dtype() == DType::F32 && x.device().is_cpu())
    }

    /// All projections of `x`, or of `rms_norm(x, weight, eps)`, side by side.
    fn joined(&self, x: &Tensor, norm: Option<(&Tensor, f32)>) -> Result<Tensor> {
        let normed;
        let x = match (norm, self.packed_for(x)) {
            (Some((weight, eps)), Some(p)) => {
                let y =
                    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &NormedMatmul(p.clone(), eps))?;
                return self.finish(y, x.dtype());
            }
            (Some((weight, eps)), None) => {
                normed = candle_nn::ops::rms_norm(x, weight, eps)?;
                &normed
            }
            (None, _) => x,
        };
        let padded;
        let x = if self.pad > 0 {
            padded = x.pad_with_zeros(1, 0, self.pad)?;
            &padded
        } else {
            x
        };
        let y = if let Some(p) = &self.packed {
            x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(p)?.to_dtype(x.dtype())?
        } else if self.weights.len() == 1 {
            self.weights[0].forward(x)?
        } else {
            let outs = self.weights.iter().map(|w| w.forward(x)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&outs, 1)?
        };
        self.finish(y, x.dtype())
    }

    /// The output in the activations' dtype, with the bias added.
    fn finish(&self, y: Tensor, dtype: DType) -> Result<Tensor> {
        let y = y.to_dtype(dtype)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// One tensor per projection, from the joined output.
    fn split(&self, y: Tensor) -> Result<Vec<Tensor>> {
        if self.out_sizes.len() == 1 {
            return Ok(vec![y]);
        }
        let mut start = 0;
        let mut outs = Vec::with_capacity(self.out_sizes.len());
        for &n in &self.out_sizes {
            outs.push(y.narrow(1, start, n)?);
            start += n;
        }
        Ok(outs)
    }

    /// The single-projection output, for unfused layers.
    pub fn forward_one(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.forward(x)?;
        Ok(outs.swap_remove(0))
    }
}

thread_local! {
    /// A choice of kernels for the models this thread builds (see
    /// [`with_cpu_kernels`]).
    static KERNELS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether Q8_0 and Q4_1 matrices on the CPU run on inferd's kernels (the default)
/// rather than candle's (`INFERD_CPU_MATMUL=candle`).
pub fn own_cpu_kernels() -> bool {
    static OWN: OnceLock<bool> = OnceLock::new();
    KERNELS.with(|k| k.get()).unwrap_or_else(|| {
        *OWN.get_or_init(|| {
            !std::env::var("INFERD_CPU_MATMUL").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
        })
    })
}

/// Runs `f` with the models it builds on this thread using inferd's CPU
/// kernels (`own`) or candle's, whatever `INFERD_CPU_MATMUL` says: for
/// tests and benches that compare the two in one process.
pub fn with_cpu_kernels<R>(own: bool, f: impl FnOnce() -> R) -> R {
    let before = KERNELS.with(|k| k.replace(Some(own)));
    let out = f();
    KERNELS.with(|k| k.set(before));
    out
}

/// A packed matrix as a candle op on CPU tensors: `(T, k)` f32 in,
/// `(T, n)` f32 out.
#[derive(Debug, Clone)]
struct PackedMatmul(Arc<PackedMatrix>);

impl PackedMatmul {
    /// `m` rows computed from `source` times the matrix, as a CPU storage.
    fn run(&self, source: RowSource<'_>, m: usize) -> (CpuStorage, Shape) {
        (CpuStorage::F32(self.0.forward_from(source, m)), Shape::from((m, self.0.n())))
    }
}

/// The contiguous f32 data of a CPU tensor.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(x) = storage else { candle_core::bail!("the packed matmul takes f32 {what}") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("the packed matmul takes contiguous {what}")
    };
    Ok(&x[start..end])
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "inferd-packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if k != self.0.k() {
            candle_core::bail!("matmul input has {k} columns, the matrix {}", self.0.k());
        }
        Ok(self.run(RowSource::Plain(f32_data(storage, layout, "input")?), m))
    }
}

/// RMSNorm of the input (the second operand is the norm's weight), fused
/// into the quantization ahead of a packed matmul.
#[derive(Debug, Clone)]
struct NormedMatmul(PackedMatmul, f32);

impl CustomOp2 for NormedMatmul {
    fn name(&self) -> &'static str {
        "inferd-rms-norm-packed-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        if k != self.0.0.k() || l2.shape().elem_count() != k {
            candle_core::bail!(
                "norm and matmul sizes differ: input {k}, weight {:?}, matrix {}",
                l2.shape(),
                self.0.0.k()
            );
        }
        let (x, weight) = (f32_data(s1, l1, "input")?, f32_data(s2, l2, "norm weight")?);
        Ok(self.0.run(RowSource::RmsNorm { x, weight, eps: self.1 }, m))
    }
}

/// SwiGLU of a `(T, 2k)` gate-and-up input, fused into the quantization
/// ahead of a packed matmul of `k` inputs.
#[derive(Debug, Clone)]
struct SwiGluMatmul(PackedMatmul);

impl CustomOp1 for SwiGluMatmul {
    fn name(&self) -> &'static str {
        "inferd-swiglu-packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, two_k) = layout.shape().dims2()?;
        if two_k != 2 * self.0.0.k() {
            candle_core::bail!("SwiGLU input has {two_k} columns, the matrix takes {}", self.0.0.k());
        }
        Ok(self.0.run(RowSource::SwiGlu(f32_data(storage, layout, "input")?), m))
    }
}

/// A packed matmul whose output is added to a residual (the second
/// operand): of the input as it is, or of SwiGLU of a `(T, 2k)` input.
#[derive(Debug, Clone)]
struct ResidualMatmul(PackedMatmul, bool);

impl CustomOp2 for ResidualMatmul {
    fn name(&self) -> &'static str {
        "inferd-packed-matmul-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ResidualMatmul(PackedMatmul(p), swiglu) = self;
        let (m, width) = l1.shape().dims2()?;
        let k = if *swiglu { 2 * p.k() } else { p.k() };
        if width != k || l2.shape().dims2()? != (m, p.n()) {
            candle_core::bail!(
                "residual matmul sizes differ: input {:?}, residual {:?}, matrix {} by {}",
                l1.shape(),
                l2.shape(),
                p.n(),
                p.k()
            );
        }
        let x = f32_data(s1, l1, "input")?;
        let source = if *swiglu { RowSource::SwiGlu(x) } else { RowSource::Plain(x) };
        let y = p.forward_residual(source, m, f32_data(s2, l2, "residual")?);
        Ok((CpuStorage::F32(y), Shape::from((m, p.n()))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn rand(shape: (usize, usize), seed: u64) -> Result<Tensor> {
        let n = shape.0 * shape.1;
        let v: Vec<f32> =
            (0..n).map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    #[test]
    fn stacked_quantized_projection_equals_separate_ones() -> Result<()> {
        let (a, b) = (rand((64, 64), 1)?, rand((32, 64), 2)?);
        let x = rand((3, 64), 3)?;
        let q8 = |w: &Tensor| -> Result<RawWeight> {
            Ok(RawWeight::Quantized(QTensor::quantize(w, GgmlDType::Q8_0)?))
        };
        let one = |w: &Tensor| FusedLinear::new(vec![q8(w)?], None, WeightFormat::Native, DType::F32);
        let (sep_a, sep_b) = (one(&a)?.forward_one(&x)?, one(&b)?.forward_one(&x)?);
        let fused = FusedLinear::new(vec![q8(&a)?, q8(&b)?], None, WeightFormat::Native, DType::F32)?;
        assert_eq!(
            fused.weights.len() + usize::from(fused.packed.is_some()),
            1,
            "same-type quantized weights stack"
        );
        let outs = fused.forward(&x)?;
        let d1: f32 = (&outs[0] - &sep_a)?.abs()?.max_all()?.to_scalar()?;
        let d2: f32 = (&outs[1] - &sep_b)?.abs()?.max_all()?.to_scalar()?;
        assert_eq!((d1, d2), (0.0, 0.0));
        Ok(())
    }

    #[test]
    fn padded_q8_0_projection_equals_the_f32_one() -> Result<()> {
        let w = rand((64, 576), 9)?;
        let x = rand((3, 576), 10)?;
        let exact = x.matmul(&w.t()?)?;
        let lin = FusedLinear::new(vec![RawWeight::Dense(w)], None, WeightFormat::Q8_0, DType::F32)?;
        let diff: f32 = (lin.forward_one(&x)? - &exact)?.abs()?.max_all()?.to_scalar()?;
        // Outputs reach about 10; candle's unpadded Q8_0 kernel is off by
        // 0.117 here at most, inferd's by 0.116.
        assert!(diff < 0.15, "{diff}");
        if own_cpu_kernels() {
            assert!(lin.packed.is_some() && lin.pad == 0, "inferd's kernels take any multiple of 32");
        } else {
            assert_eq!(lin.pad, repack_padding(WeightFormat::Q8_0, 576, 64, &Device::Cpu));
        }
        Ok(())
    }

    #[test]
    fn own_kernels_are_at_least_as_close_to_f32_as_candles() -> Result<()> {
        // The same quantized weights through both kernels, against the
        // dequantized weights times the unquantized input: inferd keeps each
        // input block's scale in f32 where candle rounds it to f16.
        let w = rand((256, 576), 21)?;
        let x = (rand((16, 576), 22)? * 3.0)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&w, dtype)?;
            let exact = x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?;
            let candle = QMatMul::from_qtensor(copy(&q)?)?.forward(&x)?;
            let packed = match dtype {
                GgmlDType::Q8_0 => PackedMatrix::from_q8_0(&q.data()?, 256, 576),
                _ => PackedMatrix::from_q4_1(&q.data()?, 256, 576),
            };
            let ours = packed.map_err(candle_core::Error::msg)?.forward(&x.flatten_all()?.to_vec1()?, 16);
            let ours = Tensor::from_vec(ours, (16, 256), &Device::Cpu)?;
            let err = |y: &Tensor| -> Result<f32> { (y - &exact)?.sqr()?.sum_all()?.sqrt()?.to_scalar() };
            let (e_ours, e_candle) = (err(&ours)?, err(&candle)?);
            assert!(e_ours <= e_candle * 1.001, "{dtype:?}: inferd {e_ours} vs candle {e_candle}");
        }
        Ok(())
    }

    #[test]
    fn fused_norm_and_swiglu_give_the_unfused_numbers() -> Result<()> {
        // Every path: the packed kernels fuse the step into quantization,
        // candle's kernels and dense weights run it as a separate op.
        // candle's Q4_1 kernel wants an even number of blocks per row.
        let (k, inter) = (64, 128);
        let x = (rand((5, k), 41)? * 2.0)?;
        let norm = (rand((1, k), 42)?.squeeze(0)? + 1.0)?;
        let gu = (rand((5, 2 * inter), 43)? * 3.0)?;
        let quantized = |w: &Tensor, dtype| -> Result<RawWeight> {
            Ok(RawWeight::Quantized(QTensor::quantize(w, dtype)?))
        };
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            for own in [true, false] {
                with_cpu_kernels(own, || -> Result<()> {
                    let (a, b) = (rand((32, k), 44)?, rand((48, k), 45)?);
                    let proj = FusedLinear::new(
                        vec![quantized(&a, dtype)?, quantized(&b, dtype)?],
                        None,
                        WeightFormat::Native,
                        DType::F32,
                    )?;
                    assert_eq!(proj.packed.is_some(), own);
                    let want = proj.forward(&candle_nn::ops::rms_norm(&x, &norm, 1e-5)?)?;
                    let got = proj.forward_normed(&x, &norm, 1e-5)?;
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!(
                            g.to_vec2::<f32>()?,
                            w.to_vec2::<f32>()?,
                            "{dtype:?} norm, own kernels {own}"
                        );
                    }
                    let joined = proj.forward_normed_joined(&x, &norm, 1e-5)?;
                    assert_eq!(joined.to_vec2::<f32>()?, Tensor::cat(&want, 1)?.to_vec2::<f32>()?);

                    let down = FusedLinear::new(
                        vec![quantized(&rand((32, inter), 46)?, dtype)?],
                        None,
                        WeightFormat::Native,
                        DType::F32,
                    )?;
                    // The packed path's SiLU takes inferd_cpu's exponential
                    // (vectorized) where candle's takes libm's.
                    let gate = gu.narrow(1, 0, inter)?;
                    let silu = match own {
                        true => Tensor::from_vec(
                            gate.flatten_all()?.to_vec1::<f32>()?.into_iter().map(inferd_cpu::silu).collect(),
                            gate.shape(),
                            gate.device(),
                        )?,
                        false => candle_nn::ops::silu(&gate)?,
                    };
                    let want = down.forward_one(&(silu * gu.narrow(1, inter, inter)?)?)?;
                    let got = down.forward_swiglu(&gu)?;
                    assert_eq!(
                        got.to_vec2::<f32>()?,
                        want.to_vec2::<f32>()?,
                        "{dtype:?} SwiGLU, own kernels {own}"
                    );

                    // The residual connection, added into the output.
                    let residual = (rand((5, 32), 49)? * 4.0)?;
                    let want = (&residual + &want)?;
                    let got = down.forward_swiglu_residual(&gu, &residual)?;
                    assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{dtype:?} SwiGLU + residual");
                    let act = (rand((5, inter), 50)? * 2.0)?;
                    let want = (&residual + down.forward_one(&act)?)?;
                    let got = down.forward_residual(&act, &residual)?;
                    assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{dtype:?} + residual");
                    Ok(())
                })?;
            }
        }
        // A shape that does not fit is an error, not a panic.
        let down = FusedLinear::new(
            vec![quantized(&rand((32, inter), 47)?, GgmlDType::Q8_0)?],
            None,
            WeightFormat::Native,
            DType::F32,
        )?;
        assert!(down.forward_swiglu(&rand((2, inter), 48)?).is_err());
        assert!(down.forward_residual(&rand((2, inter), 48)?, &rand((2, 31), 49)?).is_err());
        assert!(down.forward_swiglu_residual(&rand((2, inter), 48)?, &rand((2, 32), 49)?).is_err());
        Ok(())
    }

    #[test]
    fn auto_keeps_what_the_cpu_kernels_run_and_requantizes_the_rest() -> Result<()> {
        let w = rand((32, 256), 31)?;
        let quantized =
            |dtype| -> Result<RawWeight> { Ok(RawWeight::Quantized(QTensor::quantize(&w, dtype)?)) };
        let cpu = Device::Cpu;
        for (raw, want) in [
            (quantized(GgmlDType::Q4_1)?, WeightFormat::Native),
            (quantized(GgmlDType::Q8_0)?, WeightFormat::Native),
            (quantized(GgmlDType::Q4K)?, WeightFormat::Q8_0),
            (RawWeight::Dense(w.clone()), WeightFormat::Q8_0),
        ] {
            assert_eq!(WeightFormat::Auto.resolve(&raw, &cpu), want);
            let stored = match &raw {
                RawWeight::Quantized(q) if want == WeightFormat::Native => q.dtype(),
                _ => GgmlDType::Q8_0,
            };
            match raw.into_matmul(WeightFormat::Auto, DType::F32)? {
                QMatMul::QTensor(q) => assert_eq!(q.dtype(), stored),
                other => panic!("auto kept a quantized format, got {other:?}"),
            }
        }
        for f in [WeightFormat::Native, WeightFormat::Q8_0, WeightFormat::Dense] {
            assert_eq!(f.resolve(&RawWeight::Dense(w.clone()), &cpu), f, "only auto resolves");
        }
        assert_eq!("auto".parse::<WeightFormat>(), Ok(WeightFormat::Auto));
        Ok(())
    }

    fn copy(q: &QTensor) -> Result<QTensor> {
        QTensor::new(
            QStorage::from_data(Cow::Owned(q.data()?.into_owned()), &Device::Cpu, q.dtype())?,
            q.shape(),
        )
    }

    #[test]
    fn only_cpu_weights_get_the_cpu_kernels_padding() {
        // The padding follows the host's VNNI support on the CPU (0 without
        // it) and is never applied for another device, whatever the host.
        let cpu = repack_padding(WeightFormat::Q8_0, 576, 64, &Device::Cpu);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512f")
        {
            assert_eq!(cpu, 192);
        }
        assert!(cpu == 0 || cpu == 192);
        assert_eq!(repack_padding(WeightFormat::Native, 576, 64, &Device::Cpu), 0, "q8_0 only");
        assert_eq!(repack_padding(WeightFormat::Q8_0, 768, 64, &Device::Cpu), 0, "already a multiple of 256");
        #[cfg(feature = "cuda")]
        if let Ok(gpu) = Device::new_cuda(0) {
            assert_eq!(repack_padding(WeightFormat::Q8_0, 576, 64, &gpu), 0);
        }
    }

    #[test]
    fn dense_weights_and_biases_take_the_compute_dtype() -> Result<()> {
        let w = rand((32, 64), 11)?;
        let bias = rand((1, 32), 12)?.squeeze(0)?;
        let x = rand((2, 64), 13)?;
        let exact = x.matmul(&w.t()?)?.broadcast_add(&bias)?;
        for dtype in [DType::BF16, DType::F16] {
            let lin = FusedLinear::new(
                vec![RawWeight::Dense(w.clone())],
                Some(vec![bias.clone()]),
                WeightFormat::Dense,
                dtype,
            )?;
            let y = lin.forward_one(&x.to_dtype(dtype)?)?;
            assert_eq!(y.dtype(), dtype);
            let diff: f32 = (y.to_dtype(DType::F32)? - &exact)?.abs()?.max_all()?.to_scalar()?;
            let scale: f32 = exact.abs()?.max_all()?.to_scalar()?;
            // bf16 keeps 8 bits of mantissa: about 1% of the largest output.
            assert!(diff < 0.02 * scale, "{dtype:?} off by {diff} of {scale}");
            // A quantized matrix takes activations in the compute dtype too.
            let q = RawWeight::Quantized(QTensor::quantize(&w, GgmlDType::Q8_0)?);
            let lin = FusedLinear::new(vec![q], None, WeightFormat::Native, dtype)?;
            assert_eq!(lin.forward_one(&x.to_dtype(dtype)?)?.dtype(), dtype);
        }
        Ok(())
    }

    #[test]
    fn formats_convert_and_stay_close_to_f32() -> Result<()> {
        let w = rand((32, 64), 5)?;
        let x = rand((2, 64), 6)?;
        let exact = x.matmul(&w.t()?)?;
        for format in [WeightFormat::Native, WeightFormat::Q8_0, WeightFormat::Dense] {
            let m = RawWeight::Dense(w.clone()).into_matmul(format, DType::F32)?;
            let diff: f32 = (m.forward(&x)? - &exact)?.abs()?.max_all()?.to_scalar()?;
            assert!(diff < 0.1, "{format:?} off by {diff}");
        }
        assert!("Q8_0".parse::<WeightFormat>().is_ok());
        assert_eq!("f32".parse::<WeightFormat>(), Ok(WeightFormat::Dense), "f32 stays accepted");
        assert!("q5".parse::<WeightFormat>().is_err());
        Ok(())
    }
}
