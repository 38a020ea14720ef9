//! Label-smoothed cross-entropy over non-padding tokens, returned as device-side sums.
//!
//! `loss = (1 - ε)·(−log p[gold]) + ε·mean_v(−log p[v])` per token (PyTorch's `label_smoothing`),
//! summed over tokens whose label is not `<pad>`. Sums, not means: the trainer adds them over a
//! sync window on the device and divides once, so every step's loss counts exactly.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Device-side sums of one batch.
pub struct LossSums<B: Backend> {
    /// Σ label-smoothed loss over real tokens (the training objective), shape `[1]`.
    pub smoothed: Tensor<B, 1>,
    /// Σ plain negative log-likelihood over real tokens, shape `[1]`.
    pub nll: Tensor<B, 1>,
}

/// `logits`: `[rows, vocab]`; `labels`: `[rows]`, with `pad` for rows that do not count.
/// One fused pass on the CPU backend ([`crate::fused`]), Burn's composition elsewhere.
pub fn label_smoothed_loss<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, pad: u32, epsilon: f64) -> LossSums<B> {
    match crate::fused::cross_entropy_rows(logits, labels, pad, epsilon) {
        Ok(rows) => {
            let sums = rows.sum_dim(0);
            LossSums { smoothed: sums.clone().slice([0..1, 0..1]).reshape([1]), nll: sums.slice([0..1, 1..2]).reshape([1]) }
        }
        Err((logits, labels)) => label_smoothed_loss_composed(logits, labels, pad, epsilon),
    }
}

/// The same loss from Burn's tensor operations (log-softmax, gather, mean): the reference the
/// fused kernel is tested against, and the implementation on backends without one.
pub fn label_smoothed_loss_composed<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, pad: u32, epsilon: f64) -> LossSums<B> {
    let logp = log_softmax(logits, 1);
    let mask = labels.clone().not_equal_elem(pad as i64).float();
    let nll: Tensor<B, 1> = logp.clone().gather(1, labels.unsqueeze_dim(1)).squeeze_dim::<1>(1).neg() * mask.clone();
    let nll_sum = nll.clone().sum();
    let smoothed = if epsilon > 0.0 {
        let uniform: Tensor<B, 1> = logp.mean_dim(1).squeeze_dim::<1>(1).neg() * mask;
        nll * (1.0 - epsilon) + uniform * epsilon
    } else {
        nll
    };
    LossSums { smoothed: smoothed.sum(), nll: nll_sum }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn matches_hand_computed_values_and_ignores_padding() {
        let device = Default::default();
        // Two positions, vocab 3; the second label is padding.
        let logits = Tensor::<Flex, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 0.5, 9.0, -3.0, 4.0], [2, 3]), &device);
        let labels = Tensor::<Flex, 1, Int>::from_data(TensorData::new(vec![1i32, 0], [2]), &device);
        let sums = label_smoothed_loss(logits, labels, 0, 0.1);
        let lse = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
        let nll = lse - 2.0;
        let uniform = lse - (1.0 + 2.0 + 0.5) / 3.0;
        let got_nll = sums.nll.into_scalar() as f64;
        let got_smoothed = sums.smoothed.into_scalar() as f64;
        assert!((got_nll - nll).abs() < 1e-5, "{got_nll} vs {nll}");
        let want = 0.9 * nll + 0.1 * uniform;
        assert!((got_smoothed - want).abs() < 1e-5, "{got_smoothed} vs {want}");
    }
}
