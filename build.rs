//! Records the commit kiln is built from (`KILN_COMMIT`, `+dirty` with uncommitted changes to
//! tracked files), for each run's header and `kiln runs`. Outside a git checkout: `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=10", "HEAD"]) {
        Some(hash) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{hash}+dirty") } else { hash }
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=KILN_COMMIT={commit}");
    // A new commit moves HEAD or the branch it names; staging changes the index.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for file in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={dir}/{file}");
        }
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{branch}");
        }
    }
    // An edit to a tracked file makes the build dirty: the sources are watched too (an edit to
    // any of them rebuilds this crate anyway).
    for path in ["src", "crates", "vendor", "xtask", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
