//! Fingerprints the code that turns text into tokens, for the dataset cache key: a hash of this
//! crate's sources and the locked `tokenizers` version. A change to either misses the cache, so a
//! cache entry can never outlive the code that made it.

use std::path::Path;

fn main() {
    // Cargo's value at run time: the path compiled in is that of whichever checkout first built
    // this script, which a target folder shared between checkouts reuses.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for build scripts");
    let dir = Path::new(&manifest);
    let mut files: Vec<_> = std::fs::read_dir(dir.join("src"))
        .expect("src exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    // FNV-1a over file names and contents: simple and stable across Rust versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        feed(f.file_name().unwrap().to_string_lossy().as_bytes());
        feed(&std::fs::read(f).expect("source readable"));
    }
    let lock = dir.join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let tokenizers = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|text| {
            let mut lines = text.lines();
            while let Some(l) = lines.next() {
                if l.trim() == "name = \"tokenizers\"" {
                    return lines.next().map(|v| v.trim().to_string());
                }
            }
            None
        })
        .unwrap_or_else(|| "unknown".into());
    feed(tokenizers.as_bytes());
    println!("cargo:rustc-env=KILN_DATA_CODE_HASH={h:016x}");
    println!("cargo:rustc-env=KILN_TOKENIZERS_VERSION={tokenizers}");
}
