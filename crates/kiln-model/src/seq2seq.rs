//! Encoder-decoder Transformer (Vaswani et al.) built from Burn's transformer layers.
//!
//! Options: pre-LN (with a final LayerNorm after each stack, which Burn's layers leave out) or
//! post-LN; one embedding matrix tied across encoder input, decoder input and output projection,
//! or separate ones; sinusoidal or learned positions; dropout. Embeddings are scaled by √d and
//! initialised N(0, d^-½) so tied output logits start small.

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerDecoder, TransformerDecoderConfig, TransformerDecoderInput, TransformerEncoder, TransformerEncoderConfig,
    TransformerEncoderInput,
};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    PositionalEncoding, PositionalEncodingConfig,
};
use burn::nn::activation::ActivationConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use kiln_recipe::{Activation, ModelSection, Positions};

/// Everything needed to build the model; derived from the recipe and the vocabulary size.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqConfig {
    pub vocab_size: usize,
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub model: ModelSection,
}

/// Encoder-decoder Transformer.
#[derive(Module, Debug)]
pub struct Seq2Seq<B: Backend> {
    /// Source embedding; also target embedding and output projection when tied.
    embedding: Embedding<B>,
    target_embedding: Option<Embedding<B>>,
    output: Option<Linear<B>>,
    learned_positions: Option<Embedding<B>>,
    sinusoids: Option<PositionalEncoding<B>>,
    encoder: TransformerEncoder<B>,
    decoder: TransformerDecoder<B>,
    encoder_norm: Option<LayerNorm<B>>,
    decoder_norm: Option<LayerNorm<B>>,
    dropout: Dropout,
    d_model: usize,
    pad: usize,
    bos: usize,
    eos: usize,
}

impl Seq2SeqConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Seq2Seq<B> {
        let m = &self.model;
        let d = m.d_model;
        let emb_init = Initializer::Normal { mean: 0.0, std: (d as f64).powf(-0.5) };
        let embedding = || EmbeddingConfig::new(self.vocab_size, d).with_initializer(emb_init.clone()).init(device);
        let activation = match m.activation {
            Activation::Gelu => ActivationConfig::Gelu,
            Activation::Relu => ActivationConfig::Relu,
        };
        let encoder = TransformerEncoderConfig::new(d, m.d_ff, m.n_heads, m.encoder_layers)
            .with_dropout(m.dropout)
            .with_norm_first(m.pre_ln)
            .with_activation(activation.clone())
            .init(device);
        let decoder = TransformerDecoderConfig::new(d, m.d_ff, m.n_heads, m.decoder_layers)
            .with_dropout(m.dropout)
            .with_norm_first(m.pre_ln)
            .with_activation(activation)
            .init(device);
        let final_norm = || m.pre_ln.then(|| LayerNormConfig::new(d).init(device));
        Seq2Seq {
            embedding: embedding(),
            target_embedding: (!m.tie_embeddings).then(embedding),
            output: (!m.tie_embeddings).then(|| LinearConfig::new(d, self.vocab_size).init(device)),
            learned_positions: (m.positions == Positions::Learned)
                .then(|| EmbeddingConfig::new(m.max_positions, d).with_initializer(emb_init.clone()).init(device)),
            sinusoids: (m.positions == Positions::Sinusoidal)
                .then(|| PositionalEncodingConfig::new(d).with_max_sequence_size(m.max_positions).init(device)),
            encoder,
            decoder,
            encoder_norm: final_norm(),
            decoder_norm: final_norm(),
            dropout: DropoutConfig::new(m.dropout).init(),
            d_model: d,
            pad: self.pad as usize,
            bos: self.bos as usize,
            eos: self.eos as usize,
        }
    }
}

/// Encoder output and the source padding mask the decoder needs.
pub struct Memory<B: Backend> {
    pub states: Tensor<B, 3>,
    pub pad_mask: Tensor<B, 2, Bool>,
}

impl<B: Backend> Seq2Seq<B> {
    fn embed(&self, table: &Embedding<B>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, len] = tokens.dims();
        let x = table.forward(tokens) * (self.d_model as f64).sqrt();
        let x = match (&self.learned_positions, &self.sinusoids) {
            (Some(pos), _) => {
                let device = x.device();
                let idx = Tensor::<B, 1, Int>::arange(0..len as i64, &device).reshape([1, len]).repeat_dim(0, batch);
                x + pos.forward(idx)
            }
            (None, Some(sin)) => sin.forward(x),
            (None, None) => x,
        };
        self.dropout.forward(x)
    }

    fn target_table(&self) -> &Embedding<B> {
        self.target_embedding.as_ref().unwrap_or(&self.embedding)
    }

    /// Output logits `[batch, len, vocab]` of decoder states.
    fn project(&self, states: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, len, d] = states.dims();
        let logits = self.project_rows(states.reshape([batch * len, d]));
        let vocab = logits.dims()[1];
        logits.reshape([batch, len, vocab])
    }

    /// Output logits `[rows, vocab]` of flat decoder states `[rows, d]`.
    fn project_rows(&self, states: Tensor<B, 2>) -> Tensor<B, 2> {
        let states = match &self.decoder_norm {
            Some(norm) => norm.forward(states),
            None => states,
        };
        match &self.output {
            Some(linear) => linear.forward(states),
            None => states.matmul(self.embedding.weight.val().transpose()),
        }
    }

    pub fn encode(&self, src: Tensor<B, 2, Int>) -> Memory<B> {
        let pad_mask = src.clone().equal_elem(self.pad as i64);
        let x = self.embed(&self.embedding, src);
        let states = self.encoder.forward(TransformerEncoderInput::new(x).mask_pad(pad_mask.clone()));
        let states = match &self.encoder_norm {
            Some(norm) => norm.forward(states),
            None => states,
        };
        Memory { states, pad_mask }
    }

    /// Teacher-forced logits `[batch, tgt_len, vocab]`.
    pub fn forward(&self, src: Tensor<B, 2, Int>, tgt_in: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.project(self.decode(src, tgt_in))
    }

    /// Teacher-forced logits `[rows.len(), vocab]` of the decoder positions `rows` (flat indices
    /// into `batch × tgt_len`). Training asks only for positions that have a label, so the output
    /// layer and the loss never run on padding.
    pub fn forward_rows(&self, src: Tensor<B, 2, Int>, tgt_in: Tensor<B, 2, Int>, rows: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let states = self.decode(src, tgt_in);
        let [batch, len, d] = states.dims();
        self.project_rows(states.reshape([batch * len, d]).select(0, rows))
    }

    /// Decoder states `[batch, tgt_len, d]` before the final norm and the output layer.
    fn decode(&self, src: Tensor<B, 2, Int>, tgt_in: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let memory = self.encode(src);
        let [batch, len] = tgt_in.dims();
        let device = tgt_in.device();
        let tgt_pad = tgt_in.clone().equal_elem(self.pad as i64);
        let x = self.embed(self.target_table(), tgt_in);
        let input = TransformerDecoderInput::new(x, memory.states)
            .memory_mask_pad(memory.pad_mask)
            .target_mask_pad(tgt_pad)
            .target_mask_attn(generate_autoregressive_mask(batch, len, &device));
        self.decoder.forward(input)
    }

    /// Greedy decoding with Burn's autoregressive cache. Returns `[batch, ≤ max_len]` token ids
    /// (rows continue past `</s>`; readers cut at the first one). Checks every `check_every` steps,
    /// with one small device read, whether every row has finished.
    pub fn greedy(&self, src: Tensor<B, 2, Int>, max_len: usize, check_every: usize) -> Tensor<B, 2, Int> {
        let [batch, _] = src.dims();
        let device = src.device();
        let memory = self.encode(src);
        let mut cache = self.decoder.new_autoregressive_cache();
        let mut tokens = Tensor::<B, 2, Int>::full([batch, 1], self.bos as i64, &device);
        let mut finished = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![false; batch], [batch, 1]), &device);
        for step in 0..max_len {
            let len = step + 1;
            let x = self.embed(self.target_table(), tokens.clone());
            let input = TransformerDecoderInput::new(x, memory.states.clone())
                .memory_mask_pad(memory.pad_mask.clone())
                .target_mask_attn(generate_autoregressive_mask(batch, len, &device));
            let states = self.decoder.forward_autoregressive_inference(input, &mut cache);
            let last = states.slice([0..batch, step..len]);
            let next = self.project(last).argmax(2).reshape([batch, 1]);
            // Finished rows emit padding so they stay finished.
            let next = next.mask_fill(finished.clone(), self.pad as i64);
            finished = finished.bool_or(next.clone().equal_elem(self.eos as i64));
            tokens = Tensor::cat(vec![tokens, next], 1);
            if check_every > 0 && len % check_every == 0 && finished.clone().all().into_data().iter::<bool>().next().unwrap_or(false) {
                break;
            }
        }
        let len = tokens.dims()[1];
        tokens.slice([0..batch, 1..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    fn config(tie: bool, positions: Positions, pre_ln: bool) -> Seq2SeqConfig {
        Seq2SeqConfig {
            vocab_size: 50,
            pad: 0,
            bos: 2,
            eos: 3,
            model: ModelSection {
                d_model: 16,
                n_heads: 2,
                d_ff: 32,
                encoder_layers: 1,
                decoder_layers: 1,
                dropout: 0.0,
                tie_embeddings: tie,
                positions,
                pre_ln,
                max_positions: 40,
                ..Default::default()
            },
        }
    }

    fn ids(rows: &[&[i32]]) -> Tensor<Flex, 2, Int> {
        let len = rows[0].len();
        let flat: Vec<i32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), len]), &Default::default())
    }

    #[test]
    fn shapes_for_every_variant() {
        for (tie, pos, pre) in [(true, Positions::Sinusoidal, true), (false, Positions::Learned, false)] {
            let model: Seq2Seq<Flex> = config(tie, pos, pre).init(&Default::default());
            let logits = model.forward(ids(&[&[5, 6, 3], &[7, 3, 0]]), ids(&[&[2, 8, 9, 10], &[2, 11, 0, 0]]));
            assert_eq!(logits.dims(), [2, 4, 50]);
            let out = model.greedy(ids(&[&[5, 6, 3]]), 7, 0);
            assert_eq!(out.dims(), [1, 7]);
        }
    }

    #[test]
    fn forward_rows_selects_positions_of_forward() {
        let model: Seq2Seq<Flex> = config(false, Positions::Sinusoidal, true).init(&Default::default());
        let (src, tgt) = (ids(&[&[5, 6, 3], &[7, 3, 0]]), ids(&[&[2, 8, 9], &[2, 11, 0]]));
        let full = model.forward(src.clone(), tgt.clone()).reshape([6, 50]);
        let rows = Tensor::<Flex, 1, Int>::from_data(TensorData::new(vec![0i32, 2, 4], [3]), &Default::default());
        let picked = model.forward_rows(src, tgt, rows.clone());
        let diff = (full.select(0, rows) - picked).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn padding_does_not_change_real_positions() {
        // The same sentence with and without extra source padding gives the same logits.
        let model: Seq2Seq<Flex> = config(true, Positions::Sinusoidal, true).init(&Default::default());
        let a = model.forward(ids(&[&[5, 6, 3]]), ids(&[&[2, 8]]));
        let b = model.forward(ids(&[&[5, 6, 3, 0, 0]]), ids(&[&[2, 8]]));
        let diff = (a - b).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn greedy_equals_argmax_of_teacher_forcing_on_its_own_output() {
        let model: Seq2Seq<Autodiff<Flex>> = config(true, Positions::Learned, true).init(&Default::default());
        let src = Tensor::from_data(TensorData::new(vec![5i32, 6, 7, 3], [1, 4]), &Default::default());
        let out: Vec<i32> = model.greedy(src.clone(), 6, 0).into_data().to_vec().unwrap();
        let mut tgt_in = vec![2i32];
        tgt_in.extend_from_slice(&out[..5]);
        let tgt = Tensor::from_data(TensorData::new(tgt_in, [1, 6]), &Default::default());
        let forced: Vec<i32> = model.forward(src, tgt).argmax(2).reshape([1, 6]).into_data().to_vec().unwrap();
        // Teacher forcing on the greedy prefix must predict the same next tokens (cache is exact).
        for i in 0..6 {
            if out[..i].contains(&3) {
                break;
            }
            assert_eq!(forced[i], out[i], "position {i}: {forced:?} vs {out:?}");
        }
    }
}
