//! Models as Burn modules, their loss and their decoding. Families: the encoder-decoder
//! Transformer for translation ([`seq2seq`]) and the decoder-only language model ([`lm`], with
//! [`sampling`] for generation); [`loss`] is the label-smoothed cross-entropy that ignores
//! padding and returns *sums* so windows of steps add up exactly; [`fused`] holds the CPU
//! kernels (with their own backward steps) that replace Burn's compositions on Flex.

mod attention;
pub mod autocast;
pub mod dropout;
pub mod fused;
mod linear;
pub mod lm;
pub mod loss;
pub mod sampling;
pub mod seq2seq;

pub use loss::{label_smoothed_loss, label_smoothed_loss_composed, LossSums};
pub use lm::{DecoderLm, LmConfig};
pub use seq2seq::{Seq2Seq, Seq2SeqConfig};
