//! Dynamic loss scaling for f16 training, decided on the device: the overflow check, the skip and
//! the new scale are tensors, so a step never waits on the host for them. After `interval` clean
//! steps in a row the scale grows by `growth`; a step whose gradients are not finite is skipped and
//! the scale shrinks by `backoff`. (The f16 training path that will use it is not built yet: see
//! `train.precision`; the logic is tested here on the CPU with injected overflows.)

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

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
