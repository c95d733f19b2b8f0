/// One step's flat batch: the scheduled tokens of all sequences packed
/// together, with everything attention needs to find each sequence's KV.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelInput {
    /// `T` token ids.
    pub token_ids: Vec<u32>,
    /// Each token's position in its own sequence.
    pub positions: Vec<u32>,
    /// Each token's KV slot: `block * block_size + offset`.
    pub slot_mapping: Vec<u32>,
    /// `S + 1` offsets: sequence `s` owns tokens `query_start[s]..query_start[s + 1]`.
    pub query_start: Vec<u32>,
    /// Tokens each sequence has in the cache once this step's are written.
    pub context_lens: Vec<u32>,
    /// `S * max_blocks_per_seq` block ids, row `s` for sequence `s`, padded with 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    /// Rows of the batch whose logits are sampled, ascending.
    pub logits_rows: Vec<u32>,
}

impl ModelInput {
    /// Number of packed tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Block table row of sequence `s`.
    pub fn block_table(&self, s: usize) -> &[u32] {
        &self.block_tables[s * self.max_blocks_per_seq..(s + 1) * self.max_blocks_per_seq]
    }

    /// Checks the invariants an executor relies on, so a bad input is an
    /// error rather than an out-of-bounds access.
    pub fn validate(&self, block_size: usize, num_blocks: usize) -> Result<(), String> {
        let t = self.token_ids.len();
        let s = self.context_lens.len();
        if self.positions.len() != t || self.slot_mapping.len() != t {
            return Err("positions and slot_mapping must have one entry per token".into());
        }
        if self.query_start.len() != s + 1 || self.query_start.first() != Some(&0) {
            return Err("query_start must have num_seqs + 1 entries starting at 0".into());
        }
        if self.query_start.last().map(|&n| n as usize) != Some(t) || !self.query_start.is_sorted() {
            return Err("query_start must be ascending and end at num_tokens".into());
        }
        if self.block_tables.len() != s * self.max_blocks_per_seq {
            return Err("block_tables must be num_seqs * max_blocks_per_seq".into());
        }
        if self.block_tables.iter().any(|&b| b as usize >= num_blocks)
            || self.slot_mapping.iter().any(|&x| x as usize >= num_blocks * block_size)
        {
            return Err("block id or slot out of the cache".into());
        }
        for seq in 0..s {
            let ctx = self.context_lens[seq] as usize;
            if ctx.div_ceil(block_size) > self.max_blocks_per_seq {
                return Err(format!("sequence {seq} has more context than its block table covers"));
            }
            let (a, b) = (self.query_start[seq] as usize, self.query_start[seq + 1] as usize);
            if self.positions[a..b].iter().any(|&p| p as usize >= ctx) {
                return Err(format!("sequence {seq} has a position beyond its context"));
            }
        }
        if self.logits_rows.iter().any(|&r| r as usize >= t) {
            return Err("logits row out of the batch".into());
        }
        Ok(())
    }
}
