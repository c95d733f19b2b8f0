//! Structured output and tool calling with the real SmolLM2: guided
//! decoding on both routes, refusals that name the problem, rows with and
//! without grammars sharing batches, and the official openai SDK's parse,
//! json_object and tool-calling flows (tests/openai_structured.py).

use serde_json::{Value, json};

use crate::api::{post, server};

fn text(body: &Value) -> &str {
    body["choices"][0]["text"].as_str().or_else(|| body["choices"][0]["message"]["content"].as_str()).unwrap()
}

#[tokio::test]
async fn guided_fields_hold_on_both_routes() {
    let (s, b) = post(
        "/v1/completions",
        json!({"prompt": "Is the sky green?", "guided_choice": ["yes", "no"], "max_tokens": 8, "temperature": 1.0}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(["yes", "no"].contains(&text(&b)), "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "stop");

    let (s, b) = post(
        "/v1/completions",
        json!({"prompt": "A date:", "guided_regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]", "max_tokens": 20}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let date = text(&b);
    assert!(date.len() == 10 && date.starts_with("20") && date.as_bytes()[4] == b'-', "{b}");

    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["answer"], "additionalProperties": false});
    let (s, b) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is 3 + 4?"}], "guided_json": schema,
               "max_tokens": 64, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Greedy, so the run is the same on every machine: sampled at
    // temperature 1, whitespace between the keys (up to 16 per gap) once
    // used up 30 tokens before the object closed, a legitimate `length`.
    assert_eq!(b["choices"][0]["finish_reason"], "stop", "{b}");
    let v: Value = serde_json::from_str(text(&b)).unwrap();
    assert!(v["answer"].as_i64().is_some_and(|a| (0..=99).contains(&a)), "{b}");

    let lark = "start: \"(\" DIGIT (\"+\" DIGIT)* \")\"\nDIGIT: /[1-9]/";
    let (s, b) =
        post("/v1/completions", json!({"prompt": "A sum:", "guided_grammar": lark, "max_tokens": 12})).await;
    assert_eq!(s, 200, "{b}");
    let sum = text(&b);
    let finished = b["choices"][0]["finish_reason"] == "stop";
    assert!(sum.starts_with('(') && (!finished || sum.ends_with(')')), "{b}");
    assert!(sum.chars().all(|c| "()+123456789".contains(c)), "{b}");
}

#[tokio::test]
async fn a_grammar_that_cannot_finish_in_max_tokens_ends_with_length() {
    let (s, b) =
        post("/v1/completions", json!({"prompt": "Digits:", "guided_regex": "[0-9]{50}", "max_tokens": 5}))
            .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "length");
    assert!(text(&b).chars().all(|c| c.is_ascii_digit()), "{b}");
}

#[tokio::test]
async fn unsupported_or_conflicting_requests_are_400s_that_say_why() {
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let unique = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}}});
    let weather = json!([{"type": "function", "function": {"name": "get_weather"}}]);
    for (body, param, says) in [
        (chat(json!({"response_format": unique})), "response_format", "uniqueItems"),
        (chat(json!({"response_format": {"type": "xml"}})), "response_format", "response_format.type"),
        (chat(json!({"guided_regex": "a", "guided_choice": ["a"]})), "response_format", "at most one"),
        (chat(json!({"guided_choice": ["a"], "ignore_eos": true})), "ignore_eos", "ignore_eos"),
        (chat(json!({"guided_grammar": "root ::= \"a\""})), "guided_grammar", "GBNF"),
        (
            chat(
                json!({"tools": weather, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ),
            "tool_choice",
            "nope",
        ),
        (
            chat(
                json!({"tools": weather, "tool_choice": "required", "response_format": {"type": "json_object"}}),
            ),
            "tool_choice",
            "tool_choice",
        ),
        (chat(json!({"tool_choice": "required"})), "tool_choice", "needs tools"),
    ] {
        let (s, b) = post("/v1/chat/completions", body.clone()).await;
        assert_eq!(s, 400, "{body}: {b}");
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
        assert!(b["error"]["message"].as_str().unwrap().contains(says), "{body}: {b}");
    }
}

#[tokio::test]
async fn rows_without_a_grammar_get_the_tokens_they_get_alone() {
    let prompts: Vec<String> =
        (0..6).map(|i| format!("Write a sentence about the number {}:", i * 11)).collect();
    let free = |p: &str| json!({"prompt": p, "max_tokens": 16, "temperature": 0});
    let mut solo = Vec::new();
    for p in &prompts {
        let (s, b) = post("/v1/completions", free(p)).await;
        assert_eq!(s, 200);
        solo.push(text(&b).to_string());
    }
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
    let constrained = (0..6).map(|i| {
        post(
            "/v1/completions",
            json!({"prompt": format!("The number {i} as JSON:"), "guided_json": schema, "max_tokens": 16, "temperature": 0}),
        )
    });
    let frees = prompts.iter().map(|p| post("/v1/completions", free(p)));
    let (frees, constrained) =
        tokio::join!(futures_util::future::join_all(frees), futures_util::future::join_all(constrained));
    for (i, (s, b)) in frees.iter().enumerate() {
        assert_eq!(*s, 200);
        assert_eq!(text(b), solo[i], "request {i} changed when batched with constrained ones");
    }
    for (s, b) in &constrained {
        assert_eq!(*s, 200, "{b}");
        let t = text(b);
        assert!(t.starts_with('{'), "{b}");
    }
}

#[test]
fn the_official_python_client_parses_and_calls_tools() {
    let base = format!("{}/v1", server().base);
    let out = crate::openai_sdk::run_python(
        "openai_structured.py",
        &[&base],
        "all structured output checks passed",
    );
    println!("{out}");
}
