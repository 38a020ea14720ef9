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
