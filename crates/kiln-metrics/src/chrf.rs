//! Corpus chrF exactly as sacreBLEU 2.x computes it by default: character n-grams of orders 1–6
//! of each sentence with its whitespace removed, no word n-grams, β = 2, statistics summed over
//! the corpus, then the F-score of the precisions and recalls averaged over the orders that
//! occur (sacreBLEU's "effective order"; `eps_smoothing = False`).

use std::collections::HashMap;

const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// Summed (hypothesis, reference, match) n-gram counts per order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChrfStats {
    counts: [[u64; 3]; CHAR_ORDER],
}

/// Character n-grams of `text` (already stripped of whitespace) with their counts.
fn char_ngrams(text: &str, n: usize) -> HashMap<&str, u64> {
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
    let chars = bounds.len() - 1;
    let mut out = HashMap::new();
    for i in 0..(chars + 1).saturating_sub(n) {
        *out.entry(&text[bounds[i]..bounds[i + n]]).or_default() += 1;
    }
    out
}

/// Python's `''.join(s.split())`.
fn strip_whitespace(s: &str) -> String {
    s.chars().filter(|c| !(c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(c))).collect()
}

impl ChrfStats {
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        let (hyp, refr) = (strip_whitespace(hypothesis), strip_whitespace(reference));
        for n in 1..=CHAR_ORDER {
            let (h, r) = (char_ngrams(&hyp, n), char_ngrams(&refr, n));
            let hyp_count: u64 = h.values().sum();
            let ref_count: u64 = r.values().sum();
            let matched: u64 = h.iter().map(|(g, &c)| r.get(g).map_or(0, |&rc| c.min(rc))).sum();
            let slot = &mut self.counts[n - 1];
            // sacreBLEU counts hypothesis n-grams only where the reference has some of that order.
            slot[0] += if r.is_empty() { 0 } else { hyp_count };
            slot[1] += ref_count;
            slot[2] += matched;
        }
    }

    /// chrF in [0, 100].
    pub fn score(&self) -> f64 {
        let factor = BETA * BETA;
        let (mut avg_prec, mut avg_rec, mut effective) = (0.0, 0.0, 0);
        for &[n_hyp, n_ref, n_match] in &self.counts {
            if n_hyp > 0 && n_ref > 0 {
                avg_prec += n_match as f64 / n_hyp as f64;
                avg_rec += n_match as f64 / n_ref as f64;
                effective += 1;
            }
        }
        if effective == 0 {
            return 0.0;
        }
        avg_prec /= effective as f64;
        avg_rec /= effective as f64;
        if avg_prec + avg_rec == 0.0 {
            return 0.0;
        }
        100.0 * (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec)
    }
}

/// Corpus chrF of hypotheses against one reference each.
pub fn corpus_chrf(hypotheses: &[&str], references: &[&str]) -> f64 {
    let mut s = ChrfStats::default();
    for (h, r) in hypotheses.iter().zip(references) {
        s.add(h, r);
    }
    s.score()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_is_100_and_disjoint_is_0() {
        let s = ["Der Hund bellt.", "Ich gehe nach Hause"];
        assert!((corpus_chrf(&s, &s) - 100.0).abs() < 1e-9);
        assert_eq!(corpus_chrf(&["xyz"], &["abc"]), 0.0);
        // Whitespace does not count.
        assert!((corpus_chrf(&["a b c d"], &["abcd"]) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn fixture_equals_sacrebleu() {
        let (h, r, expected) = crate::tests::fixture("sacrebleu-chrf.txt");
        let (h, r): (Vec<&str>, Vec<&str>) = (h.iter().map(String::as_str).collect(), r.iter().map(String::as_str).collect());
        let got = corpus_chrf(&h, &r);
        assert!((got - expected).abs() < 1e-9, "kiln {got} vs sacrebleu {expected}");
    }
}
