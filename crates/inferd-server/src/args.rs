//! Command-line flags, vLLM/TGI style; every flag is also an INFERD_*
//! environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use inferd_exec::KvDtype;
use inferd_models::WeightFormat;

#[derive(Debug, Parser)]
#[command(name = "inferd", version, about = "A self-hosted LLM inference server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over the OpenAI-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// API keys for the tenants of --config.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the SHA-256 of a key (read from standard input when not given),
    /// as the config's `sha256` wants it.
    Hash { key: Option<String> },
    /// Make a new random key and print it with its hash.
    New,
}

/// How hard the ledger's commits wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LedgerDurability {
    /// A committed record survives the process being killed.
    Process,
    /// It survives power loss too (one fsync per commit).
    Full,
}

/// Parses sizes such as `512MiB`, `2GiB`, `1G` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB, MiB or GiB)")),
    };
    Ok((num * mult) as usize)
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Catalogue name (models/catalog.toml) or path to a GGUF file or Hugging Face folder.
    #[arg(long, env = "INFERD_MODEL", default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Name clients use in `model`; defaults to --model.
    #[arg(long, env = "INFERD_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "INFERD_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on the ready line).
    #[arg(long, env = "INFERD_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Most sequences running at once.
    #[arg(long, env = "INFERD_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (chunked prefill splits longer prompts).
    #[arg(long, env = "INFERD_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + output); defaults to the model's context length.
    #[arg(long, env = "INFERD_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, env = "INFERD_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Memory for the KV cache (e.g. 512MiB, 2GiB); sets the number of blocks.
    #[arg(long, env = "INFERD_KV_CACHE_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: usize,
    /// KV cache element type: f32 or f16.
    #[arg(long, env = "INFERD_KV_CACHE_DTYPE", default_value = "f32")]
    pub kv_cache_dtype: KvDtype,
    /// CPU compute format of the weights: native, q8_0 or f32.
    #[arg(long, env = "INFERD_CPU_WEIGHTS", default_value = "q8_0")]
    pub cpu_weights: WeightFormat,
    /// Compute threads; defaults to the physical cores.
    #[arg(long, env = "INFERD_THREADS")]
    pub threads: Option<usize>,
    /// Disable reuse of cached KV for repeated prompt prefixes.
    #[arg(long, env = "INFERD_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Largest request body accepted.
    #[arg(long, env = "INFERD_MAX_BODY", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_body: usize,
    /// Folder of catalogue model files.
    #[arg(long, env = "INFERD_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// The model catalogue.
    #[arg(long, env = "INFERD_CATALOG", default_value = "models/catalog.toml")]
    pub catalog: PathBuf,
    /// Most sequences waiting to be scheduled; beyond it requests get 503.
    #[arg(long, env = "INFERD_MAX_WAITING_REQUESTS", default_value_t = 256)]
    pub max_waiting_requests: usize,
    /// Most tokens (prompt + max_tokens) waiting to be scheduled; beyond it 503.
    #[arg(long, env = "INFERD_MAX_WAITING_TOKENS", default_value_t = 1_000_000)]
    pub max_waiting_tokens: usize,
    /// Seconds a request may wait to be scheduled before it is refused with 503.
    #[arg(long, env = "INFERD_MAX_QUEUE_WAIT", default_value_t = 30.0)]
    pub max_queue_wait: f64,
    /// Seconds a request may take in all; a request's `timeout` field may shorten it.
    #[arg(long, env = "INFERD_REQUEST_TIMEOUT", default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Seconds after SIGTERM/SIGINT during which new requests are still
    /// served while /ready already reports draining (so the load balancer
    /// stops sending before anything is refused).
    #[arg(long, env = "INFERD_DRAIN_DELAY", default_value_t = 10.0)]
    pub drain_delay: f64,
    /// Seconds in-flight requests may run after the drain delay before they
    /// are cut off with a final error event.
    #[arg(long, env = "INFERD_DRAIN_TIMEOUT", default_value_t = 120.0)]
    pub drain_timeout: f64,
    /// Log lines as `text` or `json` (for log shippers).
    #[arg(long, env = "INFERD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Seconds between `: keep-alive` comments on open streams.
    #[arg(long, env = "INFERD_SSE_KEEPALIVE", default_value_t = 15.0)]
    pub sse_keepalive: f64,
    /// Seconds the engine may have work without finishing a step before
    /// /health and /ready report it stalled.
    #[arg(long, env = "INFERD_ENGINE_STALL_TIMEOUT", default_value_t = 60.0)]
    pub engine_stall_timeout: f64,
    /// TOML file of tenants, API keys (SHA-256) and limits; without it the
    /// API is open to anyone as the single tenant `default`.
    #[arg(long, env = "INFERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The SQLite usage ledger (created if missing).
    #[arg(long, env = "INFERD_LEDGER", default_value = "data/usage.db")]
    pub ledger: PathBuf,
    /// process: records survive a crash of inferd; full: power loss too.
    #[arg(long, env = "INFERD_LEDGER_DURABILITY", value_enum, default_value = "process")]
    pub ledger_durability: LedgerDurability,
    /// Delete usage records older than this many days (checked hourly);
    /// kept forever when unset.
    #[arg(long, env = "INFERD_LEDGER_RETENTION_DAYS")]
    pub ledger_retention_days: Option<f64>,
    /// What the instance costs per hour in USD; prices tokens in the
    /// ledger and the cost gauge.
    #[arg(long, env = "INFERD_INSTANCE_HOURLY_COST")]
    pub instance_hourly_cost: Option<f64>,
    /// Seconds of history the throughput behind the cost is measured over.
    #[arg(long, env = "INFERD_COST_WINDOW", default_value_t = 600.0)]
    pub cost_window: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
