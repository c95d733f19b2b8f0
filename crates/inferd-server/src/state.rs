//! What every handler shares.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use inferd_engine::{BackendHealth, BackendStatus, EngineHandle};
use inferd_models::{ChatTemplate, TextTokenizer};

use crate::error::ApiError;
use crate::tenants::Caller;

/// The model being served, once loaded.
#[derive(Debug)]
pub struct Serving {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub model_name: Arc<str>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Tokens the whole KV cache holds.
    pub kv_capacity_tokens: usize,
    /// The longest prompt a compiled-shape backend can prefill (its largest
    /// compiled token count); `None` when prompts are prefilled in chunks.
    pub max_prompt_tokens: Option<usize>,
    /// Sequences a client is still waiting on (draining waits for these).
    pub open_choices: Arc<std::sync::atomic::AtomicUsize>,
    /// Structured output's grammars for this model's vocabulary, or why
    /// there are none (a tokenizer llguidance cannot read).
    pub grammars: Result<Arc<inferd_grammar::Grammars>, String>,
    /// The price of this model's tokens.
    pub cost: Arc<crate::cost::CostTracker>,
}

/// One model of the instance: loading, loaded, or failed with a reason.
#[derive(Debug)]
pub struct ModelSlot {
    /// The name clients send.
    pub name: Arc<str>,
    pub serving: OnceLock<Serving>,
    pub failed: OnceLock<String>,
    /// How far its download and load have got.
    pub progress: Arc<inferd_models::hub::LoadProgress>,
}

impl ModelSlot {
    pub fn new(name: &str) -> Self {
        ModelSlot {
            name: name.into(),
            serving: OnceLock::new(),
            failed: OnceLock::new(),
            progress: Default::default(),
        }
    }

    /// `ready`, `loading` or `failed`.
    pub fn status(&self) -> &'static str {
        match (self.serving.get(), self.failed.get()) {
            (Some(_), _) => "ready",
            (None, Some(_)) => "failed",
            (None, None) => "loading",
        }
    }
}

/// Where the process is in its life, as readiness reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Loading = 0,
    Ready = 1,
    Draining = 2,
}

/// Shared state: the port listens before the model is loaded, so `serving`
/// is filled in once loading finishes.
#[derive(Debug)]
pub struct AppState {
    /// The models, in the order they were given; the first is the default
    /// for a request that names none.
    pub models: Vec<ModelSlot>,
    pub phase: AtomicU8,
    pub started: Instant,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The engine counts as stalled when it has work but has not finished a
    /// step for this long.
    pub stall_timeout: Duration,
    pub sse_keepalive: Duration,
    pub admission: Arc<crate::admission::Admission>,
    pub max_queue_wait: Duration,
    pub request_timeout: Duration,
    /// Set once the drain delay has passed: new API requests are refused.
    pub refusing: std::sync::atomic::AtomicBool,
    /// Replaced whole when the config is reloaded (SIGHUP).
    pub tenants: std::sync::RwLock<Arc<crate::tenants::Tenants>>,
    /// The usage ledger (absent only in unit tests).
    pub ledger: Option<Arc<inferd_ledger::Ledger>>,
    /// Requests whose usage record is not yet queued for the ledger.
    pub live_meters: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether `/` serves the console.
    pub console: bool,
}

impl Default for AppState {
    fn default() -> Self {
        AppState {
            models: Vec::new(),
            phase: AtomicU8::new(Phase::Loading as u8),
            started: Instant::now(),
            metrics: None,
            stall_timeout: Duration::from_secs(60),
            sse_keepalive: Duration::from_secs(15),
            admission: crate::admission::Admission::new(256, 1_000_000),
            max_queue_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            refusing: std::sync::atomic::AtomicBool::new(false),
            tenants: std::sync::RwLock::new(Arc::new(
                crate::tenants::Tenants::new(&Default::default(), &Default::default(), 0)
                    .expect("the open configuration is valid"),
            )),
            ledger: None,
            live_meters: Default::default(),
            console: false,
        }
    }
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// The tenants now.
    pub fn tenants(&self) -> Arc<crate::tenants::Tenants> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_tenants(&self, tenants: crate::tenants::Tenants) {
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tenants);
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The models loaded so far.
    pub fn loaded(&self) -> impl Iterator<Item = &Serving> {
        self.models.iter().filter_map(|m| m.serving.get())
    }

    /// A loaded model by the name clients use (already checked for the
    /// caller), for work moved to another thread.
    pub fn loaded_named(&self, name: &str) -> Result<&Serving, ApiError> {
        self.loaded()
            .find(|s| &*s.model_name == name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
    }

    /// Why an engine is unhealthy, if one is: stopped, its backend failed
    /// (a hardware error) or restarting (its worker died or hung), or busy
    /// without a finished step for longer than the stall timeout.
    pub fn engine_problem(&self) -> Option<&'static str> {
        self.loaded().find_map(|serving| {
            if serving.engine.stats().stopped.load(Ordering::Relaxed) {
                return Some("engine_stopped");
            }
            match serving.engine.stats().backend().health {
                BackendHealth::Up => {}
                BackendHealth::Restarting { .. } => return Some("backend_restarting"),
                BackendHealth::Failed { .. } => return Some("backend_failed"),
            }
            match serving.engine.stalled_for() {
                Some(d) if d > self.stall_timeout => Some("stalled"),
                _ => None,
            }
        })
    }

    /// Refuses new work with 503 while the ledger's backlog is full (its
    /// store has been failing for a while): records are never dropped, so
    /// the instance stops taking requests instead.
    pub fn check_ledger(&self) -> Result<(), ApiError> {
        match &self.ledger {
            Some(l) if l.backlog_full() => Err(ApiError::Unavailable {
                message:
                    "This instance cannot record usage right now (its ledger is unreachable); retry shortly."
                        .into(),
                retry_after_secs: 10,
            }),
            _ => Ok(()),
        }
    }

    /// The model a request names (the first model when it names none),
    /// if the caller may use it: 404 for a model this instance does not
    /// serve to the caller, 503 while it loads or when it failed to.
    pub fn serving_for(&self, requested: Option<&str>, caller: &Caller) -> Result<&Serving, ApiError> {
        if self.models.is_empty() {
            return Err(ApiError::Unavailable {
                message: "The model is still loading.".into(),
                retry_after_secs: 5,
            });
        }
        let slot = match requested {
            Some(m) => self.models.iter().find(|s| &*s.name == m),
            None => self.models.first(),
        };
        let not_found = || ApiError::ModelNotFound(requested.unwrap_or_default().to_string());
        let slot = match slot {
            Some(s) if caller.tenant.may_use(&s.name) => s,
            Some(s) if requested.is_none() => return Err(ApiError::ModelNotFound(s.name.to_string())),
            _ => return Err(not_found()),
        };
        if let Some(serving) = slot.serving.get() {
            return Ok(serving);
        }
        Err(ApiError::Unavailable {
            message: match slot.failed.get() {
                Some(why) => format!("The model {} failed to load on this instance: {why}", slot.name),
                None => format!("The model {} is still loading.", slot.name),
            },
            retry_after_secs: if slot.failed.get().is_some() { 60 } else { 5 },
        })
    }
}

/// The backend's health for /ready and /stats.
pub fn backend_json(b: &BackendStatus) -> serde_json::Value {
    let (status, reason) = match &b.health {
        BackendHealth::Up => ("up", None),
        BackendHealth::Restarting { reason } => ("restarting", Some(reason)),
        BackendHealth::Failed { reason } => ("failed", Some(reason)),
    };
    serde_json::json!({"status": status, "reason": reason, "restarts": b.restarts})
}

impl Serving {
    /// Refuses new work with 503 while the backend cannot run it.
    pub fn check_backend(&self) -> Result<(), ApiError> {
        match self.engine.stats().backend().health {
            BackendHealth::Up => Ok(()),
            BackendHealth::Restarting { .. } => Err(ApiError::Unavailable {
                message: "The model's worker is restarting after a failure; retry shortly.".into(),
                retry_after_secs: 5,
            }),
            BackendHealth::Failed { .. } => Err(ApiError::Unavailable {
                message: "This instance's accelerator failed and it is being taken out of service; retry on another instance.".into(),
                retry_after_secs: 60,
            }),
        }
    }
}
