//! Evaluation metrics on detokenised text: corpus BLEU exactly as sacreBLEU 2.x computes it
//! (tokeniser `13a`, 4-gram, `exp` smoothing, one reference per hypothesis), and chrF ([`chrf`]).
//!
//! Equality with sacreBLEU is the contract: `tests/fixtures/bleu/` holds hypothesis and reference
//! files with the figures sacreBLEU printed for them, and the tests compare.

pub mod chrf;

pub use chrf::{corpus_chrf, ChrfStats};

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

const MAX_ORDER: usize = 4;

/// sacreBLEU's `13a` tokeniser (mteval-v13a), line for line.
pub fn tokenize_13a(line: &str) -> String {
    static RES: OnceLock<[(Regex, &'static str); 4]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            (Regex::new(r"([\{-~\[-` -&\(-\+:-@/])").unwrap(), " $1 "),
            (Regex::new(r"([^0-9])([\.,])").unwrap(), "$1 $2 "),
            (Regex::new(r"([\.,])([^0-9])").unwrap(), " $1 $2"),
            (Regex::new(r"([0-9])(-)").unwrap(), "$1 $2 "),
        ]
    });
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let mut line = format!(" {line} ");
    for (re, rep) in res.iter() {
        line = re.replace_all(&line, *rep).into_owned();
    }
    split_python(&line).collect::<Vec<_>>().join(" ")
}

/// Python's `str.split()`: Unicode whitespace plus the ASCII separators 0x1c–0x1f.
fn split_python(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)).filter(|t| !t.is_empty())
}

/// Sufficient statistics of corpus BLEU; they add up over segments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BleuStats {
    pub sys_len: usize,
    pub ref_len: usize,
    pub correct: [usize; MAX_ORDER],
    pub total: [usize; MAX_ORDER],
}

impl BleuStats {
    /// Adds one hypothesis/reference pair (raw, detokenised text).
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        let hyp = tokenize_13a(hypothesis.trim_end());
        let reference = tokenize_13a(reference.trim_end());
        let (hyp_ngrams, hyp_len) = ngrams(&hyp);
        let (ref_ngrams, ref_len) = ngrams(&reference);
        self.sys_len += hyp_len;
        self.ref_len += ref_len;
        for (gram, count) in &hyp_ngrams {
            let n = gram.len() - 1;
            self.total[n] += count;
            if let Some(rc) = ref_ngrams.get(gram) {
                self.correct[n] += (*count).min(*rc);
            }
        }
    }

    /// BLEU in [0, 100], `exp` smoothing as sacreBLEU's default.
    pub fn score(&self) -> f64 {
        let bp = if self.sys_len < self.ref_len {
            if self.sys_len > 0 { (1.0 - self.ref_len as f64 / self.sys_len as f64).exp() } else { 0.0 }
        } else {
            1.0
        };
        if self.correct.iter().all(|&c| c == 0) {
            return 0.0;
        }
        let mut precisions = [0.0f64; MAX_ORDER];
        let mut smooth = 1.0;
        for n in 0..MAX_ORDER {
            if self.total[n] == 0 {
                break;
            }
            precisions[n] = if self.correct[n] == 0 {
                smooth *= 2.0;
                100.0 / (smooth * self.total[n] as f64)
            } else {
                100.0 * self.correct[n] as f64 / self.total[n] as f64
            };
        }
        let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
        bp * (precisions.iter().map(|&p| log(p)).sum::<f64>() / MAX_ORDER as f64).exp()
    }
}

fn ngrams(tokenized: &str) -> (HashMap<Vec<&str>, usize>, usize) {
    let tokens: Vec<&str> = split_python(tokenized).collect();
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    (counts, tokens.len())
}

/// Corpus BLEU of hypotheses against one reference each.
pub fn corpus_bleu<H: AsRef<str>, R: AsRef<str>>(hypotheses: &[H], references: &[R]) -> f64 {
    assert_eq!(hypotheses.len(), references.len(), "one reference per hypothesis");
    let mut stats = BleuStats::default();
    for (h, r) in hypotheses.iter().zip(references) {
        stats.add(h.as_ref(), r.as_ref());
    }
    stats.score()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_13a_matches_sacrebleu_examples() {
        // Outputs from sacrebleu 2.6.0's Tokenizer13a.
        assert_eq!(tokenize_13a("Hello, world. It costs 3,50 - no: 3.50!"), "Hello , world . It costs 3,50 - no : 3.50 !");
        assert_eq!(tokenize_13a("It's 1990-1995 &amp; \"quoted\"."), "It's 1990 - 1995 & \" quoted \" .");
    }

    #[test]
    fn identical_corpus_scores_100_and_disjoint_scores_0() {
        let s = ["the cat sat on the mat today", "a dog barked loudly at night"];
        assert!((corpus_bleu(&s, &s) - 100.0).abs() < 1e-9);
        assert_eq!(corpus_bleu(&["x y z w"], &["a b c d"]), 0.0);
    }

    /// The fixture's hypotheses, references and the score sacreBLEU wrote into `score_file`.
    pub(crate) fn fixture(score_file: &str) -> (Vec<String>, Vec<String>, f64) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/bleu");
        let lines = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap().lines().map(str::to_string).collect::<Vec<_>>();
        let expected = lines(score_file).iter().find_map(|l| l.strip_prefix("score ").map(|v| v.trim().parse().unwrap())).unwrap();
        (lines("hyp.txt"), lines("ref.txt"), expected)
    }

    #[test]
    fn fixture_equals_sacrebleu() {
        let (h, r, expected) = fixture("sacrebleu.txt");
        let (h, r): (Vec<&str>, Vec<&str>) = (h.iter().map(String::as_str).collect(), r.iter().map(String::as_str).collect());
        let got = corpus_bleu(&h, &r);
        assert!((got - expected).abs() < 1e-9, "kiln {got} vs sacrebleu {expected}");
    }
}
