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
    /// Chat with tools in play: each choice's output is read for calls.
    pub tools: Option<Arc<crate::tools::ToolSet>>,
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

    /// The text of a chat choice as content and tool calls, and its
    /// finish reason: `tool_calls` when it made any.
    pub fn read_calls<'a>(&self, text: &str, finish: &'a str) -> (Option<String>, Vec<Value>, &'a str) {
        match &self.tools {
            Some(tools) => {
                let mut ids = || format!("call_{}", crate::request_id::generate());
                let (content, calls) = tools.read_output(text, &mut ids);
                let finish = if calls.is_empty() { finish } else { "tool_calls" };
                (content, calls.iter().map(crate::tools::ToolCall::to_json).collect(), finish)
            }
            None => (Some(text.to_string()), Vec::new(), finish),
        }
    }

    /// One choice of a complete (non-streamed) response.
    pub fn choice(&self, index: u32, text: &str, logprobs: Option<Value>, finish: &str) -> Value {
        match self.route {
            Route::Completions => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Route::Chat => {
                let (content, calls, finish) = self.read_calls(text, finish);
                let mut message = json!({"role": "assistant", "content": content});
                if !calls.is_empty() {
                    message["tool_calls"] = Value::Array(calls);
                }
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// The chunks that end a chat choice whose text was held back while
    /// tools were in play: its content, then each call (id, name, then its
    /// arguments, the way OpenAI streams them), then the finish reason.
    pub fn tool_chunks(&self, index: u32, text: &str, logprobs: Option<Value>, finish: &str) -> Vec<Value> {
        let (content, calls, finish) = self.read_calls(text, finish);
        let mut out = vec![self.chunk(index, content.as_deref().unwrap_or(""), logprobs, None, true)];
        for (i, call) in calls.iter().enumerate() {
            let start = json!({"index": i, "id": call["id"], "type": "function",
                               "function": {"name": call["function"]["name"], "arguments": ""}});
            let args = json!({"index": i, "function": {"arguments": call["function"]["arguments"]}});
            for delta in [start, args] {
                out.push(self.delta_chunk(index, json!({"tool_calls": [delta]}), None));
            }
        }
        out.push(self.delta_chunk(index, json!({}), Some(finish)));
        out
    }

    fn delta_chunk(&self, index: u32, delta: Value, finish: Option<&str>) -> Value {
        let choice = json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish});
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
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
