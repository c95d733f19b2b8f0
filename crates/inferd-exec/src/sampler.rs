//! Token sampling on the CPU, one logits row at a time, with each request's
//! own parameters. Order: penalties, then the `min_tokens` mask, then
//! logprobs (of the penalized distribution, before temperature), then greedy
//! argmax or temperature, min_p, top_k and top_p filtering and a draw.
//!
//! A seeded request draws from an RNG keyed by its seed and the number of
//! tokens it holds, so no RNG state lives between steps: a sequence draws
//! the same tokens whether it ran straight through or was preempted and
//! recomputed, and whichever side samples (engine or device) needs only the
//! seed and the position.

use inferd_contract::SampledToken;
use inferd_core::{Logprob, SamplingParams, TokenId, TokenLogprobs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the sampler needs to know about one sequence.
#[derive(Debug, Clone, Copy)]
pub struct SampleContext<'a> {
    pub params: &'a SamplingParams,
    /// Prompt followed by output so far.
    pub tokens: &'a [TokenId],
    pub prompt_len: usize,
    pub eos_token_ids: &'a [TokenId],
    /// The tokens a constraint (a grammar) allows next, one bit per token;
    /// `None` when the sequence has none.
    pub allowed: Option<&'a [u32]>,
}

/// Applies repetition (prompt and output), frequency and presence (output)
/// penalties in place.
pub fn apply_penalties(logits: &mut [f32], ctx: &SampleContext) {
    let p = ctx.params;
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in ctx.tokens {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                let l = &mut logits[t];
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<usize, u32>::new();
        for &t in &ctx.tokens[ctx.prompt_len..] {
            *counts.entry(t as usize).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t) {
                *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

/// Forbids every token that would stop the sequence before `min_tokens`.
pub fn mask_early_stop(logits: &mut [f32], ctx: &SampleContext) {
    let generated = ctx.tokens.len() - ctx.prompt_len;
    if (generated as u32) >= ctx.params.min_tokens {
        return;
    }
    let eos = if ctx.params.ignore_eos { &[][..] } else { ctx.eos_token_ids };
    for &t in eos.iter().chain(&ctx.params.stop_token_ids) {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Forbids every token `mask` does not allow.
pub fn mask_disallowed(logits: &mut [f32], mask: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        if !inferd_core::mask_allows(mask, t as TokenId) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[token]` for the sampled token and the `k` most likely.
fn logprobs(logits: &[f32], token: usize, k: usize) -> TokenLogprobs {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let lp = |i: usize| Logprob { token: i as TokenId, logprob: logits[i] - log_sum };
    let top = top_indices(logits, k).into_iter().map(lp).collect();
    TokenLogprobs { sampled: lp(token), top }
}

/// The `k` largest entries, largest first (ties by lower index).
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let desc = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(desc);
    idx
}

/// The RNG of a seeded request's draw for its token number `num_tokens`
/// (prompt included): ChaCha keyed by both, so every (seed, position) pair
/// has its own stream and no two collide.
pub fn seeded_rng(seed: u64, num_tokens: usize) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(num_tokens as u64).to_le_bytes());
    StdRng::from_seed(key)
}

/// Samples the next token of `ctx`'s sequence from `logits` (modified in
/// place): seeded requests reproducibly, others from the thread's RNG.
pub fn sample(logits: &mut [f32], ctx: &SampleContext) -> SampledToken {
    let (token, logprobs) = match ctx.params.seed {
        Some(seed) => sample_with(logits, ctx, &mut seeded_rng(seed, ctx.tokens.len())),
        None => sample_with(logits, ctx, &mut rand::rng()),
    };
    SampledToken { token, logprobs }
}

/// Samples one token from `logits` (modified in place) with `rng`.
pub fn sample_with<R: Rng>(
    logits: &mut [f32],
    ctx: &SampleContext,
    rng: &mut R,
) -> (TokenId, Option<TokenLogprobs>) {
    for &(token, bias) in &ctx.params.logit_bias {
        if let Some(l) = logits.get_mut(token as usize) {
            *l += bias;
        }
    }
    apply_penalties(logits, ctx);
    match ctx.allowed {
        // A grammar decides where the output ends: min_tokens yields to it.
        Some(mask) => mask_disallowed(logits, mask),
        None => mask_early_stop(logits, ctx),
    }
    let p = ctx.params;
    let token = if p.is_greedy() { argmax(logits) } else { draw(logits, p, rng) };
    let lp = p.logprobs.map(|k| logprobs(logits, token, k as usize));
    (token as TokenId, lp)
}

/// Temperature, min_p, top_k and top_p, then one draw.
fn draw<R: Rng>(logits: &[f32], p: &SamplingParams, rng: &mut R) -> usize {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / p.temperature;
    let mut probs: Vec<f32> = logits.iter().map(|l| ((l - max) * inv_t).exp()).collect();
    if p.min_p > 0.0 {
        // The top token has probability exp(0) = 1 before normalizing.
        probs.iter_mut().filter(|x| **x < p.min_p).for_each(|x| *x = 0.0);
    }
    let total: f32 = probs.iter().sum();
    let top_k = p.top_k.map_or(probs.len(), |k| k as usize).min(probs.len());
    let candidates: Vec<usize> = if top_k < probs.len() || p.top_p < 1.0 {
        nucleus(&probs, total, top_k, p.top_p)
    } else {
        (0..probs.len()).collect()
    };
    let mass: f32 = candidates.iter().map(|&i| probs[i]).sum();
    let mut r = rng.random::<f32>() * mass;
    for &i in &candidates {
        r -= probs[i];
        if r < 0.0 {
            return i;
        }
    }
    // Rounding left a sliver: the last candidate with any mass.
    candidates.iter().rev().copied().find(|&i| probs[i] > 0.0).unwrap_or(candidates[0])
}

/// The most likely tokens, at most `top_k`, stopping once their mass reaches
/// `top_p` of `total`. Grows its sorted prefix geometrically so that the
/// usual case sorts a few dozen entries, not the vocabulary.
fn nucleus(probs: &[f32], total: f32, top_k: usize, top_p: f32) -> Vec<usize> {
    let mut n = 64.min(top_k);
    loop {
        let top = top_indices(probs, n);
        let mut cum = 0.0;
        for (j, &i) in top.iter().enumerate() {
            cum += probs[i];
            if cum >= top_p * total {
                return top[..=j].to_vec();
            }
        }
        if n >= top_k {
            return top;
        }
        n = (n * 4).min(top_k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(params: &'a SamplingParams, tokens: &'a [TokenId]) -> SampleContext<'a> {
        SampleContext { params, tokens, prompt_len: 1, eos_token_ids: &[0], allowed: None }
    }

    #[test]
    fn logit_bias_forces_and_bans_tokens() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(sample(&mut logits.clone(), &ctx(&greedy, &[1])).token, 1);
        let biased = SamplingParams { logit_bias: vec![(1, -100.0), (3, 2.0)], ..greedy.clone() };
        assert_eq!(sample(&mut logits.clone(), &ctx(&biased, &[1])).token, 3, "1 banned, 3 raised to 2.5");
        // A forced token wins every seeded draw; an id past the vocabulary is ignored.
        let forced = SamplingParams {
            logit_bias: vec![(0, 100.0), (99, 100.0)],
            temperature: 1.0,
            ..Default::default()
        };
        for seed in 0..50 {
            let p = SamplingParams { seed: Some(seed), ..forced.clone() };
            assert_eq!(sample(&mut logits.clone(), &ctx(&p, &[1])).token, 0);
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let params = SamplingParams { temperature: 0.0, logprobs: Some(2), ..Default::default() };
        let mut logits = vec![0.0, 3.0, 1.0, 3.0];
        let (t, lp) = sample_with(&mut logits, &ctx(&params, &[2]), &mut StdRng::seed_from_u64(0));
        assert_eq!(t, 1, "ties go to the lower id");
        let lp = lp.unwrap();
        assert_eq!(lp.top.iter().map(|l| l.token).collect::<Vec<_>>(), [1, 3]);
        let total: f32 = [0.0f32, 3.0, 1.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((lp.sampled.logprob - (3.0f32.exp() / total).ln()).abs() < 1e-5);
    }

    /// Generates `n` tokens from fixed logits, appending each draw.
    fn generate(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<TokenId> {
        let mut tokens = vec![1];
        for _ in 0..n {
            let t = sample(&mut logits.to_vec(), &ctx(params, &tokens)).token;
            tokens.push(t);
        }
        tokens.split_off(1)
    }

    #[test]
    fn same_seed_same_draws_and_recompute_draws_the_same() {
        let seeded = |seed| SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() };
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let a = generate(&seeded(7), &logits, 20);
        assert_eq!(a, generate(&seeded(7), &logits, 20));
        assert_ne!(a, generate(&seeded(8), &logits, 20));
        // A draw depends only on the seed and the tokens so far: the 11th
        // token redrawn from the first 10 (as after a preemption) is the same.
        let mut tokens = vec![1];
        tokens.extend(&a[..10]);
        assert_eq!(sample(&mut logits.clone(), &ctx(&seeded(7), &tokens)).token, a[10]);
        // Unseeded requests are not all alike.
        let free = SamplingParams { temperature: 1.0, ..Default::default() };
        assert_ne!(generate(&free, &logits, 20), generate(&free, &logits, 20));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits: Vec<f32> = vec![5.0, 4.0, 3.0, -10.0, -10.0];
        let mut rng = StdRng::seed_from_u64(1);
        let k2 = SamplingParams { temperature: 1.0, top_k: Some(2), ..Default::default() };
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let minp = SamplingParams { temperature: 1.0, min_p: 0.5, ..Default::default() };
        for _ in 0..200 {
            assert!(sample_with(&mut logits.clone(), &ctx(&k2, &[9]), &mut rng).0 < 2);
            assert_eq!(
                sample_with(&mut logits.clone(), &ctx(&p, &[9]), &mut rng).0,
                0,
                "top token holds 66%"
            );
            assert_eq!(
                sample_with(&mut logits.clone(), &ctx(&minp, &[9]), &mut rng).0,
                0,
                "only the top token is within min_p"
            );
        }
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let params = SamplingParams { temperature: 1.0, ..Default::default() };
        let logits = vec![0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut rng = StdRng::seed_from_u64(3);
        let ones = (0..4000)
            .filter(|_| sample_with(&mut logits.clone(), &ctx(&params, &[5]), &mut rng).0 == 1)
            .count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            ..Default::default()
        };
        let mut logits = vec![4.0, -1.0, 4.0, 4.0];
        // Prompt [1]; output [2, 2].
        apply_penalties(
            &mut logits,
            &SampleContext {
                params: &params,
                tokens: &[1, 2, 2],
                prompt_len: 1,
                eos_token_ids: &[],
                allowed: None,
            },
        );
        assert_eq!(logits, [4.0, -2.0, 4.0 / 2.0 - 1.0 - 1.0, 4.0]);
    }

    #[test]
    fn eos_and_stop_ids_are_masked_before_min_tokens() {
        let params =
            SamplingParams { temperature: 0.0, min_tokens: 2, stop_token_ids: vec![3], ..Default::default() };
        let mut logits = vec![9.0, 1.0, 2.0, 8.0];
        let (t, _) = sample_with(&mut logits, &ctx(&params, &[5, 6]), &mut StdRng::seed_from_u64(0));
        assert_eq!(t, 2, "EOS (0) and stop id 3 are masked: one token generated so far");
        let mut logits = vec![9.0, 1.0, 2.0, 8.0];
        let (t, _) = sample_with(&mut logits, &ctx(&params, &[5, 6, 7]), &mut StdRng::seed_from_u64(0));
        assert_eq!(t, 0, "after min_tokens EOS is allowed again");
    }
}
