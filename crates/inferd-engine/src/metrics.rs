//! The Prometheus metrics of serving: names, kinds and help texts in one
//! place. The engine thread records per-step metrics; the server records
//! per-request ones and mirrors the engine's counters at scrape time.
//! Tenants, the ledger and cost have theirs in `inferd_gateway::metrics`.

/// Histograms, labelled by `model`.
pub const TIME_TO_FIRST_TOKEN: &str = "inferd_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "inferd_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "inferd_e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "inferd_request_queue_time_seconds";
/// Engine step histograms.
pub const ENGINE_STEP_SECONDS: &str = "inferd_engine_step_seconds";
pub const ENGINE_STEP_TOKENS: &str = "inferd_engine_step_tokens";

/// Gauges.
pub const NUM_REQUESTS_RUNNING: &str = "inferd_num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "inferd_num_requests_waiting";
pub const KV_CACHE_USAGE_RATIO: &str = "inferd_kv_cache_usage_ratio";
pub const KV_BLOCKS_TOTAL: &str = "inferd_kv_blocks_total";
pub const KV_BLOCKS_FREE: &str = "inferd_kv_blocks_free";

/// Counters.
pub const PROMPT_TOKENS_TOTAL: &str = "inferd_prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "inferd_generation_tokens_total";
/// Labels `status` (ok, error) and `finish_reason`.
pub const REQUESTS_TOTAL: &str = "inferd_requests_total";
/// Label `reason`.
pub const REQUESTS_REJECTED_TOTAL: &str = "inferd_requests_rejected_total";
pub const PREEMPTIONS_TOTAL: &str = "inferd_preemptions_total";
pub const CAPPED_STEPS_TOTAL: &str = "inferd_prefill_capped_steps_total";
pub const PANICS_TOTAL: &str = "inferd_panics_total";
pub const BACKEND_RESTARTS_TOTAL: &str = "inferd_backend_restarts_total";
/// 1 while the backend runs steps, 0 while it restarts or after it failed.
pub const BACKEND_UP: &str = "inferd_backend_up";
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "inferd_prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS_TOTAL: &str = "inferd_prefix_cache_hits_total";

/// Histogram buckets for latencies, in seconds.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Histogram buckets for tokens per step.
pub const TOKEN_BUCKETS: [f64; 12] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

/// Registers the help text of every metric with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        metrics::Unit::Seconds,
        "Time from arrival to the first output token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        metrics::Unit::Seconds,
        "Time between consecutive output tokens."
    );
    describe_histogram!(E2E_REQUEST_LATENCY, metrics::Unit::Seconds, "Time from arrival to the last token.");
    describe_histogram!(REQUEST_QUEUE_TIME, metrics::Unit::Seconds, "Time from arrival to first scheduling.");
    describe_histogram!(ENGINE_STEP_SECONDS, metrics::Unit::Seconds, "Duration of one engine step.");
    describe_histogram!(ENGINE_STEP_TOKENS, "Tokens computed by one engine step.");
    describe_gauge!(NUM_REQUESTS_RUNNING, "Sequences running in the engine.");
    describe_gauge!(NUM_REQUESTS_WAITING, "Sequences waiting to be scheduled.");
    describe_gauge!(KV_CACHE_USAGE_RATIO, "Fraction of KV blocks held by sequences (0 to 1).");
    describe_gauge!(KV_BLOCKS_TOTAL, "KV blocks in the cache.");
    describe_gauge!(KV_BLOCKS_FREE, "KV blocks no sequence holds (cached ones included).");
    describe_counter!(PROMPT_TOKENS_TOTAL, "Prompt tokens of finished requests.");
    describe_counter!(GENERATION_TOKENS_TOTAL, "Tokens generated.");
    describe_counter!(REQUESTS_TOTAL, "Finished sequences by status and finish reason.");
    describe_counter!(REQUESTS_REJECTED_TOTAL, "Requests refused before running, by reason.");
    describe_counter!(PREEMPTIONS_TOTAL, "Sequences preempted by recompute.");
    describe_counter!(
        CAPPED_STEPS_TOTAL,
        "Steps whose prefill chunk was cut to keep decoding sequences within --max-step-ms."
    );
    describe_counter!(
        BACKEND_RESTARTS_TOTAL,
        "Times the backend (the Neuron step worker) was restarted after it died or hung."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 while the backend runs steps; 0 while it restarts or after a hardware error."
    );
    describe_counter!(PANICS_TOTAL, "Panics caught while handling a request (answered 500), by where.");
    describe_counter!(PREFIX_CACHE_QUERIES_TOTAL, "Prompt tokens looked up in the prefix cache.");
    describe_counter!(PREFIX_CACHE_HITS_TOTAL, "Prompt tokens found in the prefix cache.");
}
