#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `mixnn bench paper` as a user runs it, on a small subset: the JSON, the
//! PNGs and the table are written, and every cascade run is byte-identical
//! to the single-process run. With root and `ip`, also on the emulated WAN
//! (network namespaces, 1 ms round trips): the measured round trip, and
//! nothing left behind afterwards, also after Ctrl-C.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository's fixture (`fixtures/fashion-mnist/README.md`).
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist");

fn mixnn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mixnn"));
    c.env_remove("RUST_LOG").env_remove("MIXNN_DATA");
    c
}

/// `mixnn bench paper` on `train` training and 200 test images, 1 epoch
/// unless `extra` says `--epochs`.
fn bench_paper(out: &Path, train: &str, extra: &[&str]) -> Command {
    let mut c = mixnn();
    c.args(["bench", "paper", "--data", DATA, "--no-fetch"])
        .args(["--train-limit", train, "--test-limit", "200"]);
    if !extra.contains(&"--epochs") {
        c.args(["--epochs", "1"]);
    }
    c.arg("--out").arg(out).args(extra).stdin(Stdio::null());
    c
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn results(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

/// Every run in `results` is complete and the cascade equals the single
/// process bit for bit.
fn assert_identical_runs(results: &Value, expect: usize) {
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), expect, "{results}");
    for run in runs {
        assert_eq!(run["weights_identical"], true, "{run}");
        assert_eq!(run["accuracy_identical"], true, "{run}");
        let sha = run["local"]["weights_sha256"].as_str().unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(run["cascade"]["weights_sha256"], sha);
        for side in ["local", "cascade"] {
            let epochs = run[side]["epochs"].as_array().unwrap();
            assert_eq!(epochs.len(), 1);
            assert!(epochs[0]["train_s"].as_f64().unwrap() > 0.0);
            assert!(epochs[0]["test_acc"].as_f64().unwrap() > 0.0);
        }
        let (l, c) = (
            run["local_median_train_s"].as_f64().unwrap(),
            run["cascade_median_train_s"].as_f64().unwrap(),
        );
        assert!((run["ratio"].as_f64().unwrap() - c / l).abs() < 1e-9);
        assert!(run["figure3"].as_str().unwrap().ends_with(".png"));
    }
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
        .unwrap_or(false)
}

#[test]
fn bench_paper_on_loopback_writes_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let stdout = ok(&bench_paper(&out, "1000", &["--ks", "1,2"])
        .output()
        .unwrap());
    assert!(stdout.contains("| RTT |"), "{stdout}");
    let r = results(&out);
    assert_identical_runs(&r, 2);
    assert_eq!(r["train_images"], 1000);
    assert_eq!(r["test_images"], 200);
    assert_eq!(r["remote_stages"], 5);
    assert!(r["command"].as_str().unwrap().contains("bench paper"));
    let runs = r["runs"].as_array().unwrap();
    for (run, k) in runs.iter().zip([1, 2]) {
        assert_eq!(run["rtt_ms"], 0.0);
        assert_eq!(run["micro_batches"], k);
        assert!(run["measured_rtt_ms"].is_null());
        assert!(is_png(&out.join(format!("figure3-rtt0-k{k}.png"))));
        assert!(is_png(&out.join(format!("ratio-vs-rtt-k{k}.png"))));
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert_eq!(table.matches("\n| 0 |").count(), 2, "{table}");
}

#[test]
fn bench_paper_rejects_a_bad_rtt() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench_paper(dir.path(), "100", &["--rtt", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--rtt: \"soon\""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Why the namespace tests cannot run here, if they cannot.
fn netns_unavailable() -> Option<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Some("not root");
    }
    let ip = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(ip, Ok(s) if s.success()) {
        return Some("`ip netns` does not work here");
    }
    None
}

#[test]
fn bench_paper_rtt_without_root_is_one_clear_error() {
    if netns_unavailable() != Some("not root") {
        eprintln!("skipped: runs as root, so --rtt is allowed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bench_paper(dir.path(), "100", &["--rtt", "1ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: --rtt needs root (network namespaces); run as root or use --rtt 0"
    );
}

/// Names of the namespaces, bridge and veths of `mixnn` process `pid`.
fn leftovers(pid: u32) -> Vec<String> {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&ns.stdout).into_owned() + &String::from_utf8_lossy(&links.stdout);
    let names = [
        format!("mixnn-{pid}-"),
        format!("mxb{pid}"),
        format!("mxv{pid}n"),
    ];
    text.lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .map(str::to_string)
        .collect()
}

#[test]
fn bench_paper_emulates_the_rtt_in_namespaces_and_cleans_up() {
    if let Some(why) = netns_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let child = bench_paper(&out, "500", &["--rtt", "1ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    ok(&output);
    let r = results(&out);
    assert_identical_runs(&r, 1);
    let run = &r["runs"][0];
    assert_eq!(run["rtt_ms"], 1.0);
    assert_eq!(run["rtt_label"], "1ms");
    assert!(is_png(&out.join("figure3-rtt1ms-k1.png")));
    let m = &run["measured"];
    let mut all: Vec<f64> = m["designer_node_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(all.len(), 5);
    all.push(m["node_node_ms"].as_f64().unwrap());
    all.push(m["node_designer_ms"].as_f64().unwrap());
    for ms in all {
        assert!(ms >= 0.9, "measured RTT {ms} ms < 0.9 ms: {m}");
    }
    assert!(run["measured_rtt_ms"].as_f64().unwrap() >= 0.9);
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn bench_paper_cleans_up_the_namespaces_on_ctrl_c() {
    if let Some(why) = netns_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Large enough to be still training when interrupted: 15 epochs of the
    // fixture's 2000 images are the 30000 images of one epoch it used to
    // run.
    let mut child = bench_paper(
        &dir.path().join("bench"),
        "2000",
        &["--rtt", "5ms", "--epochs", "15"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while leftovers(pid).len() < 5 {
        assert!(Instant::now() < deadline, "no namespaces after 60 s");
        assert!(child.try_wait().unwrap().is_none(), "bench exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let it start the nodes and the run.
    std::thread::sleep(Duration::from_secs(2));
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    // 130 from the signal handler, also when the designer sees its nodes
    // stop first.
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}
