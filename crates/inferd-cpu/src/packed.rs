//! Matmuls over quantized weights packed for int8 dot products.
//!
//! [`PackedMatrix`] regroups a matrix's rows into tiles of 16 output rows,
//! block of 32 inputs by block, so that one `vpdpbusd` of a 64-byte line
//! against four activation bytes broadcast to every lane adds four products
//! into each of the 16 rows' sums: no horizontal sums and no shuffles in the
//! inner loop. Two source formats are packed:
//!
//! - **Q8_0** (32 int8 values and an f16 scale per block): per block, the 16
//!   rows' scales as f32, then eight lines, line `g` holding values
//!   `4g..4g+4` of each row, offset by 128 into unsigned bytes (the
//!   instruction wants one unsigned operand). The offset is taken back out
//!   once per block with the activation block's own sum.
//! - **Q4_1** (32 unsigned 4-bit values, an f16 scale `d` and an f16 minimum
//!   `m` per block; a value is `d * q + m`): per block, one line of the 16
//!   rows' `d` and `m` as f16, then four lines of nibbles, line `h` holding
//!   values `4h..4h+4` of each row in its low nibbles and `16+4h..16+4h+4` in
//!   its high ones. The nibbles are already unsigned, so a mask (and a shift
//!   for the high half) gives the operand; the `m` term is `m` times the
//!   activation block's sum. 5 bits a weight to read instead of Q8_0's 9,
//!   which is what a decode step at batch 1 waits on.
//!
//! [`QuantizedRows`] quantizes the input rows once per matmul the way Q8_0
//! does (scale = max |x| / 127, values rounded to nearest, ties to even),
//! keeping the scale in f32 where Q8_0 rounds it to f16.

use crate::isa::Isa;
use crate::pool::{Pool, SendPtr};
use crate::scalar;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Values per block (Q8_0 and Q4_1 alike).
pub const QK: usize = 32;
/// Output rows per packed tile.
pub const TILE: usize = 16;
/// 64-byte lines per block of a Q8_0 tile.
pub const LINES: usize = QK / 4;
/// 64-byte lines per block of a Q4_1 tile: the scales, then the nibbles.
pub const Q4_LINES: usize = 1 + QK / 8;
/// Bytes of one Q8_0 block as candle and GGUF store it (f16 scale, 32 values).
pub const BLOCK_BYTES: usize = 2 + QK;
/// Bytes of one Q4_1 block as GGUF stores it (f16 `d`, f16 `m`, 16 bytes of nibbles).
pub const Q4_1_BLOCK_BYTES: usize = 4 + QK / 2;

/// 16 rows × 4 bytes, aligned for 512-bit loads.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// The source format a matrix was packed from, which picks its kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Q8_0,
    Q4_1,
}

impl Packing {
    /// 64-byte lines per block of a tile.
    pub(crate) fn lines_per_block(self) -> usize {
        match self {
            Packing::Q8_0 => LINES,
            Packing::Q4_1 => Q4_LINES,
        }
    }
}

/// A quantized matrix of `n` output rows and `k` inputs, packed for the kernels.
pub struct PackedMatrix {
    n: usize,
    k: usize,
    packing: Packing,
    lines: Vec<Line>,
    /// Q8_0's f32 scales, `TILE` per block of a tile (Q4_1 keeps its in `lines`).
    scales: Vec<f32>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("packing", &self.packing)
            .finish_non_exhaustive()
    }
}

/// The view of a packed matrix a kernel works on.
#[derive(Clone, Copy)]
pub(crate) struct Tiles<'a> {
    pub(crate) nb: usize,
    pub(crate) packing: Packing,
    pub(crate) lines: &'a [Line],
    pub(crate) scales: &'a [f32],
}

impl Tiles<'_> {
    /// Tile `t`'s lines (`nb` blocks of them) and Q8_0 scales (`nb * TILE`,
    /// none for Q4_1).
    pub(crate) fn tile(&self, t: usize) -> (&[Line], &[f32]) {
        let l = self.nb * self.packing.lines_per_block();
        let lines = &self.lines[t * l..(t + 1) * l];
        match self.packing {
            Packing::Q8_0 => {
                let s = self.nb * TILE;
                (lines, &self.scales[t * s..(t + 1) * s])
            }
            Packing::Q4_1 => (lines, &[]),
        }
    }
}

/// Checks a matrix's shape against its bytes: the blocks per row.
fn blocks(what: &str, bytes: usize, block_bytes: usize, n: usize, k: usize) -> Result<usize, String> {
    if k == 0 || !k.is_multiple_of(QK) {
        return Err(format!("{what} rows need a multiple of {QK} values, not {k}"));
    }
    let nb = k / QK;
    if bytes != n * nb * block_bytes {
        return Err(format!("{bytes} bytes for a {n}x{k} {what} matrix, expected {}", n * nb * block_bytes));
    }
    Ok(nb)
}

impl PackedMatrix {
    /// Packs a matrix given as Q8_0 blocks, row after row (`n * k / 32`
    /// blocks of [`BLOCK_BYTES`]). Rows past `n` in the last tile are zeros.
    pub fn from_q8_0(bytes: &[u8], n: usize, k: usize) -> Result<PackedMatrix, String> {
        let nb = blocks("Q8_0", bytes.len(), BLOCK_BYTES, n, k)?;
        let tiles = n.div_ceil(TILE);
        let mut lines = vec![Line([128; 64]); tiles * nb * LINES];
        let mut scales = vec![0f32; tiles * nb * TILE];
        for r in 0..n {
            let (t, j) = (r / TILE, r % TILE);
            for b in 0..nb {
                let block = &bytes[(r * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                scales[(t * nb + b) * TILE + j] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                for g in 0..LINES {
                    let line = &mut lines[(t * nb + b) * LINES + g].0;
                    for i in 0..4 {
                        // Two's complement plus 128: the value as an unsigned byte.
                        line[j * 4 + i] = block[2 + g * 4 + i] ^ 0x80;
                    }
                }
            }
        }
        Ok(PackedMatrix { n, k, packing: Packing::Q8_0, lines, scales })
    }

    /// Packs a matrix given as Q4_1 blocks, row after row (`n * k / 32`
    /// blocks of [`Q4_1_BLOCK_BYTES`]). Rows past `n` in the last tile are zeros.
    pub fn from_q4_1(bytes: &[u8], n: usize, k: usize) -> Result<PackedMatrix, String> {
        let nb = blocks("Q4_1", bytes.len(), Q4_1_BLOCK_BYTES, n, k)?;
        let tiles = n.div_ceil(TILE);
        let mut lines = vec![Line([0; 64]); tiles * nb * Q4_LINES];
        for r in 0..n {
            let (t, j) = (r / TILE, r % TILE);
            for b in 0..nb {
                let block = &bytes[(r * nb + b) * Q4_1_BLOCK_BYTES..][..Q4_1_BLOCK_BYTES];
                let at = (t * nb + b) * Q4_LINES;
                // The scale line: 16 f16 `d`, then 16 f16 `m`, as in the file.
                let scale = &mut lines[at].0;
                scale[2 * j..2 * j + 2].copy_from_slice(&block[0..2]);
                scale[32 + 2 * j..32 + 2 * j + 2].copy_from_slice(&block[2..4]);
                // GGUF's byte i holds value i (low nibble) and value 16 + i
                // (high nibble), which is the order the lines want.
                for h in 0..QK / 8 {
                    let line = &mut lines[at + 1 + h].0;
                    line[j * 4..j * 4 + 4].copy_from_slice(&block[4 + h * 4..4 + h * 4 + 4]);
                }
            }
        }
        Ok(PackedMatrix { n, k, packing: Packing::Q4_1, lines, scales: Vec::new() })
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The format the matrix was packed from.
    pub fn packing(&self) -> Packing {
        self.packing
    }

    /// Bytes the packed matrix holds: what one pass over it reads.
    pub fn bytes(&self) -> usize {
        self.lines.len() * size_of::<Line>() + self.scales.len() * size_of::<f32>()
    }

    fn tiles(&self) -> Tiles<'_> {
        Tiles { nb: self.k / QK, packing: self.packing, lines: &self.lines, scales: &self.scales }
    }

    /// `x` (`m` rows of `k`) times the matrix's transpose: `m` rows of `n`,
    /// on the detected kernel path and the process's pool.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.forward_on(Isa::detected(), Pool::global(), x, m)
    }

    /// As [`forward`](Self::forward), on a given path and pool.
    pub fn forward_on(&self, isa: Isa, pool: &Pool, x: &[f32], m: usize) -> Vec<f32> {
        self.forward_from_on(isa, pool, RowSource::Plain(x), m)
    }

    /// The `m` input rows computed from `source` (see [`RowSource`]) times
    /// the matrix's transpose, on the detected kernel path and the
    /// process's pool.
    pub fn forward_from(&self, source: RowSource<'_>, m: usize) -> Vec<f32> {
        self.forward_from_on(Isa::detected(), Pool::global(), source, m)
    }

    /// As [`forward_from`](Self::forward_from), on a given path and pool.
    pub fn forward_from_on(&self, isa: Isa, pool: &Pool, source: RowSource<'_>, m: usize) -> Vec<f32> {
        let rows = QuantizedRows::from_source_on(isa, pool, source, m, self.k);
        // Not zeroed first: the kernels write every element (at 512 rows
        // the zeroing was 4 % of a layer's matmul time).
        let mut out = Vec::with_capacity(m * self.n);
        // SAFETY: `out` has room for `m * n` floats.
        unsafe { self.matmul_raw(isa, pool, &rows, out.as_mut_ptr()) };
        // SAFETY: `matmul_raw` wrote all of them.
        unsafe { out.set_len(m * self.n) };
        out
    }

    /// `residual` (`m` rows of `n`) plus the `m` input rows computed from
    /// `source` times the matrix's transpose: a decoder layer's residual
    /// connection, added on the compute threads (one rounding per element,
    /// and f32 addition commutes, so the same bits as candle's `residual +
    /// product`), where candle would hand a large add to a pool of its own
    /// that competes with this one for the cores.
    pub fn forward_residual(&self, source: RowSource<'_>, m: usize, residual: &[f32]) -> Vec<f32> {
        self.forward_residual_on(Isa::detected(), Pool::global(), source, m, residual)
    }

    /// As [`forward_residual`](Self::forward_residual), on a given path and pool.
    pub fn forward_residual_on(
        &self,
        isa: Isa,
        pool: &Pool,
        source: RowSource<'_>,
        m: usize,
        residual: &[f32],
    ) -> Vec<f32> {
        assert_eq!(residual.len(), m * self.n, "residual size");
        let mut out = self.forward_from_on(isa, pool, source, m);
        /// Elements one thread adds at a time.
        const CHUNK: usize = 1 << 13;
        pool.for_each_chunk(&mut out, CHUNK, 1, |i, out| {
            for (o, r) in out.iter_mut().zip(&residual[i * CHUNK..]) {
                *o += *r;
            }
        });
        out
    }

    /// Multiplies already quantized rows into `out` (`rows.m() * n`).
    pub fn matmul_on(&self, isa: Isa, pool: &Pool, rows: &QuantizedRows, out: &mut [f32]) {
        assert_eq!(out.len(), rows.m * self.n, "output size");
        // SAFETY: `out` holds `m * n` floats.
        unsafe { self.matmul_raw(isa, pool, rows, out.as_mut_ptr()) }
    }

    /// Writes every one of the `rows.m() * n` outputs at `out`.
    ///
    /// # Safety
    /// `out` must be valid for writes of `rows.m() * n` floats.
    unsafe fn matmul_raw(&self, isa: Isa, pool: &Pool, rows: &QuantizedRows, out: *mut f32) {
        assert_eq!(rows.k, self.k, "input width");
        let tiles = self.n.div_ceil(TILE);
        let macs = rows.m * self.n * self.k;
        // Below a few hundred thousand multiply-adds a wake-up costs more than it saves.
        let parts = if macs < 1 << 18 { 1 } else { pool.threads().min(tiles) };
        // Tiles are handed out in chunks from a shared counter, so a thread
        // that a noisy neighbour slows down takes fewer of them, and one
        // that starts late takes only what is left. Chunks shrink as the
        // tiles run out (each takes an eighth of what is left between two
        // threads), so the threads finish close together and a thread
        // preempted mid-chunk holds up little; they stay even, so the
        // AVX-512 kernel can take its tiles in pairs.
        let next = AtomicUsize::new(0);
        let take = |start: usize| ((tiles - start) / (parts * 4)).max(1).next_multiple_of(2);
        let out = SendPtr(out);
        let view = self.tiles();
        pool.run_shared(parts - 1, || {
            let out = &out;
            loop {
                let mut start = next.load(Ordering::Relaxed);
                let chunk = loop {
                    if start >= tiles {
                        break 0;
                    }
                    let chunk = take(start);
                    match next.compare_exchange_weak(
                        start,
                        start + chunk,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break chunk,
                        Err(now) => start = now,
                    }
                };
                if chunk == 0 {
                    break;
                }
                let end = (start + chunk).min(tiles);
                let mut t = start;
                while t < end {
                    let pair = isa == Isa::Avx512Vnni && t + 1 < end;
                    let last = if pair { t + 1 } else { t };
                    let cols = (self.n - last * TILE).min(TILE);
                    let job =
                        TileJob { view, t, pair, rows, out: out.0.wrapping_add(t * TILE), ldo: self.n, cols };
                    // SAFETY: the job writes only its tiles' columns of each
                    // of the `m` rows of `out`, which no other job writes,
                    // and `out` outlives `run`; `isa` was chosen as supported.
                    unsafe { run_job(isa, job) };
                    t += if pair { 2 } else { 1 };
                }
            }
        });
    }
}

/// One call of a kernel: tile `t` of a matrix (and tile `t + 1` when
/// `pair`, AVX-512 only) times every input row. `out` points at tile `t`'s
/// first column of the first row; rows are `ldo` apart; `cols` is the
/// column count of the last tile (16 unless it is the matrix's last).
/// Every row of `out` must have room for the job's columns.
#[derive(Clone, Copy)]
pub(crate) struct TileJob<'a> {
    pub(crate) view: Tiles<'a>,
    pub(crate) t: usize,
    pub(crate) pair: bool,
    pub(crate) rows: &'a QuantizedRows,
    pub(crate) out: *mut f32,
    pub(crate) ldo: usize,
    pub(crate) cols: usize,
}

/// Runs a job on `isa`'s kernel for the matrix's packing.
///
/// # Safety
/// The job's output bounds hold, and `isa` is supported here.
unsafe fn run_job(isa: Isa, job: TileJob<'_>) {
    let q4 = job.view.packing == Packing::Q4_1;
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's guarantees.
        Isa::Avx512Vnni if q4 => unsafe { crate::x86::tiles_avx512::<true>(job) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's guarantees.
        Isa::Avx512Vnni => unsafe { crate::x86::tiles_avx512::<false>(job) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; AVX2 takes no pairs.
        Isa::Avx2 if q4 => unsafe { crate::x86::tile_avx2::<true>(job) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; AVX2 takes no pairs.
        Isa::Avx2 => unsafe { crate::x86::tile_avx2::<false>(job) },
        // SAFETY: as above; the scalar kernel takes no pairs.
        _ if q4 => unsafe { scalar::tile_q4_1(job) },
        // SAFETY: as above.
        _ => unsafe { scalar::tile_q8_0(job) },
    }
}

/// Input rows quantized to int8 in blocks of 32, as Q8_0 does.
pub struct QuantizedRows {
    pub(crate) m: usize,
    pub(crate) k: usize,
    /// `m * k` values.
    pub(crate) q: Vec<i8>,
    /// `m * k / 32` scales.
    pub(crate) d: Vec<f32>,
    /// `m * k / 32` block sums times 128: what the unsigned offset of
    /// packed Q8_0 weights adds to each block's dot product.
    pub(crate) c: Vec<i32>,
    /// `m * k / 32` block sums times the block's scale: the sum of the
    /// block's quantized inputs, which Q4_1's minimum multiplies.
    pub(crate) s: Vec<f32>,
}

impl std::fmt::Debug for QuantizedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedRows").field("m", &self.m).field("k", &self.k).finish_non_exhaustive()
    }
}

/// What a matmul's input rows are computed from before they are quantized,
/// so that the step before a matmul is fused into its quantization: one
/// pass over the source, no intermediate tensor.
#[derive(Clone, Copy)]
pub enum RowSource<'a> {
    /// `m` rows of `k` values, as they are.
    Plain(&'a [f32]),
    /// `m` rows of `k` values through RMSNorm: `x / sqrt(mean(x²) + eps) *
    /// weight`, in f32 and in the order candle's `rms_norm` computes it,
    /// so the fused step gives the same numbers as the unfused one.
    RmsNorm { x: &'a [f32], weight: &'a [f32], eps: f32 },
    /// `m` rows of `2k` values, gate then up, through SwiGLU: `silu(gate) *
    /// up`, in candle's order of operations, with [`crate::exp`] for libm's.
    SwiGlu(&'a [f32]),
}

impl std::fmt::Debug for RowSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowSource::Plain(x) => write!(f, "Plain({} values)", x.len()),
            RowSource::RmsNorm { x, eps, .. } => write!(f, "RmsNorm({} values, eps {eps})", x.len()),
            RowSource::SwiGlu(x) => write!(f, "SwiGlu({} values)", x.len()),
        }
    }
}

impl RowSource<'_> {
    /// Row `r` of `k` values: borrowed when plain, else computed into `scratch`.
    fn row<'s>(&'s self, isa: Isa, r: usize, k: usize, scratch: &'s mut [f32]) -> &'s [f32] {
        match *self {
            RowSource::Plain(x) => &x[r * k..(r + 1) * k],
            RowSource::RmsNorm { x, weight, eps } => {
                let x = &x[r * k..(r + 1) * k];
                let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
                let rms = (sum2 / k as f32 + eps).sqrt();
                for ((o, &v), &w) in scratch.iter_mut().zip(x).zip(weight) {
                    *o = v / rms * w;
                }
                scratch
            }
            RowSource::SwiGlu(gate_up) => {
                let (gate, up) = gate_up[r * 2 * k..(r + 1) * 2 * k].split_at(k);
                crate::math::swiglu(isa, gate, up, scratch);
                scratch
            }
        }
    }

    /// Checks the source's size for `m` rows of `k` outputs.
    fn check(&self, m: usize, k: usize) {
        match *self {
            RowSource::Plain(x) => assert_eq!(x.len(), m * k, "input size"),
            RowSource::RmsNorm { x, weight, .. } => {
                assert_eq!(x.len(), m * k, "input size");
                assert_eq!(weight.len(), k, "norm weight size");
            }
            RowSource::SwiGlu(gate_up) => assert_eq!(gate_up.len(), m * 2 * k, "gate and up size"),
        }
    }
}

impl QuantizedRows {
    /// Quantizes `m` rows of `k` values (`k` a multiple of 32), splitting
    /// large inputs over the pool.
    pub fn quantize_on(isa: Isa, pool: &Pool, x: &[f32], m: usize, k: usize) -> QuantizedRows {
        QuantizedRows::from_source_on(isa, pool, RowSource::Plain(x), m, k)
    }

    /// Computes `m` rows of `k` values from `source` and quantizes them
    /// (`k` a multiple of 32), splitting large inputs over the pool.
    pub fn from_source_on(isa: Isa, pool: &Pool, source: RowSource<'_>, m: usize, k: usize) -> QuantizedRows {
        assert!(k.is_multiple_of(QK), "row width {k} is not a multiple of {QK}");
        source.check(m, k);
        let nb = k / QK;
        let mut rows = QuantizedRows {
            m,
            k,
            q: vec![0; m * k],
            d: vec![0.0; m * nb],
            c: vec![0; m * nb],
            s: vec![0.0; m * nb],
        };
        // A norm or SwiGLU row costs several times a plain one, so those
        // are split from smaller inputs (a 32-row decode step's QKV input).
        let serial_below = match source {
            RowSource::Plain(_) => 1 << 15,
            _ => 1 << 13,
        };
        let parts = if m * k < serial_below { 1 } else { pool.threads().min(m) };
        let (q, d, c, s) = (
            SendPtr(rows.q.as_mut_ptr()),
            SendPtr(rows.d.as_mut_ptr()),
            SendPtr(rows.c.as_mut_ptr()),
            SendPtr(rows.s.as_mut_ptr()),
        );
        // Rows are taken one at a time from a shared counter, so a thread
        // that starts late or is slowed takes fewer.
        let next = AtomicUsize::new(0);
        pool.run_shared(parts - 1, || {
            let (q, d, c, s) = (&q, &d, &c, &s);
            let mut scratch = match source {
                RowSource::Plain(_) => Vec::new(),
                _ => vec![0f32; k],
            };
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= m {
                    break;
                }
                let xr = source.row(isa, r, k, &mut scratch);
                // SAFETY: row `r` of each buffer is handed out once (the
                // counter only grows), and the buffers outlive `run_shared`.
                let (qr, dr, cr, sr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(d.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(c.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(s.0.add(r * nb), nb),
                    )
                };
                quantize_row(isa, xr, BlockOut { q: qr, d: dr, c: cr, s: sr });
            }
        });
        rows
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }
}

/// One row's share of [`QuantizedRows`]: `k` values and `k / 32` of each
/// per-block figure.
pub(crate) struct BlockOut<'a> {
    pub(crate) q: &'a mut [i8],
    pub(crate) d: &'a mut [f32],
    pub(crate) c: &'a mut [i32],
    pub(crate) s: &'a mut [f32],
}

impl BlockOut<'_> {
    /// Records block `b`'s scale and the sum of its quantized values.
    pub(crate) fn block(&mut self, b: usize, scale: f32, sum: i32) {
        self.d[b] = scale;
        self.c[b] = 128 * sum;
        self.s[b] = scale * sum as f32;
    }
}

fn quantize_row(isa: Isa, x: &[f32], out: BlockOut<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path was checked to be supported before it was chosen.
        Isa::Avx512Vnni => unsafe { crate::x86::quantize_row_avx512(x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { crate::x86::quantize_row_avx2(x, out) },
        _ => scalar::quantize_row(x, out),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    /// A random `n x k` matrix as Q8_0 bytes, and its values as f32.
    pub(crate) fn random_q8_0(rng: &mut StdRng, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::with_capacity(n * k / QK * BLOCK_BYTES);
        let mut dense = Vec::with_capacity(n * k);
        for _ in 0..n * k / QK {
            let d = half::f16::from_f32(rng.random_range(0.0005f32..0.05));
            bytes.extend_from_slice(&d.to_le_bytes());
            for _ in 0..QK {
                // ggml's quantizer writes -127..=127, but -128 is a valid
                // byte, and the kernels that take magnitudes must get it right.
                let v: i8 = rng.random_range(-128..=127);
                bytes.push(v as u8);
                dense.push(d.to_f32() * f32::from(v));
            }
        }
        (bytes, dense)
    }

    /// A random `n x k` matrix as Q4_1 bytes, and its values as f32.
    pub(crate) fn random_q4_1(rng: &mut StdRng, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::with_capacity(n * k / QK * Q4_1_BLOCK_BYTES);
        let mut dense = vec![0f32; n * k];
        for blk in 0..n * k / QK {
            let d = half::f16::from_f32(rng.random_range(0.0005f32..0.01));
            let m = half::f16::from_f32(rng.random_range(-0.08f32..0.0));
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            let q: Vec<u8> = (0..QK).map(|_| rng.random_range(0..16)).collect();
            for i in 0..QK / 2 {
                bytes.push(q[i] | (q[i + QK / 2] << 4));
            }
            for (i, &v) in q.iter().enumerate() {
                dense[blk * QK + i] = d.to_f32() * f32::from(v) + m.to_f32();
            }
        }
        (bytes, dense)
    }

    /// A random matrix in `packing`, packed, and its values as f32.
    fn random_packed(rng: &mut StdRng, packing: Packing, n: usize, k: usize) -> (PackedMatrix, Vec<f32>) {
        match packing {
            Packing::Q8_0 => {
                let (bytes, dense) = random_q8_0(rng, n, k);
                (PackedMatrix::from_q8_0(&bytes, n, k).expect("pack"), dense)
            }
            Packing::Q4_1 => {
                let (bytes, dense) = random_q4_1(rng, n, k);
                (PackedMatrix::from_q4_1(&bytes, n, k).expect("pack"), dense)
            }
        }
    }

    fn random_rows(rng: &mut StdRng, m: usize, k: usize) -> Vec<f32> {
        (0..m * k).map(|_| rng.random_range(-3.0f32..3.0)).collect()
    }

    #[test]
    fn every_path_equals_the_scalar_reference_exactly() {
        let pool = Pool::new(3, Duration::from_micros(20));
        let mut rng = StdRng::seed_from_u64(7);
        for packing in [Packing::Q8_0, Packing::Q4_1] {
            every_path_equals_the_scalar_reference(&pool, &mut rng, packing);
        }
    }

    fn every_path_equals_the_scalar_reference(pool: &Pool, rng: &mut StdRng, packing: Packing) {
        // Odd shapes: a last tile of 1 to 15 rows, one block per row, row
        // counts on either side of the kernels' row groups.
        // The last shape is large enough to be quantized and multiplied on
        // several threads.
        for (m, n, k) in [
            (1, 16, 32),
            (3, 17, 64),
            (8, 40, 96),
            (9, 33, 576),
            (17, 7, 160),
            (64, 100, 256),
            (70, 200, 576),
        ] {
            let (w, _) = random_packed(rng, packing, n, k);
            let mut x = random_rows(rng, m, k);
            // An all-zero block and a block with one large value.
            x[..QK].iter_mut().for_each(|v| *v = 0.0);
            x[k - 1] = 250.0;
            let want = w.forward_on(Isa::Scalar, pool, &x, m);
            for isa in Isa::all_supported() {
                let rows = QuantizedRows::quantize_on(isa, pool, &x, m, k);
                let reference = QuantizedRows::quantize_on(Isa::Scalar, pool, &x, m, k);
                assert_eq!(
                    (&rows.q, &rows.d, &rows.c, &rows.s),
                    (&reference.q, &reference.d, &reference.c, &reference.s),
                    "{isa:?} quantization"
                );
                let got = w.forward_on(isa, pool, &x, m);
                assert_eq!(got, want, "{isa:?} {packing:?} at m={m} n={n} k={k}");
            }
        }
    }

    #[test]
    fn fused_sources_equal_quantizing_the_rows_they_compute() {
        // Large enough to be split over the pool's threads.
        let pool = Pool::new(3, Duration::from_micros(20));
        let mut rng = StdRng::seed_from_u64(13);
        let (m, k) = (70, 576);
        let x = random_rows(&mut rng, m, k);
        let weight: Vec<f32> = (0..k).map(|_| rng.random_range(0.5f32..1.5)).collect();
        let gate_up = random_rows(&mut rng, m, 2 * k);
        let normed: Vec<f32> = x
            .chunks(k)
            .flat_map(|row| {
                let rms = (row.iter().map(|v| v * v).sum::<f32>() / k as f32 + 1e-5).sqrt();
                row.iter().zip(&weight).map(move |(v, w)| v / rms * w)
            })
            .collect();
        let swiglu: Vec<f32> = gate_up
            .chunks(2 * k)
            .flat_map(|row| row[..k].iter().zip(&row[k..]).map(|(&g, u)| crate::silu(g) * u))
            .collect();
        for isa in Isa::all_supported() {
            for (source, rows) in [
                (RowSource::RmsNorm { x: &x, weight: &weight, eps: 1e-5 }, &normed),
                (RowSource::SwiGlu(&gate_up), &swiglu),
            ] {
                let fused = QuantizedRows::from_source_on(isa, &pool, source, m, k);
                let plain = QuantizedRows::quantize_on(isa, &pool, rows, m, k);
                assert_eq!(
                    (&fused.q, &fused.d, &fused.s),
                    (&plain.q, &plain.d, &plain.s),
                    "{isa:?} {source:?}"
                );
            }
        }
    }

    #[test]
    fn the_residual_is_added_to_every_output_with_the_bits_of_a_separate_add() {
        let pool = Pool::new(3, Duration::from_micros(20));
        let mut rng = StdRng::seed_from_u64(17);
        // A decode-sized output, and one split over several threads in
        // chunks that do not end on row boundaries.
        for (m, n, k) in [(3, 40, 64), (70, 200, 576)] {
            let (w, _) = random_packed(&mut rng, Packing::Q4_1, n, k);
            let x = random_rows(&mut rng, m, k);
            let residual = random_rows(&mut rng, m, n);
            let product = w.forward_on(Isa::detected(), &pool, &x, m);
            let got = w.forward_residual_on(Isa::detected(), &pool, RowSource::Plain(&x), m, &residual);
            let want: Vec<f32> = residual.iter().zip(&product).map(|(r, p)| r + p).collect();
            assert_eq!(got, want, "m={m} n={n}");
        }
    }

    #[test]
    fn products_match_the_dequantized_arithmetic() {
        let pool = Pool::new(2, Duration::from_micros(20));
        let mut rng = StdRng::seed_from_u64(11);
        for packing in [Packing::Q8_0, Packing::Q4_1] {
            products_match(&pool, &mut rng, packing);
        }
    }

    fn products_match(pool: &Pool, rng: &mut StdRng, packing: Packing) {
        let (m, n, k) = (5, 48, 320);
        let (w, dense) = random_packed(rng, packing, n, k);
        let x = random_rows(rng, m, k);
        let rows = QuantizedRows::quantize_on(Isa::detected(), pool, &x, m, k);
        let got = w.forward_on(Isa::detected(), pool, &x, m);
        for r in 0..m {
            for (b, &d) in rows.d[r * k / QK..(r + 1) * k / QK].iter().enumerate() {
                for i in 0..QK {
                    // Rounding to nearest: off by at most half a step.
                    let v = x[r * k + b * QK + i];
                    let back = d * f32::from(rows.q[r * k + b * QK + i]);
                    assert!((v - back).abs() <= d * 0.5 + 1e-6, "{v} came back as {back}");
                }
            }
            for j in 0..n {
                let wr = &dense[j * k..(j + 1) * k];
                let exact: f64 = (0..k)
                    .map(|i| {
                        f64::from(wr[i])
                            * f64::from(rows.d[r * k / QK + i / QK])
                            * f64::from(rows.q[r * k + i])
                    })
                    .sum();
                let scale: f64 = (0..k).map(|i| f64::from(wr[i].abs()) * f64::from(x[r * k + i].abs())).sum();
                let diff = (f64::from(got[r * n + j]) - exact).abs();
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "{packing:?} row {r} col {j}: {} vs {exact}",
                    got[r * n + j]
                );
                // And close to the product of the unquantized input.
                let f32_ref: f64 = (0..k).map(|i| f64::from(wr[i]) * f64::from(x[r * k + i])).sum();
                assert!((f64::from(got[r * n + j]) - f32_ref).abs() <= 0.02 * scale, "{j}");
            }
        }
    }

    #[test]
    fn malformed_matrices_are_refused() {
        assert!(PackedMatrix::from_q8_0(&[0; 34], 1, 33).is_err(), "width not a multiple of 32");
        assert!(PackedMatrix::from_q8_0(&[0; 33], 1, 32).is_err(), "short data");
        assert!(PackedMatrix::from_q8_0(&[0; 68], 2, 32).is_ok());
        assert!(PackedMatrix::from_q4_1(&[0; 20], 1, 33).is_err(), "width not a multiple of 32");
        assert!(PackedMatrix::from_q4_1(&[0; 34], 1, 32).is_err(), "Q8_0 bytes are not Q4_1 bytes");
        assert!(PackedMatrix::from_q4_1(&[0; 40], 2, 32).is_ok());
    }

    #[test]
    fn q4_1_packs_in_about_five_bits_a_weight() {
        // What a decode step at batch 1 reads: the reason to keep Q4_1.
        let (n, k) = (64, 576);
        let q8 = PackedMatrix::from_q8_0(&vec![0; n * k / QK * BLOCK_BYTES], n, k).expect("pack");
        let q4 = PackedMatrix::from_q4_1(&vec![0; n * k / QK * Q4_1_BLOCK_BYTES], n, k).expect("pack");
        assert_eq!(q8.bytes() * 8 / (n * k), 9);
        assert_eq!(q4.bytes() * 8 / (n * k), 5);
        assert_eq!((q8.packing(), q4.packing()), (Packing::Q8_0, Packing::Q4_1));
    }
}
