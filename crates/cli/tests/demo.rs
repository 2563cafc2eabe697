#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `mixnn demo` end to end on a small subset: a local directory, node
//! processes that register there, a cascade drawn from it with three dummy
//! hops, and the result byte-identical to the single-process run.

mod common;
use common::*;

#[test]
fn demo_with_a_directory_and_three_dummies_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join("demo.json");
    let plot = tmp.path().join("figure3.png");
    let out = mixnn()
        .args(["demo", "--data", DATA, "--no-fetch"])
        .args([
            "--train-limit",
            "1000",
            "--test-limit",
            "300",
            "--epochs",
            "2",
        ])
        .args(["--dummies", "3"])
        .arg("--metrics")
        .arg(&metrics)
        .arg("--plot")
        .arg(&plot)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let said = said_ok(&out, "demo");
    assert!(said.contains("byte-identical"), "{said}");
    // 5 real stages and 3 dummies, drawn from the 9 registered nodes.
    assert!(said.contains("9 nodes listed; drew 8 hops"), "{said}");
    assert_eq!(said.matches(", dummy").count(), 3, "{said}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["local"]["weights_sha256"], m["cascade"]["weights_sha256"]);
    for (l, c) in m["local"]["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(m["cascade"]["epochs"].as_array().unwrap())
    {
        assert_eq!(l["test_acc"], c["test_acc"]);
        assert_eq!(l["loss"], c["loss"]);
    }
    assert!(std::fs::metadata(&plot).unwrap().len() > 10_000);
}
