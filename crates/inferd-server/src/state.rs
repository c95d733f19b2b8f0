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
    pub serving: OnceLock<Serving>,
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
    pub cost: Arc<crate::cost::CostTracker>,
    /// Requests whose usage record is not yet queued for the ledger.
    pub live_meters: Arc<std::sync::atomic::AtomicUsize>,
    /// How far the model's download and load have got (`/ready` shows it).
    pub load_progress: Arc<inferd_models::hub::LoadProgress>,
}

impl Default for AppState {
    fn default() -> Self {
        AppState {
            serving: OnceLock::new(),
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
            cost: Arc::new(crate::cost::CostTracker::new(None, Duration::from_secs(600))),
            live_meters: Default::default(),
            load_progress: Default::default(),
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

    /// Why the engine is unhealthy, if it is: stopped, its backend failed
    /// (a hardware error) or restarting (its worker died or hung), or busy
    /// without a finished step for longer than the stall timeout.
    pub fn engine_problem(&self) -> Option<&'static str> {
        let serving = self.serving.get()?;
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

    /// The loaded model, or 503 while loading.
    pub fn serving(&self) -> Result<&Serving, ApiError> {
        self.serving.get().ok_or_else(|| ApiError::Unavailable {
            message: "The model is still loading.".into(),
            retry_after_secs: 5,
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

    /// Refuses a request naming another model, or a model the tenant may
    /// not use.
    pub fn check_model(&self, requested: Option<&str>, caller: &Caller) -> Result<(), ApiError> {
        match requested {
            Some(m) if m != &*self.model_name => Err(ApiError::ModelNotFound(m.to_string())),
            _ if !caller.tenant.may_use(&self.model_name) => {
                Err(ApiError::ModelNotFound(requested.unwrap_or(&self.model_name).to_string()))
            }
            _ => Ok(()),
        }
    }
}
