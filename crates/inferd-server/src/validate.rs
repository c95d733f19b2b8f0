//! Parse at the edge: request fields become typed sampling parameters, with
//! OpenAI-style messages for every value out of range.

use std::time::Duration;

use inferd_core::{MAX_LOGPROBS, SamplingParams};

use crate::error::ApiError;
use crate::openai::{ChatRequest, CompletionRequest, Prompt, SamplingFields};

/// The context-length refusal, with the limit in the message.
pub fn context_error(max_model_len: usize, prompt: usize, completion: usize) -> ApiError {
    ApiError::invalid(
        format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the length of the prompt or completion.",
            prompt + completion
        ),
        "max_tokens",
    )
}

impl CompletionRequest {
    /// The sampling parameters of a completions request whose longest
    /// prompt has `prompt_len` tokens.
    pub fn params(&self, prompt_len: usize, max_model_len: usize) -> Result<SamplingParams, ApiError> {
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return Err(ApiError::invalid(
                format!("logprobs must be in [0, {MAX_LOGPROBS}], got {k}"),
                "logprobs",
            ));
        }
        sampling_params(&self.sampling, self.sampling.max_tokens, self.logprobs, prompt_len, max_model_len)
    }

    /// How many prompts the request holds.
    pub fn prompt_count(&self) -> usize {
        match &self.prompt {
            Prompt::Texts(v) => v.len(),
            Prompt::TokenLists(v) => v.len(),
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
        }
    }

    /// How many sequences it asks for: `n` for each prompt.
    pub fn sequences(&self) -> usize {
        self.prompt_count().saturating_mul(self.sampling.n.unwrap_or(1) as usize)
    }

    /// The longest prompt's length in tokens if given as ids, else in
    /// bytes (an upper bound on its tokens): for checks before tokenizing.
    pub fn prompt_len_hint(&self) -> usize {
        match &self.prompt {
            Prompt::Text(s) => s.len(),
            Prompt::Texts(v) => v.iter().map(String::len).max().unwrap_or(0),
            Prompt::Tokens(t) => t.len(),
            Prompt::TokenLists(v) => v.iter().map(Vec::len).max().unwrap_or(0),
        }
    }
}

impl ChatRequest {
    /// The sampling parameters of a chat request whose rendered prompt has
    /// `prompt_len` tokens.
    pub fn params(&self, prompt_len: usize, max_model_len: usize) -> Result<SamplingParams, ApiError> {
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (true, k) => Some(k.unwrap_or(0)),
            (false, Some(_)) => {
                return Err(ApiError::invalid("top_logprobs requires logprobs to be true", "top_logprobs"));
            }
            (false, None) => None,
        };
        let max_tokens = self.max_completion_tokens.or(self.sampling.max_tokens);
        sampling_params(&self.sampling, max_tokens, logprobs, prompt_len, max_model_len)
    }
}

/// Refuses a prompt longer than a compiled-shape backend can prefill in
/// one step (`max`: its largest compiled token count), naming the limit.
pub fn check_compiled_prompt(prompt_len: usize, max: Option<usize>) -> Result<(), ApiError> {
    match max {
        Some(max) if prompt_len > max => Err(ApiError::invalid(
            format!(
                "This model was compiled for prompts of at most {max} tokens (its largest compiled step); this prompt has {prompt_len} tokens."
            ),
            "prompt",
        )),
        _ => Ok(()),
    }
}

/// Refuses sampling parameters a backend that samples on its device cannot
/// honour, naming the parameter (never silently ignored).
pub fn check_device_sampling(
    params: &inferd_core::SamplingParams,
    device: Option<inferd_contract::DeviceSampling>,
) -> Result<(), ApiError> {
    match device.and_then(|d| d.refuses(params)) {
        Some((param, message)) => Err(ApiError::invalid(message, param)),
        None => Ok(()),
    }
}

/// The deadline of a request: its `timeout` field (seconds, positive),
/// capped by the server's `--request-timeout`.
pub fn request_timeout(field: Option<f64>, server: Duration) -> Result<Duration, ApiError> {
    match field {
        None => Ok(server),
        Some(t) if t > 0.0 && t.is_finite() => {
            Ok(Duration::try_from_secs_f64(t).map_or(server, |d| d.min(server)))
        }
        Some(t) => Err(ApiError::invalid(
            format!("timeout must be a positive number of seconds, got {t}"),
            "timeout",
        )),
    }
}

/// Builds and validates sampling parameters for a prompt of `prompt_len`
/// tokens. `max_tokens` defaults to what is left of the context.
pub fn sampling_params(
    f: &SamplingFields,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<SamplingParams, ApiError> {
    if prompt_len >= max_model_len {
        return Err(context_error(max_model_len, prompt_len, max_tokens.unwrap_or(1) as usize));
    }
    let max_tokens = max_tokens.unwrap_or((max_model_len - prompt_len) as u32);
    if prompt_len + max_tokens as usize > max_model_len {
        return Err(context_error(max_model_len, prompt_len, max_tokens as usize));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1 (disabled) or at least 1, got {k}"),
                "top_k",
            ));
        }
    };
    let mut logit_bias = Vec::new();
    for (token, &bias) in f.logit_bias.iter().flatten() {
        let token = token.parse::<u32>().map_err(|_| {
            ApiError::invalid(format!("logit_bias keys must be token ids, got {token:?}"), "logit_bias")
        })?;
        logit_bias.push((token, bias));
    }
    logit_bias.sort_by_key(|&(t, _)| t);
    let d = SamplingParams::default();
    let params = SamplingParams {
        n: f.n.unwrap_or(1),
        temperature: f.temperature.unwrap_or(d.temperature),
        top_p: f.top_p.unwrap_or(d.top_p),
        top_k,
        min_p: f.min_p.unwrap_or(d.min_p),
        repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
        seed: f.seed,
        max_tokens,
        min_tokens: f.min_tokens.unwrap_or(0),
        stop: f.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        logit_bias,
        ignore_eos: f.ignore_eos,
        logprobs,
    };
    params.validate().map_err(|e| ApiError::invalid(e.to_string(), e.param()))?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_defaults_to_the_rest_of_the_context() {
        let p = sampling_params(&SamplingFields::default(), None, None, 30, 100).unwrap();
        assert_eq!(p.max_tokens, 70);
    }

    #[test]
    fn too_long_names_the_limit() {
        let err = sampling_params(&SamplingFields::default(), Some(80), None, 30, 100).unwrap_err();
        assert!(
            err.message().starts_with("This model's maximum context length is 100 tokens"),
            "{}",
            err.message()
        );
        assert!(sampling_params(&SamplingFields::default(), None, None, 100, 100).is_err());
    }

    #[test]
    fn out_of_range_values_carry_core_messages() {
        let f = SamplingFields { top_p: Some(0.0), ..Default::default() };
        let err = sampling_params(&f, Some(5), None, 3, 100).unwrap_err();
        assert_eq!(err, ApiError::invalid("top_p must be in (0, 1], got 0", "top_p"));
        let f = SamplingFields { top_k: Some(-5), ..Default::default() };
        assert!(sampling_params(&f, Some(5), None, 3, 100).is_err());
        let f = SamplingFields { top_k: Some(-1), ..Default::default() };
        assert_eq!(sampling_params(&f, Some(5), None, 3, 100).unwrap().top_k, None);
    }

    #[test]
    fn timeouts_are_positive_and_capped_by_the_server() {
        let server = Duration::from_secs(600);
        assert_eq!(request_timeout(None, server), Ok(server));
        assert_eq!(request_timeout(Some(2.5), server), Ok(Duration::from_millis(2500)));
        assert_eq!(request_timeout(Some(1e300), server), Ok(server), "no Duration overflow");
        assert_eq!(request_timeout(Some(f64::MAX), server), Ok(server));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = request_timeout(Some(bad), server).unwrap_err();
            assert!(err.message().starts_with("timeout must be a positive"), "{bad}: {}", err.message());
        }
    }

    #[test]
    fn device_samplers_refuse_parameters_they_cannot_honour_by_name() {
        let device = Some(inferd_contract::DeviceSampling { max_top_k: 256 });
        let plain = inferd_core::SamplingParams { temperature: 0.5, top_p: 0.9, ..Default::default() };
        assert!(check_device_sampling(&plain, device).is_ok());
        let penalty = inferd_core::SamplingParams { frequency_penalty: 0.5, ..plain.clone() };
        assert!(check_device_sampling(&penalty, None).is_ok(), "the host sampler does everything");
        let err = check_device_sampling(&penalty, device).unwrap_err();
        assert_eq!(err.body()["error"]["param"], "frequency_penalty");
        assert!(err.message().contains("samples on its device"), "{}", err.message());
    }

    #[test]
    fn compiled_backends_refuse_prompts_they_cannot_prefill_whole() {
        assert!(check_compiled_prompt(10_000, None).is_ok(), "chunked prefill takes any length");
        assert!(check_compiled_prompt(512, Some(512)).is_ok());
        let err = check_compiled_prompt(513, Some(512)).unwrap_err();
        assert!(
            err.message().contains("at most 512 tokens") && err.message().contains("513"),
            "{}",
            err.message()
        );
        assert_eq!(err.body()["error"]["param"], "prompt");
    }
}
