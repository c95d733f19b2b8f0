//! Tokenizers for served models. GGUF files carry their tokenizer as
//! metadata (tokens, merges, token types and a pre-tokenizer name); it is
//! rebuilt here as a `tokenizers::Tokenizer`. candle's own GGUF tokenizer is
//! not used: it adds a prefix space for SmolLM2's `smollm` pre-tokenizer.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

/// Texts of control tokens that end a generation in the families we serve.
const END_OF_GENERATION: [&str; 7] =
    ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>", "<|end|>"];

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer and the ids that matter for serving.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Tokens that end a generation.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Whether prompts start with the BOS token.
    pub add_bos_token: bool,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

fn md_strings<'a>(content: &'a gguf_file::Content, key: &str) -> Result<Vec<&'a str>> {
    let v = content.metadata.get(key).ok_or_else(|| ModelError::MissingMetadata(key.into()))?;
    let list = v.to_vec().map_err(|_| ModelError::MissingMetadata(key.into()))?;
    list.iter()
        .map(|s| s.to_string().map(String::as_str).map_err(|_| ModelError::MissingMetadata(key.into())))
        .collect()
}

fn md_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// The pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(tok_err)?;
        Ok(PreTokenizerWrapper::Split(s))
    };
    Ok(match pre {
        // Digits one by one, then GPT-2's byte-level split, no prefix space.
        "smollm" | "starcoder" | "refact" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), byte_level(true)]))
        }
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]))
        }
        "qwen2" | "deepseek-r1-qwen" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]))
        }
        other => return Err(ModelError::Tokenizer(format!("unsupported GGUF pre-tokenizer {other:?}"))),
    })
}

impl TextTokenizer {
    /// Rebuilds the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let model = content.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok());
        if model.map(String::as_str) != Some("gpt2") {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); \
                 serve the model from a Hugging Face folder with tokenizer.json instead"
            )));
        }
        let tokens = md_strings(content, "tokenizer.ggml.tokens")?;
        let merges = md_strings(content, "tokenizer.ggml.merges")?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec().map_err(tok_err)?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok());
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre.map_or("default", String::as_str))?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Token type 3 marks control tokens, 4 user-defined ones: both match
        // as whole tokens before BPE runs.
        let added = |ty: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, t)| **t == ty)
                .map(|(text, _)| AddedToken::from(text.to_string(), special))
                .collect()
        };
        inner.add_special_tokens(&added(3, true));
        inner.add_tokens(&added(4, false));

        let mut eos_token_ids: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
                .iter()
                .filter_map(|k| md_u32(content, k))
                .collect();
        for (i, (text, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == 3 && END_OF_GENERATION.contains(text) {
                eos_token_ids.push(i as u32);
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let add_bos_token = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(TextTokenizer {
            inner,
            eos_token_ids,
            bos_token_id: md_u32(content, "tokenizer.ggml.bos_token_id"),
            add_bos_token,
        })
    }

    /// Loads tokenizer.json (and the special tokens named by
    /// tokenizer_config.json and generation_config.json) from a folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tok_err)?;
        let config = read_json(&dir.join("tokenizer_config.json"));
        let token_text = |key: &str| -> Option<String> {
            let v = config.as_ref()?.get(key)?;
            v.as_str().map(String::from).or_else(|| v.get("content")?.as_str().map(String::from))
        };
        let id_of = |key: &str| token_text(key).and_then(|t| inner.token_to_id(&t));
        let mut eos_token_ids: Vec<u32> = id_of("eos_token").into_iter().collect();
        if let Some(gen_cfg) = read_json(&dir.join("generation_config.json")) {
            match gen_cfg.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos_token_ids.extend(n.as_u64().map(|n| n as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos_token_ids.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
        for text in END_OF_GENERATION {
            if let Some(id) = inner.get_added_vocabulary().token_to_id(text, inner.get_model()) {
                eos_token_ids.push(id);
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let add_bos_token =
            config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(TextTokenizer { bos_token_id: id_of("bos_token"), inner, eos_token_ids, add_bos_token })
    }

    /// Token ids of `text`; special-token texts in it become their tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos_token
            && let Some(bos) = self.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens included or skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// The vocabulary entry of one token (byte-level form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text of a special token such as `<|im_end|>`.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying tokenizer, for streaming decoders.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}
