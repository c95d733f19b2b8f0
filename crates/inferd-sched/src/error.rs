use inferd_core::RequestId;
use thiserror::Error;

/// Errors of the scheduler: requests it cannot take and misuse by its caller.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchedError {
    #[error("invalid scheduler config: {0}")]
    Config(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("request {0} is already scheduled")]
    DuplicateId(RequestId),
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}"
    )]
    TooLong { prompt_tokens: usize, max_tokens: usize, max_model_len: usize },
    #[error("the request needs {needed} KV blocks but the whole cache has {total}")]
    NeverFits { needed: usize, total: usize },
    #[error(
        "the prompt has {prompt_tokens} tokens, but this model was compiled for prompts of at most {max_prompt_tokens} tokens"
    )]
    PromptOverCompiled { prompt_tokens: usize, max_prompt_tokens: usize },
    #[error("no sampled token for {0}, which finished its prefill this step")]
    MissingSample(RequestId),
    #[error("{got} sampled tokens for a step that scheduled {expected} sequences")]
    SampleCount { got: usize, expected: usize },
}
