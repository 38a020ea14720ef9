//! The token store: a prepared dataset as one memory-mapped file, read where it lies.
//!
//! As fairseq's `mmap` datasets and nanoGPT's `train.bin`, token ids of a split lie contiguous on
//! disk, 16 bits wide when the vocabulary fits (else 32), with an index of `u64` offsets: sequence
//! `k` is `ids[offsets[k] .. offsets[k+1]]`. Sentence pairs are two such tables (sources and
//! targets), a text corpus one flat stream per split. Nothing is decoded into per-example heap
//! objects: batching reads lengths from the offsets and ids from the mapped pages, which the
//! kernel may drop and re-read at will (they do not count toward anonymous memory).
//!
//! File layout, inside the cache's container (`cache::seal`'s header, payload, BLAKE3 checksum):
//! the payload is `[meta length: u64][meta: JSON][padding][sections]`, every section starting at
//! a multiple of 8 bytes of the file so the mapped bytes can be viewed as `u16` / `u32` / `u64`
//! in place (little-endian: kiln's targets). The meta holds the tokenizer, the counters, the
//! held-out sets' text (small, needed for BLEU) and the table of sections.
//!
//! The store is written while the corpus is encoded: each section goes to its own temporary file
//! as ids arrive, and `finish` joins them into the entry (header, meta, sections, checksum), so
//! preparing never holds a split in memory. `bytemuck` views the aligned bytes; the alignment and
//! every section's bounds are checked when a store is opened, before any view exists.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::{CacheKey, CHECKSUM_LEN, HEADER_LEN};
use crate::prepare::Example;

/// Bytes a token id takes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Width {
    U16,
    U32,
}

impl Width {
    /// The narrowest width that holds every id of a vocabulary of `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Width {
        if vocab_size <= 1 << 16 { Width::U16 } else { Width::U32 }
    }
    pub fn bytes(self) -> usize {
        match self {
            Width::U16 => 2,
            Width::U32 => 4,
        }
    }
}

/// Where a store's bytes live: a mapped file, or (small sets made in memory) a buffer of `u64`s,
/// which gives the same 8-byte alignment.
enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u64>),
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Mapped(m) => write!(f, "Mapped({} bytes)", m.len()),
            Backing::Owned(v) => write!(f, "Owned({} bytes)", v.len() * 8),
        }
    }
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => bytemuck::cast_slice(v),
        }
    }

    fn pack<T: bytemuck::Pod>(items: &[T]) -> Arc<Backing> {
        let bytes: &[u8] = bytemuck::cast_slice(items);
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Arc::new(Backing::Owned(words))
    }
}

/// Token ids, borrowed from a store at its width. Equal when the ids are, whatever the widths.
#[derive(Debug, Clone, Copy)]
pub enum Ids<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl PartialEq for Ids<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<'a> Ids<'a> {
    pub fn len(&self) -> usize {
        match self {
            Ids::U16(s) => s.len(),
            Ids::U32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Ids::U16(s) => u32::from(s[i]),
            Ids::U32(s) => s[i],
        }
    }
    pub fn slice(&self, r: Range<usize>) -> Ids<'a> {
        match self {
            Ids::U16(s) => Ids::U16(&s[r]),
            Ids::U32(s) => Ids::U32(&s[r]),
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        let (a, b) = match *self {
            Ids::U16(s) => (Some(s.iter().map(|&x| u32::from(x))), None),
            Ids::U32(s) => (None, Some(s.iter().copied())),
        };
        a.into_iter().flatten().chain(b.into_iter().flatten())
    }
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }
    /// The largest id, if any.
    pub fn max(&self) -> Option<u32> {
        match self {
            Ids::U16(s) => s.iter().max().map(|&x| u32::from(x)),
            Ids::U32(s) => s.iter().max().copied(),
        }
    }
}

/// A flat array of token ids (a text split's stream, or the ids under a table of sequences).
#[derive(Clone)]
pub struct Tokens {
    backing: Arc<Backing>,
    /// Byte offset of the first id in `backing`.
    start: usize,
    len: usize,
    width: Width,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} × {:?})", self.len, self.width)
    }
}

impl PartialEq for Tokens {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.ids().iter().eq(other.ids().iter())
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::from_ids(&[])
    }
}

impl Tokens {
    /// Ids held in memory (tests, small sets), at the narrowest width that holds them.
    pub fn from_ids(ids: &[u32]) -> Tokens {
        if ids.iter().all(|&i| i <= u32::from(u16::MAX)) {
            let narrow: Vec<u16> = ids.iter().map(|&i| i as u16).collect();
            Tokens { backing: Backing::pack(&narrow), start: 0, len: ids.len(), width: Width::U16 }
        } else {
            Tokens { backing: Backing::pack(ids), start: 0, len: ids.len(), width: Width::U32 }
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn width(&self) -> Width {
        self.width
    }
    pub fn ids(&self) -> Ids<'_> {
        let bytes = &self.backing.bytes()[self.start..self.start + self.len * self.width.bytes()];
        // Alignment and bounds were checked when the store was opened (or the buffer was made).
        match self.width {
            Width::U16 => Ids::U16(bytemuck::cast_slice(bytes)),
            Width::U32 => Ids::U32(bytemuck::cast_slice(bytes)),
        }
    }
    pub fn get(&self, i: usize) -> u32 {
        self.ids().get(i)
    }
}

/// A table of sequences: `ids` and `count + 1` offsets into them.
#[derive(Clone, Debug)]
pub struct Sequences {
    ids: Tokens,
    offsets: Arc<Backing>,
    offsets_start: usize,
    count: usize,
}

impl Sequences {
    fn from_vecs(seqs: impl Iterator<Item = Vec<u32>> + Clone) -> Sequences {
        let mut offsets = vec![0u64];
        let mut flat = Vec::new();
        for s in seqs {
            flat.extend_from_slice(&s);
            offsets.push(flat.len() as u64);
        }
        let count = offsets.len() - 1;
        Sequences { ids: Tokens::from_ids(&flat), offsets: Backing::pack(&offsets), offsets_start: 0, count }
    }
    fn offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.offsets.bytes()[self.offsets_start..self.offsets_start + (self.count + 1) * 8])
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Length of sequence `i`, from the index alone.
    pub fn len_of(&self, i: usize) -> usize {
        let o = self.offsets();
        (o[i + 1] - o[i]) as usize
    }
    pub fn get(&self, i: usize) -> Ids<'_> {
        let o = self.offsets();
        self.ids.ids().slice(o[i] as usize..o[i + 1] as usize)
    }
    /// All ids of the table, in order.
    pub fn tokens(&self) -> &Tokens {
        &self.ids
    }
    /// Offsets start at 0, never decrease and end at the ids' count: what `get` relies on.
    fn check(&self) -> Result<(), String> {
        let o = self.offsets();
        if o[0] != 0 || o[self.count] != self.ids.len() as u64 || o.windows(2).any(|w| w[1] < w[0]) {
            return Err("an offsets index does not describe its ids".into());
        }
        Ok(())
    }
}

/// Sentence pairs: token ids of sources and targets, without specials.
#[derive(Clone, Debug)]
pub struct PairSet {
    pub src: Sequences,
    pub tgt: Sequences,
}

impl Default for PairSet {
    fn default() -> Self {
        PairSet::from_examples(&[])
    }
}

impl PartialEq for PairSet {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && (0..self.len()).all(|i| self.src(i) == other.src(i) && self.tgt(i) == other.tgt(i))
    }
}

impl PairSet {
    /// Pairs held in memory (tests, resampled epochs).
    pub fn from_examples(examples: &[Example]) -> PairSet {
        PairSet {
            src: Sequences::from_vecs(examples.iter().map(|e| e.src.clone())),
            tgt: Sequences::from_vecs(examples.iter().map(|e| e.tgt.clone())),
        }
    }
    pub fn len(&self) -> usize {
        self.src.len()
    }
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }
    pub fn src(&self, i: usize) -> Ids<'_> {
        self.src.get(i)
    }
    pub fn tgt(&self, i: usize) -> Ids<'_> {
        self.tgt.get(i)
    }
    /// (source, target) lengths of pair `i` without specials, from the index alone.
    pub fn lengths(&self, i: usize) -> (usize, usize) {
        (self.src.len_of(i), self.tgt.len_of(i))
    }
    /// Pair `i` copied out (for the few places that change ids).
    pub fn example(&self, i: usize) -> Example {
        Example { src: self.src(i).to_vec(), tgt: self.tgt(i).to_vec() }
    }
}

/// Pairs as batching reads them: a store's [`PairSet`], or examples in memory.
pub trait PairIds: Send + Sync {
    fn pair_count(&self) -> usize;
    fn src_ids(&self, i: usize) -> Ids<'_>;
    fn tgt_ids(&self, i: usize) -> Ids<'_>;
    /// (source, target) lengths of pair `i`, without specials.
    fn pair_lengths(&self, i: usize) -> (usize, usize) {
        (self.src_ids(i).len(), self.tgt_ids(i).len())
    }
}

impl PairIds for PairSet {
    fn pair_count(&self) -> usize {
        self.len()
    }
    /// From the offsets alone: planning an epoch reads no ids.
    fn pair_lengths(&self, i: usize) -> (usize, usize) {
        self.lengths(i)
    }
    fn src_ids(&self, i: usize) -> Ids<'_> {
        self.src(i)
    }
    fn tgt_ids(&self, i: usize) -> Ids<'_> {
        self.tgt(i)
    }
}

impl<T: PairIds + ?Sized> PairIds for Arc<T> {
    fn pair_count(&self) -> usize {
        (**self).pair_count()
    }
    fn pair_lengths(&self, i: usize) -> (usize, usize) {
        (**self).pair_lengths(i)
    }
    fn src_ids(&self, i: usize) -> Ids<'_> {
        (**self).src_ids(i)
    }
    fn tgt_ids(&self, i: usize) -> Ids<'_> {
        (**self).tgt_ids(i)
    }
}

impl PairIds for [Example] {
    fn pair_count(&self) -> usize {
        self.len()
    }
    fn src_ids(&self, i: usize) -> Ids<'_> {
        Ids::U32(&self[i].src)
    }
    fn tgt_ids(&self, i: usize) -> Ids<'_> {
        Ids::U32(&self[i].tgt)
    }
}

impl PairIds for Vec<Example> {
    fn pair_count(&self) -> usize {
        self.len()
    }
    fn src_ids(&self, i: usize) -> Ids<'_> {
        Ids::U32(&self[i].src)
    }
    fn tgt_ids(&self, i: usize) -> Ids<'_> {
        Ids::U32(&self[i].tgt)
    }
}

// ---- the file -------------------------------------------------------------------------------

/// A section of the file: a flat array of `elem`-byte items at `offset` (from the data start).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct SectionMeta {
    name: String,
    offset: u64,
    bytes: u64,
    elem: u8,
}

/// Held-out text, for BLEU.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldOutText {
    pub sources: Vec<String>,
    pub references: Vec<String>,
}

/// Everything a store says besides its ids.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreMeta {
    /// "pairs" or "text".
    pub kind: String,
    pub width: Option<Width>,
    pub tokenizer_json: String,
    pub skipped_lines: u64,
    pub dropped_long: u64,
    /// Held-out splits' text by split name (pairs corpora).
    pub held_out: Vec<(String, HeldOutText)>,
    /// Tokens that are `<unk>` (characters the tokenizer has no token for), every split.
    #[serde(default)]
    pub unknown_tokens: u64,
    /// Characters (after NFC, a line's break counted as one) of text streams by split name
    /// (`valid`, `test`), for the loss per character.
    #[serde(default)]
    pub chars: Vec<(String, u64)>,
    pub(crate) sections: Vec<SectionMeta>,
}

/// An open store: its meta and its mapped bytes.
pub struct Store {
    pub meta: StoreMeta,
    backing: Arc<Backing>,
    data_start: usize,
    width: Width,
}

fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

impl Store {
    /// Checks an entry's bytes (container, checksum, meta, every section's bounds and alignment).
    /// `key` = None accepts any key (for `cache verify`).
    pub fn open_map(map: memmap2::Mmap, key: Option<&CacheKey>) -> Result<(CacheKey, Store), String> {
        let (stored_key, _) = crate::cache::unseal(crate::cache::MAGIC, crate::cache::FORMAT_VERSION, &map, key).map_err(|e| e.0)?;
        let store = Store::parse(Arc::new(Backing::Mapped(map)), HEADER_LEN)?;
        Ok((stored_key, store))
    }

    fn parse(backing: Arc<Backing>, payload_at: usize) -> Result<Store, String> {
        let bytes = backing.bytes();
        let end = bytes.len() - CHECKSUM_LEN;
        let meta_len = bytes.get(payload_at..payload_at + 8).ok_or("payload ends early")?;
        let meta_len = u64::from_le_bytes(meta_len.try_into().unwrap());
        let meta_end = (payload_at as u64).checked_add(8).and_then(|n| n.checked_add(meta_len)).filter(|&n| n <= end as u64).ok_or("meta length exceeds the payload")?;
        let meta: StoreMeta = serde_json::from_slice(&bytes[payload_at + 8..meta_end as usize]).map_err(|e| format!("unreadable meta: {e}"))?;
        let data_start = align8(meta_end);
        let width = meta.width.unwrap_or(Width::U32);
        let mut expected_end = data_start;
        for s in &meta.sections {
            let at = data_start.checked_add(s.offset).ok_or("section offset overflows")?;
            let stop = at.checked_add(s.bytes).ok_or("section length overflows")?;
            let elem_ok = match s.elem {
                2 | 4 => s.elem as usize == width.bytes(),
                8 => true,
                _ => false,
            };
            if stop > end as u64 || at % 8 != 0 || s.bytes % u64::from(s.elem.max(1)) != 0 || !elem_ok {
                return Err(format!("section {} lies outside the payload or is misaligned", s.name));
            }
            expected_end = expected_end.max(align8(stop));
        }
        if expected_end != end as u64 {
            return Err("trailing bytes in payload".into());
        }
        Ok(Store { meta, backing, data_start: data_start as usize, width })
    }

    fn section(&self, name: &str) -> Result<&SectionMeta, String> {
        self.meta.sections.iter().find(|s| s.name == name).ok_or_else(|| format!("section {name} is missing"))
    }

    /// A flat id section.
    pub fn tokens(&self, name: &str) -> Result<Tokens, String> {
        let s = self.section(name)?;
        if s.elem as usize != self.width.bytes() {
            return Err(format!("section {name} holds no token ids"));
        }
        Ok(Tokens { backing: Arc::clone(&self.backing), start: self.data_start + s.offset as usize, len: (s.bytes / u64::from(s.elem)) as usize, width: self.width })
    }

    /// A table of sequences: sections `<name>.ids` and `<name>.offsets`, checked.
    pub fn sequences(&self, name: &str) -> Result<Sequences, String> {
        let ids = self.tokens(&format!("{name}.ids"))?;
        let o = self.section(&format!("{name}.offsets"))?;
        if o.elem != 8 || o.bytes < 8 {
            return Err(format!("section {name}.offsets is not an offsets index"));
        }
        let seqs = Sequences { ids, offsets: Arc::clone(&self.backing), offsets_start: self.data_start + o.offset as usize, count: (o.bytes / 8 - 1) as usize };
        seqs.check().map_err(|why| format!("{name}: {why}"))?;
        Ok(seqs)
    }

    pub fn pairs(&self, name: &str) -> Result<PairSet, String> {
        let set = PairSet { src: self.sequences(&format!("{name}.src"))?, tgt: self.sequences(&format!("{name}.tgt"))? };
        if set.src.len() != set.tgt.len() {
            return Err(format!("{name}: {} sources but {} targets", set.src.len(), set.tgt.len()));
        }
        Ok(set)
    }

    pub fn width(&self) -> Width {
        self.width
    }

    /// Bytes of token ids and of offsets, for reports.
    pub fn sizes(&self) -> (u64, u64) {
        self.meta.sections.iter().fold((0, 0), |(ids, offs), s| if s.elem == 8 { (ids, offs + s.bytes) } else { (ids + s.bytes, offs) })
    }
}

/// One section being written: a temporary file next to the entry.
struct SectionFile {
    name: String,
    elem: u8,
    path: PathBuf,
    file: BufWriter<File>,
    bytes: u64,
}

/// A table of sequences being written.
pub struct SeqWriter {
    ids: usize,
    offsets: usize,
    end: u64,
}

/// Writes a store section by section while the corpus is encoded; `finish` makes the entry.
/// Temporary files left by an error are removed on drop.
pub struct StoreWriter {
    dir: PathBuf,
    stem: String,
    width: Width,
    sections: Vec<SectionFile>,
    finished: bool,
}

impl StoreWriter {
    pub fn new(dir: &Path, key: &CacheKey, width: Width) -> Result<StoreWriter, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create cache directory: {e}", dir.display()))?;
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Ok(StoreWriter { dir: dir.to_path_buf(), stem: format!(".{}.{}.{nonce}", key.hex(), std::process::id()), width, sections: Vec::new(), finished: false })
    }

    pub fn width(&self) -> Width {
        self.width
    }

    fn add(&mut self, name: &str, elem: u8) -> Result<usize, String> {
        let path = self.dir.join(format!("{}.{name}.part", self.stem));
        let file = File::create(&path).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
        self.sections.push(SectionFile { name: name.to_string(), elem, path, file: BufWriter::with_capacity(1 << 20, file), bytes: 0 });
        Ok(self.sections.len() - 1)
    }

    fn write(&mut self, section: usize, bytes: &[u8]) -> Result<(), String> {
        let s = &mut self.sections[section];
        s.bytes += bytes.len() as u64;
        s.file.write_all(bytes).map_err(|e| format!("{}: cannot write: {e}", s.path.display()))
    }

    fn write_ids(&mut self, section: usize, ids: &[u32]) -> Result<(), String> {
        match self.width {
            Width::U32 => self.write(section, bytemuck::cast_slice(ids)),
            Width::U16 => {
                let narrow: Vec<u16> = ids.iter().map(|&i| u16::try_from(i)).collect::<Result<_, _>>().map_err(|_| "a token id does not fit the store's 16-bit width".to_string())?;
                self.write(section, bytemuck::cast_slice(&narrow))
            }
        }
    }

    /// A flat id section (a text stream); returns its handle for [`StoreWriter::append`].
    pub fn flat(&mut self, name: &str) -> Result<usize, String> {
        let elem = self.width.bytes() as u8;
        self.add(name, elem)
    }

    pub fn append(&mut self, section: usize, ids: &[u32]) -> Result<(), String> {
        self.write_ids(section, ids)
    }

    /// A table of sequences named `name` (`<name>.ids`, `<name>.offsets`).
    pub fn table(&mut self, name: &str) -> Result<SeqWriter, String> {
        let elem = self.width.bytes() as u8;
        let ids = self.add(&format!("{name}.ids"), elem)?;
        let offsets = self.add(&format!("{name}.offsets"), 8)?;
        self.write(offsets, &0u64.to_le_bytes())?;
        Ok(SeqWriter { ids, offsets, end: 0 })
    }

    pub fn push(&mut self, table: &mut SeqWriter, ids: &[u32]) -> Result<(), String> {
        self.write_ids(table.ids, ids)?;
        table.end += ids.len() as u64;
        self.write(table.offsets, &table.end.to_le_bytes())
    }

    /// Joins the sections into the entry at `path` (temporary file, fsync, rename) and opens it.
    pub fn finish(mut self, mut meta: StoreMeta, key: &CacheKey, path: &Path) -> Result<(PathBuf, Store), String> {
        meta.width = Some(self.width);
        let mut offset = 0u64;
        meta.sections = Vec::new();
        for s in &mut self.sections {
            s.file.flush().map_err(|e| format!("{}: cannot write: {e}", s.path.display()))?;
            meta.sections.push(SectionMeta { name: s.name.clone(), offset, bytes: s.bytes, elem: s.elem });
            offset = align8(offset + s.bytes);
        }
        let meta_json = serde_json::to_vec(&meta).map_err(|e| format!("cannot encode the store's meta: {e}"))?;
        let meta_end = HEADER_LEN as u64 + 8 + meta_json.len() as u64;
        let data_start = align8(meta_end);
        let payload_len = data_start + offset - HEADER_LEN as u64;

        let tmp = self.dir.join(format!("{}.tmp", self.stem));
        let result = (|| -> std::io::Result<()> {
            let mut out = HashingWriter { file: BufWriter::with_capacity(1 << 20, File::create(&tmp)?), hash: blake3::Hasher::new() };
            out.put(crate::cache::MAGIC)?;
            out.put(&crate::cache::FORMAT_VERSION.to_le_bytes())?;
            out.put(&key.0)?;
            out.put(&payload_len.to_le_bytes())?;
            out.put(&(meta_json.len() as u64).to_le_bytes())?;
            out.put(&meta_json)?;
            out.put(&vec![0u8; (data_start - meta_end) as usize])?;
            let mut buf = vec![0u8; 1 << 20];
            for s in &self.sections {
                let mut f = File::open(&s.path)?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.put(&buf[..n])?;
                }
                out.put(&vec![0u8; (align8(s.bytes) - s.bytes) as usize])?;
            }
            let sum = out.hash.finalize();
            out.file.write_all(sum.as_bytes())?;
            let file = out.file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        self.remove_parts();
        self.finished = true;
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: cannot write cache entry: {e}", path.display())
        })?;
        let map = crate::cache::map_entry(path)?.ok_or_else(|| format!("{}: vanished after writing", path.display()))?;
        let (_, store) = Store::open_map(map, Some(key)).map_err(|why| format!("{}: {why}", path.display()))?;
        Ok((path.to_path_buf(), store))
    }

    fn remove_parts(&mut self) {
        for s in &self.sections {
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.remove_parts();
        }
    }
}

struct HashingWriter {
    file: BufWriter<File>,
    hash: blake3::Hasher,
}

impl HashingWriter {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.file.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(a: &[u32], b: &[u32]) -> Example {
        Example { src: a.to_vec(), tgt: b.to_vec() }
    }

    #[test]
    fn written_tables_read_back_in_place_at_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for (width, big) in [(Width::U16, 65_535u32), (Width::U32, 70_000)] {
            let key = CacheKey([width.bytes() as u8; 32]);
            let mut w = StoreWriter::new(dir.path(), &key, width).unwrap();
            let mut t = w.table("train.src").unwrap();
            let mut u = w.table("train.tgt").unwrap();
            let stream = w.flat("text").unwrap();
            let pairs = [ex(&[5, 6, big], &[7]), ex(&[], &[9, 10, 11]), ex(&[8], &[])];
            for p in &pairs {
                w.push(&mut t, &p.src).unwrap();
                w.push(&mut u, &p.tgt).unwrap();
            }
            w.append(stream, &[1, 2, 3]).unwrap();
            let meta = StoreMeta { kind: "pairs".into(), tokenizer_json: "{}".into(), held_out: vec![("valid".into(), HeldOutText { sources: vec!["a".into()], references: vec!["b".into()] })], ..Default::default() };
            let path = dir.path().join(format!("{}.kds", key.hex()));
            let (_, store) = w.finish(meta.clone(), &key, &path).unwrap();
            assert_eq!(store.width(), width);
            let set = store.pairs("train").unwrap();
            assert_eq!(set, PairSet::from_examples(&pairs));
            assert_eq!(set.lengths(1), (0, 3));
            assert_eq!(set.src(0).to_vec(), vec![5, 6, big]);
            assert_eq!(store.tokens("text").unwrap().ids().to_vec(), vec![1, 2, 3]);
            assert_eq!(store.meta.held_out, meta.held_out);
            // Only the entry is left: the parts and the temporary file are gone.
            let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            assert!(names.iter().all(|n| !n.ends_with(".part") && !n.ends_with(".tmp")), "{names:?}");
        }
    }

    /// An offsets index that does not describe its ids, under a valid checksum, is refused when
    /// the store is opened (before any view could read past its ids).
    #[test]
    fn a_resealed_store_with_bad_offsets_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey([4; 32]);
        let mut w = StoreWriter::new(dir.path(), &key, Width::U16).unwrap();
        let mut t = w.table("train.src").unwrap();
        let mut u = w.table("train.tgt").unwrap();
        w.push(&mut t, &[5, 6]).unwrap();
        w.push(&mut u, &[7]).unwrap();
        let path = dir.path().join("e.kds");
        let (_, store) = w.finish(StoreMeta { kind: "pairs".into(), ..Default::default() }, &key, &path).unwrap();
        let offsets = store.meta.sections.iter().find(|s| s.name == "train.src.offsets").unwrap().offset as usize + store.data_start;
        drop(store);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offsets + 8] = 9; // the end offset: 9 ids where there are 2
        let body = bytes.len() - CHECKSUM_LEN;
        let sum = *blake3::hash(&bytes[..body]).as_bytes();
        bytes[body..].copy_from_slice(&sum);
        std::fs::write(&path, &bytes).unwrap();
        let map = crate::cache::map_entry(&path).unwrap().unwrap();
        let (_, store) = Store::open_map(map, Some(&key)).unwrap();
        assert_eq!(store.pairs("train").unwrap_err(), "train.src: an offsets index does not describe its ids");
    }

    #[test]
    fn a_narrow_store_refuses_a_wide_id_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey([1; 32]);
        {
            let mut w = StoreWriter::new(dir.path(), &key, Width::U16).unwrap();
            let s = w.flat("x").unwrap();
            assert!(w.append(s, &[70_000]).unwrap_err().contains("16-bit"));
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "dropped writer removed its parts");
    }

    #[test]
    fn in_memory_sets_choose_their_width() {
        assert_eq!(Tokens::from_ids(&[1, 65_535]).width(), Width::U16);
        assert_eq!(Tokens::from_ids(&[1, 65_536]).width(), Width::U32);
        assert_eq!(Tokens::from_ids(&[3, 65_536]).ids().to_vec(), vec![3, 65_536]);
        assert_eq!(Width::for_vocab(65_536), Width::U16);
        assert_eq!(Width::for_vocab(65_537), Width::U32);
    }
}
