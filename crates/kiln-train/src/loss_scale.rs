//! Dynamic loss scaling for f16 training (`train.precision = "f16"`), decided on the device: the
//! overflow check, the skip and the new scale are tensors, so a step never waits on the host for
//! them. The loss is multiplied by the scale before the backward pass and the gradients divided by
//! it after; after `interval` clean steps in a row the scale grows by `growth`; a step whose
//! gradients are not finite is skipped and the scale shrinks by `backoff`.
//!
//! The skip happens on the device too: the optimizer steps anyway, then every parameter and AdamW
//! moment keeps its value from before the step where the verdict says skip ([`keep_if_skipped`]).
//! One difference from PyTorch's GradScaler, which does not call the optimizer at all: AdamW's
//! step counter (a host integer, used in its bias correction) counts skipped steps too, so the
//! correction of later steps assumes a step more than was applied; it matters only early (with
//! β₂ = 0.98 the correction is within 1e-8 of 1 after 1,000 steps).

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Tensor};

/// kiln's optimizer: Burn's AdamW behind its adaptor.
pub type AdamWOptimizer<M, B> = OptimizerAdaptor<AdamW, M, B>;

pub struct LossScale<B: Backend> {
    /// The factor the loss is multiplied by before the backward pass, `[1]`.
    pub scale: Tensor<B, 1>,
    /// Clean steps since the scale last changed, `[1]` (a float: exact up to 2²⁴).
    clean: Tensor<B, 1>,
    growth: f64,
    backoff: f64,
    interval: usize,
}

impl<B: Backend> LossScale<B> {
    pub fn new(initial: f64, growth: f64, backoff: f64, interval: usize, device: &B::Device) -> Self {
        Self {
            scale: Tensor::<B, 1>::from_floats([initial as f32], device),
            clean: Tensor::<B, 1>::zeros([1], device),
            growth,
            backoff,
            interval: interval.max(1),
        }
    }

    /// PyTorch's GradScaler defaults: 2¹⁶, ×2 after 2,000 clean steps, ×½ on an overflow.
    pub fn standard(device: &B::Device) -> Self {
        Self::new(65_536.0, 2.0, 0.5, 2_000, device)
    }

    /// Takes the step's verdict — `finite`: `[1]`, true when every gradient is finite (for
    /// example `global_norm.is_finite()`) — and returns `[1]` true when the update must be skipped;
    /// the scale and the clean-step count move on the device.
    pub fn update(&mut self, finite: Tensor<B, 1, Bool>) -> Tensor<B, 1, Bool> {
        let ok = finite.clone().float();
        // An overflow resets the count; a clean step adds one.
        let clean = (self.clean.clone() + 1.0) * ok.clone();
        let grow = clean.clone().greater_equal_elem(self.interval as f64);
        let on_overflow = ok * (1.0 - self.backoff) + self.backoff;
        let on_growth = grow.clone().float() * (self.growth - 1.0) + 1.0;
        self.scale = self.scale.clone() * on_overflow * on_growth;
        self.clean = clean.mask_fill(grow, 0.0);
        finite.bool_not()
    }
}

/// `skip` (`[1]`, on the device) set: the model and optimizer as `before` them, else as `after`.
pub fn keep_if_skipped<B: AutodiffBackend, M: AutodiffModule<B>>(
    skip: &Tensor<B::InnerBackend, 1, Bool>,
    before: (&M, &AdamWOptimizer<M, B>),
    after: (M, AdamWOptimizer<M, B>),
) -> (M, AdamWOptimizer<M, B>) {
    let (model_before, optim_before) = before;
    let (model_after, optim_after) = after;
    // The parameters before the step, by id (a GradientsParams is a typed map by parameter id).
    struct Collect<'a, B: AutodiffBackend> {
        kept: &'a mut GradientsParams,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.kept.register::<B::InnerBackend, D>(param.id, param.val().inner());
        }
    }
    let mut kept = GradientsParams::new();
    model_before.visit(&mut Collect::<B> { kept: &mut kept, _b: std::marker::PhantomData });

    // Each parameter chosen between before and after; its AdamW moments likewise.
    struct Select<'a, B: AutodiffBackend> {
        skip: Tensor<B::InnerBackend, 1, Bool>,
        kept: GradientsParams,
        before: HashMap<ParamId, AdaptorRecord<AdamW, B>>,
        after: &'a mut HashMap<ParamId, AdaptorRecord<AdamW, B>>,
    }
    impl<B: AutodiffBackend> Select<'_, B> {
        fn choose<const D: usize>(&self, before: Tensor<B::InnerBackend, D>, after: Tensor<B::InnerBackend, D>) -> Tensor<B::InnerBackend, D> {
            let mask = self.skip.clone().reshape([1; D]).expand(after.shape());
            after.mask_where(mask, before)
        }
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Select<'_, B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let id = param.id;
            if let Some(record) = self.after.remove(&id) {
                let after: AdamWState<B::InnerBackend, D> = record.into_state();
                let time = after.momentum.time;
                // No state before: the step was the parameter's first; skipped, it starts at zero.
                let (m1, m2, max2) = match self.before.remove(&id) {
                    Some(r) => {
                        let b: AdamWState<B::InnerBackend, D> = r.into_state();
                        (b.momentum.moment_1, b.momentum.moment_2, b.momentum.max_moment_2)
                    }
                    None => (after.momentum.moment_1.zeros_like(), after.momentum.moment_2.zeros_like(), None),
                };
                let max_moment_2 = after.momentum.max_moment_2.map(|a| {
                    let b = max2.unwrap_or_else(|| a.zeros_like());
                    self.choose(b, a)
                });
                let momentum = AdaptiveMomentumState {
                    time,
                    moment_1: self.choose(m1, after.momentum.moment_1),
                    moment_2: self.choose(m2, after.momentum.moment_2),
                    max_moment_2,
                };
                self.after.insert(id, AdaptorRecord::from_state(AdamWState { momentum }));
            }
            let Some(before) = self.kept.remove::<B::InnerBackend, D>(id) else { return param };
            param.map(|tensor| {
                let require_grad = tensor.is_require_grad();
                let chosen = Tensor::from_inner(self.choose(before, tensor.inner()));
                if require_grad { chosen.require_grad() } else { chosen }
            })
        }
    }
    let mut records: HashMap<_, _> = optim_after.to_record().into_iter().collect();
    let before = optim_before.to_record().into_iter().collect();
    let mut select = Select::<B> { skip: skip.clone(), kept, before, after: &mut records };
    let model = model_after.map(&mut select);
    (model, optim_after.load_record(records.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn grows_after_clean_steps_and_backs_off_and_skips_on_overflow() {
        let device = Default::default();
        let mut s = LossScale::<Flex>::new(1024.0, 2.0, 0.5, 3, &device);
        // Overflows injected at steps 4, 5 and 9.
        let finite = [true, true, true, false, false, true, true, true, false, true];
        let mut skips = Vec::new();
        let mut scales = Vec::new();
        for f in finite {
            let skip = s.update(Tensor::<Flex, 1, Bool>::from_data([f], &device));
            skips.push(skip.into_data().to_vec::<bool>().unwrap()[0]);
            scales.push(s.scale.clone().into_scalar() as f64);
        }
        assert_eq!(skips, finite.map(|f| !f).to_vec(), "exactly the overflowing steps are skipped");
        // 3 clean → ×2; overflow → ×½ (twice); 3 clean → ×2; overflow → ×½; then clean.
        assert_eq!(scales, vec![1024.0, 1024.0, 2048.0, 1024.0, 512.0, 512.0, 512.0, 1024.0, 512.0, 512.0]);
    }

    /// The device-side skip: with the verdict "skip" the model and AdamW's moments are exactly
    /// those before the step (the next step from them equals the next step from a copy kept
    /// aside); without it, exactly the optimizer's step.
    #[test]
    fn a_skipped_step_leaves_weights_and_moments_as_they_were() {
        use burn::backend::Autodiff;
        use burn::module::Module;
        use burn::nn::{Linear, LinearConfig};
        use burn::optim::AdamWConfig;
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let x = Tensor::<Ad, 2>::from_floats([[0.5, -1.0, 2.0, 0.25], [1.5, 0.5, -0.5, 1.0], [-2.0, 1.0, 0.0, 0.5]], &device);
        let grads = |m: &Linear<Ad>, k: f32| GradientsParams::from_grads((m.forward(x.clone()) * k).powi_scalar(2).mean().backward(), m);
        let weights = |m: &Linear<Ad>| m.weight.val().inner().into_data().to_vec::<f32>().unwrap();
        let model: Linear<Ad> = LinearConfig::new(4, 3).init(&device).fork(&device);
        let mut optim = AdamWConfig::new().init::<Ad, Linear<Ad>>();
        let g = grads(&model, 1.0);
        let model = optim.step(1e-2, model, g);
        let verdict = |skip: bool| Tensor::<Flex, 1, Bool>::from_data([skip], &device);
        for skip in [true, false] {
            let (mut o, m) = (optim.clone(), model.clone());
            let g = grads(&m, 3.0);
            let stepped = o.step(1e-2, m.clone(), g);
            let plain = weights(&stepped);
            let (kept, mut kept_optim) = keep_if_skipped(&verdict(skip), (&model, &optim), (stepped, o));
            assert_eq!(weights(&kept), if skip { weights(&model) } else { plain }, "skip {skip}");
            // AdamW's moments of the weight: those before the step when skipped, else the step's.
            let moments = |o: &AdamWOptimizer<Linear<Ad>, Ad>| {
                let state: AdamWState<Flex, 2> = o.to_record().remove(&model.weight.id).unwrap().into_state();
                let v = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
                (state.momentum.time, v(state.momentum.moment_1), v(state.momentum.moment_2))
            };
            let (time, m1, m2) = moments(&kept_optim);
            let (time_before, m1_before, m2_before) = moments(&optim);
            assert_eq!(time, time_before + 1, "the step counter is a host integer: it counts the step");
            if skip {
                assert_eq!((m1, m2), (m1_before, m2_before));
            } else {
                assert!(m1 != m1_before && m2 != m2_before);
            }
            let _ = kept_optim.step(1e-2, kept.clone(), grads(&kept, 2.0));
        }
    }

    #[test]
    fn the_overflow_verdict_can_come_from_a_nan_gradient_norm() {
        let device = Default::default();
        let mut s = LossScale::<Flex>::standard(&device);
        let norm = Tensor::<Flex, 1>::from_floats([f32::INFINITY], &device);
        let skip = s.update(norm.is_finite());
        assert!(skip.into_data().to_vec::<bool>().unwrap()[0]);
        assert_eq!(s.scale.into_scalar(), 32_768.0);
    }
}
