//! Decoder-only Transformer language model, GPT-style as in nanoGPT: token embedding (tied with
//! the output layer), learned, sinusoidal or rotary positions, pre-LN blocks of causal self-attention and a
//! GELU MLP, a final LayerNorm. Attention is written out here rather than taken from Burn's
//! layers so that rotary positions apply to queries and keys, and so that generation has a
//! key/value cache it owns: each new token attends to cached keys and values, so the cost of a
//! step grows linearly with the length so far.

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    PositionalEncoding, PositionalEncodingConfig, RotaryEncoding, RotaryEncodingConfig,
};
use burn::tensor::activation::relu;
use crate::fused::{gelu, layer_norm};
use burn::tensor::backend::Backend;
use crate::linear::over_rows;
use burn::tensor::{Bool, Int, Tensor};
use kiln_recipe::{Activation, ModelSection, Positions};

use crate::attention::causal_mask;

/// Everything needed to build the LM; derived from the recipe and the vocabulary size.
#[derive(Debug, Clone, PartialEq)]
pub struct LmConfig {
    pub vocab_size: usize,
    pub model: ModelSection,
}

#[derive(Module, Debug)]
struct Block<B: Backend> {
    norm_attn: LayerNorm<B>,
    qkv: Linear<B>,
    attn_out: Linear<B>,
    norm_mlp: LayerNorm<B>,
    mlp_in: Linear<B>,
    mlp_out: Linear<B>,
    dropout: Dropout,
    n_heads: usize,
    relu: bool,
}

/// Keys and values of the positions seen so far, per layer: `[batch, heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Positions cached.
    pub len: usize,
}

impl<B: Backend> Block<B> {
    /// `causal`: `[len, start + len]`, true where a query must not look (shared by the blocks).
    fn forward(&self, x: Tensor<B, 3>, rope: Option<&RotaryEncoding<B>>, start: usize, causal: &Tensor<B, 2, Bool>, cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>) -> Tensor<B, 3> {
        let [batch, len, d] = x.dims();
        let heads = self.n_heads;
        let hd = d / heads;
        let h = layer_norm(&self.norm_attn, x.clone());
        let qkv = over_rows(&self.qkv, h);
        let split = |i: usize| qkv.clone().slice([0..batch, 0..len, i * d..(i + 1) * d]).reshape([batch, len, heads, hd]).swap_dims(1, 2);
        let (mut q, mut k, mut v) = (split(0), split(1), split(2));
        if let Some(rope) = rope {
            q = rope.apply(q, start);
            k = rope.apply(k, start);
        }
        if let Some(slot) = cache {
            if let Some((k_old, v_old)) = slot.take() {
                k = Tensor::cat(vec![k_old, k], 2);
                v = Tensor::cat(vec![v_old, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let scores = crate::autocast::matmul(q, k.swap_dims(2, 3));
        // Query i (absolute position start + i) sees keys 0 ..= start + i.
        let attn = crate::fused::attention_weights(scores, (hd as f64).sqrt(), Some(&causal.clone().unsqueeze::<4>()), &self.dropout);
        let context = crate::autocast::matmul(attn, v).swap_dims(1, 2).reshape([batch, len, d]);
        let x = crate::fused::residual_add(x, over_rows(&self.attn_out, context), &self.dropout);
        let h = over_rows(&self.mlp_in, layer_norm(&self.norm_mlp, x.clone()));
        let h = if self.relu { relu(h) } else { gelu(h) };
        crate::fused::residual_add(x, over_rows(&self.mlp_out, h), &self.dropout)
    }
}

/// The decoder-only language model.
#[derive(Module, Debug)]
pub struct DecoderLm<B: Backend> {
    embedding: Embedding<B>,
    output: Option<Linear<B>>,
    learned_positions: Option<Embedding<B>>,
    sinusoids: Option<PositionalEncoding<B>>,
    rope: Option<RotaryEncoding<B>>,
    blocks: Vec<Block<B>>,
    final_norm: LayerNorm<B>,
    dropout: Dropout,
    max_positions: usize,
}

impl LmConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> DecoderLm<B> {
        let m = &self.model;
        let d = m.d_model;
        // GPT-2's initialisation scale: N(0, 0.02) for embeddings.
        let emb_init = Initializer::Normal { mean: 0.0, std: 0.02 };
        let blocks = (0..m.decoder_layers)
            .map(|_| Block {
                norm_attn: LayerNormConfig::new(d).init(device),
                qkv: LinearConfig::new(d, 3 * d).init(device),
                attn_out: LinearConfig::new(d, d).init(device),
                norm_mlp: LayerNormConfig::new(d).init(device),
                mlp_in: LinearConfig::new(d, m.d_ff).init(device),
                mlp_out: LinearConfig::new(m.d_ff, d).init(device),
                dropout: DropoutConfig::new(m.dropout).init(),
                n_heads: m.n_heads,
                relu: m.activation == Activation::Relu,
            })
            .collect();
        DecoderLm {
            embedding: EmbeddingConfig::new(self.vocab_size, d).with_initializer(emb_init.clone()).init(device),
            output: (!m.tie_embeddings).then(|| LinearConfig::new(d, self.vocab_size).init(device)),
            learned_positions: (m.positions == Positions::Learned).then(|| EmbeddingConfig::new(m.max_positions, d).with_initializer(emb_init).init(device)),
            sinusoids: (m.positions == Positions::Sinusoidal).then(|| PositionalEncodingConfig::new(d).with_max_sequence_size(m.max_positions).init(device)),
            rope: (m.positions == Positions::Rotary).then(|| RotaryEncodingConfig::new(m.max_positions, d / m.n_heads).init(device)),
            blocks,
            final_norm: LayerNormConfig::new(d).init(device),
            dropout: DropoutConfig::new(m.dropout).init(),
            max_positions: m.max_positions,
        }
    }
}

impl<B: Backend> DecoderLm<B> {
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Hidden states `[batch, len, d]` of `tokens` at positions `start ..`, through the cache
    /// when one is given (its keys and values are extended).
    fn hidden(&self, tokens: Tensor<B, 2, Int>, start: usize, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let [batch, len] = tokens.dims();
        let mut x = self.embedding.forward(tokens);
        if let Some(pos) = &self.learned_positions {
            let idx = Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, &x.device()).reshape([1, len]).repeat_dim(0, batch);
            x = x + pos.forward(idx);
        }
        if let Some(sin) = &self.sinusoids {
            let d = x.dims()[2];
            x = x + sin.sinusoids.clone().slice([0..1, start..start + len, 0..d]);
        }
        x = crate::dropout::apply(&self.dropout, x);
        let causal = causal_mask::<B>(len, start + len, start, &x.device());
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(x, self.rope.as_ref(), start, &causal, slot);
        }
        if let Some(c) = cache {
            c.len = start + len;
        }
        layer_norm(&self.final_norm, x)
    }

    fn project_rows(&self, states: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.output {
            Some(linear) => crate::autocast::linear(linear, states),
            None => crate::autocast::matmul(states, self.embedding.weight.val().transpose()),
        }
    }

    /// Next-token logits `[batch, len, vocab]` of every position.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let states = self.hidden(tokens, 0, None);
        let [batch, len, d] = states.dims();
        let logits = self.project_rows(states.reshape([batch * len, d]));
        let vocab = logits.dims()[1];
        logits.reshape([batch, len, vocab])
    }

    /// Logits `[rows.len(), vocab]` of the flat positions `rows` (of `batch × len`): training asks
    /// only for positions with a label, so the output layer never runs on padding.
    pub fn forward_rows(&self, tokens: Tensor<B, 2, Int>, rows: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let states = self.hidden(tokens, 0, None);
        let [batch, len, d] = states.dims();
        self.project_rows(states.reshape([batch * len, d]).select(0, rows))
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache { layers: vec![None; self.blocks.len()], len: 0 }
    }

    /// Logits `[batch, vocab]` of the last position after feeding `tokens` (positions
    /// `cache.len ..`) through the cache.
    pub fn step(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let start = cache.len;
        let states = self.hidden(tokens, start, Some(cache));
        let [batch, len, d] = states.dims();
        self.project_rows(states.slice([0..batch, len - 1..len]).reshape([batch, d]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn model(positions: Positions) -> DecoderLm<Flex> {
        let config = LmConfig {
            vocab_size: 40,
            model: ModelSection { d_model: 16, n_heads: 2, d_ff: 32, decoder_layers: 2, dropout: 0.0, positions, max_positions: 32, ..Default::default() },
        };
        config.init(&Default::default())
    }

    fn ids(v: &[i32]) -> Tensor<Flex, 2, Int> {
        Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &Default::default())
    }

    #[test]
    fn causal_and_cached_steps_equal_the_full_forward() {
        for positions in [Positions::Learned, Positions::Rotary, Positions::Sinusoidal] {
            let lm = model(positions);
            let seq = [5, 9, 12, 7, 30, 2, 18];
            let full = lm.forward(ids(&seq));
            assert_eq!(full.dims(), [1, 7, 40]);
            // Causality: a changed later token leaves earlier logits alone.
            let mut other = seq;
            other[5] = 33;
            let changed = lm.forward(ids(&other));
            let early = (full.clone().slice([0..1, 0..5]) - changed.slice([0..1, 0..5])).abs().max().into_scalar();
            assert!(early < 1e-5, "{positions:?}: {early}");
            // A prompt of 3, then one token at a time through the cache: the same logits.
            let mut cache = lm.new_cache();
            let mut rows = vec![lm.step(ids(&seq[..3]), &mut cache)];
            for &t in &seq[3..] {
                rows.push(lm.step(ids(&[t]), &mut cache));
            }
            assert_eq!(cache.len, 7);
            for (k, row) in rows.into_iter().enumerate() {
                let pos = k + 2;
                let expected = full.clone().slice([0..1, pos..pos + 1]).reshape([1, 40]);
                let diff = (expected - row).abs().max().into_scalar();
                assert!(diff < 1e-4, "{positions:?} position {pos}: {diff}");
            }
        }
    }
}
