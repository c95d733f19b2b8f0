use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::TokenId;

/// The most choices one request may ask for.
pub const MAX_N: u32 = 16;
/// The most alternatives `logprobs` / `top_logprobs` may ask for.
pub const MAX_LOGPROBS: u32 = 20;
/// The most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in bytes: each is matched against the tail
/// of the text on every token.
pub const MAX_STOP_BYTES: usize = 512;
/// The most stop token ids one request may carry.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// The most tokens `logit_bias` may name (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// How one request samples its tokens: every OpenAI and vLLM sampling field,
/// already parsed into native types. Build it at the edge, then `validate()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Number of independent choices to generate.
    pub n: u32,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// `None` keeps every token.
    pub top_k: Option<u32>,
    /// 0 disables; otherwise drop tokens below `min_p` times the top probability.
    pub min_p: f32,
    /// 1 disables; divides positive logits of seen tokens (prompt and output).
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the output.
    pub frequency_penalty: f32,
    /// Subtracted once for any token present in the output.
    pub presence_penalty: f32,
    /// Seeds the request's own RNG: same seed, same output.
    pub seed: Option<u64>,
    pub max_tokens: u32,
    /// No stop condition (EOS, stop ids, stop strings) ends the request before this many tokens.
    pub min_tokens: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`,
    /// each in [-100, 100]; -100 all but bans a token, 100 all but forces it).
    #[serde(default)]
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Keep generating past the model's end-of-sequence token.
    pub ignore_eos: bool,
    /// `Some(k)`: return the sampled token's logprob and the `k` most likely.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logit_bias: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// A sampling parameter out of its range. Messages name the parameter, the
/// range and the value received.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplingError {
    #[error("n must be in [1, {MAX_N}], got {0}")]
    N(u32),
    #[error("temperature must be in [0, 2], got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("top_k must be at least 1 (or omitted to disable), got {0}")]
    TopK(u32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be in (0, 2], got {0}")]
    RepetitionPenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
    #[error("max_tokens must be at least 1, got {0}")]
    MaxTokens(u32),
    #[error("min_tokens must be at most max_tokens ({max_tokens}), got {min_tokens}")]
    MinTokens { min_tokens: u32, max_tokens: u32 },
    #[error("stop may hold at most {MAX_STOP_STRINGS} strings, got {0}")]
    TooManyStops(usize),
    #[error("stop strings must not be empty")]
    EmptyStop,
    #[error("stop strings may be at most {MAX_STOP_BYTES} bytes long, got one of {0}")]
    LongStop(usize),
    #[error("stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {0}")]
    TooManyStopTokenIds(usize),
    #[error("logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {0}")]
    TooManyLogitBiases(usize),
    #[error("logit_bias values must be in [-100, 100], got {0}")]
    LogitBias(f32),
    #[error("logprobs must be in [0, {MAX_LOGPROBS}], got {0}")]
    Logprobs(u32),
}

impl SamplingError {
    /// The request field the error is about (OpenAI's `param`).
    pub fn param(&self) -> &'static str {
        match self {
            SamplingError::N(_) => "n",
            SamplingError::Temperature(_) => "temperature",
            SamplingError::TopP(_) => "top_p",
            SamplingError::TopK(_) => "top_k",
            SamplingError::MinP(_) => "min_p",
            SamplingError::RepetitionPenalty(_) => "repetition_penalty",
            SamplingError::FrequencyPenalty(_) => "frequency_penalty",
            SamplingError::PresencePenalty(_) => "presence_penalty",
            SamplingError::MaxTokens(_) => "max_tokens",
            SamplingError::MinTokens { .. } => "min_tokens",
            SamplingError::TooManyStops(_) | SamplingError::EmptyStop | SamplingError::LongStop(_) => "stop",
            SamplingError::TooManyStopTokenIds(_) => "stop_token_ids",
            SamplingError::TooManyLogitBiases(_) | SamplingError::LogitBias(_) => "logit_bias",
            SamplingError::Logprobs(_) => "logprobs",
        }
    }
}

/// `lo <= v <= hi`, false for NaN.
fn within(v: f32, lo: f32, hi: f32) -> bool {
    v >= lo && v <= hi
}

impl SamplingParams {
    /// Checks every field against its range; the first violation is returned.
    pub fn validate(&self) -> Result<(), SamplingError> {
        use SamplingError as E;
        if !(1..=MAX_N).contains(&self.n) {
            return Err(E::N(self.n));
        }
        if !within(self.temperature, 0.0, 2.0) {
            return Err(E::Temperature(self.temperature));
        }
        if !(within(self.top_p, 0.0, 1.0) && self.top_p > 0.0) {
            return Err(E::TopP(self.top_p));
        }
        if let Some(0) = self.top_k {
            return Err(E::TopK(0));
        }
        if !within(self.min_p, 0.0, 1.0) {
            return Err(E::MinP(self.min_p));
        }
        if !(within(self.repetition_penalty, 0.0, 2.0) && self.repetition_penalty > 0.0) {
            return Err(E::RepetitionPenalty(self.repetition_penalty));
        }
        if !within(self.frequency_penalty, -2.0, 2.0) {
            return Err(E::FrequencyPenalty(self.frequency_penalty));
        }
        if !within(self.presence_penalty, -2.0, 2.0) {
            return Err(E::PresencePenalty(self.presence_penalty));
        }
        if self.max_tokens == 0 {
            return Err(E::MaxTokens(0));
        }
        if self.min_tokens > self.max_tokens {
            return Err(E::MinTokens { min_tokens: self.min_tokens, max_tokens: self.max_tokens });
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(E::TooManyStops(self.stop.len()));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(E::EmptyStop);
        }
        if let Some(long) = self.stop.iter().map(String::len).find(|&l| l > MAX_STOP_BYTES) {
            return Err(E::LongStop(long));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(E::TooManyStopTokenIds(self.stop_token_ids.len()));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(E::TooManyLogitBiases(self.logit_bias.len()));
        }
        if let Some(&(_, b)) = self.logit_bias.iter().find(|(_, b)| !within(*b, -100.0, 100.0)) {
            return Err(E::LogitBias(b));
        }
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return Err(E::Logprobs(k));
        }
        Ok(())
    }

    /// True when sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }

    /// True when `token` ends the sequence for these parameters, given the
    /// model's end-of-sequence ids and how many tokens were generated so far.
    pub fn is_stop_token(&self, token: TokenId, eos_token_ids: &[TokenId], generated: u32) -> bool {
        if generated < self.min_tokens {
            return false;
        }
        (!self.ignore_eos && eos_token_ids.contains(&token)) || self.stop_token_ids.contains(&token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(params: SamplingParams) -> String {
        params.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
    }

    #[test]
    fn each_range_has_an_exact_message() {
        let d = SamplingParams::default;
        assert_eq!(check(SamplingParams { top_p: 0.0, ..d() }), "top_p must be in (0, 1], got 0");
        assert_eq!(check(SamplingParams { top_p: 1.5, ..d() }), "top_p must be in (0, 1], got 1.5");
        assert_eq!(
            check(SamplingParams { temperature: -0.5, ..d() }),
            "temperature must be in [0, 2], got -0.5"
        );
        assert_eq!(
            check(SamplingParams { temperature: f32::NAN, ..d() }),
            "temperature must be in [0, 2], got NaN"
        );
        assert_eq!(
            check(SamplingParams { top_k: Some(0), ..d() }),
            "top_k must be at least 1 (or omitted to disable), got 0"
        );
        assert_eq!(check(SamplingParams { min_p: 1.1, ..d() }), "min_p must be in [0, 1], got 1.1");
        assert_eq!(
            check(SamplingParams { repetition_penalty: 0.0, ..d() }),
            "repetition_penalty must be in (0, 2], got 0"
        );
        assert_eq!(
            check(SamplingParams { frequency_penalty: 2.5, ..d() }),
            "frequency_penalty must be in [-2, 2], got 2.5"
        );
        assert_eq!(
            check(SamplingParams { presence_penalty: -3.0, ..d() }),
            "presence_penalty must be in [-2, 2], got -3"
        );
        assert_eq!(check(SamplingParams { n: 0, ..d() }), "n must be in [1, 16], got 0");
        assert_eq!(check(SamplingParams { max_tokens: 0, ..d() }), "max_tokens must be at least 1, got 0");
        assert_eq!(
            check(SamplingParams { min_tokens: 20, max_tokens: 10, ..d() }),
            "min_tokens must be at most max_tokens (10), got 20"
        );
        assert_eq!(
            check(SamplingParams { stop: vec![String::new()], ..d() }),
            "stop strings must not be empty"
        );
        assert_eq!(
            check(SamplingParams { stop: vec!["x".into(); 17], ..d() }),
            "stop may hold at most 16 strings, got 17"
        );
        assert_eq!(
            check(SamplingParams { stop: vec!["y".repeat(513)], ..d() }),
            "stop strings may be at most 512 bytes long, got one of 513"
        );
        assert_eq!(
            check(SamplingParams { stop_token_ids: vec![7; 65], ..d() }),
            "stop_token_ids may hold at most 64 ids, got 65"
        );
        SamplingParams { stop: vec!["y".repeat(512)], stop_token_ids: vec![7; 64], ..d() }
            .validate()
            .unwrap();
        assert_eq!(
            check(SamplingParams { logprobs: Some(21), ..d() }),
            "logprobs must be in [0, 20], got 21"
        );
    }

    #[test]
    fn errors_name_their_param() {
        let err =
            SamplingParams { min_tokens: 5, max_tokens: 1, ..Default::default() }.validate().unwrap_err();
        assert_eq!(err.param(), "min_tokens");
    }

    #[test]
    fn boundaries_are_accepted() {
        let params = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: Some(1),
            min_p: 1.0,
            repetition_penalty: 2.0,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            n: MAX_N,
            logprobs: Some(MAX_LOGPROBS),
            min_tokens: 4,
            max_tokens: 4,
            ..Default::default()
        };
        params.validate().unwrap();
        assert!(params.is_greedy());
    }

    #[test]
    fn stop_tokens_respect_min_tokens_and_ignore_eos() {
        let eos = [2];
        let params = SamplingParams { min_tokens: 3, stop_token_ids: vec![7], ..Default::default() };
        assert!(!params.is_stop_token(2, &eos, 2), "EOS before min_tokens must not stop");
        assert!(params.is_stop_token(2, &eos, 3));
        assert!(params.is_stop_token(7, &eos, 3));
        assert!(!params.is_stop_token(5, &eos, 3));
        let ignore = SamplingParams { ignore_eos: true, stop_token_ids: vec![7], ..Default::default() };
        assert!(!ignore.is_stop_token(2, &eos, 10), "ignore_eos keeps going past EOS");
        assert!(ignore.is_stop_token(7, &eos, 10), "stop_token_ids still apply with ignore_eos");
    }
}
