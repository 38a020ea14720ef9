//! Arithmetic on whole models, parameter by parameter: the exponential moving average of the
//! weights (`train.ema_decay`, Marian's exponential smoothing, fairseq's EMA) and the mean of
//! several checkpoints (`kiln average`). Any Burn module works: its float parameters are visited
//! in their declaration order, which is the same for two modules of one type and configuration.
//! All of it is tensor arithmetic on the module's device: nothing is read back to the host.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

/// Every float parameter of `module`, flattened, in visiting order.
fn flat_params<B: Backend, M: Module<B>>(module: &M) -> Vec<Tensor<B, 1>> {
    struct Collect<B: Backend>(Vec<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().flatten(0, D - 1));
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

/// `module` with each float parameter replaced by `f(parameter, the others' same parameters)`.
fn zip_map<B: Backend, M: Module<B>>(module: M, others: &[Vec<Tensor<B, 1>>], f: impl Fn(Tensor<B, 1>, Vec<Tensor<B, 1>>) -> Tensor<B, 1>) -> M {
    struct Zip<'a, B: Backend, F> {
        others: &'a [Vec<Tensor<B, 1>>],
        at: usize,
        f: F,
    }
    impl<B: Backend, F: Fn(Tensor<B, 1>, Vec<Tensor<B, 1>>) -> Tensor<B, 1>> ModuleMapper<B> for Zip<'_, B, F> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let theirs: Vec<Tensor<B, 1>> = self.others.iter().map(|o| o[self.at].clone()).collect();
            self.at += 1;
            let out = (self.f)(tensor.flatten(0, D - 1), theirs).reshape(shape);
            Param::from_mapped_value(id, out, mapper)
        }
    }
    let mut zip = Zip { others, at: 0, f };
    module.map(&mut zip)
}

/// Why two modules cannot be combined parameter by parameter, if they cannot.
pub fn check_same_shapes<B: Backend, M: Module<B>>(a: &M, b: &M) -> Result<(), String> {
    let (pa, pb) = (flat_params(a), flat_params(b));
    if pa.len() != pb.len() {
        return Err(format!("{} parameters against {}", pa.len(), pb.len()));
    }
    match pa.iter().zip(&pb).position(|(x, y)| x.dims() != y.dims()) {
        Some(i) => Err(format!("parameter {} has {} numbers against {}", i + 1, pa[i].dims()[0], pb[i].dims()[0])),
        None => Ok(()),
    }
}

/// The parameter-wise mean of `modules` (same type and configuration), summed in the order given
/// and divided once: the first module's structure, ids and non-float parameters are kept.
pub fn average<B: Backend, M: Module<B>>(mut modules: Vec<M>) -> Result<M, String> {
    if modules.is_empty() {
        return Err("nothing to average".into());
    }
    let first = modules.remove(0);
    for m in &modules {
        check_same_shapes(&first, m)?;
    }
    let others: Vec<Vec<Tensor<B, 1>>> = modules.iter().map(flat_params).collect();
    let n = (others.len() + 1) as f64;
    Ok(zip_map(first, &others, |mine, theirs| theirs.into_iter().fold(mine, |acc, t| acc + t).div_scalar(n)))
}

/// The exponential moving average of a model's weights, on the device, updated after each
/// optimizer step `t`: `ema ← d · ema + (1 − d) · weights` with `d = min(decay, (1 + t) / (10 + t))`.
/// The warm-up of `d` is TensorFlow's `ExponentialMovingAverage(num_updates)`: without it the
/// initial random weights would keep a share `decay^t` for thousands of steps (9 % after 1,200
/// steps at 0.998). It starts as the weights at the step it is created (the first step of a run,
/// or a resume of a run that had none); `d` depends on the step alone, so a resume continues it.
#[derive(Clone)]
pub struct Ema<B: AutodiffBackend, M: AutodiffModule<B>> {
    pub decay: f64,
    pub module: M::InnerModule,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Ema<B, M> {
    /// An average starting at `model`'s weights.
    pub fn start(decay: f64, model: &M) -> Self {
        Self { decay, module: model.valid() }
    }

    /// An average continued from saved weights (`ema.mpk` of a checkpoint).
    pub fn resume(decay: f64, module: M::InnerModule) -> Self {
        Self { decay, module }
    }

    /// The decay used after optimizer step `step` (1-based).
    pub fn decay_at(&self, step: usize) -> f64 {
        let t = step as f64;
        self.decay.min((1.0 + t) / (10.0 + t))
    }

    /// One update with the weights after optimizer step `step`.
    pub fn update(&mut self, model: &M, step: usize) {
        let weights = vec![flat_params(&model.valid())];
        let keep = self.decay_at(step);
        let take = 1.0 - keep;
        let module = self.module.clone();
        self.module = zip_map(module, &weights, |ema, mut w| ema.mul_scalar(keep) + w.remove(0).mul_scalar(take));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};

    type B = Autodiff<Flex>;

    fn values<Bk: Backend, M: Module<Bk>>(m: &M) -> Vec<f32> {
        flat_params(m).into_iter().flat_map(|t| t.into_data().to_vec::<f32>().unwrap()).collect()
    }

    fn linear(seed: u64) -> Linear<B> {
        let device = Default::default();
        B::seed(&device, seed);
        LinearConfig::new(3, 2).init(&device)
    }

    /// Three updates of a toy model's average equal the formula written out by hand.
    #[test]
    fn ema_follows_its_formula() {
        let steps: Vec<Linear<B>> = (1..=4).map(linear).collect();
        // Steps 100.. so the warm-up (1 + t) / (10 + t) is above 0.9 and the decay is 0.9 ...
        let mut ema = Ema::<B, Linear<B>>::start(0.9, &steps[0]);
        for (t, m) in steps[1..].iter().enumerate() {
            ema.update(m, 100 + t);
        }
        let w: Vec<Vec<f32>> = steps.iter().map(values).collect();
        let expected: Vec<f64> = (0..w[0].len()).map(|i| w[1..].iter().fold(w[0][i] as f64, |e, wk| 0.9 * e + 0.1 * wk[i] as f64)).collect();
        let got = values(&ema.module);
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert!((*g as f64 - e).abs() < 1e-6, "ema {g} against the formula's {e}");
        }
        // Not the last weights: the average lags them.
        assert!(got.iter().zip(&w[3]).any(|(g, l)| (g - l).abs() > 1e-3));
        // ... and at step 1 the warm-up's 2/11 rules: the first update mostly takes the new weights.
        let mut early = Ema::<B, Linear<B>>::start(0.9, &steps[0]);
        early.update(&steps[1], 1);
        let d = 2.0 / 11.0;
        for (i, g) in values(&early.module).into_iter().enumerate() {
            let e = d * w[0][i] as f64 + (1.0 - d) * w[1][i] as f64;
            assert!((g as f64 - e).abs() < 1e-6, "first update {g} against {e}");
        }
    }

    /// The average of three checkpoints' weights is their arithmetic mean, parameter by parameter.
    #[test]
    fn average_is_the_mean_of_the_weights() {
        let models: Vec<Linear<B>> = (1..=3).map(linear).collect();
        let w: Vec<Vec<f32>> = models.iter().map(values).collect();
        let mean = average(models).unwrap();
        for (i, got) in values(&mean).into_iter().enumerate() {
            let expected = (w[0][i] + w[1][i] + w[2][i]) / 3.0;
            assert!((got - expected).abs() < 1e-6, "parameter {i}: {got} against {expected}");
        }
        let wrong = vec![linear(1), { let device = Default::default(); LinearConfig::new(3, 3).init::<B>(&device) }];
        assert!(average(wrong).unwrap_err().contains("parameter 1"));
    }
}
