//! `mixnn adversary` end to end (`--features adversary`): five `mixnn
//! node --record-tensors` processes train the paper's MLP on the fixture,
//! then the attacks run on what they wrote down. Colluders holding every
//! hop rebuild the designer's model exactly, positions known or not;
//! the first and the last hop together (inputs and labels) get close to
//! it; the report, the tables and the plot are written. The anchors in
//! depth: `crates/integration/tests/extraction.rs`.
#![cfg(feature = "adversary")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

#[test]
fn colluders_with_every_hop_rebuild_the_model_and_the_report_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (json, table, plot) = (
        dir.join("report.json"),
        dir.join("tables.md"),
        dir.join("curve.png"),
    );
    let out = mixnn()
        .args(["--threads", "1", "adversary", "--data", DATA])
        .args([
            "--train-limit",
            "1500",
            "--test-limit",
            "1000",
            "--eval-images",
            "500",
        ])
        .args([
            "--epochs",
            "2",
            "--lr",
            "0.05",
            "--seed",
            "28",
            "--audit-rate",
            "0",
        ])
        .args([
            "--colluders",
            "1,2,3,4,5",
            "--colluders",
            "1,5",
            "--aux",
            "0,300",
        ])
        .args(["--attack-max-steps", "200", "--regress-max-steps", "400"])
        .args(["--invert-images", "32", "--invert-steps", "5"])
        .arg("--json")
        .arg(&json)
        .arg("--table")
        .arg(&table)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    let said = said_ok(&out, "mixnn adversary");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    // 2 sets × 2 kinds of knowledge × 2 auxiliary sizes.
    assert_eq!(rows.len(), 8, "{said}");
    let designer = report["designer_accuracy"].as_f64().unwrap();
    for r in rows {
        let o = &r["outcome"];
        let best = |what: &str| {
            ["warm", "regress", "head"]
                .iter()
                .filter_map(|a| o[a][what].as_f64())
                .fold(0.0, f64::max)
        };
        if o["hops"].as_array().unwrap().len() == 5 {
            assert_eq!(best("agreement"), 1.0, "{o}");
            assert_eq!(best("accuracy"), designer, "{o}");
        } else {
            assert_eq!(o["labels"], "loss_hop", "{o}");
            assert!(o["sees_images"].as_bool().unwrap(), "{o}");
            assert!(best("agreement") > 0.85, "{o}");
        }
    }
    let tables = std::fs::read_to_string(&table).unwrap();
    assert!(tables.contains("| chosen {1, 5} |"), "{tables}");
    assert!(std::fs::read(&plot).unwrap().starts_with(b"\x89PNG"));
}
