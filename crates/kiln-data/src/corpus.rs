//! Corpora on disk: parallel TSV (`source<TAB>target` per line) and plain text, UTF-8. Bad lines
//! are errors naming `file:line`, or skipped and counted when the recipe says
//! `data.on_bad_line = "skip"`.

use std::path::Path;

use kiln_recipe::OnBadLine;

use crate::DataError;

/// One sentence pair as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub source: String,
    pub target: String,
}

/// Pairs read from a file, with the number of bad lines skipped.
#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    pub pairs: Vec<Pair>,
    pub skipped: usize,
}

/// Reads a TSV file of sentence pairs. A UTF-8 BOM and CRLF line ends are accepted;
/// `limit` > 0 stops after that many good pairs.
pub fn read_parallel(path: &Path, on_bad_line: OnBadLine, limit: usize) -> Result<ReadResult, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::new(path.display().to_string(), format!("cannot read corpus: {e}")))?;
    parse_parallel(&bytes, &path.display().to_string(), on_bad_line, limit)
}

/// Parses TSV bytes; `origin` names the file in errors.
pub fn parse_parallel(bytes: &[u8], origin: &str, on_bad_line: OnBadLine, limit: usize) -> Result<ReadResult, DataError> {
    let mut lines = PairLines::new(bytes, origin, on_bad_line, limit);
    let mut out = ReadResult::default();
    for pair in lines.by_ref() {
        let (source, target) = pair?;
        out.pairs.push(Pair { source: source.to_string(), target: target.to_string() });
    }
    out.skipped = lines.skipped;
    if out.pairs.is_empty() {
        return Err(DataError::new(origin, "corpus has no sentence pairs"));
    }
    Ok(out)
}

/// Lines of a plain-text corpus, with the number of bad (non-UTF-8) lines skipped.
#[derive(Debug, Clone, Default)]
pub struct TextLines {
    pub lines: Vec<String>,
    pub skipped: usize,
}

/// Reads a plain-text corpus line by line (BOM and CRLF accepted, empty lines kept: they mark
/// paragraphs); `limit` > 0 stops after that many lines.
pub fn read_text(path: &Path, on_bad_line: OnBadLine, limit: usize) -> Result<TextLines, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::new(path.display().to_string(), format!("cannot read corpus: {e}")))?;
    parse_text(&bytes, &path.display().to_string(), on_bad_line, limit)
}

/// Parses plain-text bytes; `origin` names the file in errors.
pub fn parse_text(bytes: &[u8], origin: &str, on_bad_line: OnBadLine, limit: usize) -> Result<TextLines, DataError> {
    let mut lines = TextLineIter::new(bytes, origin, on_bad_line, limit);
    let mut out = TextLines::default();
    for line in lines.by_ref() {
        out.lines.push(line?.to_string());
    }
    out.skipped = lines.skipped;
    if out.lines.iter().all(|l| l.trim().is_empty()) {
        return Err(DataError::new(origin, "corpus has no text"));
    }
    Ok(out)
}

/// A corpus file mapped into memory: its pages are the kernel's file cache, not the heap, so a
/// corpus larger than memory can be read in passes.
pub struct MappedCorpus {
    map: Option<memmap2::Mmap>,
    pub origin: String,
}

impl MappedCorpus {
    pub fn open(path: &Path) -> Result<MappedCorpus, DataError> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| DataError::new(&origin, format!("cannot read corpus: {e}")))?;
        let len = file.metadata().map_err(|e| DataError::new(&origin, format!("cannot read corpus: {e}")))?.len();
        // An empty file cannot be mapped; it reads as no bytes.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the corpus is read-only to kiln; one changed while kiln reads it gives wrong
            // text (as a read would), not unsafety in kiln's own data, which is copied out.
            Some(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::new(&origin, format!("cannot map corpus: {e}")))?)
        };
        Ok(MappedCorpus { map, origin })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn pairs(&self, on_bad_line: OnBadLine, limit: usize) -> PairLines<'_> {
        PairLines::new(self.bytes(), &self.origin, on_bad_line, limit)
    }

    pub fn lines(&self, on_bad_line: OnBadLine, limit: usize) -> TextLineIter<'_> {
        TextLineIter::new(self.bytes(), &self.origin, on_bad_line, limit)
    }
}

/// Raw lines of a corpus: BOM stripped, the final newline ending the last line (not starting an
/// empty one), `\r` of CRLF stripped; with 1-based line numbers.
struct RawLines<'a> {
    rest: Option<&'a [u8]>,
    line: usize,
}

impl<'a> RawLines<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        RawLines { rest: (!bytes.is_empty()).then_some(bytes), line: 0 }
    }
}

impl<'a> Iterator for RawLines<'a> {
    type Item = (usize, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest?;
        let (raw, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        self.rest = next;
        self.line += 1;
        Some((self.line, raw.strip_suffix(b"\r").unwrap_or(raw)))
    }
}

/// The good sentence pairs of TSV bytes, in order, borrowed; a bad line is an error naming
/// `origin:line` or skipped and counted in `skipped`, by `on_bad_line`.
pub struct PairLines<'a> {
    lines: RawLines<'a>,
    origin: &'a str,
    on_bad_line: OnBadLine,
    limit: usize,
    good: usize,
    pub skipped: usize,
}

impl<'a> PairLines<'a> {
    pub fn new(bytes: &'a [u8], origin: &'a str, on_bad_line: OnBadLine, limit: usize) -> Self {
        PairLines { lines: RawLines::new(bytes), origin, on_bad_line, limit, good: 0, skipped: 0 }
    }
}

impl<'a> Iterator for PairLines<'a> {
    type Item = Result<(&'a str, &'a str), DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.limit > 0 && self.good >= self.limit {
                return None;
            }
            let (no, raw) = self.lines.next()?;
            match parse_line(raw) {
                Ok(pair) => {
                    self.good += 1;
                    return Some(Ok(pair));
                }
                Err(why) => match self.on_bad_line {
                    OnBadLine::Error => {
                        self.lines.rest = None;
                        return Some(Err(DataError::new(format!("{}:{no}", self.origin), why)));
                    }
                    OnBadLine::Skip => self.skipped += 1,
                },
            }
        }
    }
}

/// The lines of plain-text bytes, trailing spaces trimmed, empty lines kept; a non-UTF-8 line is
/// an error naming `origin:line` or skipped and counted, by `on_bad_line`.
pub struct TextLineIter<'a> {
    lines: RawLines<'a>,
    origin: &'a str,
    on_bad_line: OnBadLine,
    limit: usize,
    good: usize,
    pub skipped: usize,
}

impl<'a> TextLineIter<'a> {
    pub fn new(bytes: &'a [u8], origin: &'a str, on_bad_line: OnBadLine, limit: usize) -> Self {
        TextLineIter { lines: RawLines::new(bytes), origin, on_bad_line, limit, good: 0, skipped: 0 }
    }
}

impl<'a> Iterator for TextLineIter<'a> {
    type Item = Result<&'a str, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.limit > 0 && self.good >= self.limit {
                return None;
            }
            let (no, raw) = self.lines.next()?;
            match std::str::from_utf8(raw) {
                Ok(line) => {
                    self.good += 1;
                    return Some(Ok(line.trim_end()));
                }
                Err(e) => match self.on_bad_line {
                    OnBadLine::Error => {
                        self.lines.rest = None;
                        return Some(Err(DataError::new(format!("{}:{no}", self.origin), format!("invalid UTF-8 at byte {}", e.valid_up_to()))));
                    }
                    OnBadLine::Skip => self.skipped += 1,
                },
            }
        }
    }
}

fn parse_line(raw: &[u8]) -> Result<(&str, &str), String> {
    let line = std::str::from_utf8(raw).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    let Some((source, target)) = line.split_once('\t') else {
        return Err("expected `source<TAB>target`, found no tab".into());
    };
    if target.contains('\t') {
        return Err("expected one tab, found several".into());
    }
    // A carriage return not ending the line: mixed line ends (old Mac files), not sentence text.
    if line.contains('\r') {
        return Err("carriage return inside the line (mixed line ends?)".into());
    }
    let (source, target) = (source.trim(), target.trim());
    if source.is_empty() {
        return Err("empty source side".into());
    }
    if target.is_empty() {
        return Err("empty target side".into());
    }
    Ok((source, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8], mode: OnBadLine) -> Result<ReadResult, DataError> {
        parse_parallel(text, "c.tsv", mode, 0)
    }

    #[test]
    fn reads_pairs_with_bom_and_crlf() {
        let r = parse(b"\xEF\xBB\xBFHallo Welt\tHello world\r\nDanke\tThanks\n", OnBadLine::Error).unwrap();
        assert_eq!(r.pairs.len(), 2);
        assert_eq!(r.pairs[0], Pair { source: "Hallo Welt".into(), target: "Hello world".into() });
        assert_eq!(r.pairs[1].target, "Thanks");
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = parse(b"a\tb\nno tab here\nc\td\n", OnBadLine::Error).unwrap_err();
        assert_eq!(e.origin, "c.tsv:2");
        assert!(e.message.contains("no tab"));
        assert_eq!(parse(b"a\tb\nc\t \n", OnBadLine::Error).unwrap_err().origin, "c.tsv:2");
        assert!(parse(b"\tb\n", OnBadLine::Error).unwrap_err().message.contains("empty source"));
        let e = parse(b"a\tb\nc\t\xff\xfe\n", OnBadLine::Error).unwrap_err();
        assert_eq!(e.origin, "c.tsv:2");
        assert!(e.message.contains("UTF-8"));
        assert_eq!(parse(b"a\tb\n\nc\td\n", OnBadLine::Error).unwrap_err().origin, "c.tsv:2");
    }

    #[test]
    fn skip_mode_counts_bad_lines() {
        let r = parse(b"a\tb\nbad\nc\t\xff\ne\tf", OnBadLine::Skip).unwrap();
        assert_eq!(r.pairs.len(), 2);
        assert_eq!(r.skipped, 2);
    }

    #[test]
    fn empty_corpus_is_an_error() {
        assert!(parse(b"", OnBadLine::Error).unwrap_err().message.contains("no sentence pairs"));
        assert!(parse(b"x\n", OnBadLine::Skip).is_err());
    }

    #[test]
    fn limit_stops_early() {
        let r = parse_parallel(b"a\tb\nc\td\ne\tf\n", "c.tsv", OnBadLine::Error, 2).unwrap();
        assert_eq!(r.pairs.len(), 2);
    }

    #[test]
    fn plain_text_lines() {
        let t = parse_text(b"\xEF\xBB\xBFFirst Citizen:\r\nBefore we proceed\n\nSpeak, speak.\n", "t.txt", OnBadLine::Error, 0).unwrap();
        assert_eq!(t.lines, vec!["First Citizen:", "Before we proceed", "", "Speak, speak."]);
        let e = parse_text(b"ok\nbad \xFF\n", "t.txt", OnBadLine::Error, 0).err().unwrap();
        assert_eq!(e.origin, "t.txt:2");
        assert_eq!(parse_text(b"ok\nbad \xFF\n", "t.txt", OnBadLine::Skip, 0).unwrap().skipped, 1);
        assert_eq!(parse_text(b"a\nb\nc\n", "t.txt", OnBadLine::Error, 2).unwrap().lines.len(), 2);
        assert!(parse_text(b"\n  \n", "t.txt", OnBadLine::Error, 0).is_err());
    }

    /// Found by the fuzzer below: a lone CR inside a line ended up inside a target sentence.
    #[test]
    fn carriage_return_inside_a_line_is_a_bad_line() {
        let err = parse(b"Haus\thouse\n\xC3\xB6\t\xC3\xB6\ra\n", OnBadLine::Error).unwrap_err().to_string();
        assert!(err.starts_with("c.tsv:2") && err.contains("carriage return"), "{err}");
        assert_eq!(parse(b"Haus\thouse\r\nA\tB\rC\r\n", OnBadLine::Skip).unwrap().skipped, 1);
    }

    /// Fuzzing the TSV and text readers with arbitrary bytes (tabs, CR, LF, BOMs and invalid
    /// UTF-8 made likely): never a panic; an error names `origin` (and a line within the file);
    /// what is accepted is clean pairs.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn corpus_bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                4 => "[a-zA-Zäöü ]{0,6}".prop_map(|s| s.into_bytes()),
                1 => Just(b"\t".to_vec()),
                1 => Just(b"\n".to_vec()),
                1 => Just(b"\r\n".to_vec()),
                1 => Just(b"\r".to_vec()),
                1 => Just(b"\xEF\xBB\xBF".to_vec()),
                1 => any::<u8>().prop_map(|b| vec![b]),
            ];
            prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

            #[test]
            fn tsv_reader_never_panics(bytes in corpus_bytes(), skip in any::<bool>(), limit in 0usize..4) {
                let mode = if skip { OnBadLine::Skip } else { OnBadLine::Error };
                match parse_parallel(&bytes, "c.tsv", mode, limit) {
                    Ok(r) => {
                        prop_assert!(!r.pairs.is_empty());
                        prop_assert!(limit == 0 || r.pairs.len() <= limit);
                        for p in &r.pairs {
                            for side in [&p.source, &p.target] {
                                prop_assert!(!side.trim().is_empty() && !side.contains(['\t', '\n', '\r']), "{p:?}");
                            }
                        }
                    }
                    Err(e) => {
                        let line = e.to_string();
                        prop_assert!(line.starts_with("c.tsv") && !line.contains('\n'), "{line:?}");
                    }
                }
            }

            #[test]
            fn text_reader_never_panics(bytes in corpus_bytes(), skip in any::<bool>()) {
                let mode = if skip { OnBadLine::Skip } else { OnBadLine::Error };
                if let Err(e) = parse_text(&bytes, "c.txt", mode, 0) {
                    prop_assert!(e.to_string().starts_with("c.txt"));
                }
            }
        }
    }
}
