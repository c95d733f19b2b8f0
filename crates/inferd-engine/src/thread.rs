//! The engine thread: one OS thread owns the [`EngineCore`] (scheduler and
//! executor) with no locks around them. Requests arrive as
//! commands; each request's events leave on its own channel. A request
//! whose receiver is dropped (the client went away) is aborted before the
//! next step, so its blocks are freed within one step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use inferd_contract::{Capabilities, ExecError, ModelExecutor};
use inferd_core::{FinishReason, RequestId, StreamEvent, TokenConstraint, TokenId};
use inferd_sched::{SchedulerStats, SequenceRequest};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{BackendHealth, EngineConfig, EngineCore, EngineError, SeqOutput};

/// The first wait before restarting a lost backend again after a failed
/// restart; doubled after each failure up to [`MAX_RESTART_BACKOFF`].
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(500);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);
/// How often an idle engine asks its backend whether it is still there.
const IDLE_CHECK: Duration = Duration::from_secs(1);

enum Command {
    Add {
        req: SequenceRequest,
        constraint: Option<Box<dyn TokenConstraint>>,
        events: UnboundedSender<StreamEvent>,
    },
    Abort {
        id: RequestId,
        reason: FinishReason,
    },
    Shutdown,
}

/// Counters the engine thread publishes after every step; read without
/// waiting on the engine (health checks, metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub num_running: AtomicU64,
    pub num_waiting: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_free: AtomicU64,
    pub num_preemptions: AtomicU64,
    /// Steps whose prefill was cut short to keep within the step-time target.
    pub num_capped_steps: AtomicU64,
    pub prefix_query_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Tokens sampled by all steps.
    pub generated_tokens: AtomicU64,
    /// Milliseconds since the engine started at the last finished step.
    pub last_step_ms: AtomicU64,
    /// Microseconds spent in steps (the engine's busy time).
    pub busy_micros: AtomicU64,
    /// Microseconds the engine thread spent between consecutive steps while
    /// work was queued: taking commands, delivering tokens, publishing
    /// counters. Serving overhead that no step computes.
    pub between_steps_micros: AtomicU64,
    /// Set while the engine has work queued or running.
    pub busy: AtomicBool,
    /// Set when the engine thread has exited.
    pub stopped: AtomicBool,
    /// 0 up, 1 restarting, 2 failed for good (see [`BackendHealth`]).
    backend_state: AtomicU8,
    /// Why the backend is not up (empty when it is).
    backend_reason: Mutex<String>,
    /// Times the backend was restarted after losing its state.
    pub backend_restarts: AtomicU64,
}

/// The backend's health as the engine thread last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub health: BackendHealth,
    pub restarts: u64,
}

impl EngineStats {
    fn publish(&self, s: &SchedulerStats) {
        let r = Ordering::Relaxed;
        self.num_running.store(s.num_running as u64, r);
        self.num_waiting.store(s.num_waiting as u64, r);
        self.kv_blocks_total.store(s.kv.num_blocks as u64, r);
        self.kv_blocks_free.store(s.kv.free as u64, r);
        self.num_preemptions.store(s.num_preemptions, r);
        self.num_capped_steps.store(s.num_capped_steps, r);
        self.prefix_query_tokens.store(s.kv.prefix_query_tokens, r);
        self.prefix_hit_tokens.store(s.kv.prefix_hit_tokens, r);
        self.busy.store(s.num_running + s.num_waiting > 0, r);
    }

    fn publish_health(&self, h: &BackendHealth) {
        let (state, reason) = match h {
            BackendHealth::Up => (0, ""),
            BackendHealth::Restarting { reason } => (1, reason.as_str()),
            BackendHealth::Failed { reason } => (2, reason.as_str()),
        };
        *self.backend_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
        self.backend_state.store(state, Ordering::Release);
    }

    /// The backend's health: up, restarting (with why), or failed for good.
    pub fn backend(&self) -> BackendStatus {
        let state = self.backend_state.load(Ordering::Acquire);
        let reason = self.backend_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let health = match state {
            0 => BackendHealth::Up,
            1 => BackendHealth::Restarting { reason },
            _ => BackendHealth::Failed { reason },
        };
        BackendStatus { health, restarts: self.backend_restarts.load(Ordering::Relaxed) }
    }

    /// KV blocks held by sequences.
    pub fn kv_blocks_used(&self) -> u64 {
        let r = Ordering::Relaxed;
        self.kv_blocks_total.load(r).saturating_sub(self.kv_blocks_free.load(r))
    }
}

/// The server's side of the engine thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    started: Instant,
    next_id: Arc<AtomicU64>,
    caps: Arc<Capabilities>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Add { req, .. } => write!(f, "Add({})", req.id),
            Command::Abort { id, .. } => write!(f, "Abort({id})"),
            Command::Shutdown => write!(f, "Shutdown"),
        }
    }
}

/// Raised when the engine thread is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the engine is not running")]
pub struct EngineGone;

impl EngineHandle {
    /// Starts the engine thread. `build` makes the executor on that thread
    /// (a device context belongs to the thread that uses it); the engine is
    /// then warmed up. Returns once it is ready to serve, or with the error
    /// that stopped it.
    pub fn start<E, F>(
        build: F,
        cfg: EngineConfig,
        eos_token_ids: Vec<TokenId>,
    ) -> Result<(EngineHandle, JoinHandle<()>), EngineError>
    where
        E: ModelExecutor + 'static,
        F: FnOnce() -> Result<E, ExecError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let stats = Arc::new(EngineStats::default());
        let started = Instant::now();
        let thread_stats = stats.clone();
        let join = std::thread::Builder::new()
            .name("inferd-engine".into())
            .spawn(move || {
                // Marks the engine stopped however the thread ends, panics included.
                let _guard = StoppedOnDrop(thread_stats.clone());
                let core = build().map_err(EngineError::from).and_then(|executor| {
                    let mut core = EngineCore::new(executor, &cfg, eos_token_ids)?;
                    core.warm_up()?;
                    Ok(core)
                });
                let core = match core {
                    Ok(core) => core,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                thread_stats.publish(&core.stats());
                let _ = ready_tx.send(Ok(core.capabilities().clone()));
                EngineLoop {
                    core,
                    rx,
                    stats: thread_stats,
                    streams: HashMap::new(),
                    started,
                    next_restart: None,
                    last_step_end: None,
                }
                .run();
            })
            .expect("spawning the engine thread");
        let caps = ready_rx
            .recv()
            .map_err(|_| EngineError::Inconsistent("the engine thread died while starting".into()))??;
        let handle = EngineHandle {
            commands: tx,
            stats,
            started,
            next_id: Arc::new(AtomicU64::new(1)),
            caps: Arc::new(caps),
        };
        Ok((handle, join))
    }

    /// The backend's capabilities, as it reported them when built.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// A fresh engine-side id.
    pub fn next_id(&self) -> RequestId {
        RequestId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Queues a sequence; its events arrive on the returned receiver. The
    /// first event is `Scheduled` or, if the engine refuses it, `Error`.
    pub fn add(&self, req: SequenceRequest) -> Result<UnboundedReceiver<StreamEvent>, EngineGone> {
        self.add_constrained(req, None)
    }

    /// [`EngineHandle::add`] for a sequence whose tokens `constraint` (a
    /// grammar) decides as well.
    pub fn add_constrained(
        &self,
        req: SequenceRequest,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<UnboundedReceiver<StreamEvent>, EngineGone> {
        let (events, rx) = unbounded_channel();
        self.commands.send(Command::Add { req, constraint, events }).map_err(|_| EngineGone)?;
        Ok(rx)
    }

    /// Ends a sequence now (stop string matched, deadline passed).
    pub fn abort(&self, id: RequestId, reason: FinishReason) {
        // A gone engine has nothing left to abort.
        let _ = self.commands.send(Command::Abort { id, reason });
    }

    /// Asks the engine thread to finish its loop.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Time since the last step finished, while the engine has work.
    pub fn stalled_for(&self) -> Option<Duration> {
        let r = Ordering::Relaxed;
        if !self.stats.busy.load(r) {
            return None;
        }
        let last = Duration::from_millis(self.stats.last_step_ms.load(r));
        Some(self.started.elapsed().saturating_sub(last))
    }
}

struct StoppedOnDrop(Arc<EngineStats>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Relaxed);
    }
}

struct EngineLoop<E> {
    core: EngineCore<E>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<EngineStats>,
    streams: HashMap<RequestId, UnboundedSender<StreamEvent>>,
    started: Instant,
    /// While the backend is restarting: when to try next, and the wait
    /// after that one if it fails.
    next_restart: Option<(Instant, Duration)>,
    /// When the last step ended, if work was left after it.
    last_step_end: Option<Instant>,
}

impl<E: ModelExecutor> EngineLoop<E> {
    fn run(mut self) {
        loop {
            // Sleep until a command arrives when idle (or until the next
            // restart of a lost backend); never spin.
            let up = *self.core.health() == BackendHealth::Up;
            // Idle with a healthy backend: wake now and then to ask it
            // whether it is still there (a worker can die between steps).
            let wait = match self.next_restart {
                _ if up && self.core.has_work() => None,
                Some((at, _)) => Some(at.saturating_duration_since(Instant::now())),
                None if up => Some(IDLE_CHECK),
                None => Some(Duration::MAX),
            };
            let first = match wait {
                None => None,
                Some(d) => match self.rx.recv_timeout(d) {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if up && !self.core.has_work() {
                            let lost = self.core.check_backend();
                            self.health_changed();
                            for o in lost {
                                self.deliver(o);
                            }
                        }
                        None
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut open = first.is_none_or(|cmd| self.handle(cmd));
            while let Ok(cmd) = self.rx.try_recv() {
                open &= self.handle(cmd);
            }
            if !open {
                break;
            }
            self.abort_abandoned();
            if matches!(self.next_restart, Some((at, _)) if at <= Instant::now()) {
                self.restart();
            }
            if *self.core.health() == BackendHealth::Up && self.core.has_work() {
                // Publishes the counters itself, before delivering events.
                self.step();
            } else {
                self.stats.publish(&self.core.stats());
            }
        }
        // Whatever is left ends with a shutdown event, never silence.
        for (id, events) in self.streams.drain() {
            self.core.abort(id, FinishReason::Abort);
            let _ = events.send(StreamEvent::Shutdown);
        }
        self.stats.publish(&self.core.stats());
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add { req, constraint, events } => {
                let id = req.id;
                match self.core.add_constrained(req, constraint) {
                    Ok(()) => {
                        self.streams.insert(id, events);
                    }
                    Err(e) => {
                        let _ = events.send(StreamEvent::Error { message: e.to_string() });
                    }
                }
            }
            Command::Abort { id, reason } => {
                if let Some(usage) = self.core.abort(id, reason)
                    && let Some(events) = self.streams.remove(&id)
                {
                    let _ = events.send(StreamEvent::Finished { reason, usage });
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// Publishes a backend that is no longer up and plans its restart: the
    /// first at once, backoff only after a failed one.
    fn health_changed(&mut self) {
        if *self.core.health() == BackendHealth::Up || self.next_restart.is_some() {
            return;
        }
        self.stats.publish_health(self.core.health());
        if matches!(self.core.health(), BackendHealth::Restarting { .. }) {
            self.next_restart = Some((Instant::now(), FIRST_RESTART_BACKOFF));
        }
    }

    /// Tries to bring a lost backend back; on failure waits twice as long
    /// before the next try.
    fn restart(&mut self) {
        let Some((_, backoff)) = self.next_restart else { return };
        match self.core.recover() {
            Ok(()) => {
                self.next_restart = None;
                self.stats.backend_restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_secs = backoff.as_secs_f64(), "restarting the backend failed");
                if let BackendHealth::Failed { reason } = self.core.health().clone() {
                    self.next_restart = None;
                    self.end_all(&format!("the device failed: {reason}"));
                } else {
                    self.next_restart =
                        Some((Instant::now() + backoff, (backoff * 2).min(MAX_RESTART_BACKOFF)));
                }
            }
        }
        self.stats.publish_health(self.core.health());
    }

    /// Ends every stream with an error (the engine holds none of them any more).
    fn end_all(&mut self, message: &str) {
        for (_, events) in self.streams.drain() {
            let _ = events.send(StreamEvent::Error { message: message.to_string() });
        }
    }

    /// Aborts sequences whose receiver is gone (client disconnected).
    fn abort_abandoned(&mut self) {
        let gone: Vec<RequestId> =
            self.streams.iter().filter(|(_, tx)| tx.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.streams.remove(&id);
            self.core.abort(id, FinishReason::Abort);
            tracing::debug!(%id, "client went away; sequence aborted");
        }
    }

    fn step(&mut self) {
        #[cfg(debug_assertions)]
        fault::stall();
        let started = Instant::now();
        if let Some(end) = self.last_step_end {
            let gap = started.saturating_duration_since(end).as_micros() as u64;
            self.stats.between_steps_micros.fetch_add(gap, Ordering::Relaxed);
        }
        let outputs = match self.core.step() {
            Ok(o) => o,
            Err(e) => self.fail_all(&e),
        };
        let took = started.elapsed();
        metrics::histogram!(crate::metrics::ENGINE_STEP_SECONDS).record(took.as_secs_f64());
        metrics::histogram!(crate::metrics::ENGINE_STEP_TOKENS).record(self.core.last_step_tokens() as f64);
        let r = Ordering::Relaxed;
        self.stats.steps.fetch_add(1, r);
        self.stats.busy_micros.fetch_add(took.as_micros() as u64, r);
        self.stats.last_step_ms.store(self.started.elapsed().as_millis() as u64, r);
        // Publish before delivering, so a client that sees its request end
        // also sees its blocks freed in /stats and /metrics.
        self.stats.publish(&self.core.stats());
        self.health_changed();
        for o in outputs {
            self.deliver(o);
        }
        self.last_step_end = self.core.has_work().then_some(started + took);
    }

    /// A scheduler error is a bug, not input: end every sequence cleanly.
    fn fail_all(&mut self, e: &EngineError) -> Vec<SeqOutput> {
        tracing::error!(error = %e, "engine step failed");
        let message = e.to_string();
        for (id, events) in self.streams.drain() {
            self.core.abort(id, FinishReason::Error);
            let _ = events.send(StreamEvent::Error { message: message.clone() });
        }
        Vec::new()
    }

    fn deliver(&mut self, o: SeqOutput) {
        let Some(events) = self.streams.get(&o.id) else { return };
        if o.first_scheduled {
            let _ =
                events.send(StreamEvent::Scheduled { cached_prompt_tokens: o.usage.cached_prompt_tokens });
        }
        if let Some(s) = o.sampled {
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let _ = events.send(StreamEvent::Token { token: s.token, logprobs: s.logprobs });
        }
        if let Some(reason) = o.finished {
            let event = match o.error {
                Some(message) => StreamEvent::Error { message },
                None => StreamEvent::Finished { reason, usage: o.usage },
            };
            let _ = events.send(event);
            self.streams.remove(&o.id);
        }
    }
}

/// Fault injection for tests, compiled into debug builds only:
/// `INFERD_FAULT_STALL_MS` makes every engine step sleep that long, so the
/// stall detection of /health and /ready can be exercised.
#[cfg(debug_assertions)]
mod fault {
    use std::sync::OnceLock;
    use std::time::Duration;

    pub(super) fn stall() {
        static STALL: OnceLock<Option<Duration>> = OnceLock::new();
        let stall = STALL.get_or_init(|| {
            std::env::var("INFERD_FAULT_STALL_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
        });
        if let Some(d) = stall {
            std::thread::sleep(*d);
        }
    }
}
