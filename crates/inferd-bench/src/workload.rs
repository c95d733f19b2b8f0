//! The requests of a run: random prompts of given lengths, or a JSONL file,
//! fixed by the seed.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::args::{Endpoint, PromptForm, ServeBench};

/// What one request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
    Messages(Value),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub prompt: Prompt,
    pub max_tokens: usize,
}

/// Common English words: a random prompt of n words is about n tokens for
/// the BPE vocabularies of the Llama family.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "over",
    "new",
    "sound",
    "take",
    "only",
    "little",
    "work",
    "know",
    "place",
    "year",
    "live",
    "me",
    "back",
    "give",
    "most",
    "very",
    "after",
    "thing",
    "our",
    "just",
    "name",
    "good",
    "sentence",
    "man",
    "think",
    "say",
    "great",
    "where",
    "help",
    "through",
    "much",
    "before",
    "line",
    "right",
    "too",
    "mean",
    "old",
    "any",
    "same",
    "tell",
    "boy",
    "follow",
    "came",
    "want",
    "show",
    "also",
    "around",
    "form",
    "three",
    "small",
    "set",
    "put",
    "end",
    "does",
    "another",
    "well",
    "large",
    "must",
    "big",
    "even",
    "such",
    "because",
    "turn",
    "here",
    "why",
    "ask",
    "went",
    "men",
    "read",
    "need",
    "land",
    "different",
    "home",
    "us",
    "move",
    "try",
    "kind",
    "hand",
    "picture",
    "again",
    "change",
    "off",
    "play",
    "spell",
    "air",
    "away",
    "animal",
    "house",
    "point",
    "page",
    "letter",
    "mother",
    "answer",
    "found",
    "study",
    "still",
    "learn",
    "should",
    "world",
];

/// A length drawn from [len × (1 − r), len × (1 + r)], at least 1.
fn draw_len(rng: &mut StdRng, len: usize, ratio: f64) -> usize {
    if ratio == 0.0 {
        return len;
    }
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    rng.random_range(lo..=hi.max(lo))
}

fn random_text(rng: &mut StdRng, words: usize) -> String {
    let mut s = String::with_capacity(words * 6);
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// `n` random requests; the same arguments and seed give the same list.
pub fn random(args: &ServeBench, n: usize, seed: u64) -> Vec<Item> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids = args.endpoint == Endpoint::Completions && args.prompt_form == PromptForm::Ids;
    let top = args.vocab_limit.max(101) as u32;
    (0..n)
        .map(|_| {
            let input = draw_len(&mut rng, args.input_len, args.range_ratio);
            let max_tokens = draw_len(&mut rng, args.output_len, args.range_ratio);
            let prompt = if ids {
                Prompt::Ids((0..input).map(|_| rng.random_range(100..top)).collect())
            } else {
                Prompt::Text(random_text(&mut rng, input))
            };
            Item { prompt, max_tokens }
        })
        .collect()
}

/// Reads a JSONL file of prompts; `n` requests cycle through its lines in order.
pub fn from_file(path: &Path, n: usize, default_max_tokens: usize) -> anyhow::Result<Vec<Item>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{} line {}: not JSON: {e}", path.display(), i + 1))?;
        let prompt = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(s)), _) => Prompt::Text(s.clone()),
            (_, Some(m @ Value::Array(_))) => Prompt::Messages(m.clone()),
            _ => anyhow::bail!(
                "{} line {}: wants a string \"prompt\" or an array \"messages\"",
                path.display(),
                i + 1
            ),
        };
        let max_tokens = match v.get("max_tokens").or_else(|| v.get("output_len")) {
            None => default_max_tokens,
            Some(m) => match m.as_u64() {
                Some(m) if m > 0 => m as usize,
                _ => {
                    anyhow::bail!("{} line {}: max_tokens must be a positive integer", path.display(), i + 1)
                }
            },
        };
        lines.push(Item { prompt, max_tokens });
    }
    anyhow::ensure!(!lines.is_empty(), "{} holds no prompts", path.display());
    Ok((0..n).map(|i| lines[i % lines.len()].clone()).collect())
}

/// The JSON body of one request.
pub fn body(item: &Item, endpoint: Endpoint, model: &str, args: &ServeBench) -> Value {
    let stream = !args.no_stream;
    let mut body = json!({
        "model": model,
        "max_tokens": item.max_tokens,
        "temperature": args.temperature,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if !args.stop_at_eos {
        body["ignore_eos"] = json!(true);
    }
    match (endpoint, &item.prompt) {
        (Endpoint::Completions, Prompt::Ids(ids)) => body["prompt"] = json!(ids),
        (Endpoint::Completions, Prompt::Text(t)) => body["prompt"] = json!(t),
        (Endpoint::Completions, Prompt::Messages(m)) => {
            // A chat-shaped line sent to completions: its text, in order.
            let text: Vec<&str> = m
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|msg| msg.get("content").and_then(Value::as_str))
                .collect();
            body["prompt"] = json!(text.join("\n"));
        }
        (Endpoint::Chat, Prompt::Messages(m)) => body["messages"] = m.clone(),
        (Endpoint::Chat, Prompt::Text(t)) => body["messages"] = json!([{"role": "user", "content": t}]),
        (Endpoint::Chat, Prompt::Ids(ids)) => {
            let t: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            body["messages"] = json!([{"role": "user", "content": t.join(" ")}]);
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> ServeBench {
        crate::args::tests::parse(flags).unwrap()
    }

    #[test]
    fn the_seed_fixes_the_workload_and_lengths_stay_in_range() {
        let a = args(&["--input-len", "100", "--output-len", "20", "--range-ratio", "0.5"]);
        let one = random(&a, 50, 7);
        assert_eq!(one, random(&a, 50, 7), "same seed, same requests");
        assert_ne!(one, random(&a, 50, 8), "another seed, other requests");
        for item in &one {
            let Prompt::Ids(ids) = &item.prompt else { panic!("completions take ids") };
            assert!((50..=150).contains(&ids.len()), "{}", ids.len());
            assert!((10..=30).contains(&item.max_tokens), "{}", item.max_tokens);
            assert!(ids.iter().all(|&t| (100..32_000).contains(&t)));
        }
        let lens: std::collections::HashSet<usize> = one.iter().map(|i| i.max_tokens).collect();
        assert!(lens.len() > 3, "lengths vary: {lens:?}");
        let fixed = random(&args(&["--input-len", "16"]), 3, 0);
        assert!(
            fixed.iter().all(|i| matches!(&i.prompt, Prompt::Ids(v) if v.len() == 16) && i.max_tokens == 128)
        );
    }

    #[test]
    fn chat_takes_text_and_the_body_asks_for_exact_lengths() {
        let a = args(&["--endpoint", "chat", "--input-len", "12"]);
        let items = random(&a, 2, 1);
        let Prompt::Text(t) = &items[0].prompt else { panic!("chat takes text") };
        assert_eq!(t.split(' ').count(), 12);
        let b = body(&items[0], Endpoint::Chat, "m", &a);
        assert_eq!(b["messages"][0]["role"], "user");
        assert_eq!(b["max_tokens"], 128);
        assert_eq!((b["stream"].clone(), b["ignore_eos"].clone()), (json!(true), json!(true)));
        assert_eq!(b["stream_options"]["include_usage"], true);
        let b = body(&items[0], Endpoint::Chat, "m", &args(&["--no-stream", "--stop-at-eos"]));
        assert!(b.get("ignore_eos").is_none() && b.get("stream_options").is_none());
    }

    #[test]
    fn a_prompt_file_is_read_and_cycled_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("inferd-bench-wl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"hello\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 5}\n",
        )
        .unwrap();
        let items = from_file(&path, 5, 9).unwrap();
        assert_eq!(items.len(), 5);
        assert_eq!(items[0].prompt, Prompt::Text("hello".into()));
        assert_eq!((items[0].max_tokens, items[1].max_tokens, items[2].max_tokens), (9, 5, 9));
        std::fs::write(&path, "{\"prompt\": 3}\n").unwrap();
        let err = from_file(&path, 1, 9).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(from_file(&path, 1, 9).unwrap_err().to_string().contains("not JSON"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
