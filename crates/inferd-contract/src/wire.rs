//! The step protocol between inferd and a step worker in another process
//! (the Neuron backend's worker, or its stand-in), defined once here.
//!
//! A frame is the four bytes `IFDW`, a big-endian u32 length, then that many
//! bytes of one JSON message. A reader refuses a frame with another magic,
//! a length of 0 or over [`MAX_FRAME`] before allocating for it, and a
//! payload that is not a message; each is an error, never a guess.
//!
//! The conversation: inferd sends [`ToWorker::Hello`] with its protocol
//! version; the worker answers [`FromWorker::Manifest`] (what it compiled:
//! the [`Capabilities`], the KV layout) or [`FromWorker::Failed`]; then one
//! [`ToWorker::Step`] per engine step, each answered by [`FromWorker::Done`]
//! or [`FromWorker::Failed`] for that step; [`ToWorker::Shutdown`] ends it.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{Capabilities, ModelOutput, PaddedStep};

/// The version of this protocol; a worker speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts (64 MiB: a step of 256 sequences
/// with long block tables is a few MB of JSON).
pub const MAX_FRAME: usize = 64 << 20;

const MAGIC: [u8; 4] = *b"IFDW";

/// How the worker's KV cache is laid out, which decides what the step's
/// block tables mean to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvLayout {
    /// Blocks of `block_size` tokens addressed through the block tables.
    Paged,
    /// One contiguous slot per sequence up to `max_model_len`.
    Contiguous,
}

/// What a worker loaded, sent once after `Hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub protocol: u32,
    /// The compiled model's name or path, for logs.
    pub model: String,
    pub kv_layout: KvLayout,
    /// Buckets, sizes and the device's sampling (`device_sampling`).
    pub capabilities: Capabilities,
}

/// Messages inferd sends to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    Hello { protocol: u32 },
    Step { step: u64, input: Box<PaddedStep> },
    Shutdown,
}

/// Why a worker failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The message broke the contract (a shape that is not compiled, a
    /// decode before its prefill); the worker is fine.
    Refused,
    /// The device reported an error: the instance should be replaced.
    Hardware,
    /// Anything else; the worker may be restarted.
    Internal,
}

/// Messages a worker sends to inferd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    Manifest(Manifest),
    Done { step: u64, output: ModelOutput },
    Failed { step: Option<u64>, kind: FailureKind, message: String },
}

/// Errors reading or writing frames.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the stream ended")]
    Closed,
    #[error("not a frame of this protocol (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("a frame of {0} bytes; frames hold 1 to {MAX_FRAME} bytes")]
    BadLength(u64),
    #[error("a frame that is not a message: {0}")]
    BadMessage(String),
    #[error("the worker speaks protocol {worker}, inferd speaks {ours}")]
    Version { worker: u32, ours: u32 },
}

/// Writes one message as a frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg).map_err(|e| WireError::BadMessage(e.to_string()))?;
    if body.is_empty() || body.len() > MAX_FRAME {
        return Err(WireError::BadLength(body.len() as u64));
    }
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&MAGIC);
    head[4..].copy_from_slice(&(body.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(&body)?;
    w.flush()?;
    Ok(())
}

/// Reads one message; [`WireError::Closed`] when the stream ends cleanly
/// before a frame starts.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, WireError> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let magic: [u8; 4] = head[..4].try_into().expect("four bytes");
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let len = u32::from_be_bytes(head[4..].try_into().expect("four bytes")) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::BadLength(len as u64));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| WireError::BadMessage(e.to_string()))
}

/// Checks a worker's manifest against this side of the protocol.
pub fn check_manifest(m: &Manifest) -> Result<(), WireError> {
    if m.protocol != PROTOCOL_VERSION {
        return Err(WireError::Version { worker: m.protocol, ours: PROTOCOL_VERSION });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{DType, DeviceSpec, ModelInput, PaddedShape, Phase, SampledToken, ShapeBuckets};

    fn manifest() -> Manifest {
        Manifest {
            protocol: PROTOCOL_VERSION,
            model: "llama-3.2-1b".into(),
            kv_layout: KvLayout::Paged,
            capabilities: Capabilities {
                device: DeviceSpec::Neuron,
                block_size: 32,
                num_blocks: 512,
                max_model_len: 4096,
                vocab_size: 128_256,
                compute_dtype: DType::BF16,
                supported_dtypes: vec![DType::BF16],
                kv_dtype: DType::BF16,
                shape_buckets: Some(ShapeBuckets { batch_sizes: vec![1, 4], token_counts: vec![128, 512] }),
                device_sampling: Some(crate::DeviceSampling { max_top_k: 256 }),
            },
        }
    }

    fn frames<T: Serialize>(msgs: &[T]) -> Vec<u8> {
        let mut buf = Vec::new();
        for m in msgs {
            write_frame(&mut buf, m).unwrap();
        }
        buf
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let mut input = ModelInput::new(2);
        input.push_seq(inferd_core::RequestId(3), &[10, 11, 12], 0, &[7], 4, true);
        let padded = PaddedStep::pad(&input, Phase::Prefill, PaddedShape { batch: 1, tokens: 4 }).unwrap();
        let to = vec![
            ToWorker::Hello { protocol: PROTOCOL_VERSION },
            ToWorker::Step { step: 7, input: Box::new(padded) },
            ToWorker::Shutdown,
        ];
        let mut r = Cursor::new(frames(&to));
        for want in &to {
            assert_eq!(&read_frame::<_, ToWorker>(&mut r).unwrap(), want);
        }
        assert!(matches!(read_frame::<_, ToWorker>(&mut r), Err(WireError::Closed)));

        let from = vec![
            FromWorker::Manifest(manifest()),
            FromWorker::Done {
                step: 7,
                output: ModelOutput::Sampled(vec![SampledToken { token: 42, logprobs: None }]),
            },
            FromWorker::Failed {
                step: Some(8),
                kind: FailureKind::Hardware,
                message: "NRT_EXEC_HW_ERR".into(),
            },
        ];
        let mut r = Cursor::new(frames(&from));
        for want in &from {
            assert_eq!(&read_frame::<_, FromWorker>(&mut r).unwrap(), want);
        }
    }

    #[test]
    fn garbage_oversized_and_truncated_frames_are_errors() {
        let read = |bytes: Vec<u8>| read_frame::<_, ToWorker>(&mut Cursor::new(bytes));
        assert!(matches!(read(b"GET / HTTP/1.1\r\n".to_vec()), Err(WireError::BadMagic(_))));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(read(huge), Err(WireError::BadLength(_))), "refused before allocating 4 GiB");
        let mut empty = MAGIC.to_vec();
        empty.extend_from_slice(&0u32.to_be_bytes());
        assert!(matches!(read(empty), Err(WireError::BadLength(0))));
        let mut good = frames(&[ToWorker::Shutdown]);
        good.truncate(good.len() - 1);
        assert!(matches!(read(good), Err(WireError::Io(_))));
        assert!(matches!(read(b"IFD".to_vec()), Err(WireError::Io(_))));
        let mut not_json = MAGIC.to_vec();
        not_json.extend_from_slice(&3u32.to_be_bytes());
        not_json.extend_from_slice(b"{x}");
        assert!(matches!(read(not_json), Err(WireError::BadMessage(_))));
        let mut unknown = MAGIC.to_vec();
        let body = br#"{"type":"reboot"}"#;
        unknown.extend_from_slice(&(body.len() as u32).to_be_bytes());
        unknown.extend_from_slice(body);
        assert!(matches!(read(unknown), Err(WireError::BadMessage(_))));
    }

    #[test]
    fn a_worker_of_another_version_is_refused() {
        check_manifest(&manifest()).unwrap();
        let old = Manifest { protocol: 0, ..manifest() };
        let err = check_manifest(&old).unwrap_err().to_string();
        assert_eq!(err, "the worker speaks protocol 0, inferd speaks 1");
    }
}
