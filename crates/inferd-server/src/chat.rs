//! Chat conversations into prompts: message text, the model's chat template,
//! and the tools a model may call shown through it or a system message.

use inferd_models::ChatMessage;

use crate::error::ApiError;
use crate::openai::{Message, MessageContent};
use crate::state::Serving;
use crate::tools::ToolSet;

pub fn message_text(m: &Message) -> Result<String, ApiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("content parts of type {kind:?} are not supported"),
                            "messages",
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The most messages one conversation may hold.
pub const MAX_MESSAGES: usize = 2048;

/// Renders a conversation through the model's chat template, with the
/// tools the model may call when `tools` is active: through the template
/// when it renders tools, else described in a system message. Earlier
/// calls and tool results are shown to templates without tool support in
/// the format that system message teaches.
pub fn render(
    serving: &Serving,
    messages: &[Message],
    add_generation_prompt: bool,
    tools: Option<&ToolSet>,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must hold at least one message", "messages"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            format!("messages may hold at most {MAX_MESSAGES} messages, got {}", messages.len()),
            "messages",
        ));
    }
    let template = serving.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid("this model has no chat template; use /v1/completions", "messages")
    })?;
    let native = template.supports_tools();
    let mut chat = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        if !["system", "user", "assistant", "tool", "developer"].contains(&m.role.as_str()) {
            return Err(ApiError::invalid(format!("unknown message role {:?}", m.role), "messages"));
        }
        let mut msg = ChatMessage::new(m.role.clone(), message_text(m)?);
        if let Some(calls) = &m.tool_calls {
            if m.role != "assistant" || !calls.is_array() {
                return Err(ApiError::invalid(
                    "tool_calls is a list, on assistant messages only",
                    "messages",
                ));
            }
            if native {
                msg.tool_calls = Some(calls.clone());
            } else {
                let text = ToolSet::hermes_call_text(calls);
                msg.content = [msg.content.trim(), &text]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n");
            }
        }
        if m.role == "tool" {
            if native {
                msg.tool_call_id = m.tool_call_id.clone();
            } else {
                msg = ChatMessage::new("user", format!("<tool_response>\n{}\n</tool_response>", msg.content));
            }
        }
        chat.push(msg);
    }
    let tools = tools.filter(|t| t.active());
    let listed = match tools {
        Some(t) if native => Some(t.tools_json()),
        Some(t) => {
            let prompt = t.system_prompt();
            match chat.first_mut().filter(|m| m.role == "system") {
                Some(system) => system.content = format!("{prompt}\n\n{}", system.content),
                None => chat.insert(0, ChatMessage::new("system", prompt)),
            }
            None
        }
        None => None,
    };
    template
        .render_with_tools(&chat, listed.as_ref(), add_generation_prompt)
        .map_err(|e| ApiError::invalid(e.to_string(), "messages"))
}
