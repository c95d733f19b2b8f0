//! Who may call inferd, how much they may use, and what they used:
//!
//! - [`tenants`]: tenants and their API keys (SHA-256 only), authenticated
//!   from a bearer string;
//! - [`limits`]: per-tenant rate limits, concurrency and daily/monthly
//!   token quotas;
//! - [`meter`]: one request's usage, metered once into the ledger however
//!   it ends;
//! - [`shared_limits`]: the same limits shared by a fleet through Redis;
//! - [`cost`]: the price of a token from the instance's hourly cost and
//!   measured throughput;
//! - [`usage_query`]: `/v1/usage` parameters as a ledger query, scoped to
//!   what the caller may see;
//! - [`clock`], [`redact`], and the [`metrics`] names of all of the above.
//!
//! No HTTP framework, no model, no engine: the server keeps the HTTP side
//! (middleware, headers, the error table) and hands in what it knows (the
//! `Authorization` value, the engine's busy time).

pub mod clock;
pub mod cost;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod redact;
pub mod shared_limits;
pub mod tenants;
pub mod testing;
pub mod usage_query;

#[cfg(test)]
mod tests {
    #[test]
    fn the_gateway_depends_on_no_http_framework_model_or_engine() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest.split("[dependencies]").nth(1).expect("a dependencies table");
        let deps = deps.split("\n[").next().unwrap_or(deps);
        for forbidden in ["axum", "hyper", "candle", "inferd-engine", "inferd-exec", "inferd-models"] {
            assert!(!deps.contains(forbidden), "inferd-gateway must not depend on {forbidden}");
        }
    }
}
