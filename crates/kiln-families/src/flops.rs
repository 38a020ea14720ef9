//! Model FLOPs of training steps, for the benches' model FLOPs utilisation (MFU): what the
//! architecture must compute for a batch's real tokens, whatever kernels run it. Counted as
//! PaLM's appendix B and nanoGPT's `estimate_mfu` count: a matrix product `[a, b] × [b, c]` is
//! `2abc`; training is three forward passes (the backward pass computes two products per
//! forward product); every linear layer on each real token (padding is not work); attention's two
//! products (`QKᵀ` and `AV`) over each sequence's real length, the whole square (causal masking
//! halves the useful part, but the convention counts it whole); the output projection on the
//! labelled positions only (as kiln and the PyTorch reference compute it). Embedding look-ups,
//! norms, activations, softmax and the optimizer are left out (a few per cent here).

use kiln_recipe::ModelSection;

/// Forward FLOPs of the linear layers of one token in one layer: `2 × (weights it multiplies)`.
fn linear(weights: f64) -> f64 {
    2.0 * weights
}

/// Training FLOPs of one translation step: `sequences` are (source length with `</s>`, target
/// input length with `<s>`) of each sentence pair; `labels` the labelled target positions.
pub fn translation_step(m: &ModelSection, vocab: usize, sequences: &[(usize, usize)], labels: usize) -> f64 {
    let (d, f) = (m.d_model as f64, m.d_ff as f64);
    let (enc, dec) = (m.encoder_layers as f64, m.decoder_layers as f64);
    let mut forward = 0.0;
    for &(s, t) in sequences {
        let (s, t) = (s as f64, t as f64);
        // Encoder layer: Q, K, V, output (4d²) and the feed-forward (2df) on each source token.
        forward += enc * (s * linear(4.0 * d * d + 2.0 * d * f) + 4.0 * s * s * d);
        // Decoder layer: self-attention (4d²), cross-attention's Q and output (2d²) and the
        // feed-forward on each target token; cross-attention's K and V (2d²) on each source token.
        forward += dec * (t * linear(6.0 * d * d + 2.0 * d * f) + s * linear(2.0 * d * d) + 4.0 * t * t * d + 4.0 * t * s * d);
    }
    forward += labels as f64 * linear(d * vocab as f64);
    3.0 * forward
}

/// Training FLOPs of one language-model step: `rows` are the real lengths of its blocks (input
/// positions that predict a token); `labels` the predicted positions.
pub fn lm_step(m: &ModelSection, vocab: usize, rows: &[usize], labels: usize) -> f64 {
    let (d, f, layers) = (m.d_model as f64, m.d_ff as f64, m.decoder_layers as f64);
    let mut forward = 0.0;
    for &n in rows {
        let n = n as f64;
        forward += layers * (n * linear(4.0 * d * d + 2.0 * d * f) + 4.0 * n * n * d);
    }
    forward += labels as f64 * linear(d * vocab as f64);
    3.0 * forward
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nanoGPT's CPU shape (4 layers, width 128, MLP 512, context 64, 65 characters): per token
    /// 6N + 12·L·d·T with N the non-embedding weights plus the tied output layer, as nanoGPT's
    /// `estimate_mfu` has it; a translation pair counts its encoder, decoder, cross-attention and
    /// output terms, and padding adds nothing.
    #[test]
    fn flops_follow_the_six_n_convention() {
        let m = ModelSection { d_model: 128, n_heads: 4, d_ff: 512, decoder_layers: 4, encoder_layers: 2, ..Default::default() };
        let per_token = lm_step(&m, 65, &[64; 12], 12 * 64) / (12.0 * 64.0);
        let n = 4.0 * (4.0 * 128.0 * 128.0 + 2.0 * 128.0 * 512.0) + 128.0 * 65.0;
        assert!((per_token - (6.0 * n + 12.0 * 4.0 * 128.0 * 64.0)).abs() < 1e-6 * per_token, "{per_token}");
        // Twice the rows, twice the work; a short row costs less than a full one.
        assert_eq!(lm_step(&m, 65, &[64; 24], 24 * 64), 2.0 * lm_step(&m, 65, &[64; 12], 12 * 64));
        assert!(lm_step(&m, 65, &[10], 10) < lm_step(&m, 65, &[64], 64) / 6.0);
        let pair = translation_step(&m, 1000, &[(10, 8)], 8);
        let (d, f) = (128.0f64, 512.0f64);
        let expected = 3.0 * (2.0 * (10.0 * 2.0 * (4.0 * d * d + 2.0 * d * f) + 4.0 * 100.0 * d) + 4.0 * (8.0 * 2.0 * (6.0 * d * d + 2.0 * d * f) + 10.0 * 2.0 * 2.0 * d * d + 4.0 * 64.0 * d + 4.0 * 80.0 * d) + 8.0 * 2.0 * d * 1000.0);
        assert!((pair - expected).abs() < 1e-9 * expected, "{pair} vs {expected}");
        assert_eq!(translation_step(&m, 1000, &[(10, 8), (10, 8)], 16), 2.0 * pair);
    }
}
