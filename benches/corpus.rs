//! Synthetic corpora of any size from real sentence pairs, for scale tests and `kiln bench data
//! --scale`: pair `k` of the output joins 1–3 pairs of the input (sources with sources, targets
//! with targets, so it stays a translation), chosen by a SplitMix64 stream of (`seed`, `k`). The
//! same input, size and seed always give the same bytes. Nothing here is committed: corpora are
//! made where they are needed (`benches/make_corpus.rs` is the command-line front).
//!
//! Plain `std` on purpose: the file is compiled into the `kiln` binary (the bench) and into the
//! small `make-corpus` binary.

use std::io::{BufWriter, Write};
use std::path::Path;

/// SplitMix64: a fast, well-mixed 64-bit stream; enough for choosing sentences.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reads `source<TAB>target` lines (the well-formed ones) of `inputs`.
pub fn read_pairs(inputs: &[&Path]) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for path in inputs {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        for line in text.lines() {
            if let Some((s, t)) = line.split_once('\t') {
                let (s, t) = (s.trim(), t.trim());
                if !s.is_empty() && !t.is_empty() && !t.contains('\t') {
                    pairs.push((s.to_string(), t.to_string()));
                }
            }
        }
    }
    if pairs.is_empty() {
        return Err("the inputs hold no sentence pairs".into());
    }
    Ok(pairs)
}

/// Writes `count` synthetic pairs to `out`; returns the bytes written.
pub fn generate(pairs: &[(String, String)], count: u64, seed: u64, out: &Path) -> Result<u64, String> {
    let file = std::fs::File::create(out).map_err(|e| format!("{}: cannot create: {e}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut written = 0u64;
    let n = pairs.len() as u64;
    let (mut src, mut tgt) = (String::new(), String::new());
    for k in 0..count {
        let mut state = seed ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let pieces = 1 + splitmix(&mut state) % 3;
        src.clear();
        tgt.clear();
        for p in 0..pieces {
            let (s, t) = &pairs[(splitmix(&mut state) % n) as usize];
            if p > 0 {
                src.push(' ');
                tgt.push(' ');
            }
            src.push_str(s);
            tgt.push_str(t);
        }
        let line = format!("{src}\t{tgt}\n");
        w.write_all(line.as_bytes()).map_err(|e| format!("{}: cannot write: {e}", out.display()))?;
        written += line.len() as u64;
    }
    w.flush().map_err(|e| format!("{}: cannot write: {e}", out.display()))?;
    Ok(written)
}
