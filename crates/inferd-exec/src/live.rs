//! What a backend knows of the sequences it runs, from the lifecycle events
//! of each input: which are live and with which sampling parameters. The
//! fake executor checks the engine against it; a device backend reads each
//! sampled row's parameters from it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use inferd_contract::ModelInput;
use inferd_core::{RequestId, SamplingParams};
use inferd_kernels::{MAX_TOP_K, RowSample};

/// Sequences started and not yet finished, with their parameters.
#[derive(Debug, Default)]
pub struct LiveSeqs {
    live: HashMap<RequestId, Arc<SamplingParams>>,
    ended: HashSet<RequestId>,
}

impl LiveSeqs {
    /// Applies `input`'s lifecycle events; refuses events that break the
    /// contract (started twice, preempted or batched while not live).
    pub fn apply(&mut self, input: &ModelInput) -> Result<(), String> {
        for id in &input.finished {
            self.live.remove(id);
            self.ended.insert(*id);
        }
        if let Some(id) = input.preempted.iter().find(|id| !self.live.contains_key(id)) {
            return Err(format!("{id} preempted but not live"));
        }
        for s in &input.started {
            if self.live.contains_key(&s.id) || self.ended.contains(&s.id) {
                return Err(format!("{} started twice", s.id));
            }
            self.live.insert(s.id, s.params.clone());
        }
        match input.seq_ids.iter().find(|id| !self.live.contains_key(id)) {
            Some(id) => Err(format!("{id} is in a batch but not live")),
            None => Ok(()),
        }
    }

    /// The parameters of a live sequence.
    pub fn params(&self, id: RequestId) -> Option<&Arc<SamplingParams>> {
        self.live.get(&id)
    }

    /// The parameters of each row of `input.logits_rows`, in order.
    pub fn row_params(&self, input: &ModelInput) -> Result<Vec<Arc<SamplingParams>>, String> {
        input
            .row_seqs()
            .into_iter()
            .map(|s| {
                let id = input.seq_ids[s];
                self.live.get(&id).cloned().ok_or_else(|| format!("{id} is not live"))
            })
            .collect()
    }
}

/// How a device samples a row exactly as the host sampler would, if it
/// can: greedy as top-k 1; temperature with top-k up to the kernel's
/// candidate limit and any top-p, or with neither (the whole softmax).
/// `None` for rows that need the host: logprobs, penalties, logit bias,
/// min_tokens, min_p, or a nucleus over more than the limit. `counter` is the
/// sequence's token count; `seed` the request's, or a fresh random one.
pub fn device_row(p: &SamplingParams, counter: u64, fresh_seed: impl FnOnce() -> u64) -> Option<RowSample> {
    let plain = p.logprobs.is_none()
        && p.repetition_penalty == 1.0
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0
        && p.min_tokens == 0
        && p.min_p == 0.0
        && p.logit_bias.is_empty();
    if !plain {
        return None;
    }
    let (temperature, top_p, top_k) = if p.is_greedy() {
        (1.0, 1.0, 1)
    } else {
        match p.top_k {
            Some(k) if k <= MAX_TOP_K => (p.temperature, p.top_p, k),
            None if p.top_p >= 1.0 => (p.temperature, 1.0, 0),
            _ => return None,
        }
    };
    let seed = p.seed.unwrap_or_else(fresh_seed);
    Some(RowSample { temperature, top_p, top_k, pad: 0, seed, counter })
}

#[cfg(test)]
mod tests {
    use inferd_contract::StartedSeq;

    use super::*;

    fn started(id: u64, params: SamplingParams) -> StartedSeq {
        StartedSeq { id: RequestId(id), prompt_len: 1, params: Arc::new(params) }
    }

    #[test]
    fn rows_get_their_sequences_parameters() {
        let mut live = LiveSeqs::default();
        let mut input = ModelInput::new(1);
        input.push_seq(RequestId(1), &[1, 2, 3], 0, &[0], 16, false);
        input.push_seq(RequestId(2), &[4], 0, &[1], 16, true);
        input.started = vec![
            started(1, SamplingParams { temperature: 0.0, ..Default::default() }),
            started(2, SamplingParams { temperature: 0.7, ..Default::default() }),
        ];
        live.apply(&input).unwrap();
        let params = live.row_params(&input).unwrap();
        assert_eq!(params.len(), 1, "only sequence 2 is sampled");
        assert_eq!(params[0].temperature, 0.7);
        let mut again = input.clone();
        again.started.truncate(1);
        assert!(live.apply(&again).unwrap_err().contains("started twice"));
        let mut next = ModelInput::new(1);
        next.push_seq(RequestId(1), &[9], 3, &[0], 16, true);
        next.finished = vec![RequestId(2)];
        live.apply(&next).unwrap();
        assert!(live.params(RequestId(2)).is_none());
        let mut gone = ModelInput::new(1);
        gone.push_seq(RequestId(2), &[9], 1, &[1], 16, true);
        assert!(live.apply(&gone).unwrap_err().contains("not live"));
    }

    #[test]
    fn rows_the_device_samples_and_rows_it_leaves_to_the_host() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let row = |p: &SamplingParams| device_row(p, 9, || 77);
        assert_eq!(row(&greedy).map(|r| (r.top_k, r.temperature, r.seed, r.counter)), Some((1, 1.0, 77, 9)));
        let top = SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            top_p: 0.9,
            seed: Some(5),
            ..Default::default()
        };
        assert_eq!(row(&top).map(|r| (r.top_k, r.top_p, r.seed)), Some((40, 0.9, 5)));
        let whole = SamplingParams { temperature: 1.3, ..Default::default() };
        assert_eq!(row(&whole).map(|r| r.top_k), Some(0), "the whole softmax");
        for host in [
            SamplingParams { logprobs: Some(1), ..greedy.clone() },
            SamplingParams { repetition_penalty: 1.1, ..greedy.clone() },
            SamplingParams { min_tokens: 3, ..greedy.clone() },
            SamplingParams { min_p: 0.1, ..whole.clone() },
            SamplingParams { top_p: 0.9, ..whole.clone() },
            SamplingParams { top_k: Some(MAX_TOP_K + 1), ..whole.clone() },
        ] {
            assert_eq!(row(&host), None, "{host:?}");
        }
    }

    #[test]
    fn the_device_draw_distribution_is_the_host_samplers() {
        // The host sampler's frequencies over many seeds match the
        // distribution the GPU kernel is specified to draw from.
        let logits: Vec<f32> = (0..60).map(|i| ((i * 37) % 23) as f32 / 5.0 - 2.0).collect();
        for (t, top_p, top_k) in [(1.0, 1.0, 0), (0.7, 1.0, 5), (1.2, 0.6, 20), (1.0, 1.0, 1)] {
            let params = SamplingParams {
                temperature: t,
                top_p,
                top_k: (top_k > 0).then_some(top_k),
                ..Default::default()
            };
            let row = device_row(&params, 0, || 1).unwrap();
            let want = inferd_kernels::kept_distribution(&logits, &row);
            let n = 20_000;
            let mut counts = vec![0u32; logits.len()];
            for seed in 0..n {
                let p = SamplingParams { seed: Some(seed), ..params.clone() };
                let ctx = crate::sampler::SampleContext {
                    params: &p,
                    tokens: &[3],
                    prompt_len: 1,
                    eos_token_ids: &[],
                    allowed: None,
                };
                counts[crate::sampler::sample(&mut logits.clone(), &ctx).token as usize] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let p = want.iter().find(|x| x.0 == i as u32).map_or(0.0, |x| x.1);
                let freq = f64::from(c) / n as f64;
                let sigma = (p * (1.0 - p) / n as f64).sqrt();
                assert!(
                    (freq - p).abs() <= 5.0 * sigma + 1e-3,
                    "T {t} top_p {top_p} top_k {top_k}: token {i} {freq} vs {p}"
                );
            }
        }
    }
}
