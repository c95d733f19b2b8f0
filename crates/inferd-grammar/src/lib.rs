//! Structured output: what a request's output must match (a JSON schema, a
//! regex, one of several strings, a Lark grammar), compiled by llguidance
//! against the model's vocabulary into a per-sequence state that says which
//! tokens may come next and advances with each sampled token.
//!
//! Compiling a grammar costs far more than running it, so each distinct one
//! is compiled once and kept in a bounded cache; a request gets a fresh copy
//! of the compiled parser.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use inferd_core::{TokenConstraint, TokenId};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::Value;

/// Distinct grammars kept compiled.
pub const CACHE_CAPACITY: usize = 128;

/// Errors building the vocabulary or a grammar.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The tokenizer could not be turned into token bytes.
    #[error("structured output is unavailable for this tokenizer: {0}")]
    Tokenizer(String),
    /// The request's grammar is invalid or uses what the compiler does not
    /// support (the message names it).
    #[error("{0}")]
    Invalid(String),
}

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON matching this schema.
    JsonSchema(Value),
    /// Text matching this regex (whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

impl Spec {
    /// The llguidance grammar, and the key it is cached under.
    fn grammar(&self) -> Result<(TopLevelGrammar, String), GrammarError> {
        Ok(match self {
            Spec::JsonObject => {
                let schema = bounded_whitespace(serde_json::json!({"type": "object"}));
                (TopLevelGrammar::from_json_schema(schema), "json_object".into())
            }
            Spec::JsonSchema(schema) => {
                let key = format!("json_schema:{schema}");
                (TopLevelGrammar::from_json_schema(bounded_whitespace(schema.clone())), key)
            }
            Spec::Regex(rx) => (TopLevelGrammar::from_regex(rx), format!("regex:{rx}")),
            Spec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError::Invalid("guided_choice needs at least one choice".into()));
                }
                // A Lark alternation of string literals (JSON escaping is
                // Lark's string syntax).
                let alts: Vec<String> = choices.iter().map(|c| Value::from(c.as_str()).to_string()).collect();
                let lark = format!("start: {}", alts.join(" | "));
                (TopLevelGrammar::from_lark(lark), format!("choice:{}", serde_json::json!(choices)))
            }
            Spec::Lark(lark) => {
                if lark.contains("::=") {
                    return Err(GrammarError::Invalid(
                        "guided_grammar takes Lark syntax (`rule: ...`); GBNF (`rule ::= ...`) is not supported".into(),
                    ));
                }
                (TopLevelGrammar::from_lark(lark.clone()), format!("lark:{lark}"))
            }
        })
    }
}

/// Whitespace JSON may have at each place it may have any: enough to
/// pretty-print a few levels deep, not enough for a model to pad forever.
pub const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{0,16}";

/// `schema` with llguidance's whitespace option set to [`JSON_WHITESPACE`],
/// unless the schema sets its own (`x-guidance`).
fn bounded_whitespace(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert("x-guidance".into(), serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// The grammars of one model: its vocabulary as llguidance sees it, and
/// the compiled-grammar cache.
pub struct Grammars {
    factory: ParserFactory,
    vocab_size: usize,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Cache {
    parsers: HashMap<String, TokenParser>,
    /// Keys, least recently used first.
    order: VecDeque<String>,
    hits: u64,
    misses: u64,
}

impl Grammars {
    /// Builds the vocabulary from a Hugging Face `tokenizer.json` (as text);
    /// `vocab_size` is the model's logits width, `eos` the token a finished
    /// grammar allows.
    pub fn new(tokenizer_json: &str, vocab_size: usize, eos: TokenId) -> Result<Self, GrammarError> {
        let json: Value =
            serde_json::from_str(tokenizer_json).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        // Ids past the tokenizer's (padding rows of the embedding) never
        // match; tokens past the logits can never be sampled.
        words.resize(vocab_size, Vec::new());
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Grammars { factory, vocab_size, cache: Mutex::new(Cache::default()) })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Compiles `spec` (or takes it from the cache) and returns a fresh
    /// state for one sequence.
    pub fn constraint(&self, spec: &Spec) -> Result<Box<dyn TokenConstraint>, GrammarError> {
        let parser = self.parser(spec)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(e));
        }
        Ok(Box::new(Constraint { matcher }))
    }

    /// (hits, misses) of the compiled-grammar cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        (c.hits, c.misses)
    }

    fn parser(&self, spec: &Spec) -> Result<TokenParser, GrammarError> {
        let (grammar, key) = spec.grammar()?;
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = c.parsers.get(&key) {
                let p = p.deep_clone();
                c.hits += 1;
                if let Some(i) = c.order.iter().position(|k| *k == key) {
                    let k = c.order.remove(i).expect("present");
                    c.order.push_back(k);
                }
                return Ok(p);
            }
            c.misses += 1;
        }
        // Compile outside the lock: other requests' grammars need not wait.
        let parser = self.factory.create_parser(grammar).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !c.parsers.contains_key(&key) {
            if c.parsers.len() >= CACHE_CAPACITY
                && let Some(old) = c.order.pop_front()
            {
                c.parsers.remove(&old);
            }
            c.order.push_back(key.clone());
            c.parsers.insert(key, parser.deep_clone());
        }
        Ok(parser)
    }
}

/// One sequence's grammar state.
struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl TokenConstraint for Constraint {
    fn allowed(&mut self, mask: &mut [u32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        let words = allowed.as_slice();
        let n = mask.len().min(words.len());
        mask[..n].copy_from_slice(&words[..n]);
        mask[n..].fill(0);
        Ok(())
    }

    fn consume(&mut self, token: TokenId) -> Result<(), String> {
        if self.matcher.is_stopped() {
            // The end-of-sequence token after a finished grammar.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests;
