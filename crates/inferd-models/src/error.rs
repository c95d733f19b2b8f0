use std::path::PathBuf;

use thiserror::Error;

/// Errors of model loading, tokenization and chat templating.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a model inferd can load: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("GGUF metadata key {0} is missing or has the wrong type")]
    MissingMetadata(String),
    #[error("the model's configuration is out of range: {0}")]
    BadConfig(String),
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, mistral)")]
    UnsupportedArchitecture(String),
    #[error("checksum mismatch for {path}: catalogue says sha256 {expected}, file has {actual}")]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("unknown model {name:?}; the catalogue has: {known}")]
    UnknownModel { name: String, known: String },
    #[error("invalid model catalogue {path}: {reason}")]
    Catalog { path: PathBuf, reason: String },
    #[error("{spec}: {reason}")]
    Hub { spec: String, reason: String },
    #[error("{spec} is not approved (--approved-only): {reason}")]
    NotApproved { spec: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
