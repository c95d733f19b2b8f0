//! The `inferd` binary.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use inferd_engine::{EngineConfig, EngineHandle};
use inferd_exec::build_executor;
use inferd_models::load_text;
use tracing_subscriber::EnvFilter;

use inferd_ledger::{Durability, Ledger};
use inferd_server::args::{Cli, Command, KeysCommand, LedgerDurability, ModelPlan, ServeArgs};
use inferd_server::models_cmd;
use inferd_server::state::{AppState, ModelSlot, Serving};
use inferd_server::{admission, clock, conn, cost, drain, routes, state, telemetry, tenants};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            if let Some(n) = args.threads {
                // SAFETY: set before any other thread exists; candle's and
                // rayon's pools read these when they start.
                unsafe {
                    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
                    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
                    std::env::set_var("INFERD_CPU_THREADS", n.to_string());
                }
            }
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(*args))
        }
        Command::Keys(KeysCommand::Hash { key }) => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            anyhow::ensure!(!key.is_empty(), "the key is empty");
            println!("{}", tenants::hash_key(&key));
            Ok(())
        }
        Command::Models(cmd) => {
            init_tracing("text");
            let code = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(models_cmd::run(cmd))?;
            std::process::exit(code);
        }
        Command::Bench(cmd) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(inferd_bench::run(cmd))
        }
        Command::NeuronStandin { args } => {
            std::process::exit(inferd_exec::neuron::standin::main_with_args(&args));
        }
        Command::Keys(KeysCommand::New) => {
            let key = tenants::new_key();
            println!("key:    {key}");
            println!("sha256: {}", tenants::hash_key(&key));
            Ok(())
        }
    }
}

/// How long a starting instance waits for a PostgreSQL ledger it cannot
/// reach before giving up (the port answers 503 `loading` meanwhile).
const LEDGER_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the config and builds the tenants, whose quotas start from what
/// the ledger says they used this UTC day and month (`old`: the tenants
/// being replaced on a reload).
fn load_tenants(
    args: &ServeArgs,
    ledger: &Ledger,
    old: Option<&tenants::Tenants>,
) -> anyhow::Result<tenants::Tenants> {
    let config = match &args.config {
        Some(path) => tenants::ConfigFile::load(path)?,
        None => tenants::ConfigFile::default(),
    };
    let now = clock::now_unix();
    let day = ledger.tokens_by_tenant_since(clock::day_start(now) * 1000)?;
    let month = ledger.tokens_by_tenant_since(clock::month_start(now) * 1000)?;
    let used = month.iter().map(|(t, &m)| (t.clone(), (day.get(t).copied().unwrap_or(0), m))).collect();
    let tenants = match old {
        Some(old) => old.reload(&config, &used, now)?,
        None => tenants::Tenants::new(&config, &used, now)?,
    };
    check_retention(args.ledger_retention_days, &tenants)?;
    Ok(tenants)
}

/// Re-reads --config on SIGHUP; a config that does not load leaves the
/// running one in place.
async fn reload_on_sighup(
    st: Arc<AppState>,
    args: ServeArgs,
    ledger: Arc<Ledger>,
    shared: Option<(inferd_gateway::shared_limits::SharedLimits, inferd_gateway::limits::StoreFailure)>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        let (args, ledger, old) = (args.clone(), ledger.clone(), st.tenants());
        let loaded = tokio::task::spawn_blocking(move || load_tenants(&args, &ledger, Some(&old))).await;
        match loaded {
            Ok(Ok(tenants)) => {
                tracing::info!(tenants = tenants.all().len(), "config reloaded");
                if let Some((store, on_failure)) = &shared {
                    tenants.share_limits(store, *on_failure);
                }
                metrics::counter!(inferd_gateway::metrics::CONFIG_RELOADS_TOTAL, "result" => "ok")
                    .increment(1);
                st.set_tenants(tenants);
            }
            Ok(Err(e)) => {
                tracing::error!("config reload failed, keeping the running config: {e:#}");
                metrics::counter!(inferd_gateway::metrics::CONFIG_RELOADS_TOTAL, "result" => "error")
                    .increment(1);
            }
            Err(e) => tracing::error!("config reload failed: {e}"),
        }
    }
}

/// Deletes usage records past `--ledger-retention-days`, at start and hourly.
async fn prune_ledger(ledger: Arc<Ledger>, days: f64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let before_ms = clock::now_unix_ms() - (days * 86_400_000.0) as i64;
        match ledger.prune(before_ms) {
            Ok(done) => match done.await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, days, "usage records past retention deleted"),
                Ok(_) => {}
                Err(_) => return,
            },
            Err(_) => return,
        }
    }
}

/// Refuses a retention that would make quotas forget tokens after a restart.
fn check_retention(days: Option<f64>, tenants: &tenants::Tenants) -> anyhow::Result<()> {
    let Some(days) = days else { return Ok(()) };
    anyhow::ensure!(
        days.is_finite() && days >= 1.0,
        "--ledger-retention-days must be at least 1, got {days}"
    );
    let monthly = tenants.all().iter().find(|t| t.limiter.config().tokens_per_month.is_some());
    if let Some(t) = monthly {
        anyhow::ensure!(
            days >= 32.0,
            "--ledger-retention-days {days} is shorter than a month, but tenant `{}` has tokens_per_month, which is counted from the ledger after a restart; keep at least 32 days",
            t.id
        );
    }
    Ok(())
}

/// Opens the ledger and builds the tenants (blocking: a PostgreSQL ledger
/// is waited for up to [`LEDGER_CONNECT_WAIT`]).
fn open_accounts(args: &ServeArgs) -> anyhow::Result<(Arc<Ledger>, tenants::Tenants)> {
    let durability = match args.ledger_durability {
        LedgerDurability::Process => Durability::Process,
        LedgerDurability::Full => Durability::Full,
    };
    let ledger = Arc::new(Ledger::open_target(&args.ledger, durability, LEDGER_CONNECT_WAIT)?);
    ledger.set_max_backlog(args.ledger_max_backlog);
    tracing::info!(ledger = %args.ledger, "usage ledger open");
    let tenants = load_tenants(args, &ledger, None)?;
    if tenants.is_open() {
        tracing::warn!(
            "no tenants configured (--config): the API is open to anyone, metered as tenant `default`"
        );
    } else {
        tracing::info!(tenants = tenants.all().len(), "tenants loaded");
    }
    Ok((ledger, tenants))
}

/// Refreshes each model's cost estimate every few seconds.
async fn sample_costs(st: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tick.tick().await;
        for serving in st.loaded() {
            let busy = serving.engine.stats().busy_micros.load(std::sync::atomic::Ordering::Relaxed);
            if let Some((throughput, per_million)) = serving.cost.sample(busy) {
                let model = serving.model_name.to_string();
                metrics::gauge!(inferd_gateway::metrics::COST_THROUGHPUT, "model" => model.clone())
                    .set(throughput);
                if let Some(c) = per_million {
                    metrics::gauge!(inferd_gateway::metrics::COST_PER_MILLION_TOKENS, "model" => model)
                        .set(c);
                }
            }
        }
    }
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_env("INFERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        fmt.json().with_current_span(true).init();
    } else {
        fmt.init();
    }
}

/// Loads the tokenizer here and starts the engine thread, which builds the
/// backend `--device` names and loads the weights onto it (blocking work).
fn start_engine(args: &ServeArgs, plan: &ModelPlan, path: std::path::PathBuf) -> anyhow::Result<Serving> {
    // Fault injection for tests, debug builds only: a slow model load.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("INFERD_FAULT_LOAD_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let started = Instant::now();
    let (tokenizer, chat_template) =
        load_text(&path).with_context(|| format!("loading {}", path.display()))?;
    let args =
        &ServeArgs { kv_cache_memory: plan.kv_cache_memory, max_num_seqs: plan.max_num_seqs, ..args.clone() };
    let engine_cfg = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        // The backend bounds it by the model's context and --max-model-len.
        max_model_len: usize::MAX,
        enable_prefix_caching: !args.no_prefix_caching,
        max_step: args.max_step(),
    };
    let exec_cfg = args.executor_config(path.clone());
    let (engine, _join) =
        EngineHandle::start(move || build_executor(&exec_cfg), engine_cfg, tokenizer.eos_token_ids.clone())
            .with_context(|| format!("starting the {} backend with {}", args.device, path.display()))?;
    let caps = engine.capabilities().clone();
    tracing::info!(
        model = %plan.name,
        path = %path.display(),
        device = %caps.device,
        dtype = %caps.compute_dtype,
        kv_dtype = %caps.kv_dtype,
        format = ?args.cpu_weights,
        kv_blocks = caps.num_blocks,
        max_model_len = caps.max_model_len,
        secs = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    Ok(Serving {
        engine,
        model_name: plan.name.as_str().into(),
        max_model_len: caps.max_model_len,
        vocab_size: caps.vocab_size,
        kv_capacity_tokens: caps.kv_capacity_tokens(),
        // A compiled backend prefills a prompt whole, in one step.
        max_prompt_tokens: caps
            .shape_buckets
            .as_ref()
            .and_then(|b| b.token_counts.last())
            .map(|&t| t.min(args.max_num_batched_tokens)),
        open_choices: Default::default(),
        grammars: grammars_for(&tokenizer, caps.vocab_size),
        cost: Arc::new(cost::CostTracker::new(
            args.instance_hourly_cost,
            std::time::Duration::from_secs_f64(args.cost_window.max(1.0)),
        )),
        tokenizer: Arc::new(tokenizer),
        chat_template,
    })
}

/// Structured output's vocabulary for `tokenizer` (about 0.1 s for a 49k
/// vocabulary); a tokenizer llguidance cannot read leaves structured
/// output refused with the reason, the rest of the server unaffected.
fn grammars_for(
    tokenizer: &inferd_models::TextTokenizer,
    vocab_size: usize,
) -> Result<Arc<inferd_grammar::Grammars>, String> {
    let eos = *tokenizer.eos_token_ids.first().ok_or("the tokenizer names no end-of-sequence token")?;
    let json = tokenizer.inner().to_string(false).map_err(|e| e.to_string())?;
    let built =
        inferd_grammar::Grammars::new(&json, vocab_size, eos).map(Arc::new).map_err(|e| e.to_string());
    if let Err(e) = &built {
        tracing::warn!(error = %e, "structured output is unavailable for this model");
    }
    built
}

/// Resolves (downloading if need be), verifies and loads one model.
async fn load_model(args: &ServeArgs, plan: &ModelPlan, slot: &ModelSlot) -> anyhow::Result<Serving> {
    let sources = args.catalog.sources(args.approved_only);
    let resolved = sources.resolve(&plan.source, &slot.progress).await?;
    if let Some(entry) = &resolved.entry {
        tracing::info!(model = %plan.name, entry, approved = args.approved_only, "catalogue model verified");
    }
    slot.progress.stage(&plan.source, "loading");
    let (args, plan2) = (args.clone(), plan.clone());
    tokio::task::spawn_blocking(move || start_engine(&args, &plan2, resolved.path)).await?
}

/// Loads every model at once. One that fails is reported (log, `/ready`,
/// `inferd_model_loaded` 0, 503 to its requests) and the others serve;
/// with none loaded, the first failure ends the process.
async fn load_models(state: &Arc<AppState>, args: &ServeArgs, plans: Vec<ModelPlan>) -> anyhow::Result<()> {
    let loads = plans.iter().zip(&state.models).map(|(plan, slot)| async move {
        let loaded = load_model(args, plan, slot).await;
        let name = plan.name.clone();
        match loaded {
            Ok(serving) => {
                telemetry::register_series(&name);
                metrics::gauge!(telemetry::MODEL_LOADED, "model" => name).set(1.0);
                let _ = slot.serving.set(serving);
                None
            }
            Err(e) => {
                tracing::error!(model = %name, source = %plan.source, "the model failed to load: {e:#}");
                metrics::gauge!(telemetry::MODEL_LOADED, "model" => name).set(0.0);
                let _ = slot.failed.set(format!("{e:#}"));
                Some(e)
            }
        }
    });
    let failures: Vec<anyhow::Error> =
        futures_util::future::join_all(loads).await.into_iter().flatten().collect();
    match failures.into_iter().next() {
        Some(first) if state.loaded().next().is_none() => Err(first),
        _ => Ok(()),
    }
}

/// Refuses a backend this build lacks before anything starts.
fn check_device(args: &ServeArgs) -> anyhow::Result<()> {
    inferd_exec::check_backend(args.device)?;
    if args.device == inferd_contract::DeviceSpec::Cpu && args.gpu_memory_utilization.is_some() {
        tracing::warn!(
            "--gpu-memory-utilization applies to device backends; the CPU sizes its KV cache from --kv-cache-memory"
        );
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.log_format);
    check_device(&args)?;
    // Listen first, so health checks get answers while the model loads.
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let config_models = match &args.config {
        Some(path) => tenants::ConfigFile::load(path)?.models,
        None => Vec::new(),
    };
    let plans = args.model_plans(&config_models).map_err(anyhow::Error::msg)?;
    let (ledger, tenants) = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || open_accounts(&args)).await??
    };
    // Rate limits and quotas shared by the fleet, when a store is given.
    let shared = match &args.limits_store {
        Some(url) => {
            let store = inferd_gateway::shared_limits::SharedLimits::connect(
                url,
                std::time::Duration::from_secs_f64(args.limits_store_timeout.max(0.01)),
            )
            .await
            .with_context(|| format!("connecting to the limits store {url} (--limits-store)"))?;
            let on_failure = args.limits_store_failure;
            tenants.share_limits(&store, on_failure);
            tracing::info!(store = %url, ?on_failure, "rate limits and quotas are shared through the limits store");
            Some((store, on_failure))
        }
        None => None,
    };
    let state = Arc::new(AppState {
        tenants: std::sync::RwLock::new(Arc::new(tenants)),
        ledger: Some(ledger.clone()),
        models: plans.iter().map(|p| ModelSlot::new(&p.name)).collect(),
        metrics: Some(telemetry::install()?),
        stall_timeout: std::time::Duration::from_secs_f64(args.engine_stall_timeout),
        sse_keepalive: std::time::Duration::from_secs_f64(args.sse_keepalive.max(0.1)),
        admission: admission::Admission::new(args.max_waiting_requests, args.max_waiting_tokens),
        max_queue_wait: std::time::Duration::from_secs_f64(args.max_queue_wait.max(0.0)),
        request_timeout: std::time::Duration::from_secs_f64(args.request_timeout.max(0.0)),
        console: !args.no_console,
        ..Default::default()
    });
    if let Some(days) = args.ledger_retention_days {
        tokio::spawn(prune_ledger(ledger.clone(), days));
    }
    // Before the model loads: SIGHUP's default action would end the process.
    tokio::spawn(reload_on_sighup(state.clone(), args.clone(), ledger.clone(), shared));
    let limits = args.conn_limits();
    let app = routes::router(state.clone(), limits);
    let drain = drain::Drain {
        delay: std::time::Duration::from_secs_f64(args.drain_delay.max(0.0)),
        timeout: std::time::Duration::from_secs_f64(args.drain_timeout.max(0.0)),
    };
    let server = tokio::spawn(conn::serve(listener, app, limits, drain.run(state.clone())));
    load_models(&state, &args, plans).await?;
    state.set_phase(state::Phase::Ready);
    let names: Vec<&str> = state.loaded().map(|s| &*s.model_name).collect();
    let model = names.join(", ");
    // Under systemd (Type=notify): the models are loaded and warm.
    inferd_server::notify::notify(&format!("READY=1\nSTATUS=serving {model} on {addr}"));
    // The ready line: tests and scripts read the bound address from it.
    println!("inferd listening on http://{addr} (model {model})");
    println!(
        "try: curl http://{addr}/v1/completions -H 'Content-Type: application/json' -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'"
    );
    tokio::spawn(sample_costs(state.clone()));
    server.await??;
    for s in state.loaded() {
        s.engine.shutdown();
    }
    // Let requests cut off by the shutdown queue their usage records, then
    // commit everything queued.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while state.live_meters.load(std::sync::atomic::Ordering::Acquire) > 0
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ledger.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_shorter_than_a_quota_window_is_refused() {
        let config = |limits: &str| -> tenants::Tenants {
            let text = format!(
                "[[tenants]]\nid = \"a\"\nkeys = [{{id = \"k\", sha256 = \"{}\"}}]\nlimits = {{{limits}}}\n",
                tenants::hash_key("k")
            );
            tenants::Tenants::new(&toml::from_str(&text).unwrap(), &Default::default(), 0).unwrap()
        };
        assert!(check_retention(None, &config("tokens_per_month = 5")).is_ok());
        assert!(check_retention(Some(7.0), &config("tokens_per_day = 5")).is_ok());
        let err = check_retention(Some(7.0), &config("tokens_per_month = 5")).unwrap_err().to_string();
        assert!(err.contains("tokens_per_month") && err.contains("32"), "{err}");
        assert!(check_retention(Some(40.0), &config("tokens_per_month = 5")).is_ok());
        assert!(check_retention(Some(0.5), &config("requests_per_minute = 5")).is_err());
    }
}
