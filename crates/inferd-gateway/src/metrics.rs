//! The Prometheus metrics of tenants, usage, the ledger and cost: names
//! and help texts. Per-tenant series carry configured tenants only (plus
//! `unauthenticated`), so the label set stays bounded.

pub const TENANT_REQUESTS_TOTAL: &str = "inferd_tenant_requests_total";
pub const TENANT_PROMPT_TOKENS_TOTAL: &str = "inferd_tenant_prompt_tokens_total";
pub const TENANT_GENERATION_TOKENS_TOTAL: &str = "inferd_tenant_generation_tokens_total";
pub const TENANT_REJECTIONS_TOTAL: &str = "inferd_tenant_rejections_total";
pub const FEEDBACK_TOTAL: &str = "inferd_feedback_total";
pub const CONFIG_RELOADS_TOTAL: &str = "inferd_config_reloads_total";
pub const COST_PER_MILLION_TOKENS: &str = "inferd_cost_per_million_tokens_usd";
pub const COST_THROUGHPUT: &str = "inferd_cost_throughput_tokens_per_second";
pub const LEDGER_RECORDS_TOTAL: &str = "inferd_ledger_records_total";
pub const LEDGER_COMMITS_TOTAL: &str = "inferd_ledger_commits_total";
pub const LEDGER_BUSY_SECONDS: &str = "inferd_ledger_busy_seconds";
pub const LEDGER_ERRORS_TOTAL: &str = "inferd_ledger_errors_total";
pub const LEDGER_PENDING: &str = "inferd_ledger_pending";
pub const LEDGER_FAILING: &str = "inferd_ledger_failing";
pub const LEDGER_LOST_TOTAL: &str = "inferd_ledger_records_lost_total";
/// Label `policy` (open: fell back to local limits; closed: refused).
pub const LIMITS_STORE_ERRORS_TOTAL: &str = "inferd_limits_store_errors_total";

/// Registers the help text of every metric here with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(TENANT_REQUESTS_TOTAL, "Requests that ran, by tenant and outcome.");
    describe_counter!(TENANT_PROMPT_TOKENS_TOTAL, "Prompt tokens metered, by tenant.");
    describe_counter!(TENANT_GENERATION_TOKENS_TOTAL, "Completion tokens metered, by tenant.");
    describe_counter!(TENANT_REJECTIONS_TOTAL, "Requests refused, by tenant and reason.");
    describe_counter!(
        FEEDBACK_TOTAL,
        "Ratings received, by model and rating (last rating wins per request)."
    );
    describe_gauge!(
        COST_PER_MILLION_TOKENS,
        "Estimated USD per million tokens: --instance-hourly-cost over measured busy throughput."
    );
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads on SIGHUP, by result (ok or error).");
    describe_gauge!(COST_THROUGHPUT, "Tokens per busy engine second over the cost window.");
    describe_counter!(
        LIMITS_STORE_ERRORS_TOTAL,
        "Checks the shared limits store (Redis) could not answer, by the policy applied (open or closed)."
    );
    describe_counter!(LEDGER_RECORDS_TOTAL, "Usage records committed to the ledger.");
    describe_counter!(LEDGER_COMMITS_TOTAL, "Ledger transactions committed (each holds a batch).");
    describe_gauge!(LEDGER_BUSY_SECONDS, "Seconds the ledger writer has spent committing since start.");
    describe_counter!(LEDGER_ERRORS_TOTAL, "Failed ledger commits (retried; records are kept).");
    describe_gauge!(LEDGER_PENDING, "Ledger operations queued and not yet committed.");
    describe_counter!(
        LEDGER_LOST_TOTAL,
        "Usage records given up on because the ledger closed while its store stayed unreachable."
    );
    describe_gauge!(
        LEDGER_FAILING,
        "1 while the ledger's last commit failed (records are kept and retried)."
    );
}
