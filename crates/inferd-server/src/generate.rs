//! Runs one API request's choices on the engine and turns their token
//! events into text: incremental detokenization, stop strings (which abort
//! the sequence in the engine), logprobs and usage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_core::{FinishReason, RequestId, SamplingParams, StreamEvent, TokenConstraint, TokenLogprobs};
use inferd_engine::EngineHandle;
use inferd_sched::SequenceRequest;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::admission::Permit;
use crate::detok::{IncrementalDecoder, StopMatcher};
use crate::error::ApiError;
use crate::meter::{ChoiceEnd, Outcome, RequestMeter};
use crate::telemetry::SeqTimer;

/// One choice (one sequence) of a request.
#[derive(Debug)]
pub struct Choice {
    pub index: u32,
    id: RequestId,
    engine: EngineHandle,
    rx: Option<UnboundedReceiver<StreamEvent>>,
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_prompt_tokens: u32,
    pub finish_reason: Option<FinishReason>,
    timer: SeqTimer,
    /// Held until the sequence is first scheduled.
    permit: Permit,
    limits: Limits,
    arrival: Instant,
    open: Arc<std::sync::atomic::AtomicUsize>,
    meter: Arc<RequestMeter>,
    /// Whether this choice's prompt counts in usage (first choice of its prompt).
    counts_prompt: bool,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    /// Kept only when the tenant keeps prompts.
    text: Option<String>,
}

/// When a request must have been scheduled, and when it must have ended.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queue_wait: Duration,
    pub timeout: Duration,
    /// Seconds to suggest in Retry-After when the queue wait runs out.
    pub retry_after_secs: u64,
}

impl Drop for Choice {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        // Dropped unfinished: the client went away; the engine aborts it.
        self.end(FinishReason::Abort, Outcome::ClientDisconnect);
    }
}

/// What one event of a choice produced.
#[derive(Debug, Default)]
pub struct Piece {
    pub text: String,
    /// The token's id and logprobs, when asked for.
    pub logprobs: Option<(u32, TokenLogprobs)>,
    pub finished: Option<FinishReason>,
}

impl Choice {
    /// Queues one sequence on the engine.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        serving: &crate::state::Serving,
        index: u32,
        counts_prompt: bool,
        prompt: Vec<u32>,
        params: Arc<SamplingParams>,
        permit: Permit,
        limits: Limits,
        meter: Arc<RequestMeter>,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<Self, ApiError> {
        let engine = &serving.engine;
        let id = engine.next_id();
        let prompt_tokens = prompt.len() as u32;
        let stops = params.stop.clone();
        let priority = meter.priority();
        let req = SequenceRequest { priority, ..SequenceRequest::new(id, prompt, params) };
        let rx = engine
            .add_constrained(req, constraint)
            .map_err(|e| ApiError::Unavailable { message: e.to_string(), retry_after_secs: 5 })?;
        serving.open_choices.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        meter.choice_started();
        let text = meter.keeps_text().then(String::new);
        Ok(Choice {
            index,
            id,
            engine: engine.clone(),
            rx: Some(rx),
            decoder: IncrementalDecoder::new(serving.tokenizer.clone()),
            matcher: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            finish_reason: None,
            timer: SeqTimer::new(serving.model_name.clone()),
            permit,
            limits,
            arrival: Instant::now(),
            open: serving.open_choices.clone(),
            meter,
            counts_prompt,
            scheduled_at: None,
            first_token_at: None,
            text,
        })
    }

    /// Records the end of the choice once: metrics, and its part of the
    /// request's usage.
    fn end(&mut self, reason: FinishReason, outcome: Outcome) {
        if self.finish_reason.is_some() {
            return;
        }
        self.rx = None;
        self.finish_reason = Some(reason);
        self.timer.finished(reason, self.prompt_tokens, self.completion_tokens);
        self.meter.choice_ended(ChoiceEnd {
            counts_prompt: self.counts_prompt,
            prompt_tokens: self.prompt_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            completion_tokens: self.completion_tokens,
            reason,
            outcome,
            scheduled_at: self.scheduled_at,
            first_token_at: self.first_token_at,
            text: self.text.take(),
        });
    }

    /// The next piece of output; `None` once the choice has finished.
    pub async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        loop {
            let rx = self.rx.as_mut()?;
            let scheduled = !self.permit.is_waiting();
            let queue_deadline = self.arrival + self.limits.max_queue_wait;
            let deadline = self.arrival + self.limits.timeout;
            let until = if scheduled { deadline } else { deadline.min(queue_deadline) };
            let Ok(event) = tokio::time::timeout_at(until.into(), rx.recv()).await else {
                // A deadline passed: stop computing for it and say which.
                self.engine.abort(self.id, FinishReason::Abort);
                let queued = !scheduled && queue_deadline <= deadline;
                let outcome = if queued { Outcome::QueueTimeout } else { Outcome::Timeout };
                self.end(FinishReason::Abort, outcome);
                return Some(Err(if queued {
                    ApiError::QueueTimeout {
                        waited_secs: self.arrival.elapsed().as_secs_f64(),
                        retry_after_secs: self.limits.retry_after_secs,
                    }
                } else {
                    ApiError::Timeout { limit_secs: self.limits.timeout.as_secs_f64() }
                }));
            };
            let Some(event) = event else {
                self.end(FinishReason::Error, Outcome::Error);
                return Some(Err(ApiError::Internal("the engine dropped the request".into())));
            };
            match event {
                StreamEvent::Scheduled { cached_prompt_tokens } => {
                    self.cached_prompt_tokens = cached_prompt_tokens;
                    self.scheduled_at.get_or_insert_with(Instant::now);
                    self.timer.scheduled();
                    self.permit.scheduled();
                }
                StreamEvent::Token { token, logprobs } => {
                    self.completion_tokens += 1;
                    self.first_token_at.get_or_insert_with(Instant::now);
                    self.timer.token();
                    let delta = self.decoder.push(token);
                    let out = self.matcher.push(&delta);
                    if let Some(t) = &mut self.text {
                        t.push_str(&out.text);
                    }
                    let mut piece =
                        Piece { text: out.text, logprobs: logprobs.map(|l| (token, l)), finished: None };
                    if out.stopped {
                        // Matched on text: stop computing for it now.
                        self.engine.abort(self.id, FinishReason::Stop);
                        self.finish(FinishReason::Stop, &mut piece);
                    }
                    return Some(Ok(piece));
                }
                StreamEvent::Finished { reason, .. } => {
                    let mut piece = Piece { text: self.matcher.flush(), ..Default::default() };
                    if let Some(t) = &mut self.text {
                        t.push_str(&piece.text);
                    }
                    self.finish(reason, &mut piece);
                    return Some(Ok(piece));
                }
                StreamEvent::Shutdown => {
                    self.end(FinishReason::Abort, Outcome::Shutdown);
                    return Some(Err(ApiError::Unavailable {
                        message: "The server is shutting down; the request was cut off. Retry it.".into(),
                        retry_after_secs: 1,
                    }));
                }
                StreamEvent::Error { message } => {
                    self.end(FinishReason::Error, Outcome::Error);
                    return Some(Err(ApiError::Internal(message)));
                }
            }
        }
    }

    fn finish(&mut self, reason: FinishReason, piece: &mut Piece) {
        self.end(reason, Outcome::Completed);
        piece.finished = Some(reason);
    }
}

/// Starts `n` choices for each prompt; choice `i` of a seeded request uses
/// `seed + i`, so choices differ but the request is reproducible. Each
/// choice takes the next of `constraints` (none when it runs out).
pub fn start_choices(
    st: &crate::state::AppState,
    serving: &crate::state::Serving,
    prompts: Vec<Vec<u32>>,
    params: &SamplingParams,
    timeout: Duration,
    meter: &Arc<RequestMeter>,
    constraints: Vec<Option<Box<dyn TokenConstraint>>>,
) -> Result<Vec<Choice>, ApiError> {
    let mut constraints = constraints.into_iter();
    let n = params.n;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut permits = st.admission.admit(prompts.len() * n as usize, longest + params.max_tokens as usize)?;
    let limits = Limits {
        max_queue_wait: st.max_queue_wait,
        timeout,
        retry_after_secs: st.admission.retry_after_secs(),
    };
    let mut choices = Vec::with_capacity(prompts.len() * n as usize);
    for (p, prompt) in prompts.into_iter().enumerate() {
        for i in 0..n {
            let mut params = params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(u64::from(i)));
            let index = p as u32 * n + i;
            let permit = permits.pop().expect("one permit per choice");
            choices.push(Choice::start(
                serving,
                index,
                i == 0,
                prompt.clone(),
                Arc::new(params),
                permit,
                limits,
                meter.clone(),
                constraints.next().flatten(),
            )?);
        }
    }
    Ok(choices)
}
