//! The Python worker's protocol layer (neuron/protocol.py) against this
//! crate's definition of the protocol, through a real process and pipes:
//! neuron/fake_worker.py runs a deterministic fake model in place of NxDI
//! and enforces what a compiled model would.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use inferd_contract::wire::{
    FailureKind, FromWorker, KvLayout, Manifest, PROTOCOL_VERSION, ToWorker, read_frame, write_frame,
};
use inferd_contract::{
    Capabilities, DType, DeviceSampling, DeviceSpec, ModelInput, ModelOutput, PaddedShape, PaddedStep, Phase,
    ShapeBuckets,
};
use inferd_core::RequestId;

const VOCAB: u32 = 1000;
const BLOCK: usize = 4;

fn manifest() -> Manifest {
    Manifest {
        protocol: PROTOCOL_VERSION,
        model: "fake".into(),
        kv_layout: KvLayout::Paged,
        capabilities: Capabilities {
            device: DeviceSpec::Neuron,
            block_size: BLOCK,
            num_blocks: 64,
            max_model_len: 32,
            vocab_size: VOCAB as usize,
            compute_dtype: DType::BF16,
            supported_dtypes: vec![DType::BF16],
            kv_dtype: DType::BF16,
            shape_buckets: Some(ShapeBuckets { batch_sizes: vec![1, 2, 4], token_counts: vec![4, 16] }),
            device_sampling: Some(DeviceSampling { max_top_k: 256 }),
        },
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

fn spawn() -> Worker {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!(
        "inferd-worker-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_vec(&manifest()).unwrap()).unwrap();
    let mut child = Command::new("python3")
        .arg(root.join("neuron/fake_worker.py"))
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    Worker { child, stdin, stdout }
}

impl Worker {
    fn send(&mut self, msg: &ToWorker) {
        write_frame(&mut self.stdin, msg).unwrap();
    }
    fn recv(&mut self) -> FromWorker {
        read_frame(&mut self.stdout).unwrap()
    }
}

/// The fake model's token for a row.
fn fake_token(token: u32, position: u32) -> u32 {
    (token * 31 + position * 7 + 1) % VOCAB
}

fn input(seqs: &[(u64, &[u32], usize)], padded: (usize, usize)) -> Box<PaddedStep> {
    let mut input = ModelInput::new(8);
    for &(id, tokens, start) in seqs {
        let blocks: Vec<u32> = (0..8).map(|b| id as u32 * 8 + b).collect();
        input.push_seq(RequestId(id), tokens, start, &blocks, BLOCK, true);
    }
    let phase = if seqs.iter().all(|s| s.2 > 0) { Phase::Decode } else { Phase::Prefill };
    let shape = PaddedShape { batch: padded.0, tokens: padded.1 };
    Box::new(PaddedStep::pad(&input, phase, shape).unwrap())
}

#[test]
fn the_python_worker_speaks_the_protocol_and_enforces_the_contract() {
    let mut w = spawn();
    w.send(&ToWorker::Hello { protocol: PROTOCOL_VERSION });
    assert_eq!(w.recv(), FromWorker::Manifest(manifest()));

    // A prefill of two prompts, then a decode of both at the next positions.
    w.send(&ToWorker::Step {
        step: 1,
        input: input(&[(1, &[5, 6, 7], 0), (2, &[9, 8, 7, 6, 5], 0)], (2, 16)),
    });
    let want = vec![fake_token(7, 2), fake_token(5, 4)];
    match w.recv() {
        FromWorker::Done { step: 1, output: ModelOutput::Sampled(t) } => {
            assert_eq!(t.iter().map(|s| s.token).collect::<Vec<_>>(), want);
        }
        other => panic!("{other:?}"),
    }
    w.send(&ToWorker::Step { step: 2, input: input(&[(1, &[want[0]], 3), (2, &[want[1]], 5)], (2, 4)) });
    assert!(matches!(w.recv(), FromWorker::Done { step: 2, .. }));

    // What a compiled model cannot run is refused, and the worker goes on.
    let mut bad_padding = input(&[(1, &[1], 4)], (1, 4));
    bad_padding.padded.slot_mapping[2] = 9;
    let mut short = input(&[(1, &[1], 4)], (1, 4));
    short.padded.positions.pop();
    let refusals = [
        (input(&[(1, &[1], 4)], (1, 8)), "not a compiled bucket"),
        (bad_padding, "padding rows and positions must be empty"),
        (short, "positions has 3 entries"),
        (input(&[(1, &[1], 9)], (1, 4)), "holds 4 tokens"),
        (input(&[(3, &[1], 2)], (1, 4)), "holds 0 tokens"),
    ];
    for (step, (inp, why)) in refusals.into_iter().enumerate() {
        let step = 10 + step as u64;
        w.send(&ToWorker::Step { step, input: inp });
        match w.recv() {
            FromWorker::Failed { step: Some(s), kind: FailureKind::Refused, message } => {
                assert_eq!(s, step);
                assert!(message.contains(why), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    w.send(&ToWorker::Step { step: 20, input: input(&[(1, &[3], 4)], (1, 4)) });
    assert!(matches!(w.recv(), FromWorker::Done { step: 20, .. }), "still serving after refusals");

    w.send(&ToWorker::Shutdown);
    assert!(w.child.wait().unwrap().success());
}

#[test]
fn garbage_ends_the_worker_and_another_version_is_refused() {
    let mut w = spawn();
    w.send(&ToWorker::Hello { protocol: PROTOCOL_VERSION });
    w.recv();
    w.stdin.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(w.stdin);
    let out = w.child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a frame of this protocol"));

    let mut w = spawn();
    w.send(&ToWorker::Hello { protocol: 99 });
    match w.recv() {
        FromWorker::Failed { step: None, kind: FailureKind::Refused, message } => {
            assert!(message.contains("protocol 1") && message.contains("99"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.child.wait().unwrap().success());

    // An oversized frame is refused by its header.
    let mut w = spawn();
    w.send(&ToWorker::Hello { protocol: PROTOCOL_VERSION });
    w.recv();
    let mut frame = b"IFDW".to_vec();
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    w.stdin.write_all(&frame).unwrap();
    drop(w.stdin);
    let out = w.child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frames hold 1 to"));
}
