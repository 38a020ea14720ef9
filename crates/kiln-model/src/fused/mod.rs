//! Fused CPU operations: label-smoothed cross-entropy, exact GELU, the last-axis softmax, layer
//! normalisation, attention weights (scale, key mask, softmax, dropout) and the residual add with
//! dropout, each one pass forward and one backward over its tensor, instead of the chain of
//! element-wise passes (and autodiff nodes) that Burn composes them from. Dropout masks inside
//! them are the step's host masks (`crate::dropout`), drawn where they are applied and drawn again
//! for the backward, never stored.
//!
//! They exist for Burn's CPU backend, Flex, and the autodiff over it, kiln's training backend.
//! The functions here are generic over any backend and specialise at run time by type: for
//! `Flex` and `Autodiff<Flex>` they run kiln's kernels ([`math`]) and register their own backward
//! step with Burn's autodiff (Burn's backend-extension mechanism, without threading a trait bound
//! through every model type); for any other backend (CUDA) they are Burn's composition.
//! `KILN_UNFUSED=1` turns them off, for comparison and for the tests that check each against the
//! composition.

pub mod math;

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

type Ad = Autodiff<Flex>;

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KILN_UNFUSED").is_none_or(|v| v.is_empty() || v == "0"))
}

/// Which implementation a backend gets.
enum Kind {
    Flex,
    AutodiffFlex,
    Other,
}

fn kind<B: Backend>() -> Kind {
    if !enabled() {
        Kind::Other
    } else if TypeId::of::<B>() == TypeId::of::<Flex>() {
        Kind::Flex
    } else if TypeId::of::<B>() == TypeId::of::<Ad>() {
        Kind::AutodiffFlex
    } else {
        Kind::Other
    }
}

/// Moves a value to the type it is known (by `TypeId`) to have.
fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>).downcast::<U>().expect("fused: type checked by TypeId")
}

fn float_primitive<const D: usize>(x: Tensor<Ad, D>) -> FloatTensor<Ad> {
    x.into_primitive().tensor()
}

/// A contiguous f32 tensor whose storage starts at its first element.
fn dense(t: FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 { t } else { FlexTensor::from_data(t.into_data().convert::<f32>()) };
    if t.as_slice::<f32>().is_some_and(|s| s.len() == t.layout().num_elements()) {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    let s = t.as_slice::<f32>().expect("fused: dense f32 tensor");
    &s[..t.layout().num_elements()]
}

fn from_vec(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// `f(values)` written into the tensor's own buffer when nothing else holds it, else a new one.
fn map_in_place(t: FlexTensor, f: impl FnOnce(&mut [f32])) -> FlexTensor {
    let mut t = dense(t);
    let n = t.layout().num_elements();
    if let Some(s) = t.try_storage_mut::<f32>() {
        if s.len() == n {
            f(s);
            return t;
        }
    }
    let mut copy = values(&t).to_vec();
    f(&mut copy);
    from_vec(copy, t.layout().shape().to_vec())
}

// ---------------------------------------------------------------------------------------------
// GELU

fn gelu_flex(x: &FlexTensor) -> FlexTensor {
    let x = dense(x.clone());
    let mut out = vec![0.0; x.layout().num_elements()];
    math::gelu(values(&x), &mut out);
    from_vec(out, x.layout().shape().to_vec())
}

/// GELU of `x` and its derivative, the latter written over `x` when nothing else holds it.
fn gelu_and_derivative_flex(x: FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = x.layout().shape().to_vec();
    let mut out = vec![0.0; x.layout().num_elements()];
    let derivative = map_in_place(x, |v| math::gelu_and_derivative(v, &mut out));
    (from_vec(out, shape), derivative)
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// GELU's derivative at the input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let derivative = dense(ops.state);
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| map_in_place(grad, |g| math::multiply_in_place(g, values(&derivative))));
    }
}

/// Exact GELU, `x·Φ(x)`.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match kind::<B>() {
        Kind::Flex => {
            let x: Tensor<Flex, D> = cast(x);
            cast(Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(gelu_flex(&x.into_primitive().tensor()))))
        }
        Kind::AutodiffFlex => {
            let x = float_primitive(cast::<_, Tensor<Ad, D>>(x));
            let out = match GeluBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (y, derivative) = gelu_and_derivative_flex(x.primitive);
                    prep.finish(derivative, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(gelu_flex(&x.primitive)),
            };
            cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
        }
        Kind::Other => burn::tensor::activation::gelu(x),
    }
}

// ---------------------------------------------------------------------------------------------
// Layer normalisation

/// The ε of every kiln layer norm (`LayerNormConfig`'s default; Burn keeps the module's own private).
/// The tests compare against `LayerNorm::forward`, so a different ε there would fail them.
const LAYER_NORM_EPSILON: f32 = 1e-5;

#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let LayerNormState { x, gamma, mean, rstd } = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, gamma) = (dense(x), dense(gamma));
        let width = gamma.layout().num_elements();
        let mut sums = None;
        let dx = map_in_place(grad, |g| sums = Some(math::layer_norm_backward(values(&x), values(&gamma), &mean, &rstd, g)));
        let (dgamma, dbeta) = sums.expect("computed above");
        let [parent_x, parent_gamma, parent_beta] = ops.parents;
        if let Some(node) = parent_x {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = parent_gamma {
            grads.register::<Flex>(node.id, from_vec(dgamma, vec![width]));
        }
        if let Some(node) = parent_beta {
            grads.register::<Flex>(node.id, from_vec(dbeta, vec![width]));
        }
    }
}

fn layer_norm_flex(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let (x, gamma, beta) = (dense(x.clone()), dense(gamma.clone()), dense(beta.clone()));
    let n = x.layout().num_elements();
    let rows = n / gamma.layout().num_elements().max(1);
    let (mut out, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    math::layer_norm(values(&x), values(&gamma), values(&beta), LAYER_NORM_EPSILON, &mut out, &mut mean, &mut rstd);
    (from_vec(out, x.layout().shape().to_vec()), mean, rstd)
}

/// `norm(x)` over the last axis: one pass forward and one backward (γ's and β's gradients
/// included) under `Autodiff<Flex>`; Burn's own `LayerNorm::forward` elsewhere (Flex's forward is
/// already one pass; Burn's autodiff composes it from a dozen operations).
pub fn layer_norm<B: Backend, const D: usize>(norm: &burn::nn::LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let Some(beta) = &norm.beta else { return norm.forward(x) };
    let Kind::AutodiffFlex = kind::<B>() else { return norm.forward(x) };
    let x = float_primitive(cast::<_, Tensor<Ad, D>>(x));
    let gamma = float_primitive(cast::<_, Tensor<Ad, 1>>(norm.gamma.val()));
    let beta = float_primitive(cast::<_, Tensor<Ad, 1>>(beta.val()));
    let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
    let out = match LayerNormBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (y, mean, rstd) = layer_norm_flex(&x.primitive, &gamma.primitive, &beta.primitive);
            prep.finish(LayerNormState { x: x.primitive.clone(), gamma: gamma.primitive.clone(), mean, rstd }, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(layer_norm_flex(&x.primitive, &gamma.primitive, &beta.primitive).0),
    };
    cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last axis

fn softmax_flex(x: FlexTensor) -> FlexTensor {
    let width = *x.layout().shape().last().expect("softmax of a scalar");
    // The input buffer is reused when the caller no longer needs it (the scores usually are not).
    map_in_place(x, |v| math::softmax_rows(v, width))
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The softmax output.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = dense(ops.state);
        let width = *y.layout().shape().last().expect("softmax of a scalar");
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| map_in_place(grad, |g| math::softmax_backward_rows(values(&y), g, width)));
    }
}

/// Softmax over the last axis.
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match kind::<B>() {
        Kind::Flex => {
            let x: Tensor<Flex, D> = cast(x);
            cast(Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(softmax_flex(x.into_primitive().tensor()))))
        }
        Kind::AutodiffFlex => {
            let x = float_primitive(cast::<_, Tensor<Ad, D>>(x));
            let node = x.node.clone();
            // Computed from the primitive alone: the autodiff tensor (and with it our reference to
            // the scores) is dropped first, so the scores' buffer can take the result.
            let primitive = x.primitive.clone();
            let out = match SoftmaxBackward.prepare::<NoCheckpointing>([node]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    drop(x);
                    let y = softmax_flex(primitive);
                    prep.finish(y.clone(), y)
                }
                OpsKind::UnTracked(prep) => {
                    drop(x);
                    prep.finish(softmax_flex(primitive))
                }
            };
            cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
        }
        Kind::Other => burn::tensor::activation::softmax(x, D - 1),
    }
}

// ---------------------------------------------------------------------------------------------
// Attention weights: scale, key mask, softmax and dropout in one pass each way

/// A key mask read to the host, with its 4-D shape.
#[derive(Debug, Clone)]
struct HostKeyMask {
    bits: Vec<bool>,
    dims: [usize; 4],
}

impl HostKeyMask {
    fn read<B: Backend>(mask: &Tensor<B, 4, Bool>) -> Self {
        let dims = mask.dims();
        let bits = mask.to_data().iter::<bool>().collect();
        Self { bits, dims }
    }

    fn over(&self, scores: [usize; 4]) -> math::KeyMask<'_> {
        math::KeyMask::new(&self.bits, self.dims, scores).expect("attention: the key mask does not broadcast over the scores")
    }
}

#[derive(Debug, Clone)]
struct AttentionState {
    /// The softmax output, before dropout.
    y: FlexTensor,
    divisor: f32,
    mask: Option<HostKeyMask>,
    /// Drawn again for the backward rather than kept.
    dropout: Option<crate::dropout::HostMask>,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 1> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let AttentionState { y, divisor, mask, dropout } = ops.state;
        let y = dense(y);
        let dims = dims4(&y);
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            map_in_place(grad, |g| {
                if let Some(dropout) = dropout {
                    dropout.multiply(g);
                }
                math::attention_softmax_backward_rows(values(&y), g, dims[3], divisor, mask.as_ref().map(|m| m.over(dims)));
            })
        });
    }
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Softmax of `scores / divisor` with masked keys at −10⁹, written over the scores when nothing
/// else holds them.
fn attention_softmax_flex(scores: FlexTensor, divisor: f32, mask: Option<&HostKeyMask>) -> FlexTensor {
    let scores = dense(scores);
    let dims = dims4(&scores);
    map_in_place(scores, |v| math::attention_softmax_rows(v, dims[3], divisor, mask.map(|m| m.over(dims))))
}

/// `dropout(softmax(mask_fill(scores / divisor, mask, −10⁹)))` over the last axis of attention
/// scores `[batch, heads, queries, keys]`; `mask` (true where a query must not look) broadcasts to
/// them. On Flex under autodiff one pass forward and one backward, the dropout mask drawn in the
/// pass (and again for the backward) instead of kept; elsewhere Burn's composition. Either way the
/// same values: the same operations in the same order, and the mask `dropout::apply` would draw.
pub fn attention_weights<B: Backend>(scores: Tensor<B, 4>, divisor: f64, mask: Option<&Tensor<B, 4, Bool>>, dropout: &burn::nn::Dropout) -> Tensor<B, 4> {
    match kind::<B>() {
        Kind::Flex => {
            let scores: Tensor<Flex, 4> = cast(scores);
            let mask = mask.map(HostKeyMask::read);
            let y = attention_softmax_flex(scores.into_primitive().tensor(), divisor as f32, mask.as_ref());
            cast(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(y)))
        }
        Kind::AutodiffFlex => {
            let scores = float_primitive(cast::<_, Tensor<Ad, 4>>(scores));
            let host_mask = mask.map(HostKeyMask::read);
            let dims = dims4(&scores.primitive);
            let drop_mask = crate::dropout::next_host_mask(dropout, &dims);
            let node = scores.node.clone();
            let primitive = scores.primitive.clone();
            // The autodiff tensor goes first, so the scores' buffer can take the weights.
            drop(scores);
            let divisor = divisor as f32;
            let dropped = |y: &FlexTensor| match drop_mask {
                Some(m) => {
                    let mut out = values(y).to_vec();
                    m.multiply(&mut out);
                    from_vec(out, y.layout().shape().to_vec())
                }
                None => y.clone(),
            };
            let out = match AttentionBackward.prepare::<NoCheckpointing>([node]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let y = attention_softmax_flex(primitive, divisor, host_mask.as_ref());
                    let out = dropped(&y);
                    prep.finish(AttentionState { y, divisor, mask: host_mask, dropout: drop_mask }, out)
                }
                OpsKind::UnTracked(prep) => {
                    let y = attention_softmax_flex(primitive, divisor, host_mask.as_ref());
                    prep.finish(dropped(&y))
                }
            };
            let weights: Tensor<B, 4> = cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)));
            // Without a host mask (none seeded for this step) Burn's dropout, as `apply` does.
            if drop_mask.is_none() { crate::dropout::apply(dropout, weights) } else { weights }
        }
        Kind::Other => {
            let dims = scores.dims();
            let mut scores = scores / divisor;
            if let Some(mask) = mask {
                scores = scores.mask_fill(mask.clone().expand(dims), -1.0e9);
            }
            crate::dropout::apply(dropout, burn::tensor::activation::softmax(scores, 3))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Residual connection with dropout: x + dropout(y)

#[derive(Debug)]
struct ResidualBackward;

impl Backward<Flex, 2> for ResidualBackward {
    /// The dropout mask, drawn again rather than kept.
    type State = crate::dropout::HostMask;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mask = ops.state;
        burn::backend::autodiff::ops::binary::<Flex, _, _>(ops.parents, ops.node, grads, |grad| grad, |grad| map_in_place(grad, |g| mask.multiply(g)));
    }
}

/// `x + dropout(y)`, a residual connection: on Flex under autodiff with the step's host mask, one
/// pass forward (the mask drawn in it, never stored) and one backward (drawn again); elsewhere
/// `x + dropout::apply(dropout, y)`. The same values either way.
pub fn residual_add<B: Backend, const D: usize>(x: Tensor<B, D>, y: Tensor<B, D>, dropout: &burn::nn::Dropout) -> Tensor<B, D> {
    let fused = matches!(kind::<B>(), Kind::AutodiffFlex) && x.dims() == y.dims();
    let Some(mask) = fused.then(|| crate::dropout::next_host_mask(dropout, &y.dims())).flatten() else {
        return x + crate::dropout::apply(dropout, y);
    };
    let (x, y) = (float_primitive(cast::<_, Tensor<Ad, D>>(x)), float_primitive(cast::<_, Tensor<Ad, D>>(y)));
    let nodes = [x.node.clone(), y.node.clone()];
    let (base, values_of_y) = (dense(x.primitive.clone()), y.primitive.clone());
    // The autodiff tensors go first, so `y`'s buffer can take the sum.
    drop((x, y));
    let sum = map_in_place(values_of_y, |v| mask.multiply_add(v, values(&base)));
    let out = match ResidualBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(mask, sum),
        OpsKind::UnTracked(prep) => prep.finish(sum),
    };
    cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
}

// ---------------------------------------------------------------------------------------------
// Label-smoothed cross-entropy

/// The per-row results: columns `[smoothed loss, nll]`, zero for padding rows.
fn cross_entropy_flex(logits: &FlexTensor, labels: &[i64], pad: i64, epsilon: f32) -> (FlexTensor, Vec<f32>) {
    let logits = dense(logits.clone());
    let vocab = logits.layout().shape()[1];
    let rows = labels.len();
    let mut out = vec![0.0f32; rows * 2];
    let mut lse = vec![0.0f32; rows];
    out.par_chunks_mut(2)
        .zip(lse.par_iter_mut())
        .zip(values(&logits).par_chunks(vocab))
        .zip(labels.par_iter())
        .for_each(|(((out, lse), row), &label)| {
            if label == pad {
                return;
            }
            let (log_sum, sum) = math::log_sum_exp_and_sum(row);
            let nll = log_sum - row[label as usize];
            let uniform = log_sum - sum / vocab as f32;
            out[0] = (1.0 - epsilon) * nll + epsilon * uniform;
            out[1] = nll;
            *lse = log_sum;
        });
    (from_vec(out, vec![rows, 2]), lse)
}

#[derive(Debug, Clone)]
struct CrossEntropyState {
    logits: FlexTensor,
    labels: Vec<i64>,
    lse: Vec<f32>,
    pad: i64,
    epsilon: f32,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    /// With `g = (g_smoothed, g_nll)` per row and `p = softmax(row)`:
    /// `∂/∂z = (g_s + g_n)·p − g_s·ε/V − [v = gold]·(g_s·(1 − ε) + g_n)`.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let CrossEntropyState { logits, labels, lse, pad, epsilon } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = dense(grad);
            let g = values(&grad);
            let vocab = logits.layout().shape()[1];
            // The logits are usually held by nothing else by now: the gradient is written over them.
            map_in_place(logits, |z| {
                z.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
                    if labels[i] == pad {
                        row.fill(0.0);
                        return;
                    }
                    let (gs, gn) = (g[2 * i], g[2 * i + 1]);
                    math::scaled_softmax_minus_in_place(row, lse[i], gs + gn, gs * epsilon / vocab as f32);
                    row[labels[i] as usize] -= gs * (1.0 - epsilon) + gn;
                });
            })
        });
    }
}

fn labels_of(labels: FlexTensor) -> Vec<i64> {
    match labels.dtype() {
        DType::I64 => labels.into_data().to_vec::<i64>().expect("i64 labels"),
        _ => labels.into_data().convert::<i64>().to_vec::<i64>().expect("integer labels"),
    }
}

/// The inputs handed back where no fused kernel applies.
pub type Unfused<B> = (Tensor<B, 2>, Tensor<B, 1, Int>);

/// Per-row label-smoothed cross-entropy and negative log-likelihood, `[rows, 2]`, zero where the
/// label is `pad`. Fused on Flex; on other backends the inputs come back (the caller composes it).
pub fn cross_entropy_rows<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, pad: u32, epsilon: f64) -> Result<Tensor<B, 2>, Unfused<B>> {
    let vocab = logits.dims()[1] as i64;
    match kind::<B>() {
        Kind::Flex => {
            let logits: Tensor<Flex, 2> = cast(logits);
            let labels = labels_of(cast::<_, Tensor<Flex, 1, Int>>(labels).into_primitive());
            check_labels(&labels, vocab, pad);
            let (rows, _) = cross_entropy_flex(&logits.into_primitive().tensor(), &labels, pad as i64, epsilon as f32);
            Ok(cast(Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(rows))))
        }
        Kind::AutodiffFlex => {
            let logits = float_primitive(cast::<_, Tensor<Ad, 2>>(logits));
            let labels = labels_of(cast::<_, Tensor<Ad, 1, Int>>(labels).into_primitive());
            check_labels(&labels, vocab, pad);
            let (pad, epsilon) = (pad as i64, epsilon as f32);
            let out = match CrossEntropyBackward.prepare::<NoCheckpointing>([logits.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (rows, lse) = cross_entropy_flex(&logits.primitive, &labels, pad, epsilon);
                    let primitive = logits.primitive.clone();
                    drop(logits);
                    prep.finish(CrossEntropyState { logits: primitive, labels, lse, pad, epsilon }, rows)
                }
                OpsKind::UnTracked(prep) => prep.finish(cross_entropy_flex(&logits.primitive, &labels, pad, epsilon).0),
            };
            Ok(cast(Tensor::<Ad, 2>::from_primitive(TensorPrimitive::Float(out))))
        }
        Kind::Other => Err((logits, labels)),
    }
}

/// Labels index the vocabulary: one out of range is a bug upstream (the tokenizer and the model
/// disagree), reported as such rather than read out of bounds.
fn check_labels(labels: &[i64], vocab: i64, pad: u32) {
    if let Some(bad) = labels.iter().find(|&&l| l != pad as i64 && !(0..vocab).contains(&l)) {
        panic!("cross-entropy label {bad} outside the vocabulary of {vocab}");
    }
}

#[cfg(test)]
mod tests;
