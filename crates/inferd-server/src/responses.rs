//! Response bodies and stream chunks for both routes, OpenAI's shapes.

use std::sync::Arc;

use inferd_core::TokenLogprobs;
use inferd_models::TextTokenizer;
use serde_json::{Value, json};

/// Which route a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Completions,
    Chat,
}

/// Fixed fields of every body of one request.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub route: Route,
}

pub use inferd_gateway::meter::UsageTotals;

pub fn usage_json(u: UsageTotals) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

fn token_text(tok: &TextTokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Logprobs of a run of tokens in the route's format.
pub fn logprobs_json(
    route: Route,
    tok: &Arc<TextTokenizer>,
    items: &[(u32, TokenLogprobs)],
    offset: usize,
) -> Value {
    match route {
        Route::Chat => {
            let content: Vec<Value> = items
                .iter()
                .map(|(id, lp)| {
                    let text = token_text(tok, *id);
                    let top: Vec<Value> = lp
                        .top
                        .iter()
                        .map(|t| {
                            let s = token_text(tok, t.token);
                            json!({"token": s, "logprob": t.logprob, "bytes": s.as_bytes()})
                        })
                        .collect();
                    json!({"token": text, "logprob": lp.sampled.logprob, "bytes": text.as_bytes(), "top_logprobs": top})
                })
                .collect();
            json!({ "content": content })
        }
        Route::Completions => {
            let mut tokens = Vec::new();
            let mut token_logprobs = Vec::new();
            let mut top_logprobs = Vec::new();
            let mut text_offset = Vec::new();
            let mut at = offset;
            for (id, lp) in items {
                let text = token_text(tok, *id);
                text_offset.push(at);
                at += text.len();
                tokens.push(text);
                token_logprobs.push(lp.sampled.logprob);
                let top: serde_json::Map<String, Value> =
                    lp.top.iter().map(|t| (token_text(tok, t.token), json!(t.logprob))).collect();
                top_logprobs.push(Value::Object(top));
            }
            json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
        }
    }
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.route, chunk) {
            (Route::Completions, _) => "text_completion",
            (Route::Chat, false) => "chat.completion",
            (Route::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice of a complete (non-streamed) response.
    pub fn choice(&self, index: u32, text: String, logprobs: Option<Value>, finish: &str) -> Value {
        match self.route {
            Route::Completions => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Route::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// The complete response.
    pub fn response(&self, choices: Vec<Value>, usage: UsageTotals) -> Value {
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_json(usage),
        })
    }

    /// One stream chunk for one choice. `first` adds the chat role.
    pub fn chunk(
        &self,
        index: u32,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
        first: bool,
    ) -> Value {
        let choice = match self.route {
            Route::Completions => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Route::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// The last chunk when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, usage: UsageTotals) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(usage),
        })
    }
}
