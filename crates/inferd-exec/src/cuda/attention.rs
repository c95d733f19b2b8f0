//! Attention of the CUDA executor: per layer, write this step's K/V through
//! the slot mapping, then run the step's planned kernel over the paged cache.

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use inferd_contract::ExecError;
use inferd_kernels::{AttentionPlan, AttnArgs, AttnShape, Launch, StepMeta};
use inferd_models::AttentionBackend;

use super::device::{Arg, DevArgs, Kernels, addr, buf_addr, launch};

/// One layer's keys and values: `[num_blocks, block_size, kv_heads,
/// head_dim]` each, in the compute dtype, as raw device memory.
#[derive(Debug)]
pub(crate) struct LayerCache {
    pub k: CudaSlice<u8>,
    pub v: CudaSlice<u8>,
}

/// Everything one forward pass's attention needs.
pub(crate) struct CudaAttention<'a> {
    pub stream: &'a Arc<CudaStream>,
    pub kernels: &'a Kernels,
    pub cache: &'a [LayerCache],
    pub shape: AttnShape,
    pub plan: AttentionPlan,
    /// The step's metadata, uploaded once, and where each array lies in it.
    pub meta: &'a Tensor,
    pub layout: &'a StepMeta,
    pub num_tokens: u32,
    pub max_blocks: u32,
    /// f32 scratch of a split-K step.
    pub workspace: Option<Tensor>,
}

fn candle_err(e: ExecError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CudaAttention<'_> {
    fn meta_ptr(&self, r: &Range<usize>) -> Result<Arg, ExecError> {
        let base = addr(self.meta, self.stream)?;
        Ok(Arg::Ptr(base + (r.start * 4) as u64))
    }

    /// Writes this step's K and V rows (`(T, kv_heads, D)`) into `layer`'s
    /// cache through the slot mapping.
    pub(crate) fn write_kv(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(), ExecError> {
        let row = self.shape.num_kv_heads * self.shape.head_dim;
        let (k, v) = (contiguous(k)?, contiguous(v)?);
        let cache = &self.cache[layer];
        let (kc, vc) = (Arg::Ptr(buf_addr(&cache.k, self.stream)), Arg::Ptr(buf_addr(&cache.v, self.stream)));
        let l = Launch { grid: (self.num_tokens, 1, 1), block: (row.min(256), 1, 1), shared_mem_bytes: 0 };
        let (kp, vp) = (Arg::Ptr(addr(&k, self.stream)?), Arg::Ptr(addr(&v, self.stream)?));
        let slots = self.meta_ptr(&self.layout.slot_mapping)?;
        launch(
            self.stream,
            &self.kernels.cache_write,
            l,
            &[kp, vp, kc, vc, slots, Arg::U32(row), Arg::U32(row), Arg::U32(row)],
        )?;
        // k and v live until their kernel is queued.
        drop((k, v));
        Ok(())
    }

    /// Attention of every query row of `q` (`(T, heads, D)`) over `layer`'s
    /// cache with the step's plan; returns `(T, heads * D)`.
    pub(crate) fn attention(&self, layer: usize, q: &Tensor) -> Result<Tensor, ExecError> {
        let s = self.shape;
        let (t, d) = (self.num_tokens, s.head_dim);
        let q = contiguous(q)?;
        let cache = &self.cache[layer];
        let (kc, vc) = (Arg::Ptr(buf_addr(&cache.k, self.stream)), Arg::Ptr(buf_addr(&cache.v, self.stream)));
        let out = Tensor::zeros((t as usize, (s.num_heads * d) as usize), q.dtype(), q.device())
            .map_err(|e| ExecError::Backend(e.to_string()))?;
        let (op, qp) = (Arg::Ptr(addr(&out, self.stream)?), Arg::Ptr(addr(&q, self.stream)?));
        let args = Arg::Args(DevArgs(AttnArgs {
            q_stride: s.num_heads * d,
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            block_size: s.block_size,
            max_blocks: self.max_blocks,
            scale: 1.0 / (d as f32).sqrt(),
        }));
        let elem = q.dtype().size_in_bytes() as u32;
        let token_seq = self.meta_ptr(&self.layout.token_seq)?;
        let positions = self.meta_ptr(&self.layout.positions)?;
        let tables = self.meta_ptr(&self.layout.block_tables)?;
        let l = self.plan.launch(&s, elem, t, self.layout.num_tiles());
        match self.plan {
            AttentionPlan::Simple => launch(
                self.stream,
                &self.kernels.simple,
                l,
                &[op, qp, kc, vc, token_seq, positions, tables, args],
            )?,
            AttentionPlan::Split { segments, seg_len } => {
                let ws = self.workspace.as_ref().ok_or(ExecError::Backend("no split-K workspace".into()))?;
                let wp = Arg::Ptr(addr(ws, self.stream)?);
                let split_args = [wp, qp, kc, vc, token_seq, positions, tables, args, Arg::U32(seg_len)];
                launch(self.stream, &self.kernels.split, l, &split_args)?;
                let merge = self.plan.merge_launch(&s, t).expect("a split plan merges");
                launch(
                    self.stream,
                    &self.kernels.merge,
                    merge,
                    &[op, wp, Arg::U32(s.num_heads), Arg::U32(segments)],
                )?;
            }
            AttentionPlan::Tiled { .. } => {
                let tiled = self
                    .kernels
                    .tiled
                    .as_ref()
                    .ok_or(ExecError::Backend("no tiled kernel for f32".into()))?;
                let tiles = [
                    op,
                    qp,
                    kc,
                    vc,
                    self.meta_ptr(&self.layout.tile_seq)?,
                    self.meta_ptr(&self.layout.tile_row)?,
                    self.meta_ptr(&self.layout.query_start)?,
                    self.meta_ptr(&self.layout.context_lens)?,
                    tables,
                    args,
                ];
                launch(self.stream, tiled, l, &tiles)?;
            }
        }
        // q lives until its kernels are queued.
        drop(q);
        Ok(out)
    }
}

fn contiguous(t: &Tensor) -> Result<Tensor, ExecError> {
    t.contiguous().map_err(|e| ExecError::Backend(e.to_string()))
}

impl AttentionBackend for CudaAttention<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        self.write_kv(layer, k, v).and_then(|()| self.attention(layer, q)).map_err(candle_err)
    }
}
