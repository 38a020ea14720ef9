//! Models as Burn modules, their loss and their decoding. kiln's first family is the
//! encoder-decoder Transformer for translation ([`seq2seq`]); [`loss`] is the label-smoothed
//! cross-entropy that ignores padding and returns *sums* so windows of steps add up exactly.

pub mod loss;
pub mod seq2seq;

pub use loss::{label_smoothed_loss, LossSums};
pub use seq2seq::{Seq2Seq, Seq2SeqConfig};
