//! A fake executor for testing the engine without a model. It is an oracle
//! of the contract rather than a stub:
//!
//! - it keeps the token and position written to every KV slot, and computes
//!   each next token from the context it reads back through the block table
//!   ([`fake_next_token`]), so a wrong block table, slot mapping, prefix hit
//!   or recompute changes the output a test compares against
//!   [`fake_generate`];
//! - it checks every input (the contract's `validate`, the compiled shape
//!   buckets, the lifecycle of sequences: started once, never seen after
//!   finishing, only live sequences in a batch) and logs any violation;
//! - it returns logits (a peak at the next token) or, like a device
//!   sampler, the tokens themselves with the same logprobs;
//! - tests inject failures and delays through [`FakeControl`] while the
//!   engine runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inferd_contract::{
    Capabilities, DType, DeviceSpec, ExecError, Logits, ModelExecutor, ModelInput, ModelOutput, PaddedShape,
    SampledToken, ShapeBuckets,
};
use inferd_core::{Logprob, RequestId, SamplingParams, TokenId, TokenLogprobs};

use crate::LiveSeqs;

/// Tokens below this id are never produced (room for EOS and friends).
pub const FAKE_FIRST_TOKEN: TokenId = 16;
/// The logit of the next token; every other token's logit is 0.
const PEAK: f32 = 12.0;

/// The token the fake model puts after `context` (FNV-1a of the whole
/// context, so every earlier token matters).
pub fn fake_next_token(context: &[TokenId], vocab_size: usize) -> TokenId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in context {
        for b in t.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    FAKE_FIRST_TOKEN + (h % (vocab_size as u64 - u64::from(FAKE_FIRST_TOKEN))) as TokenId
}

/// What the fake model generates greedily after `prompt`: `n` tokens.
pub fn fake_generate(prompt: &[TokenId], n: usize, vocab_size: usize) -> Vec<TokenId> {
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        tokens.push(fake_next_token(&tokens, vocab_size));
    }
    tokens.split_off(prompt.len())
}

/// Knobs a test turns while the engine runs.
#[derive(Debug, Default)]
pub struct FakeControl {
    /// Fail the next step (once) with a backend error.
    pub fail_next: AtomicBool,
    /// Sleep this many milliseconds in every step.
    pub delay_ms: AtomicU64,
    /// And this many microseconds more per token of the step, so a step
    /// costs what its size says, as a real model's does.
    pub delay_per_token_us: AtomicU64,
    /// Fail the next step (once) as a worker that died: every slot and
    /// sequence is forgotten, as a restarted worker would have them.
    pub lose_next: AtomicBool,
    /// Fail the next step (once) with a hardware error.
    pub hardware_next: AtomicBool,
    /// Fail this many restarts before one succeeds.
    pub failing_restarts: AtomicU64,
    /// Restarts that succeeded.
    pub restarts: AtomicU64,
}

impl FakeControl {
    pub fn fail_next_step(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }

    pub fn lose_next_step(&self) {
        self.lose_next.store(true, Ordering::SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

/// One step as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub seq_ids: Vec<RequestId>,
    pub num_tokens: usize,
    pub padded_shape: Option<PaddedShape>,
    pub started: Vec<RequestId>,
    pub preempted: Vec<RequestId>,
    pub finished: Vec<RequestId>,
    /// False when the step was failed on purpose.
    pub ok: bool,
}

/// Everything the fake saw, for tests to assert on.
#[derive(Debug, Default, Clone)]
pub struct FakeLog {
    pub steps: Vec<StepRecord>,
    /// Broken contract rules; a correct engine leaves this empty.
    pub violations: Vec<String>,
}

impl FakeLog {
    /// Indices of the steps whose batch held `id`.
    pub fn steps_with(&self, id: RequestId) -> Vec<usize> {
        (0..self.steps.len()).filter(|&i| self.steps[i].seq_ids.contains(&id)).collect()
    }
}

/// A model-free executor that checks the contract and generates
/// [`fake_next_token`]s.
#[derive(Debug)]
pub struct FakeExecutor {
    caps: Capabilities,
    /// (token, position) written to each slot.
    slots: Vec<Option<(TokenId, u32)>>,
    live: LiveSeqs,
    control: Arc<FakeControl>,
    log: Arc<Mutex<FakeLog>>,
}

impl FakeExecutor {
    /// A fake with `num_blocks` blocks of `block_size`, returning logits.
    pub fn new(block_size: usize, num_blocks: usize, vocab_size: usize, max_model_len: usize) -> Self {
        let caps = Capabilities {
            device: DeviceSpec::Cpu,
            block_size,
            num_blocks,
            max_model_len,
            vocab_size,
            compute_dtype: DType::F32,
            supported_dtypes: vec![DType::F32],
            kv_dtype: DType::F32,
            shape_buckets: None,
            device_sampling: None,
        };
        FakeExecutor {
            slots: vec![None; num_blocks * block_size],
            caps,
            live: LiveSeqs::default(),
            control: Arc::default(),
            log: Arc::default(),
        }
    }

    /// Returns sampled tokens (greedy, as a device sampler would) instead of logits.
    pub fn sampling_on_device(mut self) -> Self {
        self.caps.device_sampling = Some(inferd_contract::DeviceSampling { max_top_k: u32::MAX });
        self
    }

    /// Runs only these compiled shapes.
    pub fn with_buckets(mut self, buckets: ShapeBuckets) -> Self {
        self.caps.shape_buckets = Some(buckets);
        self
    }

    pub fn control(&self) -> Arc<FakeControl> {
        self.control.clone()
    }

    pub fn log(&self) -> Arc<Mutex<FakeLog>> {
        self.log.clone()
    }

    fn violation(&self, what: String) -> ExecError {
        lock(&self.log).violations.push(what.clone());
        ExecError::Input(what)
    }

    /// Reads sequence `s`'s context back through its block table.
    fn read_context(&self, input: &ModelInput, s: usize) -> Result<Vec<TokenId>, String> {
        let bs = self.caps.block_size;
        let table = input.block_table(s);
        (0..input.context_lens[s] as usize)
            .map(|p| {
                let slot = table[p / bs] as usize * bs + p % bs;
                match self.slots[slot] {
                    Some((token, pos)) if pos as usize == p => Ok(token),
                    other => {
                        Err(format!("{}: position {p} reads slot {slot} holding {other:?}", input.seq_ids[s]))
                    }
                }
            })
            .collect()
    }

    fn output(&self, next: Vec<(TokenId, Arc<SamplingParams>)>) -> ModelOutput {
        let vocab = self.caps.vocab_size;
        if self.caps.samples_on_device() {
            let sampled = next
                .into_iter()
                .map(|(token, params)| SampledToken {
                    token,
                    logprobs: params.logprobs.map(|k| peak_logprobs(token, vocab, k)),
                })
                .collect();
            return ModelOutput::Sampled(sampled);
        }
        let mut data = vec![0.0; next.len() * vocab];
        for (row, (token, _)) in next.iter().enumerate() {
            data[row * vocab + *token as usize] = PEAK;
        }
        ModelOutput::Logits(Logits { vocab_size: vocab, data })
    }
}

/// The logprobs a sampler computes from a row with one peak at `token`:
/// the peak, then the lowest ids (ties go to the lower id).
fn peak_logprobs(token: TokenId, vocab: usize, k: u32) -> TokenLogprobs {
    let log_sum = (f64::from(PEAK).exp() + (vocab - 1) as f64).ln() as f32;
    let rest = (0..vocab as TokenId).filter(|&t| t != token).map(|t| Logprob { token: t, logprob: -log_sum });
    let sampled = Logprob { token, logprob: PEAK - log_sum };
    TokenLogprobs { sampled, top: std::iter::once(sampled).chain(rest).take(k as usize).collect() }
}

fn lock(log: &Mutex<FakeLog>) -> std::sync::MutexGuard<'_, FakeLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelExecutor for FakeExecutor {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError> {
        if self.control.lose_next.swap(false, Ordering::SeqCst) {
            self.slots.fill(None);
            self.live = LiveSeqs::default();
            return Err(ExecError::Lost("injected worker death".into()));
        }
        if self.control.hardware_next.swap(false, Ordering::SeqCst) {
            return Err(ExecError::Hardware("injected hardware error".into()));
        }
        let fail = self.control.fail_next.swap(false, Ordering::SeqCst);
        lock(&self.log).steps.push(StepRecord {
            seq_ids: input.seq_ids.clone(),
            num_tokens: input.num_tokens(),
            padded_shape: input.padded_shape,
            started: input.started.iter().map(|s| s.id).collect(),
            preempted: input.preempted.clone(),
            finished: input.finished.clone(),
            ok: !fail,
        });
        let delay = Duration::from_millis(self.control.delay_ms.load(Ordering::SeqCst))
            + Duration::from_micros(self.control.delay_per_token_us.load(Ordering::SeqCst))
                * input.num_tokens() as u32;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if let Err(e) = input.validate(self.caps.block_size, self.caps.num_blocks) {
            return Err(self.violation(e));
        }
        if let Some(buckets) = &self.caps.shape_buckets {
            match input.padded_shape {
                Some(p) if buckets.contains(p) => {}
                other => return Err(self.violation(format!("step shape {other:?} is not a compiled bucket"))),
            }
        }
        if let Err(e) = self.live.apply(input) {
            return Err(self.violation(e));
        }
        if fail {
            return Err(ExecError::Backend("injected failure".into()));
        }
        for i in 0..input.num_tokens() {
            self.slots[input.slot_mapping[i] as usize] = Some((input.token_ids[i], input.positions[i]));
        }
        let mut next = Vec::with_capacity(input.logits_rows.len());
        for s in 0..input.num_seqs() {
            let context = self.read_context(input, s).map_err(|e| self.violation(e))?;
            let params = self.live.params(input.seq_ids[s]).expect("checked live above").clone();
            let last_row = input.query_range(s).end as u32 - 1;
            if input.logits_rows.binary_search(&last_row).is_ok() {
                next.push((fake_next_token(&context, self.caps.vocab_size), params));
            }
        }
        Ok(self.output(next))
    }

    fn recover(&mut self) -> Result<(), ExecError> {
        let failing = &self.control.failing_restarts;
        if failing.load(Ordering::SeqCst) > 0 {
            failing.fetch_sub(1, Ordering::SeqCst);
            return Err(ExecError::Unavailable("injected failed restart".into()));
        }
        self.slots.fill(None);
        self.live = LiveSeqs::default();
        self.control.restarts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Arc<SamplingParams> {
        Arc::new(SamplingParams { logprobs: Some(2), ..Default::default() })
    }

    fn prefill(id: u64, tokens: &[TokenId], blocks: &[u32]) -> ModelInput {
        let mut input = ModelInput::new(blocks.len());
        input.push_seq(RequestId(id), tokens, 0, blocks, 4, true);
        let prompt_len = tokens.len() as u32;
        input.started.push(inferd_contract::StartedSeq { id: RequestId(id), prompt_len, params: params() });
        input
    }

    #[test]
    fn generates_from_the_context_it_reads_back() {
        let mut fake = FakeExecutor::new(4, 8, 100, 64);
        let prompt = [20, 21, 22, 23, 24];
        let out = fake.execute(&prefill(1, &prompt, &[3, 5])).unwrap().into_logits().unwrap();
        let first = fake_generate(&prompt, 1, 100)[0];
        assert_eq!(crate::sampler::argmax(out.row(0)) as TokenId, first);
        // Decode reads the prompt back through the same blocks.
        let mut step = ModelInput::new(2);
        step.push_seq(RequestId(1), &[first], 5, &[3, 5], 4, true);
        let out = fake.execute(&step).unwrap().into_logits().unwrap();
        assert_eq!(crate::sampler::argmax(out.row(0)) as TokenId, fake_generate(&prompt, 2, 100)[1]);
        assert!(lock(&fake.log).violations.is_empty());
    }

    #[test]
    fn a_wrong_block_table_is_caught() {
        let mut fake = FakeExecutor::new(4, 8, 100, 64);
        fake.execute(&prefill(1, &[20, 21, 22, 23, 24], &[3, 5])).unwrap();
        let mut step = ModelInput::new(2);
        step.push_seq(RequestId(1), &[30], 5, &[3, 6], 4, true);
        assert!(fake.execute(&step).is_err());
        assert!(lock(&fake.log).violations[0].contains("position 4"));
    }

    #[test]
    fn lifecycle_and_buckets_are_enforced() {
        let mut fake = FakeExecutor::new(4, 8, 100, 64);
        let mut unknown = ModelInput::new(1);
        unknown.push_seq(RequestId(9), &[20], 0, &[0], 4, true);
        assert!(fake.execute(&unknown).is_err(), "never started");
        fake.execute(&prefill(1, &[20, 21], &[0])).unwrap();
        assert!(fake.execute(&prefill(1, &[20, 21], &[0])).is_err(), "started twice");
        let buckets = ShapeBuckets { batch_sizes: vec![2], token_counts: vec![8] };
        let mut fake = FakeExecutor::new(4, 8, 100, 64).with_buckets(buckets);
        let mut input = prefill(2, &[20, 21], &[0]);
        assert!(fake.execute(&input).is_err(), "no padded shape");
        input.padded_shape = Some(PaddedShape { batch: 2, tokens: 8 });
        assert!(fake.execute(&input).is_ok());
        assert_eq!(lock(&fake.log).violations.len(), 1);
    }

    #[test]
    fn device_sampling_returns_what_the_sampler_would_pick_from_the_logits() {
        let prompt = [20, 21, 22];
        let mut logits_fake = FakeExecutor::new(4, 8, 50, 64);
        let mut device_fake = FakeExecutor::new(4, 8, 50, 64).sampling_on_device();
        let ModelOutput::Logits(mut l) = logits_fake.execute(&prefill(1, &prompt, &[2])).unwrap() else {
            panic!("logits expected")
        };
        let ModelOutput::Sampled(s) = device_fake.execute(&prefill(1, &prompt, &[2])).unwrap() else {
            panic!("tokens expected")
        };
        let p = SamplingParams { temperature: 0.0, logprobs: Some(2), ..Default::default() };
        let ctx = crate::sampler::SampleContext {
            params: &p,
            tokens: &prompt,
            prompt_len: 3,
            eos_token_ids: &[],
            allowed: None,
        };
        let host = crate::sampler::sample(l.row_mut(0), &ctx);
        assert_eq!(host.token, s[0].token);
        let (a, b) = (host.logprobs.unwrap(), s[0].logprobs.clone().unwrap());
        assert_eq!(
            a.top.iter().map(|l| l.token).collect::<Vec<_>>(),
            b.top.iter().map(|l| l.token).collect::<Vec<_>>()
        );
        assert!((a.sampled.logprob - b.sampled.logprob).abs() < 1e-4, "{a:?} vs {b:?}");
    }
}
