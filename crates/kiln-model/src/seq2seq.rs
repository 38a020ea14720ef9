//! Encoder-decoder Transformer (Vaswani et al.) of kiln's own layers: the encoder's (self-attention,
//! feed-forward) and the decoder's (self-attention, cross-attention, feed-forward), each with one
//! fused query/key/value product and kiln's dropout masks. The decoder has a key/value cache kiln
//! can reorder: beam search keeps every beam's cached keys and values and gathers them when beams
//! are re-ranked, so each step costs one new position per beam.
//!
//! Options: pre-LN (with a final LayerNorm after each stack, which Burn's layers leave out) or
//! post-LN; one embedding matrix tied across encoder input, decoder input and output projection,
//! or separate ones; sinusoidal or learned positions; dropout. Embeddings are scaled by √d and
//! initialised N(0, d^-½) so tied output logits start small.

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    PositionalEncoding, PositionalEncodingConfig,
};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use crate::fused::layer_norm;
use crate::linear::over_rows;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use kiln_recipe::{Activation, ModelSection, Positions};

use crate::attention::{attend, causal_mask, merge_heads, split_heads};

/// Everything needed to build the model; derived from the recipe and the vocabulary size.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqConfig {
    pub vocab_size: usize,
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub model: ModelSection,
}

/// A residual sub-layer: pre-LN `x + dropout(f(norm(x)))` or post-LN `norm(x + dropout(f(x)))`.
fn residual<B: Backend>(x: Tensor<B, 3>, norm: &LayerNorm<B>, pre_ln: bool, dropout: &Dropout, f: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>) -> Tensor<B, 3> {
    if pre_ln {
        let y = f(layer_norm(norm, x.clone()));
        crate::fused::residual_add(x, y, dropout)
    } else {
        let y = f(x.clone());
        layer_norm(norm, crate::fused::residual_add(x, y, dropout))
    }
}

/// Feed-forward: `out(act(in(x)))`.
fn feed_forward<B: Backend>(ff_in: &Linear<B>, ff_out: &Linear<B>, relu: bool, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let h = over_rows(ff_in, x);
    over_rows(ff_out, if relu { burn::tensor::activation::relu(h) } else { crate::fused::gelu(h) })
}

/// One encoder layer: self-attention over the source (padding masked), feed-forward. Written out
/// like the decoder layer — one fused query/key/value product, kiln's dropout masks — rather than
/// Burn's `TransformerEncoderLayer` (three products, Burn's per-element dropout sampling).
#[derive(Module, Debug)]
struct EncoderLayer<B: Backend> {
    self_qkv: Linear<B>,
    self_out: Linear<B>,
    ff_in: Linear<B>,
    ff_out: Linear<B>,
    norm_self: LayerNorm<B>,
    norm_ff: LayerNorm<B>,
    dropout: Dropout,
    n_heads: usize,
    pre_ln: bool,
    relu: bool,
}

impl<B: Backend> EncoderLayer<B> {
    fn new(m: &ModelSection, device: &B::Device) -> Self {
        let d = m.d_model;
        Self {
            self_qkv: LinearConfig::new(d, 3 * d).init(device),
            self_out: LinearConfig::new(d, d).init(device),
            ff_in: LinearConfig::new(d, m.d_ff).init(device),
            ff_out: LinearConfig::new(m.d_ff, d).init(device),
            norm_self: LayerNormConfig::new(d).init(device),
            norm_ff: LayerNormConfig::new(d).init(device),
            dropout: DropoutConfig::new(m.dropout).init(),
            n_heads: m.n_heads,
            pre_ln: m.pre_ln,
            relu: m.activation == Activation::Relu,
        }
    }

    /// `x`: `[batch, len, d]`; `src_mask`: `[batch, 1, 1, len]`, true on padding.
    fn forward(&self, x: Tensor<B, 3>, src_mask: &Tensor<B, 4, Bool>) -> Tensor<B, 3> {
        let [batch, len, d] = x.dims();
        let self_attn = |h: Tensor<B, 3>| {
            let qkv = over_rows(&self.self_qkv, h);
            let part = |i: usize| split_heads(qkv.clone().slice([0..batch, 0..len, i * d..(i + 1) * d]), self.n_heads);
            over_rows(&self.self_out, merge_heads(attend(part(0), part(1), part(2), Some(src_mask.clone()), &self.dropout)))
        };
        let x = residual(x, &self.norm_self, self.pre_ln, &self.dropout, &self_attn);
        residual(x, &self.norm_ff, self.pre_ln, &self.dropout, &|h| feed_forward(&self.ff_in, &self.ff_out, self.relu, h))
    }
}

/// One decoder layer: causal self-attention, cross-attention over the encoder, feed-forward.
#[derive(Module, Debug)]
struct DecoderLayer<B: Backend> {
    /// Self-attention (causal here), feed-forward, their norms and dropout: an encoder layer's parts.
    base: EncoderLayer<B>,
    cross_q: Linear<B>,
    cross_kv: Linear<B>,
    cross_out: Linear<B>,
    norm_cross: LayerNorm<B>,
}

/// Keys and values `[batch, heads, len, head_dim]`.
type Kv<B> = (Tensor<B, 4>, Tensor<B, 4>);

impl<B: Backend> DecoderLayer<B> {
    /// Cross-attention keys and values of the encoder states (computed once per sentence).
    fn memory_kv(&self, memory: Tensor<B, 3>) -> Kv<B> {
        let [batch, len, d] = memory.dims();
        let kv = over_rows(&self.cross_kv, memory);
        let k = kv.clone().slice([0..batch, 0..len, 0..d]);
        let v = kv.slice([0..batch, 0..len, d..2 * d]);
        (split_heads(k, self.base.n_heads), split_heads(v, self.base.n_heads))
    }

    /// `x`: `[batch, len, d]` at positions `start ..`; `cache`: this layer's self-attention keys
    /// and values so far (extended here); `src_mask`: `[batch, 1, 1, src_len]`, true on padding;
    /// `causal`: `[1, 1, len, start + len]`, shared by the layers of one pass.
    fn forward(&self, x: Tensor<B, 3>, memory: &Kv<B>, src_mask: &Tensor<B, 4, Bool>, causal: &Tensor<B, 4, Bool>, cache: Option<&mut Option<Kv<B>>>) -> Tensor<B, 3> {
        let [batch, len, d] = x.dims();
        let heads = self.base.n_heads;
        let sub = |x: Tensor<B, 3>, norm: &LayerNorm<B>, f: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>| residual(x, norm, self.base.pre_ln, &self.base.dropout, f);
        let cache = std::cell::RefCell::new(cache);
        let self_attn = |h: Tensor<B, 3>| {
            let qkv = over_rows(&self.base.self_qkv, h);
            let part = |i: usize| split_heads(qkv.clone().slice([0..batch, 0..len, i * d..(i + 1) * d]), heads);
            let (q, mut k, mut v) = (part(0), part(1), part(2));
            if let Some(slot) = cache.borrow_mut().as_deref_mut() {
                if let Some((k_old, v_old)) = slot.take() {
                    k = Tensor::cat(vec![k_old, k], 2);
                    v = Tensor::cat(vec![v_old, v], 2);
                }
                *slot = Some((k.clone(), v.clone()));
            }
            over_rows(&self.base.self_out, merge_heads(attend(q, k, v, Some(causal.clone()), &self.base.dropout)))
        };
        let cross_attn = |h: Tensor<B, 3>| {
            let q = split_heads(over_rows(&self.cross_q, h), heads);
            over_rows(&self.cross_out, merge_heads(attend(q, memory.0.clone(), memory.1.clone(), Some(src_mask.clone()), &self.base.dropout)))
        };
        let ff = |h: Tensor<B, 3>| feed_forward(&self.base.ff_in, &self.base.ff_out, self.base.relu, h);
        let x = sub(x, &self.base.norm_self, &self_attn);
        let x = sub(x, &self.norm_cross, &cross_attn);
        sub(x, &self.base.norm_ff, &ff)
    }
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
    encoder: Vec<EncoderLayer<B>>,
    decoder: Vec<DecoderLayer<B>>,
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
        let encoder = (0..m.encoder_layers).map(|_| EncoderLayer::new(m, device)).collect();
        let decoder = (0..m.decoder_layers)
            .map(|_| DecoderLayer {
                base: EncoderLayer::new(m, device),
                cross_q: LinearConfig::new(d, d).init(device),
                cross_kv: LinearConfig::new(d, 2 * d).init(device),
                cross_out: LinearConfig::new(d, d).init(device),
                norm_cross: LayerNormConfig::new(d).init(device),
            })
            .collect();
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

/// Incremental decoding state: per layer the encoder's keys/values and the self-attention
/// cache, for `batch` rows (sentences, or beams). [`DecodeState::reorder`] gathers rows.
pub struct DecodeState<B: Backend> {
    memory: Vec<Kv<B>>,
    src_mask: Tensor<B, 4, Bool>,
    cache: Vec<Option<Kv<B>>>,
    /// Target positions decoded so far.
    pub len: usize,
}

impl<B: Backend> DecodeState<B> {
    /// Keeps rows `rows` (in that order, repeats allowed): beams that survive a step.
    pub fn reorder(&mut self, rows: Tensor<B, 1, Int>) {
        let pick = |(k, v): &Kv<B>| (k.clone().select(0, rows.clone()), v.clone().select(0, rows.clone()));
        self.memory = self.memory.iter().map(pick).collect();
        self.cache = self.cache.iter().map(|c| c.as_ref().map(pick)).collect();
        self.src_mask = self.src_mask.clone().select(0, rows);
    }
}

/// Moves the tokens decoded since the batch last changed (`segment`, one `[rows, 1]` tensor a
/// step, rows in `live`'s order) to their original rows: one read.
fn take_segment<B: Backend>(segment: &mut Vec<Tensor<B, 2, Int>>, live: &[usize], tokens: &mut [Vec<i64>]) {
    if segment.is_empty() {
        return;
    }
    let len = segment.len();
    let flat: Vec<i64> = Tensor::cat(std::mem::take(segment), 1).into_data().iter::<i64>().collect();
    for (r, &row) in live.iter().enumerate() {
        tokens[row].extend_from_slice(&flat[r * len..(r + 1) * len]);
    }
}

/// Beam search settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamSettings {
    pub beam: usize,
    pub max_len: usize,
    /// GNMT length penalty α: hypotheses are ranked by log p / ((5 + len) / 6)^α (0 = none).
    pub len_penalty: f64,
}

impl<B: Backend> Seq2Seq<B> {
    /// Embeds tokens at target or source positions `start ..`.
    fn embed(&self, table: &Embedding<B>, tokens: Tensor<B, 2, Int>, start: usize) -> Tensor<B, 3> {
        let [batch, len] = tokens.dims();
        let x = table.forward(tokens) * (self.d_model as f64).sqrt();
        let x = match (&self.learned_positions, &self.sinusoids) {
            (Some(pos), _) => {
                let device = x.device();
                let idx = Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, &device).reshape([1, len]).repeat_dim(0, batch);
                x + pos.forward(idx)
            }
            (None, Some(sin)) => {
                let d = self.d_model;
                x + sin.sinusoids.clone().slice([0..1, start..start + len, 0..d])
            }
            (None, None) => x,
        };
        crate::dropout::apply(&self.dropout, x)
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
            Some(norm) => layer_norm(norm, states),
            None => states,
        };
        match &self.output {
            Some(linear) => crate::autocast::linear(linear, states),
            None => crate::autocast::matmul(states, self.embedding.weight.val().transpose()),
        }
    }

    pub fn encode(&self, src: Tensor<B, 2, Int>) -> Memory<B> {
        let pad_mask = src.clone().equal_elem(self.pad as i64);
        let x = self.embed(&self.embedding, src, 0);
        let [batch, src_len] = pad_mask.dims();
        let src_mask = pad_mask.clone().reshape([batch, 1, 1, src_len]);
        let states = self.encoder.iter().fold(x, |x, layer| layer.forward(x, &src_mask));
        let states = match &self.encoder_norm {
            Some(norm) => layer_norm(norm, states),
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
        let mut state = self.start_decoding(src);
        self.decode_from(tgt_in, &mut state, false)
    }

    /// Encodes `src` and prepares incremental decoding.
    pub fn start_decoding(&self, src: Tensor<B, 2, Int>) -> DecodeState<B> {
        let memory = self.encode(src);
        let [batch, src_len] = memory.pad_mask.dims();
        let src_mask = memory.pad_mask.reshape([batch, 1, 1, src_len]);
        let kv = self.decoder.iter().map(|layer| layer.memory_kv(memory.states.clone())).collect();
        DecodeState { memory: kv, src_mask, cache: vec![None; self.decoder.len()], len: 0 }
    }

    /// Decoder states of `tokens` at positions `state.len ..`, through the cache when `cached`.
    fn decode_from(&self, tokens: Tensor<B, 2, Int>, state: &mut DecodeState<B>, cached: bool) -> Tensor<B, 3> {
        let start = state.len;
        let len = tokens.dims()[1];
        let causal = causal_mask::<B>(len, start + len, start, &tokens.device()).unsqueeze::<4>();
        let mut x = self.embed(self.target_table(), tokens, start);
        for (i, layer) in self.decoder.iter().enumerate() {
            let slot = if cached { Some(&mut state.cache[i]) } else { None };
            x = layer.forward(x, &state.memory[i], &state.src_mask, &causal, slot);
        }
        if cached {
            state.len = start + len;
        }
        x
    }

    /// Log-probabilities `[batch, vocab]` of the next token after feeding `tokens` (the new
    /// positions only) through the cache.
    pub fn step(&self, tokens: Tensor<B, 2, Int>, state: &mut DecodeState<B>) -> Tensor<B, 2> {
        let states = self.decode_from(tokens, state, true);
        self.next_logp(states)
    }

    /// Next-token log-probabilities of the last position of decoder states; `<pad>` and `<s>`
    /// are never generated.
    fn next_logp(&self, states: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, len, d] = states.dims();
        let logits = self.project_rows(states.slice([0..batch, len - 1..len]).reshape([batch, d]));
        let vocab = logits.dims()[1];
        let banned: Vec<bool> = (0..vocab).map(|t| t == self.pad || t == self.bos).collect();
        let banned = Tensor::<B, 2, Bool>::from_data(TensorData::new(banned, [1, vocab]), &logits.device()).expand([batch, vocab]);
        log_softmax(logits.mask_fill(banned, -1.0e9), 1)
    }

    /// Greedy decoding through the key/value cache, at most `max_len` tokens per row. Returns
    /// `[batch, ≤ max_len]` token ids (rows continue past `</s>` with padding; readers cut at the
    /// first `</s>`). Checks every `check_every` steps, with one small device read, whether every
    /// row has finished.
    pub fn greedy(&self, src: Tensor<B, 2, Int>, max_len: usize, check_every: usize) -> Tensor<B, 2, Int> {
        let batch = src.dims()[0];
        self.greedy_rows(src, &vec![max_len; batch], check_every)
    }

    /// Greedy decoding with a length limit per row (`max_lens[row]` tokens), so a sentence's
    /// output does not depend on the batch it was decoded in. At each check the rows that have
    /// finished leave the batch (their caches dropped, as beam search drops beams): a batch's
    /// later steps compute only the sentences still being translated, so a batch costs about
    /// what its sentences would cost alone instead of its longest one times its rows.
    pub fn greedy_rows(&self, src: Tensor<B, 2, Int>, max_lens: &[usize], check_every: usize) -> Tensor<B, 2, Int> {
        let [batch, _] = src.dims();
        let device = src.device();
        let longest = max_lens.iter().copied().max().unwrap_or(0);
        let limits_of = |rows: &[usize]| Tensor::<B, 2, Int>::from_data(TensorData::new(rows.iter().map(|&r| max_lens[r] as i64).collect::<Vec<_>>(), [rows.len(), 1]), &device);
        let unfinished = |n: usize| Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![false; n], [n, 1]), &device);
        // The original row of each row still in the batch, and each original row's tokens.
        let mut live: Vec<usize> = (0..batch).collect();
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); batch];
        let mut limits = limits_of(&live);
        let mut state = self.start_decoding(src);
        let mut next = Tensor::<B, 2, Int>::full([batch, 1], self.bos as i64, &device);
        let mut segment: Vec<Tensor<B, 2, Int>> = Vec::new();
        let mut finished = unfinished(batch);
        let mut steps = 0;
        for step in 0..longest {
            let rows = live.len();
            // Rows past their own limit are finished.
            finished = finished.bool_or(limits.clone().lower_equal_elem(step as i64));
            let token = self.step(next, &mut state).argmax(1).reshape([rows, 1]);
            // Finished rows emit padding so they stay finished.
            let token = token.mask_fill(finished.clone(), self.pad as i64);
            finished = finished.bool_or(token.clone().equal_elem(self.eos as i64));
            segment.push(token.clone());
            next = token;
            steps = step + 1;
            if check_every > 0 && steps % check_every == 0 {
                let flags: Vec<bool> = finished.clone().into_data().iter::<bool>().collect();
                if flags.iter().all(|&f| f) {
                    break;
                }
                if flags.iter().any(|&f| f) {
                    take_segment(&mut segment, &live, &mut tokens);
                    let keep: Vec<usize> = (0..rows).filter(|&r| !flags[r]).collect();
                    let picked = Tensor::<B, 1, Int>::from_data(TensorData::new(keep.iter().map(|&r| r as i64).collect::<Vec<_>>(), [keep.len()]), &device);
                    state.reorder(picked.clone());
                    next = next.select(0, picked);
                    live = keep.iter().map(|&r| live[r]).collect();
                    limits = limits_of(&live);
                    finished = unfinished(live.len());
                }
            }
        }
        if steps == 0 {
            return Tensor::<B, 2, Int>::zeros([batch, 0], &device);
        }
        take_segment(&mut segment, &live, &mut tokens);
        // Rows that left the batch pad to the end, as finished rows do.
        let flat: Vec<i64> = tokens.into_iter().flat_map(|mut t| {
            t.resize(steps, self.pad as i64);
            t
        }).collect();
        Tensor::from_data(TensorData::new(flat, [batch, steps]), &device)
    }

    /// The score beam search ranks by, of given hypotheses (token ids without `<s>` and `</s>`),
    /// one per row of `src`, in one teacher-forced pass: the log-probability of each hypothesis
    /// followed by `</s>`, with `<pad>` and `<s>` out of the softmax as in decoding, divided by
    /// the GNMT length penalty `((5 + len) / 6)^α` of its length with `</s>` (α = 0: the plain
    /// sum). One device read.
    pub fn score_rows(&self, src: Tensor<B, 2, Int>, hyps: &[Vec<u32>], len_penalty: f64) -> Vec<f64> {
        let device = src.device();
        let batch = hyps.len();
        if batch == 0 {
            return Vec::new();
        }
        let len = hyps.iter().map(|h| h.len() + 1).max().unwrap_or(1);
        let mut tgt_in = vec![self.pad as i32; batch * len];
        let mut labels = vec![self.pad as i32; batch * len];
        let mut real = vec![0.0f32; batch * len];
        for (row, hyp) in hyps.iter().enumerate() {
            let at = row * len;
            tgt_in[at] = self.bos as i32;
            for (i, &t) in hyp.iter().enumerate() {
                tgt_in[at + i + 1] = t as i32;
                labels[at + i] = t as i32;
            }
            labels[at + hyp.len()] = self.eos as i32;
            real[at..at + hyp.len() + 1].fill(1.0);
        }
        let logits = self.forward(src, Tensor::from_data(TensorData::new(tgt_in, [batch, len]), &device));
        let vocab = logits.dims()[2];
        let banned: Vec<bool> = (0..vocab).map(|t| t == self.pad || t == self.bos).collect();
        let banned = Tensor::<B, 3, Bool>::from_data(TensorData::new(banned, [1, 1, vocab]), &device).expand([batch, len, vocab]);
        let logp = log_softmax(logits.mask_fill(banned, -1.0e9), 2);
        let labels = Tensor::<B, 3, Int>::from_data(TensorData::new(labels, [batch, len, 1]), &device);
        let picked = logp.gather(2, labels).reshape([batch, len]) * Tensor::from_data(TensorData::new(real, [batch, len]), &device);
        let sums: Vec<f64> = picked.sum_dim(1).into_data().iter::<f64>().collect();
        sums.iter().zip(hyps).map(|(sum, hyp)| if len_penalty > 0.0 { sum / ((5.0 + (hyp.len() + 1) as f64) / 6.0).powf(len_penalty) } else { *sum }).collect()
    }

    /// Beam search for one sentence (`src`: `[1, src_len]`); the best hypothesis without `<s>`
    /// and `</s>`. Beams are rows of one batch; after each step the surviving beams' caches are
    /// gathered. Finished hypotheses (ended by `</s>`) are ranked with the length penalty; the
    /// search stops early once `beam` hypotheses have finished. With `cached = false` every step
    /// recomputes the whole prefix (for tests that the cache changes nothing). Beam 1 is greedy.
    pub fn beam_search(&self, src: Tensor<B, 2, Int>, s: BeamSettings, cached: bool) -> Vec<u32> {
        self.beam_search_n(src, s, cached, 1).into_iter().next().map(|(t, _)| t).unwrap_or_default()
    }

    /// The `n` best hypotheses of the same search (`n` ≤ the beam), best first, each with its
    /// score: the log-probability of its tokens and `</s>` divided by the length penalty (the
    /// figure the beam ranks by). Finished hypotheses come first; where fewer than `n` finished
    /// within `max_len`, the best unfinished ones follow, scored without `</s>`.
    pub fn beam_search_n(&self, src: Tensor<B, 2, Int>, s: BeamSettings, cached: bool, n: usize) -> Vec<(Vec<u32>, f64)> {
        let device = src.device();
        let k = s.beam.max(1);
        let mut state = self.start_decoding(src);
        // Live hypotheses: tokens (after <s>) and summed log-probability.
        let mut live: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
        let mut done: Vec<(Vec<u32>, f64)> = Vec::new();
        let norm = |len: usize, logp: f64| if s.len_penalty > 0.0 { logp / ((5.0 + len as f64) / 6.0).powf(s.len_penalty) } else { logp };
        let ids = |rows: Vec<Vec<u32>>| {
            let (n, len) = (rows.len(), rows[0].len());
            let flat: Vec<i32> = rows.into_iter().flatten().map(|t| t as i32).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [n, len]), &device)
        };
        for step in 0..s.max_len {
            let logp = if cached {
                let last: Vec<Vec<u32>> = live.iter().map(|(t, _)| vec![t.last().copied().unwrap_or(self.bos as u32)]).collect();
                self.step(ids(last), &mut state)
            } else {
                let prefixes: Vec<Vec<u32>> = live.iter().map(|(t, _)| std::iter::once(self.bos as u32).chain(t.iter().copied()).collect()).collect();
                let mut fresh = DecodeState { len: 0, cache: vec![None; self.decoder.len()], ..self.clone_state(&state) };
                self.next_logp(self.decode_from(ids(prefixes), &mut fresh, false))
            };
            let vocab = logp.dims()[1];
            let scores: Vec<f32> = logp.into_data().iter::<f32>().collect();
            // Candidates: every live beam × its `k` best tokens.
            let mut candidates: Vec<(f64, usize, u32)> = Vec::with_capacity(live.len() * k);
            for (b, (_, base)) in live.iter().enumerate() {
                let row = &scores[b * vocab..(b + 1) * vocab];
                let mut order: Vec<usize> = (0..vocab).collect();
                let keep = k.min(order.len());
                order.select_nth_unstable_by(keep - 1, |&x, &y| row[y].total_cmp(&row[x]));
                for &t in &order[..keep] {
                    candidates.push((base + row[t] as f64, b, t as u32));
                }
            }
            // Best first; ties by beam then token, so the search is deterministic.
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let mut next: Vec<(Vec<u32>, f64)> = Vec::new();
            let mut parents: Vec<i32> = Vec::new();
            for (score, b, t) in candidates {
                if next.len() == k {
                    break;
                }
                if t == self.eos as u32 {
                    let tokens = live[b].0.clone();
                    done.push((tokens.clone(), norm(tokens.len() + 1, score)));
                    continue;
                }
                let mut tokens = live[b].0.clone();
                tokens.push(t);
                next.push((tokens, score));
                parents.push(b as i32);
            }
            if done.len() >= k || next.is_empty() || step + 1 == s.max_len {
                if done.len() < n {
                    let mut unfinished: Vec<(Vec<u32>, f64)> = next
                        .into_iter()
                        .map(|(t, sc)| {
                            let len = t.len();
                            (t, norm(len, sc))
                        })
                        .collect();
                    unfinished.sort_by(|a, b| b.1.total_cmp(&a.1));
                    done.sort_by(|a, b| b.1.total_cmp(&a.1));
                    done.extend(unfinished.into_iter().take(n - done.len()));
                    return done;
                }
                break;
            }
            let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(parents, [next.len()]), &device);
            state.reorder(rows);
            live = next;
        }
        done.sort_by(|a, b| b.1.total_cmp(&a.1));
        done.truncate(n.max(1));
        done
    }

    fn clone_state(&self, state: &DecodeState<B>) -> DecodeState<B> {
        DecodeState { memory: state.memory.clone(), src_mask: state.src_mask.clone(), cache: state.cache.clone(), len: state.len }
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
    fn greedy_output_does_not_depend_on_the_batch() {
        let model: Seq2Seq<Flex> = config(true, Positions::Sinusoidal, true).init(&Default::default());
        let alone: Vec<i64> = model.greedy_rows(ids(&[&[5, 6, 3]]), &[4], 0).into_data().iter::<i64>().collect();
        let batch = model.greedy_rows(ids(&[&[5, 6, 3, 0, 0], &[7, 8, 9, 10, 3]]), &[4, 9], 0);
        assert_eq!(batch.dims(), [2, 9]);
        let first: Vec<i64> = batch.slice([0..1, 0..9]).into_data().iter::<i64>().collect();
        assert_eq!(&first[..4], &alone[..]);
        assert!(first[4..].iter().all(|&t| t == 0), "past its own limit a row only pads: {first:?}");
        // Rows leaving the batch as they finish (checked every step) change no row's tokens.
        let three = || ids(&[&[5, 6, 3, 0, 0], &[7, 8, 9, 10, 3], &[11, 3, 0, 0, 0]]);
        // Each row up to its `</s>` or padding (a batch that ends early has fewer columns).
        let rows = |t: Tensor<Flex, 2, Int>| -> Vec<Vec<i64>> {
            let cols = t.dims()[1];
            let flat: Vec<i64> = t.into_data().iter::<i64>().collect();
            flat.chunks(cols.max(1)).map(|r| r.iter().copied().take_while(|&x| x != 3 && x != 0).collect()).collect()
        };
        // The first row leaves first, then the third: the rows left must keep their places.
        let limits = [2, 9, 4];
        let whole = rows(model.greedy_rows(three(), &limits, 0));
        assert!(whole.iter().zip(limits).any(|(r, l)| r.len() == l), "a row ran to its limit: {whole:?}");
        assert_eq!(rows(model.greedy_rows(three(), &limits, 1)), whole);
    }

    #[test]
    fn beam_one_is_greedy_and_the_cache_changes_nothing() {
        let device = Default::default();
        for (tie, pos, pre) in [(true, Positions::Sinusoidal, true), (false, Positions::Learned, false)] {
            let model: Seq2Seq<Flex> = config(tie, pos, pre).init(&device);
            for src in [&[5, 6, 7, 3][..], &[9, 3][..], &[11, 12, 13, 14, 15, 3][..]] {
                let src_t = || ids(&[src]);
                let greedy: Vec<u32> = model.greedy(src_t(), 12, 0).into_data().iter::<i64>().map(|t| t as u32).take_while(|&t| t != 3).collect();
                let one = model.beam_search(src_t(), BeamSettings { beam: 1, max_len: 12, len_penalty: 0.0 }, true);
                assert_eq!(one, greedy, "beam 1 = greedy");
                for beam in [2, 4] {
                    for len_penalty in [0.0, 1.0] {
                        let settings = BeamSettings { beam, max_len: 12, len_penalty };
                        let cached = model.beam_search(src_t(), settings, true);
                        let uncached = model.beam_search(src_t(), settings, false);
                        assert_eq!(cached, uncached, "beam {beam}, α {len_penalty}: the cache changes nothing");
                    }
                }
            }
        }
    }

    /// The n best are distinct, best first, the first is the 1-best, and each finished one's
    /// score is its teacher-forced log-probability over the length penalty.
    #[test]
    fn n_best_hypotheses_are_ranked_with_the_scores_teacher_forcing_gives() {
        let device = Default::default();
        let mut model: Seq2Seq<Flex> = config(false, Positions::Learned, true).init(&device);
        // `</s>` made likely, so that hypotheses of several lengths finish within the limit (an
        // untrained model seldom ends one).
        let mut bias = vec![0.0f32; 50];
        bias[3] = 1.5;
        model.output.as_mut().unwrap().bias = Some(burn::module::Param::from_tensor(Tensor::from_floats(bias.as_slice(), &device)));
        let mut finished_seen = 0;
        for src in [&[5, 6, 7, 3][..], &[11, 12, 13, 14, 15, 3][..]] {
            for len_penalty in [0.0, 1.0] {
                let settings = BeamSettings { beam: 4, max_len: 12, len_penalty };
                let best = model.beam_search(ids(&[src]), settings, true);
                let n_best = model.beam_search_n(ids(&[src]), settings, true, 3);
                assert_eq!(n_best.len(), 3);
                assert_eq!(n_best[0].0, best);
                assert!(n_best.windows(2).all(|w| w[0].0 != w[1].0), "{n_best:?}");
                let hyps: Vec<Vec<u32>> = n_best.iter().map(|h| h.0.clone()).collect();
                let srcs: Vec<&[i32]> = vec![src; hyps.len()];
                let forced = model.score_rows(ids(&srcs), &hyps, len_penalty);
                for ((hyp, score), forced) in n_best.iter().zip(&forced) {
                    if hyp.len() < 12 {
                        assert!((score - forced).abs() < 1e-4, "α {len_penalty}: {hyp:?} beam {score} forced {forced}");
                    }
                }
                let finished: Vec<f64> = n_best.iter().filter(|h| h.0.len() < 12).map(|h| h.1).collect();
                assert!(finished.windows(2).all(|w| w[0] >= w[1]), "best first: {n_best:?}");
                finished_seen += finished.len();
            }
        }
        assert!(finished_seen >= 8, "finished hypotheses were compared: {finished_seen}");
    }

    #[test]
    fn greedy_equals_argmax_of_teacher_forcing_on_its_own_output() {
        let model: Seq2Seq<Autodiff<Flex>> = config(true, Positions::Learned, true).init(&Default::default());
        let src = Tensor::from_data(TensorData::new(vec![5i32, 6, 7, 3], [1, 4]), &Default::default());
        let out: Vec<i32> = model.greedy(src.clone(), 6, 0).into_data().to_vec().unwrap();
        let mut tgt_in = vec![2i32];
        tgt_in.extend_from_slice(&out[..5]);
        let tgt = Tensor::from_data(TensorData::new(tgt_in, [1, 6]), &Default::default());
        // Argmax over the tokens decoding may produce (never <pad> or <s>).
        let logits: Vec<f32> = model.forward(src, tgt).into_data().to_vec().unwrap();
        let forced: Vec<i32> = logits
            .chunks(50)
            .map(|row| row.iter().enumerate().filter(|(t, _)| *t != 0 && *t != 2).max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as i32)
            .collect();
        // Teacher forcing on the greedy prefix must predict the same next tokens (cache is exact).
        for i in 0..6 {
            if out[..i].contains(&3) {
                break;
            }
            assert_eq!(forced[i], out[i], "position {i}: {forced:?} vs {out:?}");
        }
    }
}
