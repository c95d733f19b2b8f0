//! The Neuron backend (AWS Inferentia2). inferd keeps the engine: admission,
//! scheduling under compiled shapes, the block pool and prefix cache,
//! sampling parameters, metering. A step worker process holds the model
//! compiled ahead of time (NxD Inference on inf2: neuron/worker.py; on any
//! machine: the [`standin`] built from the CPU model) and runs one step per
//! message of the protocol in [`inferd_contract::wire`].
//!
//! [`NeuronExecutor`] starts and supervises that worker: it decides each
//! step's phase (prefill or decode: compiled models never mix them), pads
//! the step to the bucket the scheduler chose, and hands the block tables
//! through unchanged (the worker's KV cache uses NxDI's block layout with
//! the same block size and count, so our block ids are its block ids).
//! A worker that dies, hangs past `--neuron-step-timeout` or fails
//! internally is stopped and reported as [`ExecError::Lost`]; the engine
//! then ends the sequences it held and calls [`ModelExecutor::recover`],
//! which starts a fresh worker. A hardware error is [`ExecError::Hardware`]:
//! the instance stops taking work so the load balancer replaces it.

mod process;
pub mod standin;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use inferd_contract::wire::{FailureKind, FromWorker, KvLayout, Manifest, ToWorker};
use inferd_contract::{
    Capabilities, DeviceSpec, ExecError, ModelExecutor, ModelInput, ModelOutput, PaddedStep, Phase,
};
use inferd_core::RequestId;

use process::{CallError, WorkerProcess};

/// How to start the worker and how long to wait for it.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronConfig {
    /// The worker's command line (`--neuron-worker`, split on whitespace);
    /// `--socket PATH --model-dir DIR --model PATH` are appended.
    pub worker: Vec<String>,
    /// The compiled artifacts (`--neuron-model-dir`).
    pub model_dir: PathBuf,
    /// The model `--model` names (its config and tokenizer).
    pub model_path: PathBuf,
    /// Longest sequence served; at most what the model was compiled for.
    pub max_model_len: Option<usize>,
    /// How long one step may take before the worker counts as hung.
    pub step_timeout: Duration,
    /// How long the worker may take to load its model and answer hello.
    pub load_timeout: Duration,
}

/// Runs steps in a supervised step worker.
#[derive(Debug)]
pub struct NeuronExecutor {
    cfg: NeuronConfig,
    /// What the first worker loaded; every restart must load the same.
    manifest: Manifest,
    caps: Capabilities,
    worker: Option<WorkerProcess>,
    /// Sequences whose prompt the worker has prefilled: their next steps
    /// are decodes.
    prefilled: HashSet<RequestId>,
    last_step: u64,
}

impl NeuronExecutor {
    /// Starts the worker and takes its manifest as this backend's capabilities.
    pub fn start(cfg: NeuronConfig) -> Result<Self, ExecError> {
        let (worker, manifest) = WorkerProcess::start(&cfg)?;
        let caps = capabilities(&manifest, cfg.max_model_len)?;
        tracing::info!(
            model = %manifest.model,
            block_size = caps.block_size,
            num_blocks = caps.num_blocks,
            max_model_len = caps.max_model_len,
            buckets = ?caps.shape_buckets,
            "Neuron worker loaded its compiled model"
        );
        Ok(NeuronExecutor {
            cfg,
            manifest,
            caps,
            worker: Some(worker),
            prefilled: HashSet::new(),
            last_step: 0,
        })
    }

    /// The step's phase: decode when every sequence was prefilled by the
    /// worker and is still live, prefill when none was.
    fn phase(&self, input: &ModelInput) -> Result<Phase, ExecError> {
        let gone: HashSet<&RequestId> = input.finished.iter().chain(&input.preempted).collect();
        let decodes =
            input.seq_ids.iter().filter(|id| self.prefilled.contains(id) && !gone.contains(id)).count();
        match decodes {
            0 => Ok(Phase::Prefill),
            n if n == input.num_seqs() => Ok(Phase::Decode),
            _ => Err(ExecError::Input(
                "a compiled model runs prefill-only or decode-only steps; this one mixes them".into(),
            )),
        }
    }

    /// Stops the worker and forgets what it held.
    fn lose(&mut self, why: String) -> ExecError {
        if let Some(w) = self.worker.take() {
            tracing::error!(pid = w.pid(), reason = %why, "stopping the Neuron worker");
            drop(w);
        }
        self.prefilled.clear();
        ExecError::Lost(why)
    }
}

/// The capabilities a worker's manifest gives, checked.
fn capabilities(m: &Manifest, max_model_len: Option<usize>) -> Result<Capabilities, ExecError> {
    if m.kv_layout != KvLayout::Paged {
        return Err(ExecError::Config(format!(
            "the worker's KV cache is laid out {:?}; inferd drives NxDI's block layout only (compile with neuron/compile.py, which sets is_block_kv_layout)",
            m.kv_layout
        )));
    }
    let mut caps = m.capabilities.clone();
    if caps.device != DeviceSpec::Neuron || caps.device_sampling.is_none() {
        return Err(ExecError::Config(
            "the worker's manifest is not a Neuron model that samples on its device".into(),
        ));
    }
    let buckets = caps
        .shape_buckets
        .as_ref()
        .ok_or_else(|| ExecError::Config("the worker's manifest lists no compiled buckets".into()))?;
    buckets.validate().map_err(ExecError::Config)?;
    if caps.block_size == 0 || caps.num_blocks == 0 || caps.vocab_size == 0 {
        return Err(ExecError::Config("the worker's manifest has an empty KV cache or vocabulary".into()));
    }
    if let Some(max) = max_model_len {
        caps.max_model_len = caps.max_model_len.min(max);
    }
    Ok(caps)
}

impl ModelExecutor for NeuronExecutor {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError> {
        input.validate(self.caps.block_size, self.caps.num_blocks).map_err(ExecError::Input)?;
        let phase = self.phase(input)?;
        let buckets = self.caps.shape_buckets.as_ref().expect("checked at start");
        let shape = input.padded_shape.filter(|&s| buckets.contains(s)).ok_or_else(|| {
            ExecError::Input(format!(
                "step shape {:?} is not one of the compiled buckets",
                input.padded_shape
            ))
        })?;
        let padded = PaddedStep::pad(input, phase, shape).map_err(ExecError::Input)?;
        self.last_step += 1;
        let step = self.last_step;
        let Some(worker) = self.worker.as_mut() else {
            return Err(self.lose("the Neuron worker is not running".into()));
        };
        let reply = worker.call(&ToWorker::Step { step, input: Box::new(padded) }, self.cfg.step_timeout);
        // Ended sequences are gone from the worker whatever it answered.
        for id in input.finished.iter().chain(&input.preempted) {
            self.prefilled.remove(id);
        }
        match reply {
            Ok(FromWorker::Done { step: s, output: ModelOutput::Sampled(tokens) })
                if s == step && tokens.len() == input.logits_rows.len() =>
            {
                self.prefilled.extend(input.seq_ids.iter().copied());
                Ok(ModelOutput::Sampled(tokens))
            }
            Ok(FromWorker::Failed { kind: FailureKind::Refused, message, .. }) => {
                // The worker is fine; our step broke its contract (a bug here).
                Err(ExecError::Input(format!("the Neuron worker refused step {step}: {message}")))
            }
            Ok(FromWorker::Failed { kind: FailureKind::Hardware, message, .. }) => {
                self.lose(message.clone());
                Err(ExecError::Hardware(message))
            }
            Ok(FromWorker::Failed { kind: FailureKind::Internal, message, .. }) => {
                Err(self.lose(format!("the Neuron worker failed step {step}: {message}")))
            }
            Ok(other) => Err(self.lose(format!("the Neuron worker answered step {step} with {other:?}"))),
            Err(CallError::TimedOut) => Err(self.lose(format!(
                "step {step} took longer than {:?} (--neuron-step-timeout); the worker was stopped",
                self.cfg.step_timeout
            ))),
            Err(e) => {
                let why = worker.describe(e);
                Err(self.lose(format!("the Neuron worker died during step {step}: {why}")))
            }
        }
    }

    fn check(&mut self) -> Result<(), ExecError> {
        match self.worker.as_mut().map(WorkerProcess::exited) {
            Some(Some(status)) => {
                Err(self.lose(format!("the Neuron worker exited ({status}) between steps")))
            }
            Some(None) => Ok(()),
            None => Err(ExecError::Lost("the Neuron worker is not running".into())),
        }
    }

    fn recover(&mut self) -> Result<(), ExecError> {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.prefilled.clear();
        let (worker, manifest) = WorkerProcess::start(&self.cfg)?;
        if manifest != self.manifest {
            worker.stop();
            return Err(ExecError::Config(format!(
                "the restarted worker loaded another model ({}) than the first ({})",
                manifest.model, self.manifest.model
            )));
        }
        tracing::info!(pid = worker.pid(), "Neuron worker restarted");
        self.worker = Some(worker);
        Ok(())
    }
}

impl Drop for NeuronExecutor {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}
