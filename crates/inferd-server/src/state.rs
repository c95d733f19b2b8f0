//! What every handler shares.

use std::sync::{Arc, OnceLock};

use inferd_engine::EngineHandle;
use inferd_models::{ChatTemplate, TextTokenizer};

use crate::error::ApiError;

/// The model being served, once loaded.
#[derive(Debug)]
pub struct Serving {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub model_name: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Tokens the whole KV cache holds.
    pub kv_capacity_tokens: usize,
}

/// Shared state: the port listens before the model is loaded, so `serving`
/// is filled in once loading finishes.
#[derive(Debug, Default)]
pub struct AppState {
    pub serving: OnceLock<Serving>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The loaded model, or 503 while loading.
    pub fn serving(&self) -> Result<&Serving, ApiError> {
        self.serving.get().ok_or_else(|| ApiError::Unavailable {
            message: "The model is still loading.".into(),
            retry_after_secs: 5,
        })
    }
}

impl Serving {
    /// Refuses a request naming another model.
    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(m) if m != self.model_name => Err(ApiError::ModelNotFound(m.to_string())),
            _ => Ok(()),
        }
    }
}
