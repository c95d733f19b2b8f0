//! A stand-in for the Neuron step worker, built from inferd's CPU model,
//! so the whole Neuron path runs and is tested on any machine. It reads the
//! same compiled manifest (`inferd-compiled.json`) that neuron/compile.py
//! writes next to NxDI's artifacts, speaks the same protocol, and holds the
//! worker to what a compiled model allows:
//!
//! - a step's shape is exactly one compiled bucket, its arrays have that
//!   shape, and its padding is padding;
//! - a sequence is decoded only after its prefill, one token at the next
//!   position; a prefill starts at 0 or after whole cached blocks whose
//!   slots hold exactly those positions (a prefix hit);
//! - nothing runs past the compiled maximum length;
//! - sampling is what the device supports (temperature, top-p, top-k up to
//!   the compiled global top-k, seeds), done here as a device would, so a
//!   step returns token ids, never logits.
//!
//! Anything else is answered `refused`. The tokens are real: the CPU
//! executor computes them over its own paged KV cache, so greedy output
//! through the stand-in equals the CPU backend's.
//!
//! Test hooks: `--claim-protocol N` answers with another protocol version;
//! the file named by `INFERD_STANDIN_FAULTS`, when it exists at a step, is
//! read, removed and obeyed: `exit` (the process dies mid-step), `sleep MS`,
//! `hardware` or `internal` (that failure is reported for the step).
//! Bench hook: with `INFERD_STANDIN_ECHO=1` every check still runs but the
//! model does not (each sampled row gets token 1), so a step costs only the
//! protocol round trip (benches/neuron_roundtrip.rs).

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use inferd_contract::wire::{
    FailureKind, FromWorker, KvLayout, Manifest, PROTOCOL_VERSION, ToWorker, read_frame, write_frame,
};
use inferd_contract::{
    Capabilities, DType, DeviceSampling, DeviceSpec, ModelExecutor, PaddedStep, Phase, SampledToken,
    ShapeBuckets,
};
use inferd_core::{RequestId, SamplingParams};
use inferd_models::{LoadOptions, WeightFormat, load_weights};
use serde::{Deserialize, Serialize};

use crate::cpu::{CpuExecutor, CpuExecutorConfig, block_bytes};
use crate::sampler::{SampleContext, sample};

/// The file in a compiled model's folder that tells a worker (and inferd)
/// what was compiled.
pub const COMPILED_FILE: &str = "inferd-compiled.json";

/// What was compiled: written by neuron/compile.py from the NxDI
/// `NeuronConfig` it compiled with, read by the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompiledModel {
    pub model: String,
    pub kv_layout: KvLayout,
    /// NxDI's `pa_block_size` and `pa_num_blocks`.
    pub block_size: usize,
    pub num_blocks: usize,
    /// NxDI's `seq_len`.
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub dtype: DType,
    /// Sequences per step (NxDI's batch buckets), ascending.
    pub batch_sizes: Vec<usize>,
    /// Tokens per step (NxDI's context-encoding buckets), ascending.
    pub token_counts: Vec<usize>,
    /// NxDI's `on_device_sampling_config.global_topk`.
    pub max_top_k: u32,
    pub tp_degree: usize,
}

impl CompiledModel {
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(COMPILED_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The manifest a worker answers hello with.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            protocol: PROTOCOL_VERSION,
            model: self.model.clone(),
            kv_layout: self.kv_layout,
            capabilities: Capabilities {
                device: DeviceSpec::Neuron,
                block_size: self.block_size,
                num_blocks: self.num_blocks,
                max_model_len: self.max_model_len,
                vocab_size: self.vocab_size,
                compute_dtype: self.dtype,
                supported_dtypes: vec![self.dtype],
                kv_dtype: self.dtype,
                shape_buckets: Some(ShapeBuckets {
                    batch_sizes: self.batch_sizes.clone(),
                    token_counts: self.token_counts.clone(),
                }),
                device_sampling: Some(DeviceSampling { max_top_k: self.max_top_k }),
            },
        }
    }
}

type Refusal = (FailureKind, String);

fn refused(message: String) -> Refusal {
    (FailureKind::Refused, message)
}

/// The stand-in's model and what it knows of each sequence.
#[derive(Debug)]
pub struct StandIn {
    compiled: CompiledModel,
    exec: CpuExecutor,
    /// Tokens each prefilled sequence holds.
    held: HashMap<RequestId, u32>,
    params: HashMap<RequestId, Arc<SamplingParams>>,
    /// The position written to each KV slot, if any.
    slots: Vec<Option<u32>>,
    faults: Option<PathBuf>,
    echo: bool,
}

impl StandIn {
    /// Loads `model` (a GGUF file or Hugging Face folder) on the CPU with the
    /// KV cache `compiled` describes.
    pub fn load(compiled: CompiledModel, model: &Path) -> Result<Self, String> {
        let opts = LoadOptions {
            format: WeightFormat::Native,
            dtype: candle_core::DType::F32,
            max_positions: Some(compiled.max_model_len),
            device: Device::Cpu,
        };
        let llama = load_weights(model, &opts).map_err(|e| format!("{}: {e}", model.display()))?;
        let mc = llama.config();
        if mc.vocab_size != compiled.vocab_size {
            return Err(format!(
                "{} has a vocabulary of {}, the compiled model {}",
                model.display(),
                mc.vocab_size,
                compiled.vocab_size
            ));
        }
        let per_block =
            block_bytes(mc.num_layers, compiled.block_size, mc.num_kv_heads, mc.head_dim, DType::F32);
        let exec = CpuExecutor::new(
            llama,
            CpuExecutorConfig {
                block_size: compiled.block_size,
                kv_cache_memory: compiled.num_blocks * per_block,
                kv_dtype: DType::F32,
                max_model_len: compiled.max_model_len,
            },
        )
        .map_err(|e| e.to_string())?;
        let slots = vec![None; compiled.num_blocks * compiled.block_size];
        let mut exec = exec;
        warm_up(&mut exec, compiled.block_size)?;
        Ok(StandIn {
            compiled,
            exec,
            held: HashMap::new(),
            params: HashMap::new(),
            slots,
            faults: std::env::var_os("INFERD_STANDIN_FAULTS").map(PathBuf::from),
            echo: std::env::var_os("INFERD_STANDIN_ECHO").is_some_and(|v| v == "1"),
        })
    }

    /// Runs one step, or says why a compiled model could not.
    pub fn step(&mut self, step: &PaddedStep) -> Result<Vec<SampledToken>, Refusal> {
        // Ended sequences are dropped first, so a refused step still frees them.
        let lifecycle = &step.padded;
        for id in lifecycle.finished.iter().chain(&lifecycle.preempted) {
            self.held.remove(id);
            if lifecycle.finished.contains(id) {
                self.params.remove(id);
            }
        }
        let c = &self.compiled;
        let (batch, tokens) = (step.shape.batch, step.shape.tokens);
        if !c.batch_sizes.contains(&batch) || !c.token_counts.contains(&tokens) {
            return Err(refused(format!("step shape {batch}x{tokens} is not a compiled bucket")));
        }
        let input = step.unpad().map_err(refused)?;
        input.validate(c.block_size, c.num_blocks).map_err(refused)?;
        for s in &input.started {
            if self.params.insert(s.id, s.params.clone()).is_some() {
                return Err(refused(format!("{} started twice", s.id)));
            }
        }
        let sampling = DeviceSampling { max_top_k: c.max_top_k };
        for (s, &id) in input.seq_ids.iter().enumerate() {
            let params = self.params.get(&id).ok_or_else(|| refused(format!("{id} was never started")))?;
            if let Some((_, why)) = sampling.refuses(params) {
                return Err(refused(format!("{id}: {why}")));
            }
            let ctx = input.context_lens[s];
            let first = ctx - input.query_range(s).len() as u32;
            if ctx as usize > c.max_model_len {
                return Err(refused(format!(
                    "{id}: {ctx} tokens is past the compiled maximum {}",
                    c.max_model_len
                )));
            }
            match (step.phase, self.held.get(&id)) {
                (Phase::Decode, Some(&held)) if held == first => {}
                (Phase::Decode, Some(&held)) => {
                    return Err(refused(format!(
                        "{id}: decodes at position {first} but holds {held} tokens"
                    )));
                }
                (Phase::Decode, None) => return Err(refused(format!("{id}: decode before its prefill"))),
                (Phase::Prefill, Some(_)) => return Err(refused(format!("{id}: prefilled twice"))),
                (Phase::Prefill, None) => self.check_prefix(&input, s, first)?,
            }
        }
        self.fault()?;
        if self.echo {
            self.record(&input);
            let token = SampledToken { token: 1, logprobs: None };
            return Ok(vec![token; input.logits_rows.len()]);
        }
        let logits = self
            .exec
            .execute(&input)
            .and_then(|out| out.into_logits())
            .map_err(|e| (FailureKind::Internal, e.to_string()))?;
        self.record(&input);
        let mut logits = logits;
        let rows = input.row_seqs();
        let mut out = Vec::with_capacity(rows.len());
        for (row, s) in rows.into_iter().enumerate() {
            let params = &self.params[&input.seq_ids[s]];
            // The device always applies its global top-k.
            let device =
                SamplingParams { top_k: Some(sampling.effective_top_k(params)), ..(**params).clone() };
            // Only its length matters here: it seeds the draw.
            let history = vec![0; input.context_lens[s] as usize];
            let ctx = SampleContext {
                params: &device,
                tokens: &history,
                prompt_len: 0,
                eos_token_ids: &[],
                allowed: None,
            };
            out.push(sample(logits.row_mut(row), &ctx));
        }
        Ok(out)
    }

    /// What the step wrote: each slot's position, each sequence's length.
    fn record(&mut self, input: &inferd_contract::ModelInput) {
        for i in 0..input.num_tokens() {
            self.slots[input.slot_mapping[i] as usize] = Some(input.positions[i]);
        }
        for (s, &id) in input.seq_ids.iter().enumerate() {
            self.held.insert(id, input.context_lens[s]);
        }
    }

    /// A prefill starting at `first` > 0 reuses whole cached blocks: each
    /// position before it must be in a slot written at that position.
    fn check_prefix(&self, input: &inferd_contract::ModelInput, s: usize, first: u32) -> Result<(), Refusal> {
        let bs = self.compiled.block_size;
        let id = input.seq_ids[s];
        if !(first as usize).is_multiple_of(bs) {
            return Err(refused(format!("{id}: a prefill starts at {first}, not at a block boundary")));
        }
        let table = input.block_table(s);
        for p in 0..first as usize {
            let slot = table[p / bs] as usize * bs + p % bs;
            if self.slots[slot] != Some(p as u32) {
                return Err(refused(format!(
                    "{id}: cached position {p} reads slot {slot}, which holds {:?}",
                    self.slots[slot]
                )));
            }
        }
        Ok(())
    }

    /// Obeys the fault file, if a test left one.
    fn fault(&self) -> Result<(), Refusal> {
        let Some(path) = &self.faults else { return Ok(()) };
        let Ok(cmd) = std::fs::read_to_string(path) else { return Ok(()) };
        let _ = std::fs::remove_file(path);
        let cmd = cmd.trim();
        match cmd.split_once(' ').unwrap_or((cmd, "")) {
            ("exit", _) => std::process::exit(17),
            ("sleep", ms) => std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0))),
            ("hardware", _) => {
                return Err((FailureKind::Hardware, "NRT_EXEC_HW_ERR_HBM_UE (status 1202), injected".into()));
            }
            ("internal", _) => return Err((FailureKind::Internal, "injected internal failure".into())),
            _ => eprintln!("inferd neuron-standin: unknown fault {cmd:?}"),
        }
        Ok(())
    }
}

/// One small forward before answering hello, as NxDI warms its compiled
/// graphs up when it loads them, so the first real step is not the slowest.
/// Its KV lands in block 0 but is never recorded as written.
fn warm_up(exec: &mut CpuExecutor, block_size: usize) -> Result<(), String> {
    let mut input = inferd_contract::ModelInput::new(1);
    let tokens: Vec<u32> = (1..=block_size.min(8) as u32).collect();
    input.push_seq(RequestId(u64::MAX), &tokens, 0, &[0], block_size, true);
    exec.execute(&input).map(drop).map_err(|e| format!("warming up: {e}"))
}

/// The stand-in's command line: `--socket PATH --model-dir DIR --model
/// PATH [--claim-protocol N]`. Returns the exit code.
pub fn main_with_args(args: &[String]) -> i32 {
    let mut flags: HashMap<&str, &str> = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            (f @ ("--socket" | "--model-dir" | "--model" | "--claim-protocol"), Some(v)) => {
                flags.insert(f, v);
            }
            _ => {
                eprintln!(
                    "usage: inferd neuron-standin --socket PATH --model-dir DIR --model PATH [--claim-protocol N]"
                );
                return 2;
            }
        }
    }
    let (Some(socket), Some(dir), Some(model)) =
        (flags.get("--socket"), flags.get("--model-dir"), flags.get("--model"))
    else {
        eprintln!("inferd neuron-standin: --socket, --model-dir and --model are required");
        return 2;
    };
    let protocol = flags.get("--claim-protocol").and_then(|v| v.parse().ok()).unwrap_or(PROTOCOL_VERSION);
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("inferd neuron-standin: connecting to {socket}: {e}");
            return 1;
        }
    };
    match serve(&mut stream, Path::new(dir), Path::new(model), protocol) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("inferd neuron-standin: {e}");
            1
        }
    }
}

fn serve(stream: &mut UnixStream, dir: &Path, model: &Path, protocol: u32) -> Result<(), String> {
    let fail = |stream: &mut UnixStream, step, kind, message: String| {
        write_frame(stream, &FromWorker::Failed { step, kind, message: message.clone() })
            .map_err(|e| e.to_string())?;
        Err::<(), String>(message)
    };
    match read_frame::<_, ToWorker>(stream).map_err(|e| e.to_string())? {
        ToWorker::Hello { protocol: p } if p == PROTOCOL_VERSION => {}
        ToWorker::Hello { protocol: p } => {
            let why = format!("the worker speaks protocol {PROTOCOL_VERSION}, inferd speaks {p}");
            return fail(stream, None, FailureKind::Refused, why);
        }
        other => return Err(format!("expected hello, got {other:?}")),
    }
    let loaded = CompiledModel::read(dir).and_then(|c| StandIn::load(c, model));
    let mut standin = match loaded {
        Ok(s) => s,
        Err(e) => return fail(stream, None, FailureKind::Internal, e),
    };
    let manifest = Manifest { protocol, ..standin.compiled.manifest() };
    write_frame(stream, &FromWorker::Manifest(manifest)).map_err(|e| e.to_string())?;
    loop {
        let msg = match read_frame::<_, ToWorker>(stream) {
            Ok(m) => m,
            Err(inferd_contract::wire::WireError::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let reply = match msg {
            ToWorker::Shutdown => return Ok(()),
            ToWorker::Hello { .. } => {
                FromWorker::Failed { step: None, kind: FailureKind::Refused, message: "hello twice".into() }
            }
            ToWorker::Step { step, input } => match standin.step(&input) {
                Ok(tokens) => {
                    FromWorker::Done { step, output: inferd_contract::ModelOutput::Sampled(tokens) }
                }
                Err((kind, message)) => FromWorker::Failed { step: Some(step), kind, message },
            },
        };
        write_frame(stream, &reply).map_err(|e| e.to_string())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_python_worker_builds_the_same_manifest_from_the_same_file() {
        let compiled = CompiledModel {
            model: "m".into(),
            kv_layout: KvLayout::Paged,
            block_size: 32,
            num_blocks: 100,
            max_model_len: 4096,
            vocab_size: 128_256,
            dtype: DType::BF16,
            batch_sizes: vec![8],
            token_counts: vec![128, 256],
            max_top_k: 256,
            tp_degree: 2,
        };
        let neuron = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../neuron");
        let script = "import json, sys, protocol; print(json.dumps(protocol.manifest_from_compiled(json.load(sys.stdin))))";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .current_dir(&neuron)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        serde_json::to_writer(child.stdin.take().unwrap(), &compiled).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let from_python: Manifest = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(from_python, compiled.manifest());
    }
}
