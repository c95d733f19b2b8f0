//! Greedy generation with the real SmolLM2 through scheduler, CPU executor
//! and sampler together.

use inferd_contract::{DType, SampledToken};
use inferd_core::{RequestId, SamplingParams};
use inferd_engine::{EngineConfig, EngineCore};
use inferd_exec::{CpuExecutor, CpuExecutorConfig};
use inferd_models::testing::smollm2_path;
use inferd_models::{ChatMessage, LoadOptions, TextTokenizer, WeightFormat, load};
use inferd_sched::SequenceRequest;

/// The executor every test here runs: f32 cache, blocks of 16.
const EXEC: CpuExecutorConfig = CpuExecutorConfig {
    block_size: 16,
    kv_cache_memory: 64 << 20,
    kv_dtype: DType::F32,
    max_model_len: 1024,
};

/// Greedy answer to one user message: each step's sampled token with its
/// top-5 logprobs, and the tokenizer.
fn chat_greedy_steps(
    format: WeightFormat,
    question: &str,
    max_tokens: u32,
) -> (Vec<SampledToken>, TextTokenizer) {
    let opts = LoadOptions { format, max_positions: Some(1024), ..Default::default() };
    let loaded = load(&smollm2_path(), &opts).unwrap();
    let prompt =
        loaded.chat_template.as_ref().unwrap().render(&[ChatMessage::new("user", question)], true).unwrap();
    let ids = loaded.tokenizer.encode(&prompt).unwrap();
    let exec = CpuExecutor::new(loaded.model, EXEC).unwrap();
    let mut engine =
        EngineCore::new(exec, &EngineConfig::default(), loaded.tokenizer.eos_token_ids.clone()).unwrap();
    let params = SamplingParams { temperature: 0.0, max_tokens, logprobs: Some(5), ..Default::default() };
    engine.add(SequenceRequest::new(RequestId(1), ids, params)).unwrap();
    let mut steps = Vec::new();
    while engine.has_work() {
        steps.extend(engine.step().unwrap().into_iter().filter_map(|o| o.sampled));
    }
    (steps, loaded.tokenizer)
}

fn chat_greedy(format: WeightFormat, question: &str, max_tokens: u32) -> String {
    let (steps, tok) = chat_greedy_steps(format, question, max_tokens);
    tok.decode(&steps.iter().map(|s| s.token).collect::<Vec<_>>(), true).unwrap()
}

#[test]
fn f32_compute_knows_the_capital_of_france() {
    let answer = chat_greedy(WeightFormat::Dense, "What is the capital of France?", 12);
    assert!(answer.contains("Paris"), "{answer:?}");
}

/// llama.cpp 0c1e57098's greedy answer to the prompt on the same file. Q4_1
/// rounds activations to 8 bits, which flips the first token from "The"
/// (f32 compute) to "L".
const LLAMA_CPP_ANSWER: &str = "L'Étoile, la Marseillaise, la femme au roi, la femme au roi";

/// Largest logit gap (nats) at which two correct Q4_1 implementations that
/// round and sum in a different order may pick different tokens. Activations
/// are rounded to 8 bits before every matmul, so a last-bit difference in
/// one sum can move a value across a rounding step and a logit by a tenth
/// or more. This answer is a list of near ties: the same model diverged
/// from llama.cpp at its 7th to 15th token as only the exponential's last
/// bits or the order of attention's sums changed (AVX2 or plain Rust; a
/// degree-6 or degree-7 polynomial or libm's), at the gaps we measured 0.19
/// to 0.28 nats, while its logits stayed as close to f32 arithmetic
/// (`native_q4_1_stays_close_to_f32_arithmetic_on_every_position`).
const NEAR_TIE: f32 = 0.5;

/// Tokens every correct implementation agrees on before the first near tie.
const SURE_TOKENS: usize = 5;

/// Our greedy `steps` follow `expected` (another implementation's greedy
/// tokens) until they diverge, and where they do, `expected`'s token is our
/// runner-up within a near tie: summation order, not a wrong computation.
fn assert_follows_up_to_a_near_tie(steps: &[SampledToken], expected: &[u32], tok: &TextTokenizer, who: &str) {
    let ours: Vec<u32> = steps.iter().map(|s| s.token).collect();
    let agree = ours.iter().zip(expected).take_while(|(a, b)| a == b).count();
    let texts = format!("ours {:?}, {who} {:?}", tok.decode(&ours, true), tok.decode(expected, true));
    assert!(agree >= SURE_TOKENS, "agreed with {who} on {agree} tokens: {texts}");
    if agree < expected.len().min(ours.len()) {
        let lp = steps[agree].logprobs.as_ref().unwrap();
        let theirs = lp.top.iter().find(|l| l.token == expected[agree]);
        let gap = theirs.map(|t| lp.sampled.logprob - t.logprob);
        assert!(
            gap.is_some_and(|g| g < NEAR_TIE),
            "diverged from {who} at token {agree} by {gap:?} nats: {texts}"
        );
        eprintln!("agreed with {who} on {agree} tokens; diverged at a near tie of {gap:?} nats");
    }
}

/// Greedy tokens of candle-transformers' own quantized_llama (one sequence,
/// contiguous cache, matmul attention): an independent reference forward.
fn candle_reference_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut f = std::fs::File::open(smollm2_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits: Vec<f32> = model.forward(&x, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        pos += input.len();
        let next = inferd_exec::sampler::argmax(&logits) as u32;
        out.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn native_q4_1_follows_candles_reference_forward_up_to_a_near_tie() {
    let question = "What is the capital of France?";
    let (steps, tok) = chat_greedy_steps(WeightFormat::Native, question, 24);
    let loaded = load(&smollm2_path(), &Default::default()).unwrap();
    let prompt =
        loaded.chat_template.as_ref().unwrap().render(&[ChatMessage::new("user", question)], true).unwrap();
    let reference = candle_reference_greedy(&tok.encode(&prompt).unwrap(), 24);
    assert_follows_up_to_a_near_tie(&steps, &reference, &tok, "candle");
}

#[test]
fn native_q4_1_follows_llama_cpp_up_to_a_near_tie() {
    let (steps, tok) = chat_greedy_steps(WeightFormat::Native, "What is the capital of France?", 20);
    let expected = tok.encode(LLAMA_CPP_ANSWER).unwrap();
    assert_follows_up_to_a_near_tie(&steps, &expected, &tok, "llama.cpp");
}

/// Logits of every position of `text` (teacher-forced, one prefill) in
/// `format`, with a KV cache of `kv_dtype`.
fn every_position_logits(format: WeightFormat, kv_dtype: DType, text: &str) -> (Vec<Vec<f32>>, usize) {
    use inferd_contract::{ModelExecutor, ModelInput, ModelOutput};
    let opts = LoadOptions { format, max_positions: Some(1024), ..Default::default() };
    let loaded = load(&smollm2_path(), &opts).unwrap();
    let ids = loaded.tokenizer.encode(text).unwrap();
    let mut exec = CpuExecutor::new(loaded.model, CpuExecutorConfig { kv_dtype, ..EXEC }).unwrap();
    let blocks: Vec<u32> = (0..ids.len().div_ceil(EXEC.block_size) as u32).collect();
    let mut input = ModelInput::new(blocks.len());
    input.push_seq(RequestId(1), &ids, 0, &blocks, EXEC.block_size, true);
    input.logits_rows = (0..ids.len() as u32).collect();
    let ModelOutput::Logits(l) = exec.execute(&input).unwrap() else { panic!("logits") };
    (l.data.chunks(l.vocab_size).map(<[f32]>::to_vec).collect(), ids.len())
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    x.iter().map(|&v| v as f64 - max - sum.ln()).collect()
}

/// The native Q4_1 path's next-token distributions stay close to those of
/// f32 arithmetic on the same weights (`dense`: dequantized weights, f32
/// activations, no 8-bit rounding anywhere): greedy texts diverge at near
/// ties whenever rounding changes (see NEAR_TIE), so this is the measure of
/// whether a kernel's numbers got better or worse. Both cache dtypes are
/// held to it: f32, and f16 (the server's default on the CPU). It prints
/// the figures.
#[test]
fn native_q4_1_stays_close_to_f32_arithmetic_on_every_position() {
    let text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. \
        It is named after the engineer Gustave Eiffel, whose company designed and built the tower from \
        1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed \
        as the centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French \
        Revolution. Although initially criticised by some of France's leading artists and intellectuals for \
        its design, it has since become a global cultural icon of France and one of the most recognisable \
        structures in the world.";
    let (reference, n) = every_position_logits(WeightFormat::Dense, DType::F32, text);
    for kv_dtype in [DType::F32, DType::F16] {
        let (ours, _) = every_position_logits(WeightFormat::Native, kv_dtype, text);
        let (mut kl, mut same_top, mut worst) = (0f64, 0usize, 0f64);
        for (r, o) in reference.iter().zip(&ours) {
            let (lr, lo) = (log_softmax(r), log_softmax(o));
            let k: f64 = lr.iter().zip(&lo).map(|(a, b)| a.exp() * (a - b)).sum();
            kl += k;
            worst = worst.max(k);
            same_top += usize::from(inferd_exec::sampler::argmax(r) == inferd_exec::sampler::argmax(o));
        }
        let mean = kl / n as f64;
        eprintln!(
            "{n} positions, {kv_dtype:?} cache: mean KL(f32 || native) {mean:.5} nats, worst {worst:.4}, \
             same top token {same_top}"
        );
        assert!(mean < 0.03 && worst < 0.5, "{kv_dtype:?} cache: mean KL {mean}, worst {worst}");
        assert!(same_top * 10 >= n * 9, "{kv_dtype:?} cache: top token agreed on {same_top} of {n}");
    }
}
