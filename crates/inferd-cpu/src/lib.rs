//! inferd's CPU kernels.
//!
//! A linear layer's Q8_0 or Q4_1 weights are packed once, at load, into
//! tiles of 16 output rows whose bytes are interleaved for the int8
//! dot-product instructions (see [`packed`]); each matmul quantizes its
//! input rows to int8 once and runs every tile on the pool of compute
//! threads ([`pool`]). The instruction set is chosen at run time ([`Isa`]):
//! AVX-512 VNNI, AVX2, or a portable scalar path that is also the reference
//! the others are tested against.

pub mod math;
pub mod packed;
pub mod pool;

mod isa;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use isa::Isa;
pub use math::{exp, silu};
pub use packed::{PackedMatrix, Packing, QuantizedRows, RowSource};
pub use pool::Pool;
