//! Mixed precision (`train.precision`): matrix products — every linear layer, the attention
//! products and the output projection — run in a half-precision dtype, while weights, optimizer
//! state and everything else (embeddings, layer norms, softmax, the loss, the residual stream)
//! stay f32. This is the split PyTorch's autocast makes for bf16.
//!
//! Each product casts its operands down and its result back up with Burn's differentiable
//! `cast`, whose backward casts the gradient back to the source dtype: the f32 parameters receive
//! f32 gradients and the optimizer never sees a half-precision tensor. Backends never mix dtypes
//! in one operation (Flex panics; CubeCL would read the bytes as the other dtype), so every
//! operand is cast, never just one.
//!
//! The setting is per thread, like autocast's context: the training loop enters it for the run
//! ([`enter`]) and the model asks for it ([`compute`]) at each product.

use std::cell::Cell;

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

thread_local! {
    static COMPUTE: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

/// The dtype of matrix products on this thread; `None` = the tensors' own (f32).
pub fn compute() -> Option<FloatDType> {
    COMPUTE.with(Cell::get)
}

/// Restores the previous setting when dropped.
#[must_use = "the setting lasts as long as the guard"]
pub struct Autocast(Option<FloatDType>);

/// Runs this thread's matrix products in `dtype` (`None` or F32: full precision) until the
/// returned guard is dropped.
pub fn enter(dtype: Option<FloatDType>) -> Autocast {
    let dtype = dtype.filter(|d| *d != FloatDType::F32);
    Autocast(COMPUTE.with(|c| c.replace(dtype)))
}

impl Drop for Autocast {
    fn drop(&mut self) {
        COMPUTE.with(|c| c.set(self.0));
    }
}

/// `layer(x)`, the product and the bias in the compute dtype, the result in `x`'s dtype.
pub(crate) fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    match compute() {
        None => layer.forward(x),
        Some(half) => {
            let back: FloatDType = x.dtype().into();
            let weight = layer.weight.val().cast(half);
            let bias = layer.bias.as_ref().map(|b| b.val().cast(half));
            burn::tensor::module::linear(x.cast(half), weight, bias).cast(back)
        }
    }
}

/// `a · b` in the compute dtype, the result in `a`'s dtype.
pub(crate) fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    match compute() {
        None => a.matmul(b),
        Some(half) => {
            let back: FloatDType = a.dtype().into();
            a.cast(half).matmul(b.cast(half)).cast(back)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::LinearConfig;
    use burn::tensor::{DType, Distribution};

    type B = Autodiff<Flex>;

    #[test]
    fn the_guard_sets_and_restores_the_thread_setting() {
        assert_eq!(compute(), None);
        {
            let _outer = enter(Some(FloatDType::BF16));
            assert_eq!(compute(), Some(FloatDType::BF16));
            {
                let _inner = enter(Some(FloatDType::F32));
                assert_eq!(compute(), None, "f32 is full precision");
            }
            assert_eq!(compute(), Some(FloatDType::BF16));
            let other = std::thread::spawn(compute).join().unwrap();
            assert_eq!(other, None, "per thread");
        }
        assert_eq!(compute(), None);
    }

    /// A bf16 product: f32 in, f32 out, f32 gradients for the f32 parameters, values within
    /// bf16's rounding (8 bits of mantissa) of the f32 product, and not equal to it (it did run
    /// in bf16).
    #[test]
    fn a_half_precision_linear_keeps_f32_parameters_and_gradients() {
        let device = Default::default();
        let layer: Linear<B> = LinearConfig::new(64, 32).init(&device);
        let x = Tensor::<B, 2>::random([16, 64], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let run = |dtype: Option<FloatDType>| {
            let _autocast = enter(dtype);
            let y = linear(&layer, x.clone());
            assert_eq!(y.dtype(), DType::F32);
            let loss = (y.clone() * y.clone()).sum();
            let grads = loss.backward();
            let gw = layer.weight.grad(&grads).unwrap();
            let gx = x.grad(&grads).unwrap();
            assert_eq!((gw.dtype(), gx.dtype()), (DType::F32, DType::F32));
            let v = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
            (v(y.inner()), v(gw), v(gx))
        };
        let full = run(None);
        let half = run(Some(FloatDType::BF16));
        for (name, a, b) in [("y", &full.0, &half.0), ("dW", &full.1, &half.1), ("dx", &full.2, &half.2)] {
            let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 0.03 * scale, "{name}: bf16 off by {worst} at scale {scale}");
            assert!(worst > 0.0, "{name}: bf16 gave the f32 result exactly; it did not run in bf16");
        }
    }

    #[test]
    fn a_half_precision_matmul_returns_the_first_operands_dtype() {
        let device = Default::default();
        let a = Tensor::<Flex, 3>::random([2, 8, 16], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 3>::random([2, 16, 4], Distribution::Normal(0.0, 1.0), &device);
        let full: Vec<f32> = a.clone().matmul(b.clone()).into_data().to_vec().unwrap();
        let _autocast = enter(Some(FloatDType::F16));
        let half = matmul(a, b);
        assert_eq!(half.dtype(), DType::F32);
        let half: Vec<f32> = half.into_data().to_vec().unwrap();
        let worst = full.iter().zip(&half).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(worst > 0.0 && worst < 0.05, "f16 product off by {worst}");
    }
}
