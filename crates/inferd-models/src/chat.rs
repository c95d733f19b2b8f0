//! Chat templates: the Jinja template a model ships with (GGUF
//! `tokenizer.chat_template` or tokenizer_config.json), rendered with
//! minijinja plus the Python string methods Hugging Face templates call.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// One message of a conversation. Assistant messages may carry the tool
/// calls they made and tool messages the id of the call they answer, in
/// OpenAI's shapes, for templates that render them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template renders a `tools` list itself.
    supports_tools: bool,
}

const NAME: &str = "chat";

fn template_err(e: minijinja::Error) -> ModelError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    ModelError::ChatTemplate(msg)
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts templates
    /// may refer to.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // What transformers sets for its Jinja environment.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string()).map_err(template_err)?;
        let supports_tools = source.contains("tools");
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into(), supports_tools })
    }

    /// The prompt for `messages`, ending with the assistant's turn opener
    /// when `add_generation_prompt` is set.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders tool definitions (a `tools` variable)
    /// itself; when it does not, callers describe tools in a system message.
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// [`ChatTemplate::render`] with the tools the model may call (OpenAI's
    /// `[{"type": "function", "function": {...}}]`) as the template's
    /// `tools` variable.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_err)?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(template_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&[ChatMessage::new("user", "Hi")], false).unwrap();
        assert!(!out.contains("assistant"));
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t.render(&[ChatMessage::new("user", "  hi  ")], false).unwrap();
        assert_eq!(out, "HI|True", "Python booleans print as Python does");
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&[ChatMessage::new("assistant", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first message must be from the user"), "{err}");
    }

    #[test]
    fn bad_template_is_a_clear_error() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
