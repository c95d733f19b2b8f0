//! Every class of bad input gets a 4xx with an OpenAI-shaped body, and the
//! server keeps serving afterwards.

use serde_json::{Value, json};

use crate::api::{client, post, server};

fn assert_openai_error(body: &Value) {
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
}

async fn raw(path: &str, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    // A refusal of an oversized body can close the connection while the
    // client is still writing it (the client then sees a broken pipe, not
    // the response); on a busy machine that race is real, so try again.
    let mut last_error = None;
    for _ in 0..5 {
        let mut req = client().post(server().url(path)).body(body.clone());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                return (status, resp.json().await.unwrap_or(Value::Null));
            }
            Err(e) => last_error = Some(e),
        }
    }
    panic!("no response in 5 tries: {last_error:?}");
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_body() {
    let json_ct = Some("application/json");
    let cases: Vec<(&str, u16, (u16, Value))> = vec![
        ("malformed JSON", 400, raw("/v1/completions", json_ct, b"{\"prompt\": ".to_vec()).await),
        ("wrong type", 400, post("/v1/completions", json!({"prompt": "hi", "temperature": "hot"})).await),
        (
            "negative max_tokens",
            400,
            post("/v1/completions", json!({"prompt": "hi", "max_tokens": -1})).await,
        ),
        ("top_p out of range", 400, post("/v1/completions", json!({"prompt": "hi", "top_p": 0})).await),
        (
            "n of zero",
            400,
            post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "n": 0}))
                .await,
        ),
        ("unknown model", 404, post("/v1/completions", json!({"prompt": "hi", "model": "gpt-9"})).await),
        ("empty messages", 400, post("/v1/chat/completions", json!({"messages": []})).await),
        (
            "unknown role",
            400,
            post("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "x"}]})).await,
        ),
        ("empty prompt", 400, post("/v1/completions", json!({"prompt": ""})).await),
        ("token id out of vocabulary", 400, post("/v1/completions", json!({"prompt": [1, 999999]})).await),
        (
            "prompt longer than the context",
            400,
            post("/v1/completions", json!({"prompt": "word ".repeat(3000)})).await,
        ),
        (
            "max_tokens beyond the context",
            400,
            post("/v1/completions", json!({"prompt": "hi", "max_tokens": 5000})).await,
        ),
        (
            "top_logprobs without logprobs",
            400,
            post(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            )
            .await,
        ),
        ("oversized body", 413, raw("/v1/completions", json_ct, vec![b'a'; 5 << 20]).await),
        ("not JSON", 415, raw("/v1/completions", Some("text/plain"), b"hello".to_vec()).await),
        ("detokenize negative id", 400, post("/detokenize", json!({"tokens": [-3]})).await),
        ("detokenize id out of vocabulary", 400, post("/detokenize", json!({"tokens": [49152]})).await),
        ("unknown route", 404, post("/v1/nothing", json!({})).await),
    ];
    for (name, want, (got, body)) in cases {
        assert_eq!(got, want, "{name}: {body}");
        if name != "oversized body" || !body.is_null() {
            assert_openai_error(&body);
        }
    }
    // The context error names the limit.
    let (_, body) = post("/v1/completions", json!({"prompt": "hi", "max_tokens": 5000})).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("maximum context length is 2048 tokens"));

    // A token that is half a UTF-8 character decodes lossily, not to an error.
    let (status, body) = post("/detokenize", json!({"tokens": [131]})).await;
    assert_eq!(status, 200, "{body}");

    // Still serving.
    let (status, body) = post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");
}
