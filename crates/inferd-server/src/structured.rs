//! Structured output requested through the API: OpenAI's `response_format`
//! and vLLM's `guided_json`, `guided_regex`, `guided_choice` and
//! `guided_grammar`, read into the grammar the engine holds the output to.

use inferd_grammar::Spec;
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::SamplingFields;

/// Longest grammar source (a schema's JSON, a regex, a Lark grammar) taken.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

fn too_long(len: usize, param: &'static str) -> Result<(), ApiError> {
    if len > MAX_GRAMMAR_BYTES {
        return Err(ApiError::invalid(
            format!("{param} is {len} bytes; at most {MAX_GRAMMAR_BYTES} are taken"),
            param,
        ));
    }
    Ok(())
}

fn schema_of(v: &Value, param: &'static str) -> Result<Spec, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::invalid(format!("{param} is not a JSON schema: {e}"), param))?,
        other => other.clone(),
    };
    if !schema.is_object() {
        return Err(ApiError::invalid(format!("{param} must be a JSON schema object"), param));
    }
    too_long(schema.to_string().len(), param)?;
    Ok(Spec::JsonSchema(schema))
}

fn response_format(v: &Value) -> Result<Option<Spec>, ApiError> {
    const P: &str = "response_format";
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Spec::JsonObject)),
        Some("json_schema") => {
            let schema = v.get("json_schema").and_then(|j| j.get("schema")).ok_or_else(|| {
                ApiError::invalid("response_format of type json_schema needs json_schema.schema", P)
            })?;
            schema_of(schema, P).map(Some)
        }
        other => Err(ApiError::invalid(
            format!(
                "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"
            ),
            P,
        )),
    }
}

/// The grammar a request's fields ask for, if any, with the field it came
/// from (for errors); at most one of them may be given.
pub fn spec(fields: &SamplingFields) -> Result<Option<(Spec, &'static str)>, ApiError> {
    let given: Vec<&str> = [
        ("response_format", fields.response_format.is_some()),
        ("guided_json", fields.guided_json.is_some()),
        ("guided_regex", fields.guided_regex.is_some()),
        ("guided_choice", fields.guided_choice.is_some()),
        ("guided_grammar", fields.guided_grammar.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if given.len() > 1 {
        return Err(ApiError::invalid(
            format!("give at most one of {}", given.join(", ")),
            "response_format",
        ));
    }
    let spec = if let Some(v) = &fields.response_format {
        response_format(v)?.map(|s| (s, "response_format"))
    } else if let Some(v) = &fields.guided_json {
        Some((schema_of(v, "guided_json")?, "guided_json"))
    } else if let Some(rx) = &fields.guided_regex {
        too_long(rx.len(), "guided_regex")?;
        Some((Spec::Regex(rx.clone()), "guided_regex"))
    } else if let Some(choices) = &fields.guided_choice {
        if choices.is_empty() || choices.iter().any(String::is_empty) {
            return Err(ApiError::invalid("guided_choice must list non-empty strings", "guided_choice"));
        }
        too_long(choices.iter().map(String::len).sum(), "guided_choice")?;
        Some((Spec::Choice(choices.clone()), "guided_choice"))
    } else if let Some(g) = &fields.guided_grammar {
        too_long(g.len(), "guided_grammar")?;
        Some((Spec::Lark(g.clone()), "guided_grammar"))
    } else {
        None
    };
    if spec.is_some() && fields.ignore_eos {
        return Err(ApiError::invalid(
            "ignore_eos cannot be combined with structured output: the grammar decides where the output ends",
            "ignore_eos",
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> SamplingFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn each_field_reads_into_its_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = [
            (json!({"response_format": {"type": "text"}}), None),
            (json!({"response_format": {"type": "json_object"}}), Some(Spec::JsonObject)),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Some(Spec::JsonSchema(schema.clone())),
            ),
            (json!({"guided_json": schema.to_string()}), Some(Spec::JsonSchema(schema.clone()))),
            (json!({"guided_regex": "[a-z]+"}), Some(Spec::Regex("[a-z]+".into()))),
            (json!({"guided_choice": ["a", "b"]}), Some(Spec::Choice(vec!["a".into(), "b".into()]))),
            (json!({"guided_grammar": "start: \"x\""}), Some(Spec::Lark("start: \"x\"".into()))),
        ];
        for (body, want) in cases {
            assert_eq!(spec(&fields(body.clone())).unwrap().map(|(s, _)| s), want, "{body}");
        }
    }

    #[test]
    fn conflicting_or_malformed_fields_are_refused() {
        for body in [
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            json!({"response_format": {"type": "yaml"}}),
            json!({"response_format": {"type": "json_schema"}}),
            json!({"guided_json": "not json"}),
            json!({"guided_json": [1, 2]}),
            json!({"guided_choice": []}),
            json!({"guided_regex": "a", "ignore_eos": true}),
            json!({"guided_grammar": "x".repeat(MAX_GRAMMAR_BYTES + 1)}),
        ] {
            assert!(matches!(spec(&fields(body.clone())), Err(ApiError::Invalid { .. })), "{body}");
        }
    }
}
