//! The f32 arithmetic of the fused CPU kernels, written so that LLVM vectorises it: branch-free
//! `exp` (Cephes' polynomial, ~1 ulp), `erfc` (Numerical Recipes' `erfcc`, relative error
//! < 1.2e-7 for every argument, so GELU's tail keeps its relative accuracy), and the slice loops
//! with several accumulators (a float sum only vectorises if it is written as lanes). Each loop is
//! compiled twice, plain and with AVX2+FMA, and picked at run time; rows are spread over rayon.

use rayon::prelude::*;
use std::f32::consts::{FRAC_1_SQRT_2, LOG2_E};
use std::sync::OnceLock;

/// Elements per parallel task for element-wise kernels: large enough that rayon's hand-off is
/// noise, small enough that two cores share a 1 M-element tensor evenly.
const CHUNK: usize = 16 * 1024;
const LANES: usize = 8;

/// `eˣ`, clamped to the normal range (so `2ⁿ` is built from bits without a branch): below
/// −87.3 it returns ~1e-38 instead of 0, harmless wherever kiln sums exponentials; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5) * r * r + r + 1.0;
    // 2ⁿ from bits. `n as i32` would be a saturating conversion, which LLVM does not vectorise;
    // adding 1.5·2²³ instead leaves the integer n (|n| ≤ 127) in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let k = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(k.wrapping_add(127) << 23)
}

/// `erfc(z)` for `z ≥ 0`.
#[inline(always)]
fn erfc_nonnegative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = t * (1.000_023_7 + t * (0.374_091_96 + t * (0.096_784_18 + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(-z * z - 1.265_512_2 + poly)
}

/// Φ(x), the standard normal CDF: `½·erfc(−x/√2)`, computed from the tail so it stays relatively
/// accurate for negative x.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_nonnegative(x.abs() * FRAC_1_SQRT_2);
    if x < 0.0 {
        half_tail
    } else {
        1.0 - half_tail
    }
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_forward_body(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * normal_cdf(v);
    }
}

/// `out = x·Φ(x)` and, in place, `x ← Φ(x) + x·φ(x)`, the derivative the backward needs: both
/// from the same Φ, so the backward is a multiplication instead of a second round of `exp`s.
#[inline(always)]
fn gelu_and_derivative_body(x: &mut [f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x.iter_mut()) {
        let a = *v;
        let cdf = normal_cdf(a);
        *o = a * cdf;
        *v = cdf + a * exp(-0.5 * a * a) * FRAC_1_SQRT_2PI;
    }
}

#[inline(always)]
fn max_and_sum_body(row: &[f32]) -> (f32, f32) {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut sum = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            max[i] = max[i].max(c[i]);
            sum[i] += c[i];
        }
    }
    let mut m = max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s: f32 = sum.iter().sum();
    for &v in rest {
        m = m.max(v);
        s += v;
    }
    // A NaN logit must make the loss NaN (the trainer's non-finite check reads it): `max` skips
    // NaN, the plain sum keeps it.
    if s.is_nan() {
        m = f32::NAN;
    }
    (m, s)
}

#[inline(always)]
fn sum_exp_body(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp(c[i] - shift);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| exp(v - shift)).sum::<f32>()
}

/// `row[v] ← a·exp(row[v] − shift) − b` (the cross-entropy gradient before the gold correction).
#[inline(always)]
fn scaled_exp_minus_body(row: &mut [f32], shift: f32, a: f32, b: f32) {
    for v in row.iter_mut() {
        *v = a * exp(*v - shift) - b;
    }
}

/// In place: `row ← exp(row − max) / Σ`.
#[inline(always)]
fn softmax_row_body(row: &mut [f32]) {
    // Max, exponentials and their sum in lanes, so that each loop vectorises (a float fold
    // does not). `max` skips NaN, but a NaN entry still makes its exp, the sum and so the whole
    // row NaN.
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            maxes[i] = maxes[i].max(c[i]);
        }
    }
    let m = chunks.remainder().iter().fold(maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b));
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - m);
            sums[i] += c[i];
        }
    }
    let mut s: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - m);
        s += *v;
    }
    let inv = 1.0 / s;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// In place on `grad`: `g ← y·(g − Σ g·y)`, softmax's backward.
#[inline(always)]
fn softmax_backward_row_body(y: &[f32], grad: &mut [f32]) {
    let mut dots = [0.0f32; LANES];
    let (gc, yc) = (grad.chunks_exact(LANES), y.chunks_exact(LANES));
    let (g_rest, y_rest) = (gc.remainder(), yc.remainder());
    for (g, p) in gc.zip(yc) {
        for i in 0..LANES {
            dots[i] += g[i] * p[i];
        }
    }
    let dot = dots.iter().sum::<f32>() + g_rest.iter().zip(y_rest).map(|(a, b)| a * b).sum::<f32>();
    for (g, &p) in grad.iter_mut().zip(y) {
        *g = p * (*g - dot);
    }
}

/// MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ≈ ½.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// A dropout mask as a pure function of the element's index: element `i` is kept (value
/// `scale`, else 0) when `fmix32(fmix32(lo(i) ⊕ k1) ⊕ hi(i) ⊕ k2) < threshold`. 32-bit
/// arithmetic only, so the loops below run 8 lanes wide on AVX2 (a 64-bit generator such as
/// SplitMix64 cannot: AVX2 has no 64-bit multiply).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskStream {
    pub k1: u32,
    pub k2: u32,
    pub threshold: u32,
    pub scale: f32,
}

impl MaskStream {
    #[inline(always)]
    fn value(&self, lo: u32, hi_key: u32) -> f32 {
        if fmix32(fmix32(lo ^ self.k1) ^ hi_key) < self.threshold {
            self.scale
        } else {
            0.0
        }
    }
}

fn mask_fill_body(out: &mut [f32], first: u64, s: MaskStream) {
    let (lo, hi_key) = (first as u32, (first >> 32) as u32 ^ s.k2);
    out.iter_mut().enumerate().for_each(|(i, o)| *o = s.value(lo.wrapping_add(i as u32), hi_key));
}

fn mask_multiply_body(values: &mut [f32], first: u64, s: MaskStream) {
    let (lo, hi_key) = (first as u32, (first >> 32) as u32 ^ s.k2);
    values.iter_mut().enumerate().for_each(|(i, v)| *v *= s.value(lo.wrapping_add(i as u32), hi_key));
}

fn mask_multiply_add_body(values: &mut [f32], base: &[f32], first: u64, s: MaskStream) {
    let (lo, hi_key) = (first as u32, (first >> 32) as u32 ^ s.k2);
    values.iter_mut().zip(base).enumerate().for_each(|(i, (v, b))| *v = *b + *v * s.value(lo.wrapping_add(i as u32), hi_key));
}

fn has_avx2_fma() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines `$name(args) -> ret` that calls `$body` compiled for AVX2+FMA when the CPU has it.
macro_rules! dispatch {
    ($name:ident, $avx:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx($($arg: $ty),*) -> $ret {
            $body($($arg),*)
        }

        #[inline]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU was checked for both features above.
                return unsafe { $avx($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

dispatch!(gelu_forward_chunk, gelu_forward_avx2, gelu_forward_body, (x: &[f32], out: &mut [f32]) -> ());
dispatch!(gelu_and_derivative_chunk, gelu_and_derivative_avx2, gelu_and_derivative_body, (x: &mut [f32], out: &mut [f32]) -> ());
dispatch!(max_and_sum, max_and_sum_avx2, max_and_sum_body, (row: &[f32]) -> (f32, f32));
dispatch!(sum_exp, sum_exp_avx2, sum_exp_body, (row: &[f32], shift: f32) -> f32);
dispatch!(scaled_exp_minus, scaled_exp_minus_avx2, scaled_exp_minus_body, (row: &mut [f32], shift: f32, a: f32, b: f32) -> ());
dispatch!(softmax_row, softmax_row_avx2, softmax_row_body, (row: &mut [f32]) -> ());
dispatch!(softmax_backward_row, softmax_backward_row_avx2, softmax_backward_row_body, (y: &[f32], grad: &mut [f32]) -> ());

dispatch!(mask_fill_chunk, mask_fill_avx2, mask_fill_body, (out: &mut [f32], first: u64, s: MaskStream) -> ());
dispatch!(mask_multiply_chunk, mask_multiply_avx2, mask_multiply_body, (values: &mut [f32], first: u64, s: MaskStream) -> ());
dispatch!(mask_multiply_add_chunk, mask_multiply_add_avx2, mask_multiply_add_body, (values: &mut [f32], base: &[f32], first: u64, s: MaskStream) -> ());

/// Runs `body(part, index of its first element)` over `values` (elements `start ..` of a mask) in
/// parallel chunks, each cut where the index's high 32 bits change.
fn over_mask_chunks(values: &mut [f32], start: u64, body: impl Fn(usize, &mut [f32], u64) + Sync) {
    values.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let offset = c * CHUNK;
        let first = start + offset as u64;
        let cut = ((((first >> 32) + 1) << 32) - first).min(chunk.len() as u64) as usize;
        let (a, b) = chunk.split_at_mut(cut);
        body(offset, a, first);
        if !b.is_empty() {
            body(offset + cut, b, first + cut as u64);
        }
    });
}

/// `out` ← elements `start ..` of the mask `s`.
pub fn mask_fill(out: &mut [f32], start: u64, s: MaskStream) {
    over_mask_chunks(out, start, |_, part, first| mask_fill_chunk(part, first, s));
}

/// `values ← values · mask`, `values` being elements `start ..`.
pub fn mask_multiply(values: &mut [f32], start: u64, s: MaskStream) {
    over_mask_chunks(values, start, |_, part, first| mask_multiply_chunk(part, first, s));
}

/// `values ← base + values · mask`, `values` being elements `start ..`.
pub fn mask_multiply_add(values: &mut [f32], base: &[f32], start: u64, s: MaskStream) {
    assert_eq!(values.len(), base.len(), "dropout: residual of another size");
    over_mask_chunks(values, start, |offset, part, first| mask_multiply_add_chunk(part, &base[offset..offset + part.len()], first, s));
}

/// `out = x·Φ(x)` (exact GELU).
pub fn gelu(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| gelu_forward_chunk(x, o));
}

/// `out = x·Φ(x)`; `x ← Φ(x) + x·φ(x)` (GELU's derivative, kept for the backward).
pub fn gelu_and_derivative(x: &mut [f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).zip(x.par_chunks_mut(CHUNK)).for_each(|(o, x)| gelu_and_derivative_chunk(x, o));
}

/// `grad ← grad·factor`, element-wise.
pub fn multiply_in_place(grad: &mut [f32], factor: &[f32]) {
    grad.par_chunks_mut(CHUNK).zip(factor.par_chunks(CHUNK)).for_each(|(g, f)| g.iter_mut().zip(f).for_each(|(g, f)| *g *= f));
}

/// Softmax over rows of `width`, in place.
pub fn softmax_rows(data: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    let rows_per_task = (CHUNK / width.max(1)).max(1);
    data.par_chunks_mut(rows_per_task * width).for_each(|block| block.chunks_exact_mut(width).for_each(softmax_row));
}

/// Softmax's backward over rows of `width`: `grad ← y·(grad − Σ grad·y)` row by row.
pub fn softmax_backward_rows(y: &[f32], grad: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    let rows_per_task = (CHUNK / width.max(1)).max(1);
    grad.par_chunks_mut(rows_per_task * width)
        .zip(y.par_chunks(rows_per_task * width))
        .for_each(|(g, y)| g.chunks_exact_mut(width).zip(y.chunks_exact(width)).for_each(|(g, y)| softmax_backward_row(y, g)));
}

/// Which keys each row of attention scores `[batch, heads, queries, keys]` must not see: a boolean
/// mask of shape `[batch or 1, heads or 1, queries or 1, keys]`, broadcast over the dimensions it
/// has only once.
#[derive(Debug, Clone, Copy)]
pub struct KeyMask<'a> {
    bits: &'a [bool],
    /// Steps in `bits` per batch row, head and query (0 where the mask is broadcast).
    strides: [usize; 3],
    heads: usize,
    queries: usize,
    keys: usize,
}

impl<'a> KeyMask<'a> {
    /// `bits` of shape `mask_dims` over scores of shape `scores_dims`; `None` when the shapes do
    /// not broadcast.
    pub fn new(bits: &'a [bool], mask_dims: [usize; 4], scores_dims: [usize; 4]) -> Option<Self> {
        let [b, h, q, k] = scores_dims;
        let [mb, mh, mq, mk] = mask_dims;
        let fits = |m: usize, n: usize| m == n || m == 1;
        if mk != k || !fits(mb, b) || !fits(mh, h) || !fits(mq, q) || bits.len() != mb * mh * mq * mk {
            return None;
        }
        let strides = [if mb > 1 { mh * mq * mk } else { 0 }, if mh > 1 { mq * mk } else { 0 }, if mq > 1 { mk } else { 0 }];
        Some(Self { bits, strides, heads: h, queries: q, keys: k })
    }

    fn row(&self, r: usize) -> &'a [bool] {
        let (query, head, batch) = (r % self.queries, (r / self.queries) % self.heads, r / (self.queries * self.heads));
        let at = batch * self.strides[0] + head * self.strides[1] + query * self.strides[2];
        &self.bits[at..at + self.keys]
    }
}

/// Attention weights, in place, over rows of `width`: `softmax(x / divisor)` per row, the keys
/// `mask` marks set to −10⁹ first (as `mask_fill` does, so a row with every key masked comes out
/// uniform, and no row divides by zero).
pub fn attention_softmax_rows(data: &mut [f32], width: usize, divisor: f32, mask: Option<KeyMask<'_>>) {
    if width == 0 {
        return;
    }
    let rows_per_task = (CHUNK / width).max(1);
    data.par_chunks_mut(rows_per_task * width).enumerate().for_each(|(task, block)| {
        for (i, row) in block.chunks_exact_mut(width).enumerate() {
            match mask {
                Some(mask) => row.iter_mut().zip(mask.row(task * rows_per_task + i)).for_each(|(v, &m)| *v = if m { -1.0e9 } else { *v / divisor }),
                None => row.iter_mut().for_each(|v| *v /= divisor),
            }
            softmax_row(row);
        }
    });
}

/// The backward of [`attention_softmax_rows`]: `grad ← y·(grad − Σ grad·y) / divisor`, zero at
/// masked keys (the composition's `mask_fill` backward), in the composition's order of operations.
pub fn attention_softmax_backward_rows(y: &[f32], grad: &mut [f32], width: usize, divisor: f32, mask: Option<KeyMask<'_>>) {
    if width == 0 {
        return;
    }
    let rows_per_task = (CHUNK / width).max(1);
    grad.par_chunks_mut(rows_per_task * width).zip(y.par_chunks(rows_per_task * width)).enumerate().for_each(|(task, (g, y))| {
        for (i, (g, y)) in g.chunks_exact_mut(width).zip(y.chunks_exact(width)).enumerate() {
            softmax_backward_row(y, g);
            match mask {
                Some(mask) => g.iter_mut().zip(mask.row(task * rows_per_task + i)).for_each(|(g, &m)| *g = if m { 0.0 } else { *g / divisor }),
                None => g.iter_mut().for_each(|g| *g /= divisor),
            }
        }
    });
}

/// Layer normalisation of rows of `gamma.len()`: `out = (x − μ)·r·γ + β` with the biased
/// variance (as Burn and PyTorch), `r = 1/√(var + ε)`; each row's `μ` and `r` kept for the backward.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], epsilon: f32, out: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
    let width = gamma.len();
    if width == 0 {
        return;
    }
    let rows_per_task = (CHUNK / width).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .zip(x.par_chunks(rows_per_task * width))
        .zip(mean.par_chunks_mut(rows_per_task).zip(rstd.par_chunks_mut(rows_per_task)))
        .for_each(|((out, x), (mean, rstd))| {
            for (((out, x), mean), rstd) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
                let mu = x.iter().sum::<f32>() / width as f32;
                let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / width as f32;
                let r = 1.0 / (var + epsilon).sqrt();
                for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *o = (v - mu) * r * g + b;
                }
                (*mean, *rstd) = (mu, r);
            }
        });
}

/// Layer normalisation's backward: with `x̂ = (x − μ)·r` and `h = g·γ` per row,
/// `dx = r·(h − mean(h) − x̂·mean(h·x̂))`, `dγ = Σ_rows g·x̂`, `dβ = Σ_rows g`.
/// Returns `(dγ, dβ)`; `grad` is overwritten with `dx`.
pub fn layer_norm_backward(x: &[f32], gamma: &[f32], mean: &[f32], rstd: &[f32], grad: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    if width == 0 {
        return (Vec::new(), Vec::new());
    }
    let rows_per_task = (CHUNK / width).max(1);
    grad.par_chunks_mut(rows_per_task * width)
        .zip(x.par_chunks(rows_per_task * width))
        .zip(mean.par_chunks(rows_per_task).zip(rstd.par_chunks(rows_per_task)))
        .map(|((grad, x), (mean, rstd))| {
            let (mut dgamma, mut dbeta) = (vec![0.0f32; width], vec![0.0f32; width]);
            let mut h = vec![0.0f32; width];
            for (((g, x), &mu), &r) in grad.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(mean).zip(rstd) {
                let (mut sum_h, mut sum_hx) = (0.0f32, 0.0f32);
                for j in 0..width {
                    let xhat = (x[j] - mu) * r;
                    h[j] = g[j] * gamma[j];
                    sum_h += h[j];
                    sum_hx += h[j] * xhat;
                    dgamma[j] += g[j] * xhat;
                    dbeta[j] += g[j];
                }
                let (mean_h, mean_hx) = (sum_h / width as f32, sum_hx / width as f32);
                for j in 0..width {
                    let xhat = (x[j] - mu) * r;
                    g[j] = r * (h[j] - mean_h - xhat * mean_hx);
                }
            }
            (dgamma, dbeta)
        })
        .reduce(
            || (vec![0.0; width], vec![0.0; width]),
            |(mut ga, mut ba), (gb, bb)| {
                ga.iter_mut().zip(&gb).for_each(|(a, b)| *a += b);
                ba.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                (ga, ba)
            },
        )
}

/// Per row: `(log Σ exp, Σ logits)`.
pub fn log_sum_exp_and_sum(row: &[f32]) -> (f32, f32) {
    let (max, sum) = max_and_sum(row);
    if !max.is_finite() {
        // A NaN or infinite logit: the loss is not finite either way; keep it NaN.
        return (f32::NAN, sum);
    }
    (max + sum_exp(row, max).ln(), sum)
}

/// `row[v] ← a·softmax(row)[v] − b`, with `lse` the row's log Σ exp.
pub fn scaled_softmax_minus_in_place(row: &mut [f32], lse: f32, a: f32, b: f32) {
    scaled_exp_minus(row, lse, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Φ(x) in f64 from libm's erfc, accurate in the tails too.
    fn cdf_reference(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = exp(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1.0e9) < 1.0e-37);
    }

    #[test]
    fn gelu_matches_the_erf_definition_in_relative_terms_including_the_tail() {
        let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
        let mut out = vec![0.0; xs.len()];
        gelu(&xs, &mut out);
        let mut worst: f64 = 0.0;
        for (&x, &y) in xs.iter().zip(&out) {
            let want = x as f64 * cdf_reference(x as f64);
            if want != 0.0 {
                worst = worst.max((y as f64 - want).abs() / want.abs());
            }
        }
        // Element by element, down to gelu(−10) ≈ −7.6e-23.
        assert!(worst < 1e-5, "worst relative error {worst}");
    }

    #[test]
    fn gelu_backward_matches_the_derivative() {
        let xs: Vec<f32> = (0..801).map(|i| -6.0 + i as f32 * 0.015).collect();
        let (mut grad, mut out) = (xs.clone(), vec![0.0; xs.len()]);
        gelu_and_derivative(&mut grad, &mut out);
        let mut plain = vec![0.0; xs.len()];
        gelu(&xs, &mut plain);
        assert_eq!(out, plain, "the same GELU either way");
        for (&x, &g) in xs.iter().zip(&grad) {
            let x = x as f64;
            let want = cdf_reference(x) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((g as f64 - want).abs() < 1e-6, "x = {x}: {g} vs {want}");
        }
    }

    /// Machines without AVX2 run the plain compilation of the same loops: it must agree with the
    /// dispatched one (on this machine, the AVX2 one).
    #[test]
    fn the_plain_build_of_each_loop_agrees_with_the_dispatched_one() {
        let xs: Vec<f32> = (0..1003).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.13).collect();
        let (mut plain, mut fast) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        gelu_forward_body(&xs, &mut plain);
        gelu(&xs, &mut fast);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs().max(1.0));
        assert!(close(&plain, &fast), "gelu");
        let (mut dp, mut df) = (xs.clone(), xs.clone());
        gelu_and_derivative_body(&mut dp, &mut plain);
        gelu_and_derivative(&mut df, &mut fast);
        assert!(close(&dp, &df), "gelu derivative");
        let (mut sp, mut sf) = (xs.clone(), xs.clone());
        softmax_row_body(&mut sp);
        softmax_rows(&mut sf, xs.len());
        assert!(close(&sp, &sf), "softmax");
        let (m, s) = max_and_sum_body(&xs);
        let plain_lse = m + sum_exp_body(&xs, m).ln();
        assert!((plain_lse - log_sum_exp_and_sum(&xs).0).abs() <= 1e-6 * plain_lse.abs(), "log Σ exp");
        assert_eq!(s, log_sum_exp_and_sum(&xs).1);
    }

    #[test]
    fn nan_logits_give_a_nan_log_sum_exp() {
        let mut row = vec![0.5f32; 37];
        assert!(log_sum_exp_and_sum(&row).0.is_finite());
        row[20] = f32::NAN;
        assert!(log_sum_exp_and_sum(&row).0.is_nan());
        row[20] = f32::INFINITY;
        assert!(log_sum_exp_and_sum(&row).0.is_nan());
    }
}
