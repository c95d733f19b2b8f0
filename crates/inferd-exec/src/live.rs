//! What a backend knows of the sequences it runs, from the lifecycle events
//! of each input: which are live and with which sampling parameters. The
//! fake executor checks the engine against it; a device backend reads each
//! sampled row's parameters from it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use inferd_contract::ModelInput;
use inferd_core::{RequestId, SamplingParams};

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
        let mut out = Vec::with_capacity(input.logits_rows.len());
        let mut rows = input.logits_rows.iter().peekable();
        for s in 0..input.num_seqs() {
            let range = input.query_range(s);
            while let Some(&&r) = rows.peek() {
                if r as usize >= range.end {
                    break;
                }
                let id = input.seq_ids[s];
                out.push(self.live.get(&id).cloned().ok_or_else(|| format!("{id} is not live"))?);
                rows.next();
            }
        }
        Ok(out)
    }
}

/// True when a row's next token is its argmax with nothing else to report,
/// so a device can pick it and copy one id instead of a row of logits.
pub fn greedy_on_device(p: &SamplingParams) -> bool {
    p.is_greedy()
        && p.logprobs.is_none()
        && p.repetition_penalty == 1.0
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0
        && p.min_tokens == 0
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
    fn only_plain_greedy_rows_are_picked_on_the_device() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert!(greedy_on_device(&greedy));
        assert!(!greedy_on_device(&SamplingParams { logprobs: Some(1), ..greedy.clone() }));
        assert!(!greedy_on_device(&SamplingParams { repetition_penalty: 1.1, ..greedy.clone() }));
        assert!(!greedy_on_device(&SamplingParams { min_tokens: 3, ..greedy.clone() }));
        assert!(!greedy_on_device(&SamplingParams::default()), "temperature 1 samples");
    }
}
