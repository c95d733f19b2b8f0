//! The same tiny random llama written as a Hugging Face safetensors folder
//! and as a GGUF F32 file (Q/K rows permuted as llama.cpp's converter does)
//! loads to the same logits.

use candle_core::DType;
use inferd_models::testing::{random_weights, reference_logits, tiny_config, write_gguf, write_hf};
use inferd_models::{LoadOptions, WeightFormat, load_weights};

#[test]
fn safetensors_folder_and_gguf_f32_give_the_same_logits() {
    let cfg = tiny_config();
    let weights = random_weights(&cfg, 11).unwrap();
    let root = std::env::temp_dir().join(format!("inferd-hf-vs-gguf-{}", std::process::id()));
    let tokens: Vec<u32> = (0..19).map(|i| (i * 29 + 3) % 128).collect();
    write_gguf(&root.join("tiny.gguf"), &cfg, &weights, &[]).unwrap();
    let opts = LoadOptions { format: WeightFormat::Dense, ..Default::default() };
    let from_gguf =
        reference_logits(&load_weights(&root.join("tiny.gguf"), &opts).unwrap(), &tokens).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dir = root.join(format!("hf-{dtype:?}"));
        write_hf(&dir, &cfg, &weights, dtype, 1).unwrap();
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
