//! Linear layers applied to `[batch, len, d]` activations as one `[batch·len, d]` product.
//!
//! Burn 0.21 differentiates a linear layer over a 3-D input with one `xᵀ·g` product per batch
//! row, a `[batch, d_in, d_out]` intermediate (64 MiB for a 1024-wide feed-forward at batch 64),
//! then a sum over the batch; it also copies the transposed weight to broadcast it. Flattened to
//! rows, the weight gradient is a single product over all `batch·len` rows and the bias gradient
//! one column sum. Same numbers, far less work; the reshapes are free on contiguous activations.

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `layer(x)` for `x`: `[batch, len, d_in]`.
pub(crate) fn over_rows<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, len, d] = x.dims();
    let y = crate::autocast::linear(layer, x.reshape([batch * len, d]));
    let out = y.dims()[1];
    y.reshape([batch, len, out])
}
