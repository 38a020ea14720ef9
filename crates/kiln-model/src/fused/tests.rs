//! Each fused operation against Burn's composition of the same function: values and gradients,
//! relative error ≤ 1e-4 (the largest difference over the largest magnitude of the reference),
//! on contiguous and strided inputs, with padding, masks and label smoothing.

use super::*;
use crate::loss::{label_smoothed_loss, label_smoothed_loss_composed};
use burn::tensor::Distribution;

type F = Flex;

fn assert_close<B: burn::tensor::backend::Backend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>, what: &str) {
    let got: Vec<f32> = got.into_data().convert::<f32>().to_vec().unwrap();
    let want: Vec<f32> = want.into_data().convert::<f32>().to_vec().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let worst = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst / scale <= 1e-4, "{what}: relative error {} (worst {worst}, scale {scale})", worst / scale);
    assert!(scale > 1e-6, "{what}: the reference is all zeros, the comparison says nothing");
}

fn random<B: burn::tensor::backend::Backend, const D: usize>(shape: [usize; D], scale: f64) -> Tensor<B, D> {
    B::seed(&Default::default(), 7);
    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, scale), &Default::default())
}

fn labels(values: &[i32]) -> Tensor<Ad, 1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &Default::default())
}

#[test]
fn cross_entropy_matches_the_composition_with_padding_and_smoothing() {
    let gold = [3, 0, 36, 5, 0, 17, 1, 2, 0, 35, 9];
    for epsilon in [0.0, 0.1] {
        let x = random::<Ad, 2>([gold.len(), 37], 3.0);
        let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
        let fused = label_smoothed_loss(a.clone(), labels(&gold), 0, epsilon);
        let composed = label_smoothed_loss_composed(b.clone(), labels(&gold), 0, epsilon);
        assert_close(fused.smoothed.clone(), composed.smoothed.clone(), "smoothed sum");
        assert_close(fused.nll.clone(), composed.nll.clone(), "nll sum");
        // Both outputs feed the gradient, with different weights, so both paths of the backward count.
        let ga = (fused.smoothed * 0.7 + fused.nll * 0.3).backward();
        let gb = (composed.smoothed * 0.7 + composed.nll * 0.3).backward();
        let (da, db) = (a.grad(&ga).unwrap(), b.grad(&gb).unwrap());
        assert_close(da.clone(), db, "d loss / d logits");
        let pad_row: Vec<f32> = da.slice([1..2, 0..37]).into_data().to_vec().unwrap();
        assert!(pad_row.iter().all(|&v| v == 0.0), "a padding row gets no gradient");
    }
}

#[test]
fn cross_entropy_on_strided_logits_and_without_autodiff() {
    let gold = [4, 1, 0, 6];
    let x = random::<F, 2>([7, 4], 2.0).transpose(); // [4, 7], not contiguous
    let gold_f: Tensor<F, 1, Int> = Tensor::from_data(TensorData::new(gold.to_vec(), [4]), &Default::default());
    let fused = label_smoothed_loss(x.clone(), gold_f.clone(), 0, 0.1);
    let composed = label_smoothed_loss_composed(x, gold_f, 0, 0.1);
    assert_close(fused.smoothed, composed.smoothed, "smoothed sum");
    assert_close(fused.nll, composed.nll, "nll sum");
}

#[test]
fn cross_entropy_of_a_nan_logit_is_nan() {
    let mut v = vec![0.25f32; 2 * 9];
    v[12] = f32::NAN;
    let x: Tensor<Ad, 2> = Tensor::from_data(TensorData::new(v, [2, 9]), &Default::default());
    let loss = label_smoothed_loss(x, labels(&[3, 4]), 0, 0.1);
    assert!(loss.smoothed.into_scalar().is_nan());
}

#[test]
fn gelu_matches_burns_and_its_gradient_too() {
    let x = random::<Ad, 3>([3, 5, 41], 2.5);
    let w = random::<Ad, 3>([3, 5, 41], 1.0).detach();
    let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
    let fa = gelu(a.clone());
    let fb = burn::tensor::activation::gelu(b.clone());
    assert_close(fa.clone(), fb.clone(), "gelu");
    let (ga, gb) = ((fa * w.clone()).sum().backward(), (fb * w).sum().backward());
    assert_close(a.grad(&ga).unwrap(), b.grad(&gb).unwrap(), "d gelu");
    // Strided input, plain Flex.
    let s = random::<F, 2>([6, 9], 3.0).transpose();
    assert_close(gelu(s.clone()), burn::tensor::activation::gelu(s), "gelu on a transposed tensor");
}

#[test]
fn softmax_matches_burns_with_masks_and_its_gradient_too() {
    let x = random::<Ad, 4>([2, 3, 5, 7], 2.0);
    // A causal-style mask filled the way attention fills it.
    let mask: Vec<bool> = (0..5).flat_map(|i| (0..7).map(move |j| j > i + 1)).collect();
    let mask: Tensor<Ad, 4, burn::tensor::Bool> = Tensor::<Ad, 2, burn::tensor::Bool>::from_data(TensorData::new(mask, [5, 7]), &Default::default()).reshape([1, 1, 5, 7]).expand([2, 3, 5, 7]);
    let w = random::<Ad, 4>([2, 3, 5, 7], 1.0).detach();
    let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
    let fa = softmax_last(a.clone().mask_fill(mask.clone(), -1.0e9));
    let fb = burn::tensor::activation::softmax(b.clone().mask_fill(mask, -1.0e9), 3);
    assert_close(fa.clone(), fb.clone(), "softmax");
    let (ga, gb) = ((fa * w.clone()).sum().backward(), (fb * w).sum().backward());
    assert_close(a.grad(&ga).unwrap(), b.grad(&gb).unwrap(), "d softmax");
    let s = random::<F, 3>([4, 6, 3], 2.0).swap_dims(1, 2);
    assert_close(softmax_last(s.clone()), burn::tensor::activation::softmax(s, 2), "softmax on a strided tensor");
}

#[test]
fn the_input_a_caller_still_holds_is_not_overwritten() {
    // The kernels write into buffers nobody else holds; a tensor the caller keeps must survive.
    let x = random::<F, 2>([4, 9], 1.0);
    let before: Vec<f32> = x.clone().into_data().to_vec().unwrap();
    let _ = softmax_last(x.clone());
    let after: Vec<f32> = x.into_data().to_vec().unwrap();
    assert_eq!(before, after);
}

#[test]
fn layer_norm_matches_burns_with_all_three_gradients() {
    use burn::module::Param;
    let device = Default::default();
    let mut norm = burn::nn::LayerNormConfig::new(40).init::<Ad>(&device);
    // Non-trivial scale and shift, so their gradients and their use in the forward both count.
    norm.gamma = Param::from_tensor(random::<Ad, 1>([40], 1.0) + 1.0);
    norm.beta = Some(Param::from_tensor(random::<Ad, 1>([40], 0.5)));
    let x = random::<Ad, 3>([3, 7, 40], 2.0) + 0.7;
    let w = random::<Ad, 3>([3, 7, 40], 1.0).detach();
    let (a, b) = (x.clone().detach().require_grad(), x.detach().require_grad());
    let fa = layer_norm(&norm, a.clone());
    let fb = norm.forward(b.clone());
    assert_close(fa.clone(), fb.clone(), "layer norm");
    let (ga, gb) = ((fa * w.clone()).sum().backward(), (fb * w).sum().backward());
    assert_close(a.grad(&ga).unwrap(), b.grad(&gb).unwrap(), "d x");
    assert_close(norm.gamma.grad(&ga).unwrap(), norm.gamma.grad(&gb).unwrap(), "d gamma");
    let beta = norm.beta.as_ref().unwrap();
    assert_close(beta.grad(&ga).unwrap(), beta.grad(&gb).unwrap(), "d beta");
}

#[test]
fn layer_norm_over_many_rows_splits_its_parameter_gradients_exactly() {
    // More rows than one parallel task takes, so the partial γ/β sums are reduced across tasks.
    let device = Default::default();
    let norm = burn::nn::LayerNormConfig::new(64).init::<Ad>(&device);
    let x = random::<Ad, 2>([700, 64], 1.5);
    let w = random::<Ad, 2>([700, 64], 1.0).detach();
    let (ga, gb) = ((layer_norm(&norm, x.clone()) * w.clone()).sum().backward(), (norm.forward(x) * w).sum().backward());
    assert_close(norm.gamma.grad(&ga).unwrap(), norm.gamma.grad(&gb).unwrap(), "d gamma");
    let beta = norm.beta.as_ref().unwrap();
    assert_close(beta.grad(&ga).unwrap(), beta.grad(&gb).unwrap(), "d beta");
}

/// Burn's composition of what `attention_weights` fuses, dropout by `dropout::apply`.
fn attention_composed<B: burn::tensor::backend::Backend>(s: Tensor<B, 4>, divisor: f64, mask: Option<&Tensor<B, 4, burn::tensor::Bool>>, dropout: &burn::nn::Dropout) -> Tensor<B, 4> {
    let dims = s.dims();
    let mut s = s / divisor;
    if let Some(mask) = mask {
        s = s.mask_fill(mask.clone().expand(dims), -1.0e9);
    }
    crate::dropout::apply(dropout, burn::tensor::activation::softmax(s, 3))
}

/// Scale, key mask, softmax and dropout in one pass each way, against the composition: a padding
/// mask `[batch, 1, 1, keys]` with one query row whose keys are all masked, a causal mask
/// `[1, 1, queries, keys]`, and none; dropout 0.3 with the step's host masks (the same draw both
/// ways), rows split over parts of a batch; values and the gradient of a weighted sum.
#[test]
fn attention_weights_match_the_composition_with_masks_and_dropout() {
    use crate::dropout::{mask_state, seed_step, set_mask_state};
    let device = Default::default();
    let (b, h, q, k) = (3, 2, 5, 6);
    let dropout = burn::nn::DropoutConfig::new(0.3).init();
    let bool4 = |bits: Vec<bool>, dims: [usize; 4]| Tensor::<Ad, 4, burn::tensor::Bool>::from_data(TensorData::new(bits, dims), &device);
    // Batch row 2 is all padding: its queries see no key at all.
    let padding = bool4((0..b).flat_map(|bi| (0..k).map(move |j| bi == 2 || j >= k - bi)).collect(), [b, 1, 1, k]);
    let causal = bool4((0..q).flat_map(|i| (0..k).map(move |j| j > i + 1)).collect(), [1, 1, q, k]);
    for (what, mask) in [("padding", Some(&padding)), ("causal", Some(&causal)), ("no mask", None)] {
        let x = random::<Ad, 4>([b, h, q, k], 3.0);
        let w = random::<Ad, 4>([b, h, q, k], 1.0).detach();
        let (xa, xb) = (x.clone().detach().require_grad(), x.detach().require_grad());
        seed_step(Some(5));
        let start = mask_state();
        let fa = attention_weights(xa.clone(), 8f64.sqrt(), mask, &dropout);
        set_mask_state(start);
        let fb = attention_composed(xb.clone(), 8f64.sqrt(), mask, &dropout);
        assert_close(fa.clone(), fb.clone(), &format!("{what}: weights"));
        let dropped = fa.clone().equal_elem(0.0).int().sum().into_scalar() as usize;
        assert!(dropped > 0, "{what}: dropout dropped nothing");
        let (ga, gb) = ((fa * w.clone()).sum().backward(), (fb * w).sum().backward());
        assert_close(xa.grad(&ga).unwrap(), xb.grad(&gb).unwrap(), &format!("{what}: d scores"));
        // Rows 1.. of the batch alone, with the mask state at row 1: the same rows of the weights.
        let x = random::<Ad, 4>([b, h, q, k], 3.0);
        set_mask_state(start);
        let whole = attention_weights(x.clone(), 8f64.sqrt(), mask, &dropout);
        set_mask_state(start.at_row(1));
        let part_mask = mask.map(|m| if m.dims()[0] == b { m.clone().slice([1..b, 0..1, 0..1, 0..k]) } else { m.clone() });
        let part = attention_weights(x.slice([1..b, 0..h, 0..q, 0..k]), 8f64.sqrt(), part_mask.as_ref(), &dropout);
        assert_close(part, whole.slice([1..b, 0..h, 0..q, 0..k]), &format!("{what}: rows 1.. alone"));
        seed_step(None);
    }
    // Without autodiff (evaluation): no dropout, the masked softmax alone.
    let x = random::<F, 4>([b, h, q, k], 3.0);
    let causal = Tensor::<F, 4, burn::tensor::Bool>::from_data(causal.into_data(), &device);
    let off = burn::nn::DropoutConfig::new(0.3).init();
    assert_close(attention_weights(x.clone(), 2.0, Some(&causal), &off), attention_composed(x, 2.0, Some(&causal), &off), "evaluation");
}

/// `x + dropout(y)` in one pass each way, against `x + dropout::apply(dropout, y)` with the same
/// host mask: the sum and both gradients; and the mask state counts the call either way.
#[test]
fn residual_add_matches_the_composition_and_both_gradients() {
    use crate::dropout::{mask_state, seed_step, set_mask_state};
    let dropout = burn::nn::DropoutConfig::new(0.25).init();
    // More elements than one block of the mask stream, rows split at an odd offset.
    let (x, y) = (random::<Ad, 3>([5, 37, 130], 1.0), random::<Ad, 3>([5, 37, 130], 2.0) * 0.5);
    let w = random::<Ad, 3>([5, 37, 130], 1.0).detach();
    let (xa, ya, xb, yb) = (x.clone().detach().require_grad(), y.clone().detach().require_grad(), x.detach().require_grad(), y.detach().require_grad());
    seed_step(Some(3));
    let start = mask_state().at_row(2);
    set_mask_state(start);
    let fa = residual_add(xa.clone(), ya.clone(), &dropout);
    let after = mask_state();
    set_mask_state(start);
    let fb = xb.clone() + crate::dropout::apply(&dropout, yb.clone());
    assert_eq!(mask_state(), after, "one dropout call either way");
    assert_close(fa.clone(), fb.clone(), "x + dropout(y)");
    let dropped = (fa.clone() - xa.clone()).equal_elem(0.0).int().sum().into_scalar() as usize;
    assert!(dropped > 1000, "dropout dropped {dropped} values");
    let (ga, gb) = ((fa * w.clone()).sum().backward(), (fb * w).sum().backward());
    assert_close(xa.grad(&ga).unwrap(), xb.grad(&gb).unwrap(), "d x");
    assert_close(ya.grad(&ga).unwrap(), yb.grad(&gb).unwrap(), "d y");
    seed_step(None);
}
