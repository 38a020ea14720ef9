//! `data.train`: one training corpus, or several mixed into every epoch.
//!
//! ```toml
//! train = "clean.tsv"                                   # one corpus, as always
//! train = ["clean.tsv", "in-domain.tsv"]                # several, each seen once per epoch
//! train = [{ path = "clean.tsv" },                      # several with weights: pairs of a
//!          { path = "back-translated.tsv", weight = 0.5 },  # corpus are seen `weight` times
//!          { path = "in-domain.tsv", weight = 3, swap = true }]  # per epoch on average
//! ```
//!
//! The first corpus is the main one: held-out sets are carved from it (unless `data.valid` is
//! set) and the tokenizer is trained on it, so adding or reweighting another corpus changes
//! neither and reuses every cached entry. `data.temperature` > 0 replaces the weights with
//! sampling ∝ size^(1/T) over the same number of pairs per epoch (fairseq's and XLM's
//! temperature sampling: T = 1 is plain concatenation, larger T evens the corpora out).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One training corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    pub path: PathBuf,
    /// Times each pair is seen per epoch on average: 1 = once, 0.5 = half the pairs (drawn anew
    /// every epoch), 3 = three times.
    #[serde(default = "one")]
    pub weight: f64,
    /// Column 2 → column 1 for this corpus (default: `data.swap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<bool>,
}

fn one() -> f64 {
    1.0
}

impl TrainFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TrainFile { path: path.into(), weight: 1.0, swap: None }
    }
}

/// The training corpora, main one first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainFiles(pub Vec<TrainFile>);

impl TrainFiles {
    /// The main corpus (empty path when none is set).
    pub fn main(&self) -> &Path {
        self.0.first().map_or(Path::new(""), |f| f.path.as_path())
    }
    /// The corpora after the main one.
    pub fn extra(&self) -> &[TrainFile] {
        self.0.get(1..).unwrap_or(&[])
    }
    pub fn files(&self) -> &[TrainFile] {
        &self.0
    }
    pub fn files_mut(&mut self) -> &mut [TrainFile] {
        &mut self.0
    }
    pub fn is_empty(&self) -> bool {
        self.main().as_os_str().is_empty()
    }
    /// Several corpora are mixed, or the main one is reweighted.
    pub fn is_mix(&self) -> bool {
        self.0.len() > 1 || self.0.first().is_some_and(|f| f.weight != 1.0)
    }
}

impl From<PathBuf> for TrainFiles {
    fn from(path: PathBuf) -> Self {
        if path.as_os_str().is_empty() { TrainFiles(Vec::new()) } else { TrainFiles(vec![TrainFile::new(path)]) }
    }
}

impl From<&Path> for TrainFiles {
    fn from(path: &Path) -> Self {
        path.to_path_buf().into()
    }
}

impl Serialize for TrainFiles {
    /// A plain corpus stays a string, so recipes written by kiln read as before.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [] => s.serialize_str(""),
            [f] if f.weight == 1.0 && f.swap.is_none() => f.path.serialize(s),
            files => files.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TrainFiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Entry {
            Path(PathBuf),
            File(TrainFile),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(PathBuf),
            Many(Vec<Entry>),
        }
        let form = Form::deserialize(d).map_err(|_| serde::de::Error::custom("expected a path, or a list of paths or of { path, weight, swap } tables"))?;
        Ok(match form {
            Form::One(p) => p.into(),
            Form::Many(entries) => TrainFiles(
                entries
                    .into_iter()
                    .map(|e| match e {
                        Entry::Path(p) => TrainFile::new(p),
                        Entry::File(f) => f,
                    })
                    .collect(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Holder {
        train: TrainFiles,
    }

    fn read(text: &str) -> Result<TrainFiles, String> {
        toml::from_str::<Holder>(text).map(|h| h.train).map_err(|e| e.to_string())
    }

    #[test]
    fn one_path_several_paths_or_tables() {
        assert_eq!(read("train = \"a.tsv\"").unwrap(), TrainFiles(vec![TrainFile::new("a.tsv")]));
        assert_eq!(read("train = [\"a.tsv\", \"b.tsv\"]").unwrap().0.len(), 2);
        let mixed = read("train = [\"a.tsv\", { path = \"b.tsv\", weight = 0.5, swap = true }]").unwrap();
        assert_eq!(mixed.main(), Path::new("a.tsv"));
        assert_eq!(mixed.extra(), &[TrainFile { path: "b.tsv".into(), weight: 0.5, swap: Some(true) }]);
        assert!(mixed.is_mix());
        assert!(read("train = 3").unwrap_err().contains("expected a path, or a list"));
        assert!(read("train = [{ path = \"b.tsv\", wieght = 2 }]").is_err(), "unknown keys are refused");
        // Written back as read: a plain corpus stays a string.
        for text in ["train = \"a.tsv\"\n", "train = [\"a.tsv\", { path = \"b.tsv\", weight = 0.5, swap = true }]"] {
            let files = read(text).unwrap();
            let again = toml::to_string(&Holder { train: files.clone() }).unwrap();
            assert_eq!(read(&again).unwrap(), files, "{again}");
        }
        assert_eq!(toml::to_string(&Holder { train: TrainFiles::from(PathBuf::from("a.tsv")) }).unwrap(), "train = \"a.tsv\"\n");
    }
}
