//! Scaled dot-product attention written out (as Burn's multi-head attention composes it), for
//! the layers kiln owns because it needs their key/value caches: the language model's blocks and
//! the translation decoder. Heads live in dimension 1: `[batch, heads, len, head_dim]`.

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

/// `[batch, len, d]` → `[batch, heads, len, d / heads]`.
pub(crate) fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [batch, len, d] = x.dims();
    x.reshape([batch, len, heads, d / heads]).swap_dims(1, 2)
}

/// `[batch, heads, len, head_dim]` → `[batch, len, heads × head_dim]`.
pub(crate) fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, len, hd] = x.dims();
    x.swap_dims(1, 2).reshape([batch, len, heads * hd])
}

/// softmax(q·kᵀ/√d, masked) · v. `mask` is true where a query must not look, broadcastable to
/// `[batch, heads, len_q, len_k]` by `expand`.
pub(crate) fn attend<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>, dropout: &Dropout) -> Tensor<B, 4> {
    let [batch, heads, len_q, hd] = q.dims();
    let len_k = k.dims()[2];
    let mut scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask.expand([batch, heads, len_q, len_k]), -1.0e9);
    }
    crate::dropout::apply(dropout, crate::fused::softmax_last(scores)).matmul(v)
}

/// `[len, total]`, true where query `i` (absolute position `start + i`) must not see key `j`.
pub(crate) fn causal_mask<B: Backend>(len: usize, total: usize, start: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    let mask: Vec<bool> = (0..len).flat_map(|i| (0..total).map(move |j| j > start + i)).collect();
    Tensor::from_data(TensorData::new(mask, [len, total]), device)
}
