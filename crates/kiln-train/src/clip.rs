//! Global-norm gradient clipping computed entirely on the device: the norm and the scale stay
//! tensors, so clipping never forces a device→host read. (Burn's own clipping is per parameter.)

use std::marker::PhantomData;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.powi_scalar(2).sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + sq,
                None => sq,
            });
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: Tensor<B::InnerBackend, 1>,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let factor = self.factor.clone().reshape([1; D]);
            self.grads.register::<B::InnerBackend, D>(param.id, g * factor);
        }
    }
}

/// Multiplies every gradient of `module` by `factor` (`[1]`, on the device).
pub fn scale_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &mut GradientsParams, factor: Tensor<B::InnerBackend, 1>) {
    let mut v = Scale::<B> { grads, factor, _b: PhantomData };
    module.visit(&mut v);
}

/// Global L2 norm of all gradients of `module`, as a `[1]` device tensor.
pub fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> Option<Tensor<B::InnerBackend, 1>> {
    let mut v = SquaredNorm::<B> { grads, sum: None };
    module.visit(&mut v);
    v.sum.map(|s| s.sqrt())
}

/// Scales gradients by `min(1, max_norm / norm)`; returns the pre-clip norm (on the device).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let norm = global_norm::<B, M>(module, grads)?;
    let factor = (norm.clone() + 1e-6).recip().mul_scalar(max_norm).clamp_max(1.0);
    let mut v = Scale::<B> { grads, factor, _b: PhantomData };
    module.visit(&mut v);
    Some(norm)
}

/// Reads a `[1]` tensor (tests and diagnostics only; the loop never calls it).
pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;

    type B = Autodiff<Flex>;

    fn grads_of(model: &Linear<B>) -> GradientsParams {
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0, 0.5, 4.0, -1.0], [2, 3]), &Default::default());
        let loss = model.forward(x).powi_scalar(2).sum();
        GradientsParams::from_grads(loss.backward(), model)
    }

    #[test]
    fn clipping_scales_to_the_threshold_and_leaves_small_gradients_alone() {
        let model: Linear<B> = LinearConfig::new(3, 2).init(&Default::default());
        let mut grads = grads_of(&model);
        let norm = scalar(global_norm::<B, _>(&model, &grads).unwrap());
        assert!(norm > 0.0);

        let before = clip_global_norm::<B, _>(&model, &mut grads, norm / 4.0).unwrap();
        assert!((scalar(before) - norm).abs() < 1e-4 * norm);
        let after = scalar(global_norm::<B, _>(&model, &grads).unwrap());
        assert!((after - norm / 4.0).abs() < 1e-4 * norm, "{after} vs {}", norm / 4.0);

        let mut grads = grads_of(&model);
        clip_global_norm::<B, _>(&model, &mut grads, norm * 10.0);
        let unclipped = scalar(global_norm::<B, _>(&model, &grads).unwrap());
        assert!((unclipped - norm).abs() < 1e-5 * norm);
    }
}
