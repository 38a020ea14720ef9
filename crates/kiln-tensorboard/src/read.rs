//! Reads a run's event files back as TensorBoard's `EventAccumulator` would, for kiln's tests and
//! tools: scalars by tag, in step order, with the points a `SessionLog` START drops (those at or
//! past its step, logged before it) dropped.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;

use crate::proto::{Content, Event, What, SESSION_START};
use crate::record::read_records;

/// What a run's event files hold.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Board {
    /// Scalars by tag: (step, value) in the order written, after restarts dropped what they drop.
    pub scalars: BTreeMap<String, Vec<(i64, f32)>>,
    /// Texts by tag: (step, text).
    pub texts: BTreeMap<String, Vec<(i64, String)>>,
    /// `SessionLog` START records seen (a resume or a rollback each).
    pub restarts: usize,
}

/// Reads every `events.out.tfevents.*` file of `dir` in name order.
pub fn read_dir(dir: &Path) -> Result<Board, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents.")))
        .collect();
    files.sort();
    let mut board = Board::default();
    for path in files {
        let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for record in read_records(&mut file).map_err(|e| format!("{}: {e}", path.display()))? {
            let event = Event::decode(record.as_slice()).map_err(|e| format!("{}: not an Event: {e}", path.display()))?;
            match event.what {
                Some(What::SessionLog(log)) if log.status == SESSION_START => {
                    board.restarts += 1;
                    for points in board.scalars.values_mut() {
                        points.retain(|(step, _)| *step < event.step);
                    }
                    for points in board.texts.values_mut() {
                        points.retain(|(step, _)| *step < event.step);
                    }
                }
                Some(What::Summary(summary)) => {
                    for value in summary.value {
                        match value.content {
                            Some(Content::SimpleValue(x)) => board.scalars.entry(value.tag).or_default().push((event.step, x)),
                            Some(Content::Tensor(t)) => {
                                let text = t.string_val.first().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                                board.texts.entry(value.tag).or_default().push((event.step, text));
                            }
                            None => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(board)
}
