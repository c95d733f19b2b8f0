//! Metering of one API request: its choices report here as they end, and
//! the request's usage record goes to the ledger once, however it ends.
//!
//! A request that completes writes its record and waits for the commit
//! before the client gets the end of the response, so every response a
//! client received in full has its record on disk. A request cut short
//! (client gone, error) writes its record when the last choice lets go of
//! the meter, without anyone waiting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inferd_core::FinishReason;
use inferd_ledger::{Ledger, NotCommitted, UsageRecord};

use crate::cost::CostTracker;
use crate::limits::Ticket;
use crate::metrics as m;
use crate::tenants::Caller;

/// Where the engine's busy time comes from (microseconds spent in steps
/// since it started), which prices tokens; the server reads it from the
/// engine.
pub trait BusyTime: Send + Sync + std::fmt::Debug {
    fn busy_micros(&self) -> u64;
}

/// A request's token usage as the client is told it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

/// How long a completing request waits for its record's commit.
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// How one choice ended, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Completed,
    ClientDisconnect,
    QueueTimeout,
    Timeout,
    Shutdown,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientDisconnect => "client_disconnect",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::Timeout => "timeout",
            Outcome::Shutdown => "shutdown",
            Outcome::Error => "error",
        }
    }
}

/// The most telling finish reason of a request's choices.
fn rank(r: FinishReason) -> u8 {
    match r {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Abort => 2,
        FinishReason::Error => 3,
    }
}

/// What one choice reports when it ends.
#[derive(Debug, Clone)]
pub struct ChoiceEnd {
    /// Whether its prompt counts (the first choice of each prompt).
    pub counts_prompt: bool,
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub reason: FinishReason,
    pub outcome: Outcome,
    pub scheduled_at: Option<Instant>,
    pub first_token_at: Option<Instant>,
    /// The choice's text, only when the tenant keeps prompts.
    pub text: Option<String>,
}

/// Fixed facts about the request, known when it starts.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub caller: Caller,
    pub request_id: String,
    pub response_id: String,
    pub model: String,
    pub feature: Option<String>,
    pub route: &'static str,
    /// Already redacted; only when the tenant keeps prompts.
    pub prompt_text: Option<String>,
}

#[derive(Debug, Default)]
struct Totals {
    prompt: u64,
    cached: u64,
    completion: u64,
    started: u32,
    reason: Option<FinishReason>,
    outcome: Option<Outcome>,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    texts: Vec<String>,
    written: bool,
}

/// One request's meter, shared by its choices.
#[derive(Debug)]
pub struct RequestMeter {
    info: RequestInfo,
    arrival: Instant,
    ledger: Option<Arc<Ledger>>,
    cost: Arc<CostTracker>,
    /// The engine's busy time, which prices tokens.
    busy: Arc<dyn BusyTime>,
    ticket: Mutex<Option<Ticket>>,
    totals: Mutex<Totals>,
    /// Meters alive in the process; shutdown waits for it to reach zero
    /// before closing the ledger.
    live: Arc<AtomicUsize>,
}

impl RequestMeter {
    pub fn new(
        info: RequestInfo,
        arrival: Instant,
        ticket: Ticket,
        ledger: Option<Arc<Ledger>>,
        cost: Arc<CostTracker>,
        busy: Arc<dyn BusyTime>,
        live: Arc<AtomicUsize>,
    ) -> Arc<Self> {
        live.fetch_add(1, Ordering::AcqRel);
        Arc::new(RequestMeter {
            info,
            arrival,
            ledger,
            cost,
            busy,
            ticket: Mutex::new(Some(ticket)),
            totals: Mutex::new(Totals::default()),
            live,
        })
    }

    /// The engine priority of the request's sequences: its tenant's.
    pub fn priority(&self) -> i32 {
        self.info.caller.tenant.priority
    }

    /// Whether choices should keep their text for the record.
    pub fn keeps_text(&self) -> bool {
        self.info.prompt_text.is_some()
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A choice was handed to the engine.
    pub fn choice_started(&self) {
        self.totals().started += 1;
    }

    /// A choice ended.
    pub fn choice_ended(&self, end: ChoiceEnd) {
        let mut t = self.totals();
        if end.counts_prompt {
            t.prompt += u64::from(end.prompt_tokens);
            t.cached += u64::from(end.cached_prompt_tokens);
        }
        t.completion += u64::from(end.completion_tokens);
        if t.reason.is_none_or(|r| rank(end.reason) > rank(r)) {
            t.reason = Some(end.reason);
        }
        t.outcome = t.outcome.max(Some(end.outcome));
        t.scheduled_at = min_some(t.scheduled_at, end.scheduled_at);
        t.first_token_at = min_some(t.first_token_at, end.first_token_at);
        if let Some(text) = end.text {
            t.texts.push(text);
        }
    }

    /// Builds the record once, settles the tenant's limits and counts the
    /// tenant's metrics; `None` if already done or nothing ran.
    fn take_record(&self) -> Option<UsageRecord> {
        let mut t = self.totals();
        if t.written || t.started == 0 {
            return None;
        }
        t.written = true;
        let used = t.prompt + t.completion;
        if let Some(ticket) = self.ticket.lock().unwrap_or_else(|p| p.into_inner()).take() {
            ticket.settle(used);
        }
        self.cost.add_tokens(used);
        let outcome = t.outcome.unwrap_or(Outcome::ClientDisconnect);
        let tenant = self.info.caller.tenant.id.to_string();
        metrics::counter!(m::TENANT_REQUESTS_TOTAL, "tenant" => tenant.clone(), "outcome" => outcome.as_str())
            .increment(1);
        metrics::counter!(m::TENANT_PROMPT_TOKENS_TOTAL, "tenant" => tenant.clone()).increment(t.prompt);
        metrics::counter!(m::TENANT_GENERATION_TOKENS_TOTAL, "tenant" => tenant.clone())
            .increment(t.completion);
        let secs = |at: Option<Instant>| at.map(|a| a.duration_since(self.arrival).as_secs_f64());
        let completion_text = match t.texts.len() {
            0 => None,
            1 => t.texts.pop(),
            _ => serde_json::to_string(&t.texts).ok(),
        };
        Some(UsageRecord {
            request_id: self.info.request_id.clone(),
            response_id: self.info.response_id.clone(),
            tenant,
            key_id: self.info.caller.key_id.as_deref().map(String::from),
            model: self.info.model.clone(),
            feature: self.info.feature.clone(),
            route: self.info.route.to_string(),
            prompt_tokens: t.prompt,
            cached_prompt_tokens: t.cached,
            completion_tokens: t.completion,
            finish_reason: t.reason.unwrap_or(FinishReason::Abort).as_str().to_string(),
            outcome: outcome.as_str().to_string(),
            queue_seconds: secs(t.scheduled_at),
            ttft_seconds: secs(t.first_token_at),
            total_seconds: self.arrival.elapsed().as_secs_f64(),
            ts_ms: crate::clock::now_unix_ms(),
            cost_usd: self.cost.estimate(used, self.busy.busy_micros()),
            prompt_text: self.info.prompt_text.clone(),
            completion_text: completion_text.map(|s| crate::redact::redact(&s)),
        })
    }

    /// The request's token usage so far: each prompt once, every choice's
    /// completion.
    pub fn usage(&self) -> UsageTotals {
        let t = self.totals();
        let n = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        UsageTotals {
            prompt_tokens: n(t.prompt),
            completion_tokens: n(t.completion),
            cached_tokens: n(t.cached),
        }
    }

    /// The request completed: writes its record and waits for the commit,
    /// unless the ledger is failing (then the record waits in memory for
    /// the writer's retries, and the client is not held up). Returns the
    /// usage recorded, which is what the client is told.
    pub async fn finish(&self) -> UsageTotals {
        let usage = self.usage();
        let (Some(record), Some(ledger)) = (self.take_record(), &self.ledger) else { return usage };
        match ledger.write(record) {
            Ok(done) => match ledger.wait(done, COMMIT_WAIT).await {
                // Failing: the record waits in memory for the writer's
                // retries, and the client is not held up.
                Ok(()) | Err(NotCommitted::Failing) => {}
                Err(e) => tracing::error!("the usage record was not committed: {e}"),
            },
            Err(e) => tracing::error!(error = %e, "usage record not written"),
        }
        usage
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        if let (Some(record), Some(ledger)) = (self.take_record(), &self.ledger)
            && let Err(e) = ledger.write_detached(record)
        {
            tracing::error!(error = %e, "usage record not written");
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

fn min_some(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
