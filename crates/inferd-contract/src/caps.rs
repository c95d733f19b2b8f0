use serde::{Deserialize, Serialize};

use inferd_core::SamplingParams;

use crate::{DType, DeviceSpec};

/// Shapes a static-shape backend (Neuron) was compiled for. It runs only
/// these: the engine pads every step to one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeBuckets {
    /// Sequences per step, strictly ascending.
    pub batch_sizes: Vec<usize>,
    /// Packed tokens per step, strictly ascending.
    pub token_counts: Vec<usize>,
}

impl ShapeBuckets {
    /// Checks that both lists are positive and strictly ascending.
    pub fn validate(&self) -> Result<(), String> {
        for (name, list) in [("batch_sizes", &self.batch_sizes), ("token_counts", &self.token_counts)] {
            if list.is_empty() || list.contains(&0) || !list.is_sorted_by(|a, b| a < b) {
                return Err(format!("{name} must be positive and strictly ascending, got {list:?}"));
            }
        }
        Ok(())
    }

    /// True when `shape` is exactly one of the compiled shapes.
    pub fn contains(&self, shape: PaddedShape) -> bool {
        self.batch_sizes.contains(&shape.batch) && self.token_counts.contains(&shape.tokens)
    }
}

/// The compiled shape one step is padded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaddedShape {
    pub batch: usize,
    pub tokens: usize,
}

/// What a backend can run; bounds what the scheduler plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub device: DeviceSpec,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache, sized from a memory budget at start-up.
    pub num_blocks: usize,
    /// Most tokens one sequence may hold (prompt + output).
    pub max_model_len: usize,
    /// Vocabulary size: the width of a logits row.
    pub vocab_size: usize,
    /// The dtype activations are computed in.
    pub compute_dtype: DType,
    /// Compute dtypes this backend can run.
    pub supported_dtypes: Vec<DType>,
    /// Element type of the KV cache.
    pub kv_dtype: DType,
    /// Compiled shapes, for static-shape backends; `None` runs any shape.
    pub shape_buckets: Option<ShapeBuckets>,
    /// Set when `execute` returns sampled tokens rather than logits: what
    /// the device's sampler supports. Requests asking for more are refused.
    #[serde(default)]
    pub device_sampling: Option<DeviceSampling>,
}

/// The sampling a backend that samples on its device (Neuron) supports:
/// temperature, top-p, top-k up to `max_top_k` (always applied: without a
/// `top_k` the draw is from the `max_top_k` most likely tokens, as NxDI's
/// `global_topk` does), and seeds. No penalties, logit bias, min-p,
/// min_tokens or logprobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSampling {
    pub max_top_k: u32,
}

impl DeviceSampling {
    /// The first parameter of `p` this sampler cannot honour, as the
    /// request names it, with the reason.
    pub fn refuses(&self, p: &SamplingParams) -> Option<(&'static str, String)> {
        let device = "this model samples on its device";
        let unsupported = [
            ("logprobs", p.logprobs.is_some()),
            ("repetition_penalty", p.repetition_penalty != 1.0),
            ("frequency_penalty", p.frequency_penalty != 0.0),
            ("presence_penalty", p.presence_penalty != 0.0),
            ("logit_bias", !p.logit_bias.is_empty()),
            ("min_p", p.min_p != 0.0),
            ("min_tokens", p.min_tokens != 0),
        ];
        if let Some((name, _)) = unsupported.into_iter().find(|(_, used)| *used) {
            return Some((
                name,
                format!(
                    "{name} is not supported: {device}, which supports temperature, top_p, top_k (at most {}) and seed",
                    self.max_top_k
                ),
            ));
        }
        match p.top_k {
            Some(k) if k > self.max_top_k => {
                Some(("top_k", format!("top_k must be at most {}: {device}", self.max_top_k)))
            }
            _ => None,
        }
    }

    /// The top-k the device applies for `p`.
    pub fn effective_top_k(&self, p: &SamplingParams) -> u32 {
        p.top_k.map_or(self.max_top_k, |k| k.min(self.max_top_k))
    }
}

impl Capabilities {
    /// True when `execute` returns sampled tokens rather than logits.
    pub fn samples_on_device(&self) -> bool {
        self.device_sampling.is_some()
    }

    /// Tokens the whole KV cache holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_validate_and_contain_only_compiled_shapes() {
        let b = ShapeBuckets { batch_sizes: vec![1, 4], token_counts: vec![128, 512] };
        assert!(b.validate().is_ok());
        assert!(b.contains(PaddedShape { batch: 4, tokens: 128 }));
        assert!(!b.contains(PaddedShape { batch: 3, tokens: 128 }), "3 is not compiled");
        let unsorted = ShapeBuckets { batch_sizes: vec![4, 1], token_counts: vec![128] };
        assert!(unsorted.validate().unwrap_err().contains("batch_sizes"));
        let zero = ShapeBuckets { batch_sizes: vec![1], token_counts: vec![0, 8] };
        assert!(zero.validate().unwrap_err().contains("token_counts"));
    }

    #[test]
    fn device_samplers_refuse_what_they_cannot_do_by_name() {
        let d = DeviceSampling { max_top_k: 256 };
        let plain = SamplingParams { temperature: 0.7, top_p: 0.9, seed: Some(1), ..Default::default() };
        assert_eq!(d.refuses(&plain), None);
        assert_eq!(d.effective_top_k(&plain), 256, "the global top-k applies");
        assert_eq!(d.effective_top_k(&SamplingParams { top_k: Some(5), ..plain.clone() }), 5);
        for (name, p) in [
            ("logprobs", SamplingParams { logprobs: Some(0), ..plain.clone() }),
            ("presence_penalty", SamplingParams { presence_penalty: 0.5, ..plain.clone() }),
            ("min_tokens", SamplingParams { min_tokens: 2, ..plain.clone() }),
            ("top_k", SamplingParams { top_k: Some(257), ..plain.clone() }),
        ] {
            let (got, message) = d.refuses(&p).expect("refused");
            assert_eq!(got, name);
            assert!(message.contains(name) && message.contains("256"), "{message}");
        }
    }
}
