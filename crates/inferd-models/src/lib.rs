//! Llama-family models on candle: configuration, weight loading from GGUF and
//! Hugging Face safetensors, a packed-batch forward with per-token positions,
//! and the tokenizer and chat template that go with a model.

pub mod catalog;
pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod hub;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod rope;
pub mod source;
pub mod testing;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use linear::WeightFormat;
pub use llama::{AttentionBackend, BatchTokens, LayerQkv, LayerWeights, Llama, ModelWeights};
pub use loader::{LoadOptions, LoadedModel, load, load_text, load_weights};
pub use source::{Resolved, Sources};
pub use tokenizer::TextTokenizer;
