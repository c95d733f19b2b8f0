//! One step's metadata as one u32 buffer, uploaded once per step (not per
//! layer): every kernel and the model's own gathers read views of it.

use std::ops::Range;

use inferd_contract::ModelInput;

/// The packed buffer and where each array lies in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMeta {
    pub data: Vec<u32>,
    /// `T` token ids (the embedding gather).
    pub token_ids: Range<usize>,
    /// `T` positions (RoPE and the causal rule).
    pub positions: Range<usize>,
    /// `T` KV slots to write.
    pub slot_mapping: Range<usize>,
    /// `T` sequence index of each token.
    pub token_seq: Range<usize>,
    /// `S + 1` offsets of each sequence's tokens.
    pub query_start: Range<usize>,
    /// `S` context lengths.
    pub context_lens: Range<usize>,
    /// `S * max_blocks_per_seq` block ids.
    pub block_tables: Range<usize>,
    /// Rows whose logits are wanted.
    pub logits_rows: Range<usize>,
    /// Sequence and first row of each query tile (tiled kernel).
    pub tile_seq: Range<usize>,
    pub tile_row: Range<usize>,
}

/// The query tiles of a step: rows are (token, head within the group)
/// pairs of one sequence, `rows_per_tile` per tile; returns each tile's
/// sequence and first row.
pub fn query_tiles(query_start: &[u32], group: u32, rows_per_tile: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut seqs, mut rows) = (Vec::new(), Vec::new());
    for (s, w) in query_start.windows(2).enumerate() {
        let n = (w[1] - w[0]) * group;
        for r in (0..n).step_by(rows_per_tile.max(1) as usize) {
            seqs.push(s as u32);
            rows.push(r);
        }
    }
    (seqs, rows)
}

impl StepMeta {
    /// Packs `input`; with `tiles = Some((group, rows_per_tile))` also the
    /// query tiles of the tiled kernel.
    pub fn pack(input: &ModelInput, tiles: Option<(u32, u32)>) -> StepMeta {
        let mut data = Vec::with_capacity(4 * input.num_tokens() + input.block_tables.len() + 64);
        let mut put = |xs: &[u32]| {
            let start = data.len();
            data.extend_from_slice(xs);
            start..data.len()
        };
        let token_ids = put(&input.token_ids);
        let positions = put(&input.positions);
        let slot_mapping = put(&input.slot_mapping);
        let mut seq_of = Vec::with_capacity(input.num_tokens());
        for s in 0..input.num_seqs() {
            seq_of.extend(std::iter::repeat_n(s as u32, input.query_range(s).len()));
        }
        let token_seq = put(&seq_of);
        let query_start = put(&input.query_start);
        let context_lens = put(&input.context_lens);
        let block_tables = put(&input.block_tables);
        let logits_rows = put(&input.logits_rows);
        let (tseq, trow) =
            tiles.map_or_else(Default::default, |(g, m)| query_tiles(&input.query_start, g, m));
        let tile_seq = put(&tseq);
        let tile_row = put(&trow);
        StepMeta {
            data,
            token_ids,
            positions,
            slot_mapping,
            token_seq,
            query_start,
            context_lens,
            block_tables,
            logits_rows,
            tile_seq,
            tile_row,
        }
    }

    /// Number of query tiles packed.
    pub fn num_tiles(&self) -> u32 {
        self.tile_seq.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use inferd_core::RequestId;

    use super::*;

    #[test]
    fn tiles_cover_every_row_of_every_sequence_once() {
        // 3 query tokens x group 3 = 9 rows; 1 token = 3 rows; 12 tokens = 36 rows.
        let (seqs, rows) = query_tiles(&[0, 3, 4, 16], 3, 16);
        assert_eq!(seqs, [0, 1, 2, 2, 2]);
        assert_eq!(rows, [0, 0, 0, 16, 32]);
        // A tile never mixes sequences, and every row is in exactly one tile.
        let total: u32 = [9u32, 3, 36].iter().sum();
        let covered: u32 = seqs
            .iter()
            .zip(&rows)
            .map(|(&s, &r)| {
                let n = [9u32, 3, 36][s as usize];
                (n - r).min(16)
            })
            .sum();
        assert_eq!(covered, total);
    }

    #[test]
    fn one_buffer_holds_every_array() {
        let mut input = ModelInput::new(0);
        input.push_seq(RequestId(1), &[5, 6, 7], 0, &[4], 16, true);
        input.push_seq(RequestId(2), &[8], 20, &[2, 9], 16, true);
        let meta = StepMeta::pack(&input, Some((2, 32)));
        let at = |r: &Range<usize>| meta.data[r.clone()].to_vec();
        assert_eq!(at(&meta.token_ids), [5, 6, 7, 8]);
        assert_eq!(at(&meta.positions), [0, 1, 2, 20]);
        assert_eq!(at(&meta.slot_mapping), [64, 65, 66, 148]);
        assert_eq!(at(&meta.token_seq), [0, 0, 0, 1]);
        assert_eq!(at(&meta.query_start), [0, 3, 4]);
        assert_eq!(at(&meta.context_lens), [3, 21]);
        assert_eq!(at(&meta.block_tables), [4, 0, 2, 9]);
        assert_eq!(at(&meta.logits_rows), [2, 3]);
        assert_eq!((at(&meta.tile_seq), at(&meta.tile_row)), (vec![0, 1], vec![0, 0]));
        assert_eq!(meta.num_tiles(), 2);
        assert_eq!(StepMeta::pack(&input, None).num_tiles(), 0);
    }
}
