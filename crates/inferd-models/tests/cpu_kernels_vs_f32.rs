//! On the real SmolLM2: logits from inferd's Q8_0 CPU kernels are at least as
//! close to the f32 model's (every matrix dequantized to f32) as candle's
//! Q8_0 kernels are, in f32 and in bf16 compute. Both use the same Q8_0
//! weights; they differ in how activations are quantized (inferd keeps each
//! block's scale in f32, candle rounds it to f16) and in summation order.
//! And the default `auto` format, which runs the file's own Q4_1 weights on
//! inferd's Q4_1 kernel, is closer still than requantizing them to Q8_0, and
//! at least as close as candle's Q4_1 kernel on the same weights.

use candle_core::DType;
use inferd_models::linear::with_cpu_kernels;
use inferd_models::testing::{reference_logits, smollm2_path};
use inferd_models::{LoadOptions, WeightFormat, load_text, load_weights};

fn logits(format: WeightFormat, dtype: DType, own: bool, tokens: &[u32]) -> Vec<Vec<f32>> {
    with_cpu_kernels(own, || {
        let opts = LoadOptions { format, dtype, max_positions: Some(256), ..Default::default() };
        reference_logits(&load_weights(&smollm2_path(), &opts).expect("model loads"), tokens)
            .expect("forward")
    })
}

/// Root mean square of the difference, over every position and vocabulary entry.
fn rms(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            sum += f64::from(p - q).powi(2);
            n += 1;
        }
    }
    (sum / n as f64).sqrt()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// How far, in logits, the f32 model's top token must lead its runner-up
/// for a different pick to count as an error rather than a near tie: which
/// side of a near tie a quantized model lands on moves with summation
/// order (candle's Q8_0 kernels, for one, pick differently on AVX2 and on
/// AVX-512).
const DECISIVE: f32 = 0.5;

/// Positions whose top token equals the reference's, counted where the
/// reference's choice is decisive (see [`DECISIVE`]), and how many such
/// positions there are.
fn top1_agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> (usize, usize) {
    let decisive: Vec<(&Vec<f32>, &Vec<f32>)> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| {
            let top = y[argmax(y)];
            let second = y.iter().copied().filter(|&v| v < top).fold(f32::NEG_INFINITY, f32::max);
            top - second >= DECISIVE
        })
        .collect();
    (decisive.iter().filter(|(x, y)| argmax(x) == argmax(y)).count(), decisive.len())
}

/// 52 tokens of ordinary English.
fn text_tokens() -> Vec<u32> {
    let (tok, _) = load_text(&smollm2_path()).expect("tokenizer");
    let text = "The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many \
                artists disliked it, but it soon became the symbol of the city, and today \
                millions of visitors climb its stairs or ride its lifts every year.";
    let tokens = tok.encode(text).expect("encode");
    assert!(tokens.len() > 30);
    tokens
}

#[test]
fn own_q8_0_kernels_are_at_least_as_close_to_f32_as_candles() {
    let tokens = text_tokens();
    let reference = logits(WeightFormat::Dense, DType::F32, true, &tokens);
    for dtype in [DType::F32, DType::BF16] {
        let ours = logits(WeightFormat::Q8_0, dtype, true, &tokens);
        let candle = logits(WeightFormat::Q8_0, dtype, false, &tokens);
        let (e_ours, e_candle) = (rms(&ours, &reference), rms(&candle, &reference));
        let ((a_ours, n), (a_candle, _)) =
            (top1_agreement(&ours, &reference), top1_agreement(&candle, &reference));
        eprintln!(
            "{dtype:?}: logits rms error vs f32: inferd {e_ours:.4}, candle {e_candle:.4}; \
             top-1 agreement at the {n} of {} positions where f32's choice is decisive: \
             inferd {a_ours}, candle {a_candle}",
            tokens.len()
        );
        // A few percent of slack: both are quantized, and run to run the two
        // kernels' errors differ by summation order only.
        assert!(e_ours <= e_candle * 1.03, "{dtype:?}: inferd {e_ours} vs candle {e_candle}");
        assert!(a_ours >= a_candle, "{dtype:?}: top-1 agreement {a_ours} vs {a_candle} of {n}");
    }
}

#[test]
fn the_files_own_q4_1_weights_are_closer_to_f32_than_a_q8_0_requantization() {
    let tokens = text_tokens();
    let reference = logits(WeightFormat::Dense, DType::F32, true, &tokens);
    for dtype in [DType::F32, DType::BF16] {
        let auto = logits(WeightFormat::Auto, dtype, true, &tokens);
        let q8 = logits(WeightFormat::Q8_0, dtype, true, &tokens);
        let candle = logits(WeightFormat::Native, dtype, false, &tokens);
        let (e_auto, e_q8, e_candle) =
            (rms(&auto, &reference), rms(&q8, &reference), rms(&candle, &reference));
        let agree = |l: &[Vec<f32>]| top1_agreement(l, &reference).0;
        eprintln!(
            "{dtype:?}: logits rms error vs f32: auto (Q4_1 on inferd) {e_auto:.4}, q8_0 {e_q8:.4}, \
             candle's Q4_1 {e_candle:.4}; top-1 agreement at the {} of {} positions where f32's \
             choice is decisive: {}, {}, {}",
            top1_agreement(&reference, &reference).1,
            tokens.len(),
            agree(&auto),
            agree(&q8),
            agree(&candle)
        );
        assert!(e_auto <= e_q8, "{dtype:?}: auto {e_auto} vs q8_0 {e_q8}");
        assert!(e_auto <= e_candle * 1.03, "{dtype:?}: auto {e_auto} vs candle's Q4_1 {e_candle}");
        assert!(agree(&auto) >= agree(&q8).max(agree(&candle)), "{dtype:?}: top-1 agreement");
    }
}
