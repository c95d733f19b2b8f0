//! Prometheus export and per-request metrics. Metric names live in
//! `inferd_engine::metrics`; this module installs the recorder, mirrors the
//! engine's counters at scrape time, and times each sequence.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use inferd_core::FinishReason;
use inferd_engine::EngineStats;
use inferd_engine::metrics as m;
use inferd_gateway::metrics as g;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the global Prometheus recorder with inferd's buckets.
/// 1 for each model that loaded, 0 for one that failed to.
pub const MODEL_LOADED: &str = "inferd_model_loaded";

pub fn install() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for name in [
        m::TIME_TO_FIRST_TOKEN,
        m::INTER_TOKEN_LATENCY,
        m::E2E_REQUEST_LATENCY,
        m::REQUEST_QUEUE_TIME,
        m::ENGINE_STEP_SECONDS,
    ] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), &m::LATENCY_BUCKETS)?;
    }
    builder =
        builder.set_buckets_for_metric(Matcher::Full(m::ENGINE_STEP_TOKENS.into()), &m::TOKEN_BUCKETS)?;
    let handle = builder.install_recorder()?;
    m::describe();
    g::describe();
    metrics::describe_gauge!(
        MODEL_LOADED,
        "1 when the model is loaded and serving, 0 when it failed to load."
    );
    Ok(handle)
}

/// Registers the series dashboards and alerts expect on a fresh instance,
/// so they read 0 rather than "no data" until the first request: the
/// latency histograms of `model`, the engine's step histograms and the
/// panic counters.
pub fn register_series(model: &str) {
    for name in
        [m::TIME_TO_FIRST_TOKEN, m::INTER_TOKEN_LATENCY, m::E2E_REQUEST_LATENCY, m::REQUEST_QUEUE_TIME]
    {
        let _ = metrics::histogram!(name, "model" => model.to_owned());
    }
    let _ = metrics::histogram!(m::ENGINE_STEP_SECONDS);
    let _ = metrics::histogram!(m::ENGINE_STEP_TOKENS);
    for place in ["handler", "stream"] {
        metrics::counter!(m::PANICS_TOTAL, "where" => place).increment(0);
    }
}

/// Copies the engine's published state into gauges and counters, then
/// renders the exposition text.
pub fn render(
    handle: &PrometheusHandle,
    engines: &[(&str, &EngineStats)],
    ledger: Option<&inferd_ledger::LedgerStats>,
) -> String {
    if let Some(l) = ledger {
        let r = Ordering::Relaxed;
        metrics::counter!(g::LEDGER_RECORDS_TOTAL).absolute(l.records_written.load(r));
        metrics::counter!(g::LEDGER_COMMITS_TOTAL).absolute(l.commits.load(r));
        metrics::counter!(g::LEDGER_ERRORS_TOTAL).absolute(l.errors.load(r));
        metrics::gauge!(g::LEDGER_BUSY_SECONDS).set(l.commit_micros.load(r) as f64 / 1e6);
        metrics::gauge!(g::LEDGER_PENDING).set(l.pending.load(r) as f64);
        metrics::gauge!(g::LEDGER_FAILING).set(if l.failing.load(r) { 1.0 } else { 0.0 });
        metrics::counter!(g::LEDGER_LOST_TOTAL).absolute(l.lost.load(r));
    }
    for &(model, s) in engines {
        let r = Ordering::Relaxed;
        let total = s.kv_blocks_total.load(r);
        let label = || ("model", model.to_string());
        metrics::gauge!(m::NUM_REQUESTS_RUNNING, &[label()]).set(s.num_running.load(r) as f64);
        metrics::gauge!(m::NUM_REQUESTS_WAITING, &[label()]).set(s.num_waiting.load(r) as f64);
        metrics::gauge!(m::KV_BLOCKS_TOTAL, &[label()]).set(total as f64);
        metrics::gauge!(m::KV_BLOCKS_FREE, &[label()]).set(s.kv_blocks_free.load(r) as f64);
        let ratio = if total == 0 { 0.0 } else { s.kv_blocks_used() as f64 / total as f64 };
        metrics::gauge!(m::KV_CACHE_USAGE_RATIO, &[label()]).set(ratio);
        metrics::counter!(m::PREEMPTIONS_TOTAL, &[label()]).absolute(s.num_preemptions.load(r));
        metrics::counter!(m::CAPPED_STEPS_TOTAL, &[label()]).absolute(s.num_capped_steps.load(r));
        metrics::counter!(m::BACKEND_RESTARTS_TOTAL, &[label()]).absolute(s.backend_restarts.load(r));
        let up = s.backend().health == inferd_engine::BackendHealth::Up;
        metrics::gauge!(m::BACKEND_UP, &[label()]).set(if up { 1.0 } else { 0.0 });
        metrics::counter!(m::PREFIX_CACHE_QUERIES_TOTAL, &[label()]).absolute(s.prefix_query_tokens.load(r));
        metrics::counter!(m::PREFIX_CACHE_HITS_TOTAL, &[label()]).absolute(s.prefix_hit_tokens.load(r));
    }
    handle.render()
}

/// Timing of one sequence, recorded as its events arrive. A sequence dropped
/// before it finished (client gone) counts as aborted.
#[derive(Debug)]
pub struct SeqTimer {
    model: Arc<str>,
    arrival: Instant,
    last_token: Option<Instant>,
    done: bool,
}

impl SeqTimer {
    pub fn new(model: Arc<str>) -> Self {
        SeqTimer { model, arrival: Instant::now(), last_token: None, done: false }
    }

    pub fn scheduled(&self) {
        metrics::histogram!(m::REQUEST_QUEUE_TIME, "model" => self.model.to_string())
            .record(self.arrival.elapsed().as_secs_f64());
    }

    pub fn token(&mut self) {
        let now = Instant::now();
        let model = self.model.to_string();
        match self.last_token {
            None => {
                let secs = now.duration_since(self.arrival).as_secs_f64();
                metrics::histogram!(m::TIME_TO_FIRST_TOKEN, "model" => model).record(secs);
                crate::recent::recent().first_token(secs);
            }
            Some(last) => {
                let secs = now.duration_since(last).as_secs_f64();
                metrics::histogram!(m::INTER_TOKEN_LATENCY, "model" => model).record(secs);
                crate::recent::recent().next_token(secs);
            }
        }
        self.last_token = Some(now);
    }

    /// Records the end of the sequence once.
    pub fn finished(&mut self, reason: FinishReason, prompt_tokens: u32, completion_tokens: u32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let status = if reason == FinishReason::Error { "error" } else { "ok" };
        crate::recent::recent().finished(reason == FinishReason::Error);
        metrics::histogram!(m::E2E_REQUEST_LATENCY, "model" => self.model.to_string())
            .record(self.arrival.elapsed().as_secs_f64());
        metrics::counter!(m::REQUESTS_TOTAL, "status" => status, "finish_reason" => reason.as_str())
            .increment(1);
        metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(u64::from(prompt_tokens));
        metrics::counter!(m::GENERATION_TOKENS_TOTAL).increment(u64::from(completion_tokens));
    }
}
