//! Command-line flags, vLLM/TGI style; every flag is also an INFERD_*
//! environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use inferd_contract::{DType, DeviceSpec};
use inferd_exec::ExecutorConfig;
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
    /// The Hugging Face cache and the catalogue: pull, list, verify, remove
    /// and pin models (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Benchmarks: `bench serve` drives any OpenAI-compatible server.
    #[command(subcommand)]
    Bench(inferd_bench::BenchCommand),
    /// The Neuron stand-in worker: inferd's CPU model behind the Neuron step
    /// protocol, holding each step to what a compiled model allows. Started
    /// by `serve --device neuron --neuron-worker "inferd neuron-standin"` to
    /// rehearse a Neuron deployment without Inferentia; its model folder
    /// holds an inferd-compiled.json (see neuron/README.md).
    #[command(name = "neuron-standin", disable_help_flag = true)]
    NeuronStandin {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the SHA-256 of a key (read from standard input when not given),
    /// as the config's `sha256` wants it.
    Hash { key: Option<String> },
    /// Make a new random key and print it with its hash.
    New,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download models into the cache: catalogue names or
    /// org/name[@revision][:file.gguf]; a pinned entry's files are checked.
    Pull {
        #[arg(required = true)]
        models: Vec<String>,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// The models in the cache, and the catalogue's entries with whether
    /// they are pinned and downloaded.
    List {
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Recompute the sha256 of cached files: against the blob name the Hub
    /// gave (large files) and against the catalogue's pins. Exits 1 on any
    /// mismatch.
    Verify {
        /// Repositories (org/name[@revision]) or catalogue names; all cached ones when absent.
        models: Vec<String>,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Remove a repository from the cache, or with @revision one snapshot.
    Rm {
        #[arg(required = true)]
        models: Vec<String>,
    },
    /// Download a Hub model and print a catalogue entry pinning its commit
    /// and the sha256 of every file, for review and approval.
    Pin {
        /// org/name[@revision][:file.gguf]
        model: String,
        /// The entry's name.
        #[arg(long)]
        name: String,
        /// The model's license, as its card states it.
        #[arg(long)]
        license: String,
    },
}

/// Where the catalogue and its pip-packaged files are.
#[derive(Debug, Clone, Args)]
pub struct CatalogArgs {
    /// The model catalogue.
    #[arg(long, env = "INFERD_CATALOG", default_value = "models/catalog.toml")]
    pub catalog: PathBuf,
    /// Folder of catalogue model files.
    #[arg(long, env = "INFERD_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
}

/// How hard the ledger's commits wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LedgerDurability {
    /// A committed record survives the process being killed.
    Process,
    /// It survives power loss too (one fsync per commit).
    Full,
}

/// The default model when neither --model nor [[models]] names one.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// One model to serve, with its own engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPlan {
    /// The name clients send.
    pub name: String,
    /// What to load: a catalogue name, a path or a Hub repository.
    pub source: String,
    pub kv_cache_memory: usize,
    pub max_num_seqs: usize,
}

impl ServeArgs {
    /// The models to serve: every --model (named by --served-model-name in
    /// order), else the config's [[models]], else the default model.
    pub fn model_plans(
        &self,
        config: &[inferd_gateway::tenants::ModelEntry],
    ) -> Result<Vec<ModelPlan>, String> {
        let plan = |name: &str, source: &str| ModelPlan {
            name: name.into(),
            source: source.into(),
            kv_cache_memory: self.kv_cache_memory,
            max_num_seqs: self.max_num_seqs,
        };
        let plans: Vec<ModelPlan> = if !self.models.is_empty() {
            if !config.is_empty() {
                return Err("models are given both by --model and by [[models]] in --config; use one".into());
            }
            let names = &self.served_model_names;
            if !names.is_empty() && names.len() != self.models.len() {
                return Err(format!(
                    "{} --served-model-name for {} --model; give one per model, in order",
                    names.len(),
                    self.models.len()
                ));
            }
            self.models.iter().enumerate().map(|(i, m)| plan(names.get(i).unwrap_or(m), m)).collect()
        } else if !config.is_empty() {
            if !self.served_model_names.is_empty() {
                return Err("--served-model-name names --model; [[models]] entries take `name`".into());
            }
            let mut plans = Vec::new();
            for e in config {
                let mut p = plan(e.name.as_deref().unwrap_or(&e.model), &e.model);
                if let Some(kv) = &e.kv_cache_memory {
                    p.kv_cache_memory = parse_bytes(kv)
                        .map_err(|why| format!("[[models]] {}: kv_cache_memory: {why}", p.name))?;
                }
                if let Some(n) = e.max_num_seqs {
                    p.max_num_seqs = parse_count(&n.to_string())
                        .map_err(|why| format!("[[models]] {}: max_num_seqs: {why}", p.name))?;
                }
                plans.push(p);
            }
            plans
        } else {
            vec![plan(self.served_model_names.first().map_or(DEFAULT_MODEL, String::as_str), DEFAULT_MODEL)]
        };
        for (i, p) in plans.iter().enumerate() {
            if plans[..i].iter().any(|q| q.name == p.name) {
                return Err(format!("two models are served as {:?}; name them apart", p.name));
            }
        }
        Ok(plans)
    }
}

impl CatalogArgs {
    /// The model sources these flags and the Hugging Face variables name.
    pub fn sources(&self, approved_only: bool) -> inferd_models::Sources {
        inferd_models::Sources {
            catalog: self.catalog.clone(),
            models_dir: self.models_dir.clone(),
            hub: inferd_models::hub::HubConfig::from_env(),
            approved_only,
        }
    }
}

/// A dtype flag: a dtype, or `auto` (`None`) for the backend's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoDType(pub Option<DType>);

impl std::str::FromStr for AutoDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            Ok(AutoDType(None))
        } else {
            s.parse().map(|d| AutoDType(Some(d)))
        }
    }
}

/// Parses a fraction in (0, 1].
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("invalid number {s:?}"))?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("must be in (0, 1], got {s}")) }
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
    let bytes = num * mult;
    if !bytes.is_finite() || bytes > MAX_BYTES {
        return Err(format!("size {s:?} is larger than {MAX_BYTES} bytes"));
    }
    Ok(bytes as usize)
}

/// The largest size a flag accepts (1 TiB): beyond any host's memory, and
/// far below where `usize` arithmetic on it could overflow.
const MAX_BYTES: f64 = 1024.0 * 1024.0 * 1024.0 * 1024.0;

/// The longest duration a flag accepts: a year.
pub const MAX_SECONDS: f64 = 365.0 * 86_400.0;

/// Parses a duration in seconds, in [0, a year]: every time flag goes
/// through it, so no later arithmetic sees NaN, infinity or a negative.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("invalid number of seconds {s:?}"))?;
    if (0.0..=MAX_SECONDS).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be between 0 and {MAX_SECONDS} seconds, got {s}"))
    }
}

/// A ledger's path or PostgreSQL URL.
pub fn parse_ledger(s: &str) -> Result<inferd_ledger::Target, String> {
    if s.trim().is_empty() {
        return Err("the ledger's path or URL is empty".into());
    }
    Ok(inferd_ledger::Target::parse(s))
}

/// `open` or `closed`.
pub fn parse_store_failure(s: &str) -> Result<inferd_gateway::limits::StoreFailure, String> {
    match s.trim() {
        "open" => Ok(inferd_gateway::limits::StoreFailure::Open),
        "closed" => Ok(inferd_gateway::limits::StoreFailure::Closed),
        other => Err(format!("expected open or closed, got {other:?}")),
    }
}

/// Parses a count of days in (0, 100 years].
pub fn parse_days(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("invalid number of days {s:?}"))?;
    if v > 0.0 && v <= 36_525.0 { Ok(v) } else { Err(format!("must be in (0, 36525] days, got {s}")) }
}

/// Parses an hourly price in USD, in [0, 1,000,000].
pub fn parse_price(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("invalid price {s:?}"))?;
    if (0.0..=1e6).contains(&v) { Ok(v) } else { Err(format!("must be in [0, 1000000] USD, got {s}")) }
}

/// The CPU's default step-time target: decoding streams see at most about
/// this much between tokens while prompts are prefilled beside them.
pub const DEFAULT_CPU_MAX_STEP_MS: u64 = 150;

/// Parses a count of at least 1.
pub fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("invalid count {s:?}")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Catalogue name (models/catalog.toml), path to a GGUF file or Hugging
    /// Face folder, or a Hub repository: org/name[@revision] (safetensors)
    /// or org/name[@revision]:file.gguf. Repeat it (or list models in the
    /// config's [[models]]) to serve several, each with its own engine.
    /// Default: smollm2-135m-instruct.
    #[arg(long = "model", env = "INFERD_MODEL", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Name clients use in `model`, one per --model in order; defaults to --model.
    #[arg(long = "served-model-name", env = "INFERD_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_names: Vec<String>,
    #[arg(long, env = "INFERD_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on the ready line).
    #[arg(long, env = "INFERD_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Most sequences running at once.
    #[arg(long, env = "INFERD_MAX_NUM_SEQS", default_value_t = 64, value_parser = parse_count)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (chunked prefill splits longer prompts).
    #[arg(long, env = "INFERD_MAX_NUM_BATCHED_TOKENS", default_value_t = 512, value_parser = parse_count)]
    pub max_num_batched_tokens: usize,
    /// Step-time target in milliseconds while requests decode: a prompt
    /// prefilled beside them is cut into chunks that keep each step about
    /// this long (a cost model fitted to the measured steps), so a long
    /// prompt cannot stall every stream. A step with nothing decoding
    /// prefills at the full token budget. 0 turns it off. Default: 150 on
    /// the CPU, off on accelerators.
    #[arg(long, env = "INFERD_MAX_STEP_MS")]
    pub max_step_ms: Option<u64>,
    /// Longest sequence (prompt + output); defaults to the model's context length.
    #[arg(long, env = "INFERD_MAX_MODEL_LEN", value_parser = parse_count)]
    pub max_model_len: Option<usize>,
    /// The backend: cpu, cuda[:N] (built with the `cuda` feature) or neuron
    /// (a step worker process; see --neuron-*).
    #[arg(long, env = "INFERD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// The Neuron step worker's command line (split on whitespace); inferd
    /// appends `--socket PATH --model-dir DIR --model PATH`.
    #[arg(long, env = "INFERD_NEURON_WORKER", default_value = "python3 /opt/inferd/neuron/worker.py")]
    pub neuron_worker: String,
    /// The compiled model's folder (neuron/compile.py's output) for --device neuron.
    #[arg(long, env = "INFERD_NEURON_MODEL_DIR")]
    pub neuron_model_dir: Option<PathBuf>,
    /// Seconds one step may take before the Neuron worker counts as hung and
    /// is replaced.
    #[arg(long, env = "INFERD_NEURON_STEP_TIMEOUT", default_value_t = 30.0, value_parser = parse_seconds)]
    pub neuron_step_timeout: f64,
    /// Seconds the Neuron worker may take to load its compiled model.
    #[arg(long, env = "INFERD_NEURON_LOAD_TIMEOUT", default_value_t = 900.0, value_parser = parse_seconds)]
    pub neuron_load_timeout: f64,
    /// Compute dtype: f32, bf16, f16, or auto (f32 on the CPU, bf16 on devices).
    #[arg(long, env = "INFERD_DTYPE", default_value = "auto")]
    pub dtype: AutoDType,
    /// Tokens per KV block.
    #[arg(long, env = "INFERD_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Host memory for the KV cache on the CPU backend (e.g. 512MiB, 2GiB);
    /// sets the number of blocks.
    #[arg(long, env = "INFERD_KV_CACHE_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: usize,
    /// Fraction of device memory a device backend may fill, weights
    /// included; its KV cache takes what the weights leave.
    #[arg(long, env = "INFERD_GPU_MEMORY_UTILIZATION", value_parser = parse_fraction)]
    pub gpu_memory_utilization: Option<f64>,
    /// KV cache element type: f32, f16, bf16, or auto (f16 on the CPU when
    /// computing in f32, else the compute dtype).
    #[arg(long, env = "INFERD_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: AutoDType,
    /// Weight format: auto (Q8_0 and Q4_1 as stored, for inferd's CPU
    /// kernels, anything else requantized to Q8_0), q8_0, native (as
    /// stored) or dense (dequantized to the compute dtype; `f32` is accepted
    /// for it).
    #[arg(long, env = "INFERD_CPU_WEIGHTS", default_value = "auto")]
    pub cpu_weights: WeightFormat,
    /// Weight format on a GPU: native (GGUF stays quantized for candle's
    /// quantized CUDA kernels) or dense (the compute dtype, for cuBLAS).
    #[arg(long, env = "INFERD_GPU_WEIGHTS", default_value = "native")]
    pub gpu_weights: WeightFormat,
    /// Compute threads; defaults to the physical cores.
    #[arg(long, env = "INFERD_THREADS", value_parser = parse_count)]
    pub threads: Option<usize>,
    /// Disable reuse of cached KV for repeated prompt prefixes.
    #[arg(long, env = "INFERD_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Serve no console page at `/` (its status, playground and usage
    /// table use the JSON routes, which stay).
    #[arg(long, env = "INFERD_NO_CONSOLE")]
    pub no_console: bool,
    /// Largest request body accepted.
    #[arg(long, env = "INFERD_MAX_BODY", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_body: usize,
    /// Seconds a client has to send a request's head (line and headers),
    /// counted from when the connection opens or its last response ends, so
    /// an idle keep-alive connection closes after it too. Keep it above the
    /// load balancer's idle timeout (ALB: 60 s), or the server closes
    /// connections the balancer is about to reuse.
    #[arg(long, env = "INFERD_HEADER_READ_TIMEOUT", default_value_t = 75.0, value_parser = parse_seconds)]
    pub header_read_timeout: f64,
    /// Seconds a client has to send a request's whole body (408 after).
    #[arg(long, env = "INFERD_BODY_READ_TIMEOUT", default_value_t = 30.0, value_parser = parse_seconds)]
    pub body_read_timeout: f64,
    /// Largest request head (request line and headers) accepted.
    #[arg(long, env = "INFERD_MAX_HEADER_BYTES", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_header_bytes: usize,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Serve only catalogue entries pinned by checksum, and refuse any file
    /// whose sha256 differs.
    #[arg(long, env = "INFERD_APPROVED_ONLY")]
    pub approved_only: bool,
    /// Most sequences waiting to be scheduled; beyond it requests get 503.
    #[arg(long, env = "INFERD_MAX_WAITING_REQUESTS", default_value_t = 256, value_parser = parse_count)]
    pub max_waiting_requests: usize,
    /// Most tokens (prompt + max_tokens) waiting to be scheduled; beyond it 503.
    #[arg(long, env = "INFERD_MAX_WAITING_TOKENS", default_value_t = 1_000_000, value_parser = parse_count)]
    pub max_waiting_tokens: usize,
    /// Seconds a request may wait to be scheduled before it is refused with 503.
    #[arg(long, env = "INFERD_MAX_QUEUE_WAIT", default_value_t = 30.0, value_parser = parse_seconds)]
    pub max_queue_wait: f64,
    /// Seconds a request may take in all; a request's `timeout` field may shorten it.
    #[arg(long, env = "INFERD_REQUEST_TIMEOUT", default_value_t = 600.0, value_parser = parse_seconds)]
    pub request_timeout: f64,
    /// Seconds after SIGTERM/SIGINT during which new requests are still
    /// served while /ready already reports draining (so the load balancer
    /// stops sending before anything is refused).
    #[arg(long, env = "INFERD_DRAIN_DELAY", default_value_t = 10.0, value_parser = parse_seconds)]
    pub drain_delay: f64,
    /// Seconds in-flight requests may run after the drain delay before they
    /// are cut off with a final error event.
    #[arg(long, env = "INFERD_DRAIN_TIMEOUT", default_value_t = 120.0, value_parser = parse_seconds)]
    pub drain_timeout: f64,
    /// Log lines as `text` or `json` (for log shippers).
    #[arg(long, env = "INFERD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Seconds between `: keep-alive` comments on open streams.
    #[arg(long, env = "INFERD_SSE_KEEPALIVE", default_value_t = 15.0, value_parser = parse_seconds)]
    pub sse_keepalive: f64,
    /// Seconds the engine may have work without finishing a step before
    /// /health and /ready report it stalled.
    #[arg(long, env = "INFERD_ENGINE_STALL_TIMEOUT", default_value_t = 60.0, value_parser = parse_seconds)]
    pub engine_stall_timeout: f64,
    /// TOML file of tenants, API keys (SHA-256) and limits; without it the
    /// API is open to anyone as the single tenant `default`.
    #[arg(long, env = "INFERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The usage ledger: a SQLite file (created if missing), or a
    /// PostgreSQL database shared by a fleet (`postgres://user:password@host:port/db`;
    /// its table is created or updated at start).
    #[arg(long, env = "INFERD_LEDGER", default_value = "data/usage.db", value_parser = parse_ledger)]
    pub ledger: inferd_ledger::Target,
    /// SQLite only. process: records survive a crash of inferd; full: power
    /// loss too. (PostgreSQL's durability is its server's settings.)
    #[arg(long, env = "INFERD_LEDGER_DURABILITY", value_enum, default_value = "process")]
    pub ledger_durability: LedgerDurability,
    /// Ledger operations queued and not yet committed (its store is failing
    /// or slow) past which new requests get 503 and /ready says
    /// `ledger_backlog_full`; records of requests that ran are always kept.
    #[arg(long, env = "INFERD_LEDGER_MAX_BACKLOG", default_value_t = inferd_ledger::DEFAULT_MAX_BACKLOG)]
    pub ledger_max_backlog: u64,
    /// Share rate limits and token quotas across instances through this
    /// Redis (`redis://host:port/db`); without it each instance counts alone.
    #[arg(long, env = "INFERD_LIMITS_STORE")]
    pub limits_store: Option<String>,
    /// When the limits store cannot be reached: `open` falls back to this
    /// instance's own limits (counted in inferd_limits_store_errors_total),
    /// `closed` refuses requests with 503 and Retry-After.
    #[arg(long, env = "INFERD_LIMITS_STORE_FAILURE", default_value = "open", value_parser = parse_store_failure)]
    pub limits_store_failure: inferd_gateway::limits::StoreFailure,
    /// Seconds a limits-store check may take before it counts as failed.
    #[arg(long, env = "INFERD_LIMITS_STORE_TIMEOUT", default_value_t = 0.25, value_parser = parse_seconds)]
    pub limits_store_timeout: f64,
    /// Delete usage records older than this many days (checked hourly);
    /// kept forever when unset.
    #[arg(long, env = "INFERD_LEDGER_RETENTION_DAYS", value_parser = parse_days)]
    pub ledger_retention_days: Option<f64>,
    /// What the instance costs per hour in USD; prices tokens in the
    /// ledger and the cost gauge.
    #[arg(long, env = "INFERD_INSTANCE_HOURLY_COST", value_parser = parse_price)]
    pub instance_hourly_cost: Option<f64>,
    /// Seconds of history the throughput behind the cost is measured over.
    #[arg(long, env = "INFERD_COST_WINDOW", default_value_t = 600.0, value_parser = parse_seconds)]
    pub cost_window: f64,
}

/// vLLM's default share of device memory.
const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

impl ServeArgs {
    /// What one connection and one request may hold.
    pub fn conn_limits(&self) -> crate::conn::ConnLimits {
        crate::conn::ConnLimits {
            header_read_timeout: std::time::Duration::from_secs_f64(self.header_read_timeout.max(0.1)),
            body_read_timeout: std::time::Duration::from_secs_f64(self.body_read_timeout.max(0.1)),
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body,
        }
    }

    /// The step-time target (see --max-step-ms).
    pub fn max_step(&self) -> Option<std::time::Duration> {
        let ms = self.max_step_ms.unwrap_or(if self.device == DeviceSpec::Cpu {
            DEFAULT_CPU_MAX_STEP_MS
        } else {
            0
        });
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }

    /// What the engine thread builds its backend from.
    pub fn executor_config(&self, model_path: PathBuf) -> ExecutorConfig {
        ExecutorConfig {
            device: self.device,
            model_path,
            weight_format: self.cpu_weights,
            gpu_weight_format: self.gpu_weights,
            dtype: self.dtype.0,
            kv_dtype: self.kv_cache_dtype.0,
            block_size: self.block_size,
            kv_cache_memory: self.kv_cache_memory,
            gpu_memory_utilization: self.gpu_memory_utilization.unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION),
            max_model_len: self.max_model_len,
            neuron: inferd_exec::NeuronOptions {
                worker: self.neuron_worker.split_whitespace().map(String::from).collect(),
                model_dir: self.neuron_model_dir.clone(),
                step_timeout: std::time::Duration::from_secs_f64(self.neuron_step_timeout.max(0.001)),
                load_timeout: std::time::Duration::from_secs_f64(self.neuron_load_timeout.max(0.001)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_flags_parse() {
        let cli = Cli::try_parse_from(["inferd", "serve", "--device", "cuda:1", "--dtype", "bf16"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("serve") };
        assert_eq!(args.device, DeviceSpec::Cuda(1));
        assert_eq!(args.dtype, AutoDType(Some(DType::BF16)));
        assert_eq!(args.kv_cache_dtype, AutoDType(None), "auto is the backend's choice");
        assert_eq!(args.executor_config("m.gguf".into()).gpu_memory_utilization, 0.9);
        let bad = Cli::try_parse_from(["inferd", "serve", "--gpu-memory-utilization", "1.5"]).unwrap_err();
        assert!(bad.to_string().contains("(0, 1]"), "{bad}");
        let bad = Cli::try_parse_from(["inferd", "serve", "--device", "tpu"]).unwrap_err();
        assert!(bad.to_string().contains("unknown device"), "{bad}");
    }

    fn serve(flags: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["inferd", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else { panic!("serve") };
        *args
    }

    #[test]
    fn the_step_time_target_defaults_on_for_the_cpu_only() {
        let ms = |flags: &[&str]| serve(flags).max_step().map(|d| d.as_millis() as u64);
        assert_eq!(ms(&[]), Some(DEFAULT_CPU_MAX_STEP_MS));
        assert_eq!(ms(&["--max-step-ms", "0"]), None, "0 turns it off");
        assert_eq!(ms(&["--max-step-ms", "80"]), Some(80));
        assert_eq!(ms(&["--device", "cuda"]), None, "off on accelerators unless asked");
        assert_eq!(ms(&["--device", "cuda", "--max-step-ms", "40"]), Some(40));
    }

    #[test]
    fn models_come_from_flags_or_the_config_never_both() {
        let plans = serve(&[]).model_plans(&[]).unwrap();
        assert_eq!((plans.len(), plans[0].name.as_str()), (1, DEFAULT_MODEL));
        let args = serve(&["--model", "a.gguf", "--model", "org/b", "--served-model-name", "a,b"]);
        let plans = args.model_plans(&[]).unwrap();
        let names: Vec<(&str, &str)> = plans.iter().map(|p| (p.name.as_str(), p.source.as_str())).collect();
        assert_eq!(names, [("a", "a.gguf"), ("b", "org/b")]);
        let err = serve(&["--model", "x", "--model", "y", "--served-model-name", "z"])
            .model_plans(&[])
            .unwrap_err();
        assert!(err.contains("one per model"), "{err}");
        let err = serve(&["--model", "x", "--model", "x"]).model_plans(&[]).unwrap_err();
        assert!(err.contains("name them apart"), "{err}");
        let entries: inferd_gateway::tenants::ConfigFile = toml::from_str(
            "[[models]]\nmodel = \"org/m\"\nname = \"m\"\nkv_cache_memory = \"64MiB\"\n[[models]]\nmodel = \"n.gguf\"\nmax_num_seqs = 4\n",
        )
        .unwrap();
        let plans = serve(&["--kv-cache-memory", "1GiB"]).model_plans(&entries.models).unwrap();
        assert_eq!(
            (plans[0].name.as_str(), plans[0].kv_cache_memory, plans[0].max_num_seqs),
            ("m", 64 << 20, 64)
        );
        assert_eq!(
            (plans[1].name.as_str(), plans[1].kv_cache_memory, plans[1].max_num_seqs),
            ("n.gguf", 1 << 30, 4)
        );
        let err = serve(&["--model", "x"]).model_plans(&entries.models).unwrap_err();
        assert!(err.contains("both"), "{err}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("1e300").is_err(), "no overflow into a wrapped size");
        assert!(parse_bytes("99999999999999GiB").is_err());
    }

    #[test]
    fn numbers_from_flags_are_range_checked() {
        for (flag, value, want) in [
            ("--request-timeout", "1e300", "seconds"),
            ("--request-timeout", "inf", "seconds"),
            ("--drain-delay", "-1", "seconds"),
            ("--max-queue-wait", "NaN", "seconds"),
            ("--ledger-retention-days", "0", "days"),
            ("--instance-hourly-cost", "-3", "USD"),
            ("--max-num-seqs", "0", "at least 1"),
            ("--max-waiting-tokens", "0", "at least 1"),
            ("--threads", "0", "at least 1"),
        ] {
            let arg = format!("{flag}={value}");
            let err = Cli::try_parse_from(["inferd", "serve", &arg]).unwrap_err().to_string();
            assert!(err.contains(want), "{flag} {value}: {err}");
        }
        let cli = Cli::try_parse_from(["inferd", "serve", "--request-timeout", "0.5"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("serve") };
        assert_eq!(args.request_timeout, 0.5);
    }
}
