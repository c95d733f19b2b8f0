use super::*;

/// GPT-2's byte-to-character map, which byte-level BPE vocabularies use.
fn byte_char(b: u8) -> char {
    let printable = |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    if printable(u32::from(b)) {
        return char::from(b);
    }
    let shifted = (0..=255u32).filter(|&c| !printable(c)).position(|c| c == u32::from(b)).unwrap() as u32;
    char::from_u32(256 + shifted).unwrap()
}

/// A byte-level tokenizer.json of our own: an end token (id 0), every byte,
/// and a few longer pieces, as a BPE model would have them.
fn tokenizer_json() -> (String, usize) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|end|>".into(), 0.into());
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), (1 + usize::from(b)).into());
    }
    let pieces = ["{\"", "\":", "\",", "name", "age", "tags", "true", "false", "null", " \"", "12", "ab"];
    for (i, p) in pieces.iter().enumerate() {
        let key: String = p.bytes().map(byte_char).collect();
        vocab.insert(key, (257 + i).into());
    }
    let n = vocab.len();
    let json = serde_json::json!({
        "added_tokens": [{"id": 0, "content": "<|end|>", "special": true}],
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    });
    (json.to_string(), n)
}

const EOS: TokenId = 0;

fn grammars() -> (Grammars, Vec<Vec<u8>>) {
    let (json, n) = tokenizer_json();
    let words = llguidance::token_bytes_from_tokenizer_json(&serde_json::from_str(&json).unwrap()).unwrap();
    // A model's logits are often wider than its tokenizer.
    (Grammars::new(&json, n + 7, EOS).unwrap(), words)
}

fn allowed(mask: &[u32]) -> Vec<TokenId> {
    (0..mask.len() as u32 * 32).filter(|&t| inferd_core::mask_allows(mask, t)).collect()
}

/// Samples under the constraint with a seeded walk (uniform over allowed
/// tokens) until only the end is allowed; the text produced.
fn walk(grammars: &Grammars, words: &[Vec<u8>], spec: &Spec, seed: u64) -> String {
    let mut c = grammars.constraint(spec).unwrap();
    let mut mask = vec![0u32; grammars.vocab_size().div_ceil(32)];
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::new();
    for _ in 0..2_000 {
        c.allowed(&mut mask).unwrap();
        let options = allowed(&mask);
        assert!(!options.is_empty(), "a live grammar allows something");
        assert!(options.iter().all(|&t| (t as usize) < words.len()), "padding ids are never allowed");
        if options == [EOS] {
            c.consume(EOS).unwrap();
            return String::from_utf8(out).unwrap();
        }
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let t = options[(state >> 33) as usize % options.len()];
        if t == EOS {
            c.consume(t).unwrap();
            return String::from_utf8(out).unwrap();
        }
        out.extend_from_slice(&words[t as usize]);
        c.consume(t).unwrap();
    }
    panic!("the walk never ended: {}", String::from_utf8_lossy(&out));
}

fn person() -> Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": false
    })
}

#[test]
fn every_walk_under_a_json_schema_is_valid_json_of_that_schema() {
    let (g, words) = grammars();
    let spec = Spec::JsonSchema(person());
    for seed in 0..20 {
        let text = walk(&g, &words, &spec, seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let longest_gap = text.split(|c: char| !c.is_whitespace()).map(str::len).max().unwrap_or(0);
        assert!(longest_gap <= 16, "whitespace is bounded: {text:?}");
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
        assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
        assert!(o["tags"].as_array().unwrap().iter().all(|t| t == "a" || t == "b"), "{text}");
        assert!(o["ok"].is_boolean(), "{text}");
    }
    let (hits, misses) = g.cache_stats();
    assert_eq!((hits, misses), (19, 1), "compiled once, reused 19 times");
}

#[test]
fn regexes_choices_json_objects_and_lark_hold() {
    let (g, words) = grammars();
    for seed in 0..10 {
        let text = walk(&g, &words, &Spec::Regex("[0-9]{3}-[a-c]{2}".into()), seed);
        assert!(text.len() == 6 && text.as_bytes()[3] == b'-', "{text}");
        let choice =
            walk(&g, &words, &Spec::Choice(vec!["yes".into(), "no".into(), "maybe so".into()]), seed);
        assert!(["yes", "no", "maybe so"].contains(&choice.as_str()), "{choice}");
        let lark = "start: \"(\" DIGIT (\"+\" DIGIT)* \")\"\nDIGIT: /[1-9]/";
        let sum = walk(&g, &words, &Spec::Lark(lark.into()), seed);
        assert!(sum.starts_with('(') && sum.ends_with(')'), "{sum}");
    }
    // json_object: any object; the walk may nest, so only check it parses
    // when it ends (uniform walks over JSON usually do, quickly).
    let text = walk(&g, &words, &Spec::JsonObject, 3);
    assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");
}

#[test]
fn unsupported_schemas_and_grammars_are_refused_by_name() {
    let (g, _) = grammars();
    let err = |spec: Spec| match g.constraint(&spec) {
        Ok(_) => panic!("{spec:?} was accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(Spec::JsonSchema(serde_json::json!({"type": "array", "uniqueItems": true})));
    assert!(e.contains("uniqueItems"), "{e}");
    let e = err(Spec::JsonSchema(serde_json::json!({"type": "string", "not": {"const": "x"}})));
    assert!(e.contains("not"), "{e}");
    let e = err(Spec::Lark("root ::= \"a\"".into()));
    assert!(e.contains("GBNF"), "{e}");
    assert!(!err(Spec::Regex("(unclosed".into())).is_empty());
    assert!(err(Spec::Choice(vec![])).contains("at least one"));
}

#[test]
fn the_cache_is_bounded() {
    let (g, _) = grammars();
    for i in 0..CACHE_CAPACITY + 10 {
        g.constraint(&Spec::Regex(format!("x{i}"))).unwrap();
    }
    let cached = g.cache.lock().unwrap().parsers.len();
    assert_eq!(cached, CACHE_CAPACITY);
    // The oldest went first: compiling it again is a miss.
    let (_, misses) = g.cache_stats();
    g.constraint(&Spec::Regex("x0".into())).unwrap();
    assert_eq!(g.cache_stats().1, misses + 1);
}
