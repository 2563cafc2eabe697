//! House rules that a reviewer would otherwise check by hand: no Rust
//! source file of the workspace over 600 lines unless its module doc says
//! why ("Over 600 lines: …"), as the house style and issue 29 ask.

use std::path::{Path, PathBuf};

const LIMIT: usize = 600;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module doc: the leading `//!` lines (after inner attributes).
fn module_doc(text: &str) -> String {
    text.lines()
        .skip_while(|l| l.starts_with("#!["))
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn long_files_say_why() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&crates, &mut files);
    assert!(files.len() > 100, "found the workspace's sources");
    let silent: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            let n = text.lines().count();
            (n > LIMIT && !module_doc(&text).contains("Over 600 lines:"))
                .then(|| format!("{} ({n} lines)", p.display()))
        })
        .collect();
    assert!(
        silent.is_empty(),
        "files over {LIMIT} lines whose module doc does not say why: {silent:?}"
    );
}

#[test]
fn the_module_doc_is_read_past_inner_attributes() {
    let text = "#![allow(x)]\n//! One.\n//! Over 600 lines: why.\nuse a;\n//! not doc";
    assert_eq!(module_doc(text), "//! One.\n//! Over 600 lines: why.");
}
