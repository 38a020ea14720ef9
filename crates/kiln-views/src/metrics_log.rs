//! Reading `metrics.jsonl` back as events, whole or as it grows (for `watch` on a live run and for
//! the end-of-run charts). A line that does not parse is skipped and counted, never fatal; a last
//! line without its newline is held back until it is complete (a live run is mid-write).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kiln_events::{Event, RunInfo, ValidRow, WindowRow};
use serde_json::Value;

/// Follows a `metrics.jsonl` file from its start.
pub struct MetricsReader {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Lines that were not valid rows (malformed JSON, wrong fields, truncated).
    pub malformed: usize,
}

impl MetricsReader {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), offset: 0, partial: Vec::new(), malformed: 0 }
    }

    /// Events of the lines completed since the last call. A missing file is no events yet.
    pub fn poll(&mut self) -> Result<Vec<Event>, String> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: cannot read: {e}", self.path.display())),
        };
        let mut fresh = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut fresh))
            .map_err(|e| format!("{}: cannot read: {e}", self.path.display()))?;
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Ok(Vec::new()) };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        let mut events = Vec::new();
        for line in complete.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_row(line) {
                Some(Some(e)) => events.push(e),
                Some(None) => {}
                None => self.malformed += 1,
            }
        }
        Ok(events)
    }

    /// Counts a held-back incomplete last line as malformed: the run is over and it stays cut.
    pub fn finish(&mut self) {
        if !self.partial.iter().all(u8::is_ascii_whitespace) {
            self.malformed += 1;
        }
        self.partial.clear();
    }
}

/// `Some(Some(event))`: a row; `Some(None)`: a valid row of a kind this reader ignores;
/// `None`: malformed.
fn parse_row(line: &[u8]) -> Option<Option<Event>> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let kind = value.get("kind")?.as_str()?.to_string();
    Some(match kind.as_str() {
        "start" => Some(Event::RunStarted(serde_json::from_value::<RunInfo>(value).ok()?)),
        "train" => Some(Event::Window(serde_json::from_value::<WindowRow>(value).ok()?)),
        "valid" => Some(Event::Validation(serde_json::from_value::<ValidRow>(value).ok()?)),
        "data" => Some(Event::Data(serde_json::from_value::<kiln_events::DataReport>(value).ok()?)),
        "note" => Some(Event::Note(value.get("text")?.as_str()?.to_string())),
        "checkpoint" => Some(Event::Checkpoint {
            epoch: value.get("epoch")?.as_u64()? as usize,
            step: value.get("step")?.as_u64()? as usize,
            path: value.get("path")?.as_str()?.to_string(),
        }),
        "rollback" => Some(Event::Rollback { step: value.get("step")?.as_u64()? as usize }),
        _ => None,
    })
}

/// Every event of a finished file, and the number of malformed lines.
pub fn read_all(path: &Path) -> Result<(Vec<Event>, usize), String> {
    let mut r = MetricsReader::new(path);
    let events = r.poll()?;
    r.finish();
    Ok((events, r.malformed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn malformed_and_truncated_lines_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let good = r#"{"kind":"valid","epoch":1,"step":10,"loss":2.5,"ppl":12.2,"bleu":null}"#;
        let train = r#"{"kind":"train","epoch":1,"step":10,"loss":3.0,"tokens":100,"tokens_per_s":50.0,"lr":0.001,"sync":{"count":1,"total_ms":0.1,"max_ms":0.1},"sync_ms":0.1,"steps":10,"wall_s":2.0,"padding_pct":5.0,"data_wait_ms":0.0}"#;
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "{good}\nnot json at all\n{{\"kind\":\"train\",\"epoch\":\"x\"}}\n{train}\n{{\"kind\":\"future\",\"x\":1}}").unwrap();
        write!(f, "{{\"kind\":\"valid\",\"ep").unwrap();
        drop(f);
        let mut r = MetricsReader::new(&path);
        let events = r.poll().unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[1], Event::Window(ref w) if w.step == 10 && w.sentences == 0), "older rows lack the new fields");
        assert_eq!(r.malformed, 2, "bad JSON and a wrong type; the unknown kind is not an error");
        // The cut last line is held back while the run may still be writing it…
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "och\":2,\"step\":20,\"loss\":2.0,\"ppl\":7.4,\"bleu\":1.5}}").unwrap();
        drop(f);
        assert!(matches!(r.poll().unwrap()[..], [Event::Validation(ref v)] if v.step == 20));
        // …and counted once the file is known to be complete.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"kind\":\"tr").unwrap();
        let (all, malformed) = read_all(&path).unwrap();
        assert_eq!((all.len(), malformed), (3, 3));
    }
}
