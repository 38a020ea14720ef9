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
    let hd = q.dims()[3];
    let scores = crate::autocast::matmul(q, k.swap_dims(2, 3));
    crate::autocast::matmul(crate::fused::attention_weights(scores, (hd as f64).sqrt(), mask.as_ref(), dropout), v)
}

/// `[len, total]`, true where query `i` (absolute position `start + i`) must not see key `j`.
pub(crate) fn causal_mask<B: Backend>(len: usize, total: usize, start: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    let mask: Vec<bool> = (0..len).flat_map(|i| (0..total).map(move |j| j > start + i)).collect();
    Tensor::from_data(TensorData::new(mask, [len, total]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The heads' split and merge copy strided layouts (kiln's burn-flex patch copies them a row
    /// at a time): values checked against indices computed by hand, also from an offset view.
    #[test]
    fn heads_split_and_merge_move_every_value_where_it_belongs() {
        let (b, len, h, hd) = (2, 3, 4, 5);
        let d = h * hd;
        let values: Vec<f32> = (0..b * (len + 1) * d).map(|i| i as f32).collect();
        let all: Tensor<Flex, 3> = Tensor::from_data(TensorData::new(values, [b, len + 1, d]), &Default::default());
        // Positions 1.. of each row: a view that starts at an offset.
        let x = all.slice([0..b, 1..len + 1, 0..d]);
        let heads = split_heads(x.clone(), h);
        let got: Vec<f32> = heads.clone().reshape([b * h * len * hd]).into_data().to_vec().unwrap();
        let mut at = 0;
        for bi in 0..b {
            for hi in 0..h {
                for t in 0..len {
                    for e in 0..hd {
                        let want = (bi * (len + 1) * d + (t + 1) * d + hi * hd + e) as f32;
                        assert_eq!(got[at], want, "batch {bi} head {hi} position {t} element {e}");
                        at += 1;
                    }
                }
            }
        }
        let merged: Vec<f32> = merge_heads(heads).into_data().to_vec().unwrap();
        let original: Vec<f32> = x.into_data().to_vec().unwrap();
        assert_eq!(merged, original);
    }
}
