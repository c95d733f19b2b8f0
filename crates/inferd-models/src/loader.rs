//! One entry point for serving: resolve a model name or path, verify it,
//! and load the model with its tokenizer and chat template.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::chat::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::linear::WeightFormat;
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub format: WeightFormat,
    /// The compute dtype: activations, norms, embeddings and dense weights.
    pub dtype: DType,
    /// Longest context to serve; defaults to the model's own.
    pub max_positions: Option<usize>,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            format: WeightFormat::Native,
            dtype: DType::F32,
            max_positions: None,
            device: Device::Cpu,
        }
    }
}

/// A model ready to serve.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// `None` when the model ships no chat template.
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
}

fn is_hf_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").exists()
}

/// Loads only the weights (no tokenizer), from a GGUF file or a Hugging
/// Face folder.
pub fn load_weights(path: &Path, opts: &LoadOptions) -> Result<Llama> {
    let (cfg, weights) = if is_hf_dir(path) {
        let cfg = crate::hf::config(path)?;
        let w = crate::hf::weights(path, &cfg, &opts.device)?;
        (cfg, w)
    } else {
        let mut file = GgufFile::open(path)?;
        let cfg = LlamaConfig::from_gguf(&file.content)?;
        let w = file.weights(&cfg, &opts.device)?;
        (cfg, w)
    };
    let max_positions = opts.max_positions.unwrap_or(cfg.max_position_embeddings);
    Ok(Llama::new(cfg, weights, opts.format, opts.dtype, max_positions, &opts.device)?)
}

/// Loads a model's tokenizer and its chat template (`None` when the model
/// ships none): what the server needs, without the weights.
pub fn load_text(path: &Path) -> Result<(TextTokenizer, Option<ChatTemplate>)> {
    let (tokenizer, template_source) = if is_hf_dir(path) {
        let tok = TextTokenizer::from_hf_dir(path)?;
        let cfg_path = path.join("tokenizer_config.json");
        let template = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("chat_template")?.as_str().map(String::from));
        (tok, template)
    } else if path.is_file() {
        let file = GgufFile::open(path)?;
        let tok = TextTokenizer::from_gguf(&file.content)?;
        let template =
            file.content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        (tok, template)
    } else {
        return Err(ModelError::Format {
            path: path.into(),
            reason: "neither a GGUF file nor a model folder".into(),
        });
    };
    let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id)).unwrap_or_default();
    let chat_template = match template_source {
        Some(src) => Some(ChatTemplate::new(
            &src,
            &token_text(tokenizer.bos_token_id),
            &token_text(tokenizer.eos_token_ids.first().copied()),
        )?),
        None => None,
    };
    Ok((tokenizer, chat_template))
}

/// Loads a model, its tokenizer and its chat template.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let (tokenizer, chat_template) = load_text(path)?;
    let model = load_weights(path, opts)?;
    Ok(LoadedModel { model, tokenizer, chat_template, path: path.into() })
}
