//! Q8_0 matmuls over weights packed for int8 dot products.
//!
//! Q8_0 stores a row in blocks of 32 int8 values with one f16 scale each.
//! [`PackedQ8`] regroups a matrix's rows into tiles of 16: for each block,
//! the 16 rows' scales as f32, then eight 64-byte lines, line `g` holding
//! values `4g..4g+4` of each of the 16 rows, offset by 128 into unsigned
//! bytes. One `vpdpbusd` of a line against four activation bytes broadcast
//! to every lane then adds four products into each of the 16 rows' sums:
//! no horizontal sums and no shuffles in the inner loop. The +128 offset
//! (the instruction wants one unsigned operand) is taken back out once per
//! block with the activation block's own sum.
//!
//! [`QuantizedRows`] quantizes the input rows once per matmul the way Q8_0
//! does (scale = max |x| / 127, values rounded to nearest, ties to even),
//! keeping the scale in f32 where Q8_0 rounds it to f16.

use crate::isa::Isa;
use crate::pool::{Pool, SendPtr};
use crate::scalar;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Values per Q8_0 block.
pub const QK: usize = 32;
/// Output rows per packed tile.
pub const TILE: usize = 16;
/// 64-byte lines per block of a tile.
pub const LINES: usize = QK / 4;
/// Bytes of one Q8_0 block as candle and GGUF store it (f16 scale, 32 values).
pub const BLOCK_BYTES: usize = 2 + QK;

/// 16 rows × 4 bytes, aligned for 512-bit loads.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// A Q8_0 matrix of `n` output rows and `k` inputs, packed for the kernels.
pub struct PackedQ8 {
    n: usize,
    k: usize,
    lines: Vec<Line>,
    scales: Vec<f32>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8").field("n", &self.n).field("k", &self.k).finish_non_exhaustive()
    }
}

/// The view of a packed matrix a kernel works on.
#[derive(Clone, Copy)]
pub(crate) struct Tiles<'a> {
    pub(crate) nb: usize,
    pub(crate) lines: &'a [Line],
    pub(crate) scales: &'a [f32],
}

impl Tiles<'_> {
    /// Tile `t`'s lines (`nb * LINES`) and scales (`nb * TILE`).
    pub(crate) fn tile(&self, t: usize) -> (&[Line], &[f32]) {
        let (l, s) = (self.nb * LINES, self.nb * TILE);
        (&self.lines[t * l..(t + 1) * l], &self.scales[t * s..(t + 1) * s])
    }
}

impl PackedQ8 {
    /// Packs a matrix given as Q8_0 blocks, row after row (`n * k / 32`
    /// blocks of [`BLOCK_BYTES`]). Rows past `n` in the last tile are zeros.
    pub fn from_q8_0(bytes: &[u8], n: usize, k: usize) -> Result<PackedQ8, String> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(format!("Q8_0 rows need a multiple of {QK} values, not {k}"));
        }
        let nb = k / QK;
        if bytes.len() != n * nb * BLOCK_BYTES {
            return Err(format!(
                "{} bytes for a {n}x{k} Q8_0 matrix, expected {}",
                bytes.len(),
                n * nb * BLOCK_BYTES
            ));
        }
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
        Ok(PackedQ8 { n, k, lines, scales })
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    fn tiles(&self) -> Tiles<'_> {
        Tiles { nb: self.k / QK, lines: &self.lines, scales: &self.scales }
    }

    /// `x` (`m` rows of `k`) times the matrix's transpose: `m` rows of `n`,
    /// on the detected kernel path and the process's pool.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.forward_on(Isa::detected(), Pool::global(), x, m)
    }

    /// As [`forward`](Self::forward), on a given path and pool.
    pub fn forward_on(&self, isa: Isa, pool: &Pool, x: &[f32], m: usize) -> Vec<f32> {
        let rows = QuantizedRows::quantize_on(isa, pool, x, m, self.k);
        let mut out = vec![0f32; m * self.n];
        self.matmul_on(isa, pool, &rows, &mut out);
        out
    }

    /// Multiplies already quantized rows into `out` (`rows.m() * n`).
    pub fn matmul_on(&self, isa: Isa, pool: &Pool, rows: &QuantizedRows, out: &mut [f32]) {
        assert_eq!(rows.k, self.k, "input width");
        assert_eq!(out.len(), rows.m * self.n, "output size");
        let tiles = self.n.div_ceil(TILE);
        let macs = rows.m * self.n * self.k;
        // Below a few hundred thousand multiply-adds a wake-up costs more than it saves.
        let parts = if macs < 1 << 18 { 1 } else { pool.threads().min(tiles) };
        // Tiles are handed out in chunks from a shared counter, so a thread
        // that a noisy neighbour slows down takes fewer of them.
        // Even, so the AVX-512 kernel can take its tiles in pairs.
        let chunk = (tiles / (parts * 4)).max(1).next_multiple_of(2);
        let next = AtomicUsize::new(0);
        let out = SendPtr(out.as_mut_ptr());
        let view = self.tiles();
        pool.run(parts, |_| {
            let out = &out;
            loop {
                let start = next.fetch_add(chunk, Ordering::Relaxed);
                if start >= tiles {
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

/// Runs a job on `isa`'s kernel.
///
/// # Safety
/// The job's output bounds hold, and `isa` is supported here.
unsafe fn run_job(isa: Isa, job: TileJob<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's guarantees.
        Isa::Avx512Vnni => unsafe { crate::x86::tiles_avx512(job) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; AVX2 takes no pairs.
        Isa::Avx2 => unsafe { crate::x86::tile_avx2(job) },
        // SAFETY: as above; the scalar kernel takes no pairs.
        _ => unsafe { scalar::tile(job) },
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
    /// `m * k / 32` block sums times 128: what the unsigned offset of the
    /// packed weights adds to each block's dot product.
    pub(crate) c: Vec<i32>,
}

impl std::fmt::Debug for QuantizedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedRows").field("m", &self.m).field("k", &self.k).finish_non_exhaustive()
    }
}

impl QuantizedRows {
    /// Quantizes `m` rows of `k` values (`k` a multiple of 32), splitting
    /// large inputs over the pool.
    pub fn quantize_on(isa: Isa, pool: &Pool, x: &[f32], m: usize, k: usize) -> QuantizedRows {
        assert!(k.is_multiple_of(QK), "row width {k} is not a multiple of {QK}");
        assert_eq!(x.len(), m * k, "input size");
        let nb = k / QK;
        let mut rows = QuantizedRows { m, k, q: vec![0; m * k], d: vec![0.0; m * nb], c: vec![0; m * nb] };
        let parts = if m * k < 1 << 15 { 1 } else { pool.threads().min(m) };
        let per = m.div_ceil(parts);
        let (q, d, c) =
            (SendPtr(rows.q.as_mut_ptr()), SendPtr(rows.d.as_mut_ptr()), SendPtr(rows.c.as_mut_ptr()));
        pool.run(parts, |p| {
            let (q, d, c) = (&q, &d, &c);
            for r in p * per..((p + 1) * per).min(m) {
                let xr = &x[r * k..(r + 1) * k];
                // SAFETY: row `r` of each buffer is written by this part only,
                // and the buffers outlive `run`.
                let (qr, dr, cr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(d.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(c.0.add(r * nb), nb),
                    )
                };
                quantize_row(isa, xr, qr, dr, cr);
            }
        });
        rows
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }
}

fn quantize_row(isa: Isa, x: &[f32], q: &mut [i8], d: &mut [f32], c: &mut [i32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path was checked to be supported before it was chosen.
        Isa::Avx512Vnni => unsafe { crate::x86::quantize_row_avx512(x, q, d, c) },
        _ => scalar::quantize_row(x, q, d, c),
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
                let v: i8 = rng.random_range(-127..=127);
                bytes.push(v as u8);
                dense.push(d.to_f32() * f32::from(v));
            }
        }
        (bytes, dense)
    }

    fn random_rows(rng: &mut StdRng, m: usize, k: usize) -> Vec<f32> {
        (0..m * k).map(|_| rng.random_range(-3.0f32..3.0)).collect()
    }

    #[test]
    fn every_path_equals_the_scalar_reference_exactly() {
        let pool = Pool::new(3, Duration::from_micros(20));
        let mut rng = StdRng::seed_from_u64(7);
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
            let (bytes, _) = random_q8_0(&mut rng, n, k);
            let w = PackedQ8::from_q8_0(&bytes, n, k).expect("pack");
            let mut x = random_rows(&mut rng, m, k);
            // An all-zero block and a block with one large value.
            x[..QK].iter_mut().for_each(|v| *v = 0.0);
            x[k - 1] = 250.0;
            let want = w.forward_on(Isa::Scalar, &pool, &x, m);
            for isa in Isa::all_supported() {
                let rows = QuantizedRows::quantize_on(isa, &pool, &x, m, k);
                let reference = QuantizedRows::quantize_on(Isa::Scalar, &pool, &x, m, k);
                assert_eq!(
                    (&rows.q, &rows.d, &rows.c),
                    (&reference.q, &reference.d, &reference.c),
                    "{isa:?} quantization"
                );
                let got = w.forward_on(isa, &pool, &x, m);
                assert_eq!(got, want, "{isa:?} at m={m} n={n} k={k}");
            }
        }
    }

    #[test]
    fn products_match_the_dequantized_arithmetic() {
        let pool = Pool::new(2, Duration::from_micros(20));
        let mut rng = StdRng::seed_from_u64(11);
        let (m, n, k) = (5, 48, 320);
        let (bytes, dense) = random_q8_0(&mut rng, n, k);
        let w = PackedQ8::from_q8_0(&bytes, n, k).expect("pack");
        let x = random_rows(&mut rng, m, k);
        let rows = QuantizedRows::quantize_on(Isa::detected(), &pool, &x, m, k);
        let got = w.forward_on(Isa::detected(), &pool, &x, m);
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
                assert!(diff <= 1e-5 * scale.max(1.0), "row {r} col {j}: {} vs {exact}", got[r * n + j]);
                // And close to the product of the unquantized input.
                let f32_ref: f64 = (0..k).map(|i| f64::from(wr[i]) * f64::from(x[r * k + i])).sum();
                assert!((f64::from(got[r * n + j]) - f32_ref).abs() <= 0.02 * scale, "{j}");
            }
        }
    }

    #[test]
    fn malformed_matrices_are_refused() {
        assert!(PackedQ8::from_q8_0(&[0; 34], 1, 33).is_err(), "width not a multiple of 32");
        assert!(PackedQ8::from_q8_0(&[0; 33], 1, 32).is_err(), "short data");
        assert!(PackedQ8::from_q8_0(&[0; 68], 2, 32).is_ok());
    }
}
