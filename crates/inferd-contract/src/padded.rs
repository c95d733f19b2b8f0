//! A step as a compiled (static-shape) model runs it: every array padded to
//! the compiled bucket the scheduler chose, so the worker calls the model
//! with exactly the shapes it was compiled for.

use inferd_core::TokenId;
use serde::{Deserialize, Serialize};

use crate::{ModelInput, PaddedShape};

/// The token id of padding positions.
pub const PAD_TOKEN: TokenId = 0;
/// The KV slot of padding positions: written nowhere.
pub const PAD_SLOT: u32 = u32::MAX;

/// Which compiled submodel runs a step: context encoding (a whole prompt,
/// less its prefix-cache hit) or token generation (one token per sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Prefill,
    Decode,
}

/// One step padded to `shape`. The real sequences take the first rows and
/// the real tokens the first positions (sequence after sequence, as in
/// [`ModelInput`]); the rest is padding: token [`PAD_TOKEN`] at position 0
/// written to [`PAD_SLOT`], rows with no tokens (`query_start` repeats its
/// last offset), context 0 and a block table of zeros. On the wire the
/// arrays sit beside `phase` and `shape` in one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaddedStep {
    pub phase: Phase,
    pub shape: PaddedShape,
    /// The step's arrays at the bucket's shape: `token_ids`, `positions`,
    /// `slot_mapping` of `shape.tokens`; `query_start` of `shape.batch + 1`;
    /// `context_lens` of `shape.batch`; `block_tables` of `shape.batch`
    /// rows. `seq_ids`, `logits_rows` and the lifecycle are the real ones.
    #[serde(flatten)]
    pub padded: ModelInput,
}

impl PaddedStep {
    /// Pads `input` (already validated) to `shape`.
    pub fn pad(input: &ModelInput, phase: Phase, shape: PaddedShape) -> Result<Self, String> {
        let (s, t) = (input.num_seqs(), input.num_tokens());
        if s > shape.batch || t > shape.tokens {
            return Err(format!("{s} sequences of {t} tokens do not fit the bucket {shape:?}"));
        }
        let mut padded = input.clone();
        padded.token_ids.resize(shape.tokens, PAD_TOKEN);
        padded.positions.resize(shape.tokens, 0);
        padded.slot_mapping.resize(shape.tokens, PAD_SLOT);
        padded.query_start.resize(shape.batch + 1, t as u32);
        padded.context_lens.resize(shape.batch, 0);
        padded.block_tables.resize(shape.batch * input.max_blocks_per_seq, 0);
        padded.padded_shape = Some(shape);
        Ok(PaddedStep { phase, shape, padded })
    }

    /// The real step inside, after checking that every array has the
    /// bucket's shape and that the padding is padding: what a worker checks
    /// before it calls its model.
    pub fn unpad(&self) -> Result<ModelInput, String> {
        let PaddedShape { batch, tokens } = self.shape;
        let p = &self.padded;
        let width = p.max_blocks_per_seq;
        let lens = [
            ("token_ids", p.token_ids.len(), tokens),
            ("positions", p.positions.len(), tokens),
            ("slot_mapping", p.slot_mapping.len(), tokens),
            ("query_start", p.query_start.len(), batch + 1),
            ("context_lens", p.context_lens.len(), batch),
            ("block_tables", p.block_tables.len(), batch * width),
        ];
        if let Some((name, got, want)) = lens.into_iter().find(|(_, got, want)| got != want) {
            return Err(format!("{name} has {got} entries; the bucket {batch}x{tokens} needs {want}"));
        }
        let s = p.seq_ids.len();
        if s == 0 || s > batch {
            return Err(format!("{s} sequences in a bucket of batch {batch}"));
        }
        let t = p.query_start[s] as usize;
        if t > tokens {
            return Err(format!("{t} tokens in a bucket of {tokens}"));
        }
        let padding_ok = p.query_start[s..].iter().all(|&q| q as usize == t)
            && p.context_lens[s..].iter().all(|&c| c == 0)
            && p.block_tables[s * width..].iter().all(|&b| b == 0)
            && p.token_ids[t..].iter().all(|&x| x == PAD_TOKEN)
            && p.positions[t..].iter().all(|&x| x == 0)
            && p.slot_mapping[t..].iter().all(|&x| x == PAD_SLOT);
        if !padding_ok {
            return Err("padding rows and positions must be empty: pad token, position 0, PAD_SLOT".into());
        }
        let mut input = p.clone();
        input.token_ids.truncate(t);
        input.positions.truncate(t);
        input.slot_mapping.truncate(t);
        input.query_start.truncate(s + 1);
        input.context_lens.truncate(s);
        input.block_tables.truncate(s * width);
        input.max_query_len = (0..s).map(|i| p.query_start[i + 1] - p.query_start[i]).max().unwrap_or(0);
        input.max_context_len = input.context_lens.iter().copied().max().unwrap_or(0);
        input.padded_shape = Some(self.shape);
        if self.phase == Phase::Decode && input.max_query_len != 1 {
            return Err("a decode step runs one token per sequence".into());
        }
        Ok(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use inferd_core::RequestId;

    fn input() -> ModelInput {
        let mut input = ModelInput::new(2);
        input.push_seq(RequestId(1), &[10, 11, 12], 0, &[4], 4, true);
        input.push_seq(RequestId(2), &[20, 21], 4, &[5, 6], 4, true);
        input
    }

    #[test]
    fn padding_round_trips_and_is_checked() {
        let shape = PaddedShape { batch: 4, tokens: 8 };
        let step = PaddedStep::pad(&input(), Phase::Prefill, shape).unwrap();
        let p = &step.padded;
        assert_eq!(p.token_ids, [10, 11, 12, 20, 21, 0, 0, 0]);
        assert_eq!(p.slot_mapping[5..], [PAD_SLOT; 3]);
        assert_eq!(p.query_start, [0, 3, 5, 5, 5]);
        assert_eq!(p.context_lens, [3, 6, 0, 0]);
        assert_eq!(p.block_tables, [4, 0, 5, 6, 0, 0, 0, 0]);
        let json = serde_json::to_value(&step).unwrap();
        assert_eq!(json["phase"], "prefill");
        assert_eq!(json["token_ids"][7], 0, "the arrays sit beside phase and shape");
        assert_eq!(serde_json::from_value::<PaddedStep>(json).unwrap(), step);
        let mut want = input();
        want.padded_shape = Some(shape);
        assert_eq!(step.unpad().unwrap(), want);

        let broken = |f: &dyn Fn(&mut PaddedStep), why: &str| {
            let mut s = step.clone();
            f(&mut s);
            let err = s.unpad().unwrap_err();
            assert!(err.contains(why), "{err:?} should mention {why:?}");
        };
        broken(&|s| s.padded.token_ids.push(0), "token_ids has 9 entries");
        broken(&|s| s.padded.slot_mapping[6] = 3, "padding");
        broken(&|s| s.padded.context_lens[3] = 1, "padding");
        broken(&|s| s.padded.seq_ids.clear(), "0 sequences");
        broken(&|s| s.phase = Phase::Decode, "one token per sequence");
        assert!(PaddedStep::pad(&input(), Phase::Prefill, PaddedShape { batch: 1, tokens: 8 }).is_err());
    }
}
