//! Text generation from the language model: a prompt through the key/value cache, then one token
//! at a time, drawn from the next-token distribution with a temperature and an optional top-k
//! cut, from a seeded RNG (the same seed gives the same text). Temperature 0 is greedy. Past the
//! model's longest context the window slides, as nanoGPT's `generate` crops it: each further token
//! is predicted from the last `max_positions` tokens, recomputed (positions restart with the
//! window, as they did in every training block).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::lm::DecoderLm;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
    /// Stop after this token (not included), if given.
    pub stop: Option<u32>,
}

/// Picks a token from one row of logits.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0);
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if s.top_k > 0 && s.top_k < logits.len() {
        order.select_nth_unstable_by(s.top_k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        order.truncate(s.top_k);
    }
    let top = order.iter().map(|&i| logits[i] as f64).fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - top) / s.temperature).exp()).collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (&i, &w) in order.iter().zip(&weights) {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    *order.last().unwrap_or(&0) as u32
}

fn row<B: Backend>(logits: Tensor<B, 2>) -> Vec<f32> {
    logits.into_data().iter::<f32>().collect()
}

/// Continues `prompt` (at least one token) by up to `s.max_tokens` tokens; past the model's
/// longest context, from the last `max_positions` tokens. `cached = false` recomputes the whole
/// window every step (for tests that the cache changes nothing).
pub fn generate<B: Backend>(lm: &DecoderLm<B>, prompt: &[u32], s: &Sampling, cached: bool, device: &B::Device) -> Vec<u32> {
    generate_while(lm, prompt, s, cached, device, &|| true)
}

/// [`generate`], asking `keep_going` before each token: `false` ends it with the tokens so far
/// (a stop signal while a long text is generated).
pub fn generate_while<B: Backend>(lm: &DecoderLm<B>, prompt: &[u32], s: &Sampling, cached: bool, device: &B::Device, keep_going: &dyn Fn() -> bool) -> Vec<u32> {
    let ids = |v: &[u32]| Tensor::<B, 2, Int>::from_data(TensorData::new(v.iter().map(|&t| t as i32).collect::<Vec<_>>(), [1, v.len()]), device);
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut cache = lm.new_cache();
    let mut fresh: Vec<u32> = prompt.to_vec();
    let context = lm.max_positions().max(1);
    while out.len() < s.max_tokens && keep_going() {
        let logits = if cached && seq.len() <= context {
            lm.step(ids(&fresh), &mut cache)
        } else {
            let all = lm.forward(ids(&seq[seq.len().saturating_sub(context)..]));
            let [_, len, vocab] = all.dims();
            all.slice([0..1, len - 1..len]).reshape([1, vocab])
        };
        let next = pick(&row(logits), s, &mut rng);
        if Some(next) == s.stop {
            break;
        }
        out.push(next);
        seq.push(next);
        fresh = vec![next];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::LmConfig;
    use burn::backend::Flex;
    use kiln_recipe::{ModelSection, Positions};

    #[test]
    fn cached_and_uncached_generation_give_the_same_tokens() {
        let device = Default::default();
        for positions in [Positions::Learned, Positions::Rotary] {
            let config = LmConfig { vocab_size: 30, model: ModelSection { d_model: 16, n_heads: 2, d_ff: 32, decoder_layers: 2, dropout: 0.0, positions, max_positions: 24, ..Default::default() } };
            let lm: DecoderLm<Flex> = config.init(&device);
            for temperature in [0.0, 1.0] {
                let s = Sampling { max_tokens: 12, temperature, top_k: 5, seed: 4, stop: None };
                let a = generate(&lm, &[4, 7, 9], &s, true, &device);
                let b = generate(&lm, &[4, 7, 9], &s, false, &device);
                assert_eq!(a.len(), 12);
                assert_eq!(a, b, "{positions:?} temperature {temperature}");
            }
            // Past the context of 24 the window slides: as many tokens as asked, cached or not,
            // and each later token is what the last 24 tokens alone predict.
            let s = Sampling { max_tokens: 60, temperature: 0.0, top_k: 0, seed: 1, stop: None };
            let long = generate(&lm, &[4, 7, 9], &s, true, &device);
            assert_eq!(long.len(), 60);
            assert_eq!(long, generate(&lm, &[4, 7, 9], &s, false, &device));
            let seq: Vec<u32> = [4, 7, 9].into_iter().chain(long.iter().copied()).collect();
            let window = &seq[40 - 24..40];
            let alone = generate(&lm, window, &Sampling { max_tokens: 1, ..s }, true, &device);
            assert_eq!(alone[0], seq[40], "{positions:?}: token 40 from the 24 before it");
        }
    }

    #[test]
    fn top_k_and_temperature() {
        let logits = [0.0f32, 5.0, 4.9, -2.0];
        let mut rng = StdRng::seed_from_u64(1);
        let greedy = Sampling { max_tokens: 1, temperature: 0.0, top_k: 0, seed: 1, stop: None };
        assert_eq!(pick(&logits, &greedy, &mut rng), 1);
        let top2 = Sampling { temperature: 1.0, top_k: 2, ..greedy };
        let picks: Vec<u32> = (0..200).map(|_| pick(&logits, &top2, &mut rng)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }
}
