//! Tool calling on chat: the declared tools and `tool_choice`, how they
//! reach the model (its chat template's `tools`, or a system message in
//! the Hermes format when the template has none), the grammar that makes
//! `required` and named choices a valid call, and the model's output read
//! back as OpenAI `tool_calls`.

use inferd_grammar::Spec;
use serde_json::{Value, json};

use crate::error::ApiError;

/// The most tools one request may declare.
pub const MAX_TOOLS: usize = 128;

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text; tools are not shown to it.
    None,
    /// The model decides; calls are read from its output.
    Auto,
    /// At least one call, enforced by a grammar.
    Required,
    /// A call of this function, enforced by a grammar.
    Named(String),
}

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of its arguments (an object).
    pub parameters: Value,
}

/// A request's tools and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// One call read from the output.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON text (what OpenAI sends).
    pub arguments: String,
}

impl ToolCall {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::Invalid { message: message.into(), param: Some(param.to_string()) }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl ToolSet {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when
    /// no tools are declared (a `tool_choice` other than `none` or `auto`
    /// then is a 400).
    pub fn parse(
        tools: Option<&[Value]>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<ToolSet>, ApiError> {
        let tools = tools.unwrap_or_default();
        if tools.len() > MAX_TOOLS {
            return Err(invalid(
                format!("at most {MAX_TOOLS} tools may be declared, got {}", tools.len()),
                "tools",
            ));
        }
        let mut functions: Vec<Function> = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let param = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid("only tools of type \"function\" are supported", &param));
            }
            let f = t
                .get("function")
                .filter(|f| f.is_object())
                .ok_or_else(|| invalid("a tool of type \"function\" needs a \"function\" object", &param))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_name(name) {
                return Err(invalid(
                    format!("function names are 1-64 letters, digits, '_' or '-', got {name:?}"),
                    &param,
                ));
            }
            if functions.iter().any(|g| g.name == name) {
                return Err(invalid(format!("function {name:?} is declared twice"), &param));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object"}),
                Some(p) if p.is_object() => p.clone(),
                Some(_) => return Err(invalid("function parameters must be a JSON schema object", &param)),
            };
            let description = f.get("description").and_then(Value::as_str).map(String::from);
            functions.push(Function { name: name.to_string(), description, parameters });
        }
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(invalid(
                        format!(
                            "tool_choice must be \"none\", \"auto\", \"required\" or a function, got {other:?}"
                        ),
                        "tool_choice",
                    ));
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        invalid(
                            "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                            "tool_choice",
                        )
                    })?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(invalid(
                        format!("tool_choice names {name:?}, which is not a declared tool"),
                        "tool_choice",
                    ));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if functions.is_empty() {
            return match choice {
                ToolChoice::None | ToolChoice::Auto => Ok(None),
                _ => Err(invalid("tool_choice needs tools to choose from", "tool_choice")),
            };
        }
        Ok(Some(ToolSet { functions, choice, parallel: parallel.unwrap_or(true) }))
    }

    /// Whether the model is told of the tools and its output read for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The tools as OpenAI declares them, for chat templates.
    pub fn tools_json(&self) -> Value {
        Value::Array(
            self.functions
                .iter()
                .map(|f| {
                    let mut function = json!({"name": f.name, "parameters": f.parameters});
                    if let Some(d) = &f.description {
                        function["description"] = json!(d);
                    }
                    json!({"type": "function", "function": function})
                })
                .collect(),
        )
    }

    /// The system message that describes the tools to a model whose chat
    /// template cannot (Hermes' format, which small instruct models follow
    /// best of the common ones).
    pub fn system_prompt(&self) -> String {
        let mut s = String::from(
            "You may call functions to help answer. The available functions, one JSON object per line:\n<tools>\n",
        );
        for t in self.tools_json().as_array().into_iter().flatten() {
            s.push_str(&t["function"].to_string());
            s.push('\n');
        }
        s.push_str(
            "</tools>\nTo call a function, reply with nothing but one block per call:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>",
        );
        s
    }

    fn call_schema(f: &Function) -> Value {
        json!({
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    }

    /// The grammar a `required` or named choice is held to: one call (a
    /// JSON object naming a declared function, with its arguments), or a
    /// non-empty list of them when parallel calls are allowed.
    pub fn grammar(&self) -> Option<Spec> {
        let call = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Named(name) => {
                Self::call_schema(self.functions.iter().find(|f| &f.name == name).expect("validated"))
            }
            ToolChoice::Required => match self.functions.as_slice() {
                [only] => Self::call_schema(only),
                all => json!({"anyOf": all.iter().map(Self::call_schema).collect::<Vec<_>>()}),
            },
        };
        let many = self.parallel && self.choice == ToolChoice::Required;
        Some(Spec::JsonSchema(if many {
            json!({"type": "array", "items": call, "minItems": 1})
        } else {
            call
        }))
    }

    /// Reads the output: calls and the text around them. Under a grammar the
    /// whole output is the call(s); otherwise calls are looked for in the
    /// formats models are trained on: Hermes/Qwen `<tool_call>` blocks,
    /// Mistral's `[TOOL_CALLS]` list, and a bare Llama 3.1 JSON call. Only
    /// calls of declared functions with object arguments count; anything
    /// else stays text.
    pub fn read_output(
        &self,
        text: &str,
        call_ids: &mut impl FnMut() -> String,
    ) -> (Option<String>, Vec<ToolCall>) {
        let (content, found) = self.find_calls(text);
        let calls =
            found.into_iter().map(|(name, arguments)| ToolCall { id: call_ids(), name, arguments }).collect();
        (content, calls)
    }

    /// A call of a declared function with object arguments: (name,
    /// arguments as JSON text).
    fn call_of(&self, v: &Value) -> Option<(String, String)> {
        let name = v.get("name").and_then(Value::as_str)?;
        let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
        // Some models send the arguments as a JSON string.
        let args = match args {
            Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
            other => other,
        };
        (args.is_object() && self.functions.iter().any(|f| f.name == name))
            .then(|| (name.to_string(), args.to_string()))
    }

    /// All of `items` as calls, or `None` if any is not one.
    fn calls_of(&self, items: &[Value]) -> Option<Vec<(String, String)>> {
        let calls: Option<Vec<_>> = items.iter().map(|v| self.call_of(v)).collect();
        calls.filter(|c| !c.is_empty())
    }

    fn find_calls(&self, text: &str) -> (Option<String>, Vec<(String, String)>) {
        let trimmed = text.trim();
        let whole = trimmed.strip_prefix("<|python_tag|>").unwrap_or(trimmed);
        match serde_json::from_str::<Value>(whole) {
            Ok(Value::Array(items)) => {
                if let Some(calls) = self.calls_of(&items) {
                    return (None, calls);
                }
            }
            Ok(v @ Value::Object(_)) => {
                if let Some(call) = self.call_of(&v) {
                    return (None, vec![call]);
                }
            }
            _ => {}
        }
        if let Some(rest) = trimmed.strip_prefix("[TOOL_CALLS]")
            && let Ok(Value::Array(items)) = serde_json::from_str::<Value>(rest.trim())
            && let Some(calls) = self.calls_of(&items)
        {
            return (None, calls);
        }
        // Hermes blocks, anywhere in the text; what is outside them is content.
        let (mut content, mut calls, mut rest) = (String::new(), Vec::new(), text);
        while let Some(start) = rest.find("<tool_call>") {
            content.push_str(&rest[..start]);
            let body = &rest[start + "<tool_call>".len()..];
            let (inner, after) = match body.find("</tool_call>") {
                Some(end) => (&body[..end], &body[end + "</tool_call>".len()..]),
                None => (body, ""),
            };
            match serde_json::from_str::<Value>(inner.trim()).ok().and_then(|v| self.call_of(&v)) {
                Some(call) => calls.push(call),
                None => content.push_str(&rest[start..rest.len() - after.len()]),
            }
            rest = after;
        }
        content.push_str(rest);
        let content = content.trim();
        ((!content.is_empty() || calls.is_empty()).then(|| content.to_string()), calls)
    }

    /// Tool results and earlier calls in the history, in the Hermes format
    /// the fallback system message describes (for templates without tools).
    pub fn hermes_call_text(calls: &Value) -> String {
        let mut out = String::new();
        for c in calls.as_array().into_iter().flatten() {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
                other => other.clone(),
            };
            let call = json!({"name": f["name"], "arguments": args});
            out.push_str(&format!("<tool_call>\n{call}\n</tool_call>\n"));
        }
        out.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ]
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("call_{n}")
        }
    }

    #[test]
    fn tool_choice_is_parsed_and_checked_against_the_tools() {
        let tools = weather();
        let set = ToolSet::parse(Some(&tools), None, None).unwrap().unwrap();
        assert_eq!((set.choice.clone(), set.parallel), (ToolChoice::Auto, true));
        assert_eq!(set.functions[1].parameters, json!({"type": "object"}));
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let set = ToolSet::parse(Some(&tools), Some(&named), Some(false)).unwrap().unwrap();
        assert_eq!(set.choice, ToolChoice::Named("get_time".into()));
        for (tools, choice, param) in [
            (tools.clone(), json!({"type": "function", "function": {"name": "nope"}}), "tool_choice"),
            (tools.clone(), json!("sometimes"), "tool_choice"),
            (vec![], json!("required"), "tool_choice"),
            (vec![json!({"type": "retrieval"})], json!("auto"), "tools[0]"),
            (vec![tools[0].clone(), tools[0].clone()], json!("auto"), "tools[1]"),
            (vec![json!({"type": "function", "function": {"name": "a b"}})], json!("auto"), "tools[0]"),
        ] {
            let err = ToolSet::parse(Some(&tools), Some(&choice), None).unwrap_err();
            assert!(
                matches!(&err, ApiError::Invalid { param: Some(p), .. } if p == param),
                "{choice}: {err:?}"
            );
        }
        assert_eq!(ToolSet::parse(None, Some(&json!("none")), None).unwrap(), None);
    }

    #[test]
    fn output_is_read_in_each_models_format() {
        let tools = weather();
        let set = ToolSet::parse(Some(&tools), None, None).unwrap().unwrap();
        let read = |text: &str| set.read_output(text, &mut ids());
        let hermes = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = read(hermes);
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("get_weather", "{\"city\":\"Paris\"}")
        );
        let (content, calls) = read("[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}}]");
        assert_eq!((content, calls.len()), (None, 1));
        let (content, calls) = read("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}");
        assert_eq!((content, calls[0].arguments.as_str()), (None, "{\"city\":\"Oslo\"}"));
        let (_, calls) = read(
            "[{\"name\": \"get_time\", \"arguments\": {}}, {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}]",
        );
        assert_eq!(calls.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["call_1", "call_2"]);
        // Undeclared functions, broken JSON and prose stay text.
        for text in
            ["<tool_call>{\"name\": \"launch\", \"arguments\": {}}</tool_call>", "<tool_call>{oops", "Sunny."]
        {
            let (content, calls) = read(text);
            assert!(calls.is_empty(), "{text}");
            assert_eq!(content.as_deref(), Some(text));
        }
    }

    #[test]
    fn required_and_named_choices_get_a_grammar_auto_does_not() {
        let tools = weather();
        let set = |choice: Value, parallel| {
            ToolSet::parse(Some(&tools), Some(&choice), Some(parallel)).unwrap().unwrap()
        };
        assert_eq!(set(json!("auto"), true).grammar(), None);
        let Some(Spec::JsonSchema(many)) = set(json!("required"), true).grammar() else { panic!() };
        assert_eq!(many["type"], "array");
        assert_eq!(many["items"]["anyOf"].as_array().unwrap().len(), 2);
        let Some(Spec::JsonSchema(one)) = set(json!("required"), false).grammar() else { panic!() };
        assert!(one["anyOf"].is_array());
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let Some(Spec::JsonSchema(call)) = set(named, true).grammar() else { panic!() };
        assert_eq!(call["properties"]["name"]["const"], "get_weather");
        assert_eq!(call["properties"]["arguments"]["required"], json!(["city"]));
    }
}
