//! Structured output's cost per engine step: the allowed-token masks of a
//! batch of constrained sequences (1 and 32 rows), each advancing through a
//! valid document of a realistic schema, over SmolLM2's 49,152-token
//! vocabulary; and applying one mask to a row of logits. The engine
//! computes the masks on a second thread while the model runs.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inferd_core::TokenConstraint;
use inferd_grammar::{Grammars, Spec};

/// An order as a shop's API might ask for it: nested objects, an array,
/// enums, bounded numbers and strings.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "customer": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 60},
                    "email": {"type": "string", "maxLength": 80},
                    "tier": {"enum": ["free", "pro", "enterprise"]}
                },
                "required": ["name", "email", "tier"],
                "additionalProperties": false
            },
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 20},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                        "price": {"type": "number", "minimum": 0}
                    },
                    "required": ["sku", "quantity", "price"],
                    "additionalProperties": false
                },
                "maxItems": 10
            },
            "gift": {"type": "boolean"},
            "notes": {"anyOf": [{"type": "string", "maxLength": 200}, {"type": "null"}]}
        },
        "required": ["order_id", "customer", "items", "gift", "notes"],
        "additionalProperties": false
    })
}

const DOCUMENT: &str = r#"{"order_id": "ABC-123456", "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "tier": "pro"}, "items": [{"sku": "KB-01", "quantity": 2, "price": 49.5}, {"sku": "MS-07", "quantity": 1, "price": 19.99}], "gift": false, "notes": null}"#;

fn setup() -> (Grammars, Vec<u32>, usize) {
    let path = inferd_models::testing::smollm2_path();
    let (tokenizer, _) = inferd_models::load_text(&path).expect("the model file (make model)");
    let json = tokenizer.inner().to_string(false).unwrap();
    let vocab = tokenizer.vocab_size();
    let grammars = Grammars::new(&json, vocab, tokenizer.eos_token_ids[0]).unwrap();
    let doc = tokenizer.encode(DOCUMENT).unwrap();
    (grammars, doc, vocab)
}

fn masks(c: &mut Criterion) {
    let (grammars, doc, vocab) = setup();
    let spec = Spec::JsonSchema(schema());
    let mut mask = vec![0u32; vocab.div_ceil(32)];
    let mut group = c.benchmark_group("structured/masks_per_step");
    for batch in [1usize, 32] {
        group.throughput(Throughput::Elements(batch as u64));
        // Rows spread along the document, as a batch's rows would be.
        let mut rows: Vec<(Box<dyn TokenConstraint>, usize)> = Vec::new();
        for r in 0..batch {
            let mut c = grammars.constraint(&spec).unwrap();
            let at = r * doc.len() / batch;
            for &t in &doc[..at] {
                c.consume(t).unwrap();
            }
            rows.push((c, at));
        }
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, _| {
            b.iter(|| {
                for (c, at) in rows.iter_mut() {
                    if *at == doc.len() {
                        *c = grammars.constraint(&spec).unwrap();
                        *at = 0;
                    }
                    c.allowed(&mut mask).unwrap();
                    assert!(inferd_core::mask_allows(&mask, doc[*at]));
                    c.consume(doc[*at]).unwrap();
                    *at += 1;
                }
            })
        });
    }
    group.finish();

    let mut c2 = grammars.constraint(&spec).unwrap();
    c2.allowed(&mut mask).unwrap();
    let mut logits = vec![0.5f32; vocab];
    c.bench_function("structured/apply_mask_to_a_row", |b| {
        b.iter(|| inferd_exec::sampler::mask_disallowed(&mut logits, &mask))
    });
    c.bench_function("structured/compile_schema_uncached", |b| {
        let mut n = 0u64;
        b.iter(|| {
            // A distinct schema each time: a cache miss, a full compile.
            n += 1;
            let mut s = schema();
            s["properties"]["notes"]["anyOf"][0]["maxLength"] = serde_json::json!(200 + n);
            grammars.constraint(&Spec::JsonSchema(s)).unwrap()
        })
    });
}

criterion_group!(benches, masks);
criterion_main!(benches);
