use serde::{Deserialize, Serialize};

use crate::TokenId;

/// Why a sequence stopped producing tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached, or the context length of the model.
    Length,
    /// Cancelled before it finished: client gone, deadline, shutdown.
    Abort,
    /// The backend failed while running this sequence.
    Error,
}

impl FinishReason {
    /// The name used in API responses, metrics labels and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// Token accounting for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache rather than compute.
    pub cached_prompt_tokens: u32,
}

impl Usage {
    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// The log-probability of one token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Logprob {
    pub token: TokenId,
    pub logprob: f32,
}

/// The sampled token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub sampled: Logprob,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<Logprob>,
}

/// What the engine sends down one request's channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamEvent {
    /// The sequence was scheduled for the first time; `cached_prompt_tokens`
    /// of its prompt came from the prefix cache.
    Scheduled { cached_prompt_tokens: u32 },
    /// One new token.
    Token { token: TokenId, logprobs: Option<TokenLogprobs> },
    /// The last event of a sequence that ended normally or was aborted.
    Finished { reason: FinishReason, usage: Usage },
    /// The last event of a sequence that the backend failed.
    Error { message: String },
    /// The last event of a sequence cut off because the engine shut down
    /// (draining ran out of time); retrying elsewhere is the right move.
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reason_serializes_as_openai_names() {
        let json = serde_json::to_string(&FinishReason::Length).unwrap();
        assert_eq!(json, "\"length\"");
        assert_eq!(FinishReason::Stop.as_str(), "stop");
    }

    #[test]
    fn usage_total_adds_prompt_and_completion() {
        let usage = Usage { prompt_tokens: 37, completion_tokens: 5, cached_prompt_tokens: 32 };
        assert_eq!(usage.total_tokens(), 42);
    }
}
