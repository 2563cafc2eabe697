#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The repository's Fashion-MNIST fixture (`fixtures/fashion-mnist`): what
//! its README says it is, and, where the full set is at hand, the start of
//! the full set.

use std::path::Path;

mod common;
use common::*;

#[test]
fn fixture_holds_what_its_readme_says() {
    let dir = Path::new(DATA);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}`")))
            .unwrap_or_else(|| panic!("no row for {name} in the README"));
        let sha = mixnn_model::weights::sha256_hex(&bytes);
        assert!(row.contains(&format!("`{sha}`")), "{name}: {sha} vs {row}");
        let len = format!("| {} |", group(bytes.len()));
        assert!(row.contains(&len), "{name}: {len} vs {row}");
        // gzip header: no time stamp, no file name (cut with `gzip -n`).
        assert_eq!(&bytes[..4], b"\x1f\x8b\x08\x00", "{name}: flags");
        assert_eq!(&bytes[4..8], b"\0\0\0\0", "{name}: time stamp");
    }

    let split = mixnn_model::data::load_dir(dir).unwrap();
    assert_eq!(split.train.len(), DATA_TRAIN);
    assert_eq!(split.test.len(), DATA_TEST);
    for set in [&split.train, &split.test] {
        assert_eq!((set.rows, set.cols), (28, 28));
        let mut per_class = [0usize; 10];
        for &l in &set.labels {
            per_class[usize::from(l)] += 1;
        }
        // Fashion-MNIST is balanced; so are its first images, roughly.
        assert!(
            per_class.iter().all(|&n| n * 20 > set.len()),
            "{per_class:?}"
        );
    }
}

#[test]
fn fixture_is_the_start_of_the_full_set() {
    let full = match full_dataset() {
        Ok(dir) => dir,
        Err(why) => {
            // The fetch test (tests/fetch.rs) makes the same check on the
            // set it downloads, and runs in CI.
            eprintln!("skipped: {why}");
            return;
        }
    };
    assert_fixture_is_the_start_of(&full);
}

/// `1,304,947` for 1304947.
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
