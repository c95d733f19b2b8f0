//! The same tiny random llama written as a Hugging Face safetensors folder
//! and as a GGUF F32 file (Q/K rows permuted as llama.cpp's converter does)
//! loads to the same logits.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use inferd_models::gguf::permute_rows_for_gguf;
use inferd_models::linear::RawWeight;
use inferd_models::testing::{random_weights, reference_logits, tiny_config};
use inferd_models::{LlamaConfig, LoadOptions, ModelWeights, WeightFormat, load_weights};

fn dense(w: &RawWeight) -> Tensor {
    match w {
        RawWeight::Dense(t) => t.clone(),
        RawWeight::Quantized(_) => unreachable!("random weights are dense"),
    }
}

fn write_hf(dir: &Path, cfg: &LlamaConfig, w: &ModelWeights, dtype: DType) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, x: Tensor| {
        t.insert(name, x.to_dtype(dtype).unwrap());
    };
    put("model.embed_tokens.weight".into(), dense(&w.embed));
    put("model.norm.weight".into(), w.norm.clone());
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), l.attn_norm.clone());
        put(format!("{p}.post_attention_layernorm.weight"), l.ffn_norm.clone());
        put(format!("{p}.self_attn.q_proj.weight"), dense(&l.q));
        put(format!("{p}.self_attn.k_proj.weight"), dense(&l.k));
        put(format!("{p}.self_attn.v_proj.weight"), dense(&l.v));
        put(format!("{p}.self_attn.o_proj.weight"), dense(&l.o));
        put(format!("{p}.mlp.gate_proj.weight"), dense(&l.gate));
        put(format!("{p}.mlp.up_proj.weight"), dense(&l.up));
        put(format!("{p}.mlp.down_proj.weight"), dense(&l.down));
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

fn write_gguf(path: &Path, cfg: &LlamaConfig, w: &ModelWeights) {
    let q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> =
        vec![("token_embd.weight".into(), q(&dense(&w.embed))), ("output_norm.weight".into(), q(&w.norm))];
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), q(&l.attn_norm)));
        tensors.push((format!("{p}.ffn_norm.weight"), q(&l.ffn_norm)));
        tensors.push((
            format!("{p}.attn_q.weight"),
            q(&permute_rows_for_gguf(&dense(&l.q), cfg.num_heads).unwrap()),
        ));
        tensors.push((
            format!("{p}.attn_k.weight"),
            q(&permute_rows_for_gguf(&dense(&l.k), cfg.num_kv_heads).unwrap()),
        ));
        tensors.push((format!("{p}.attn_v.weight"), q(&dense(&l.v))));
        tensors.push((format!("{p}.attn_output.weight"), q(&dense(&l.o))));
        tensors.push((format!("{p}.ffn_gate.weight"), q(&dense(&l.gate))));
        tensors.push((format!("{p}.ffn_up.weight"), q(&dense(&l.up))));
        tensors.push((format!("{p}.ffn_down.weight"), q(&dense(&l.down))));
    }
    let u = |x: usize| Value::U32(x as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.block_count", u(cfg.num_layers)),
        ("llama.attention.head_count", u(cfg.num_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads)),
        ("llama.vocab_size", u(cfg.vocab_size)),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

#[test]
fn safetensors_folder_and_gguf_f32_give_the_same_logits() {
    let cfg = tiny_config();
    let weights = random_weights(&cfg, 11).unwrap();
    let root = std::env::temp_dir().join(format!("inferd-hf-vs-gguf-{}", std::process::id()));
    let tokens: Vec<u32> = (0..19).map(|i| (i * 29 + 3) % 128).collect();
    write_gguf(&root.join("tiny.gguf"), &cfg, &weights);
    let opts = LoadOptions { format: WeightFormat::Dense, ..Default::default() };
    let from_gguf =
        reference_logits(&load_weights(&root.join("tiny.gguf"), &opts).unwrap(), &tokens).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dir = root.join(format!("hf-{dtype:?}"));
        write_hf(&dir, &cfg, &weights, dtype);
        let model = load_weights(&dir, &opts).unwrap();
        assert!(!model.config().rope_interleaved);
        let from_hf = reference_logits(&model, &tokens).unwrap();
        // f16/bf16 files round the weights themselves.
        let tol = if dtype == DType::F32 { 1e-4 } else { 0.15 };
        for (a, b) in from_hf.iter().zip(&from_gguf) {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(diff < tol, "{dtype:?}: {diff}");
        }
    }
    std::fs::remove_dir_all(&root).ok();
}
