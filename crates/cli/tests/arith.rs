#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One result on every CPU (docs/arithmetic.md): a short training run that
//! uses every op, momentum and micro-batches writes the same weights with
//! every kernel path this machine supports (forced with `MIXNN_KERNELS`)
//! and under emulated CPUs (`qemu-x86_64 -cpu Westmere`, SSE4.2 only, and
//! `-cpu Haswell`, AVX2 + FMA); and a cascade with one node on an emulated
//! CPU passes every audit and ends with the native `--local` weights.
//!
//! The emulated runs need Debian's `qemu-user`. Without it they are skipped
//! with a printed reason, unless `MIXNN_REQUIRE_QEMU=1` (set by `.ci/run`,
//! which installs it), where a missing emulator fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::*;

/// Every op of the model format, in three stages (one a dummy).
const EVERY_OP: &str = r#"
name = "every-op"
input = 784

[[stage]]
ops = [{ op = "normalize", mean = 0.286, std = 0.353 }, { op = "linear", in = 784, out = 32 }, { op = "relu" }]

[[stage]]
ops = [{ op = "identity" }]

[[stage]]
ops = [{ op = "linear", in = 32, out = 10 }, { op = "log_softmax" }, { op = "nll_loss" }]
"#;

/// Four stages; the third holds parameters and a reduction (log_softmax),
/// the op whose bits depend most on how `exp`, `ln` and sums are computed.
const FOUR_STAGES: &str = r#"
name = "four-stages"
input = 784

[[stage]]
ops = [{ op = "linear", in = 784, out = 64 }, { op = "relu" }]

[[stage]]
ops = [{ op = "linear", in = 64, out = 64 }, { op = "relu" }]

[[stage]]
ops = [{ op = "linear", in = 64, out = 10 }, { op = "log_softmax" }]

[[stage]]
ops = [{ op = "nll_loss" }]
"#;

/// SHA-256 of the weights the every-op run writes under arith 1. Pinned so
/// that a change to the arithmetic shows here (and needs a new version).
/// (It also moves when the seeds' derivation does: `crates/model/src/seed.rs`
/// made it `24b81cca…` from `e4471b59…`, with every path and CPU agreeing.)
const EVERY_OP_SHA256: &str = "24b81ccac04766147bef7f4713aa25e74f7a630eb1f09a4f72905cb8bec5506a";

const RUN: &[&str] = &[
    "--train-limit",
    "320",
    "--test-limit",
    "64",
    "--epochs",
    "1",
    "--micro-batches",
    "2",
    "--seed",
    "3",
];

fn write_model(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `qemu-x86_64`, if installed; `None` (after saying why) when the test
/// may skip the emulated runs.
fn qemu() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-x86_64"))
            .find(|p| p.is_file())
    });
    let required = std::env::var("MIXNN_REQUIRE_QEMU").is_ok_and(|v| v == "1");
    match found {
        Some(q) if cfg!(target_arch = "x86_64") => Some(q),
        _ if required => panic!("MIXNN_REQUIRE_QEMU=1 but qemu-x86_64 is not on PATH"),
        _ => {
            eprintln!(
                "skipping the emulated-CPU runs: qemu-x86_64 not found (Debian: apt install qemu-user)"
            );
            None
        }
    }
}

/// `mixnn train …` under `qemu-x86_64 -cpu CPU`.
fn emulated(qemu: &Path, cpu: &str, plain: Command) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-cpu", cpu])
        .arg(plain.get_program())
        .args(plain.get_args())
        // Otherwise `mixnn` re-executes itself with glibc tunables, and the
        // new process leaves the emulator.
        .env("MIXNN_NO_TUNABLES", "1")
        .env_remove("RUST_LOG")
        .env_remove("MIXNN_DATA")
        .stdin(Stdio::null());
    if let Some(dir) = plain.get_current_dir() {
        c.current_dir(dir);
    }
    c
}

/// The kernel paths `mixnn selftest` lists as supported (and passing).
fn supported_paths() -> Vec<String> {
    let out = mixnn().arg("selftest").output().unwrap();
    let said = said_ok(&out, "mixnn selftest");
    said.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let path = words.next()?;
            (words.next()? == "ok").then(|| path.to_string())
        })
        .collect()
}

#[test]
fn every_kernel_path_and_emulated_cpu_write_the_same_weights() {
    let t = tempfile::tempdir().unwrap();
    let model = write_model(t.path(), "every-op.toml", EVERY_OP);
    let model = model.to_str().unwrap();
    let args: Vec<&str> = RUN.iter().copied().chain(["--model", model]).collect();
    let mut runs: Vec<(String, Run)> = Vec::new();
    let paths = supported_paths();
    assert!(paths.iter().any(|p| p == "scalar"), "{paths:?}");
    for path in &paths {
        let name = format!("native-{path}");
        let out = train_cmd(t.path(), &name, &["--local"], &args)
            .env("MIXNN_KERNELS", path)
            .output()
            .unwrap();
        said_ok(&out, &name);
        runs.push((name.clone(), Run::load(t.path(), &name)));
    }
    if let Some(q) = qemu() {
        for cpu in ["Westmere", "Haswell"] {
            let name = format!("qemu-{cpu}");
            let plain = train_cmd(t.path(), &name, &["--local"], &args);
            let out = emulated(&q, cpu, plain).output().unwrap();
            said_ok(&out, &name);
            runs.push((name.clone(), Run::load(t.path(), &name)));
        }
    }
    let (first, reference) = &runs[0];
    for (name, run) in &runs[1..] {
        assert!(
            run.weights == reference.weights,
            "{name} wrote other weights than {first}"
        );
        assert_same_run(reference, run);
    }
    let sha = reference.metrics["weights_sha256"].as_str().unwrap();
    eprintln!("every-op weights: {sha} ({} runs agree)", runs.len());
    assert_eq!(
        sha, EVERY_OP_SHA256,
        "the arithmetic changed: new arith version?"
    );
}

#[test]
fn a_node_on_an_emulated_cpu_passes_every_audit_and_matches_local() {
    let Some(q) = qemu() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let model = write_model(t.path(), "four.toml", FOUR_STAGES);
    let model = model.to_str().unwrap();
    let mut nodes = Nodes {
        children: Vec::new(),
        hops: Vec::new(),
        dir: t.path().to_path_buf(),
    };
    nodes.start_one(&[]);
    nodes.start_one(&[]);
    start_emulated_node(&mut nodes, &q, "Westmere");
    nodes.start_one(&[]);
    let file = nodes.cascade_file("cascade.toml");
    let args = [
        "--model",
        model,
        // 30 steps: at q = 0.2 the emulated hop goes unaudited with
        // probability 0.8^30 ≈ 0.1 % (and the weights comparison below
        // catches a divergence whether or not it is audited).
        "--train-limit",
        "1920",
        "--test-limit",
        "128",
        "--epochs",
        "1",
        "--seed",
        "5",
    ];
    let local = train(t.path(), "local", &["--local"], &args);
    let audited: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--audit-rate", "0.2"])
        .collect();
    let out = train_cmd(
        t.path(),
        "cascade",
        &["--cascade", file.to_str().unwrap()],
        &audited,
    )
    .output()
    .unwrap();
    let said = said_ok(&out, "cascade with an emulated node");
    let audits = said
        .lines()
        .find(|l| l.contains("audits:"))
        .unwrap_or_else(|| panic!("no audit line: {said}"));
    eprintln!("emulated node: {audits}");
    assert!(audits.contains(" 0 failed"), "{audits}");
    let passed: usize = audits
        .split(", ")
        .find_map(|part| part.strip_suffix(" passed"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{audits}"));
    assert!(passed >= 1, "{audits}");
    // The node really ran on the emulated CPU: no AVX2 there, so the
    // self-test ran (and passed) on the SSE2 path.
    let log = nodes.log(2);
    assert!(
        log.contains("arithmetic self-test passed") && log.contains("sse2"),
        "{log}"
    );
    assert_same_run(&local, &Run::load(t.path(), "cascade"));
}

/// Like [`Nodes::start_one`], with the node under `qemu-x86_64 -cpu CPU`.
fn start_emulated_node(nodes: &mut Nodes, qemu: &Path, cpu: &str) {
    let i = nodes.children.len();
    let log = std::fs::File::create(nodes.log_path(i)).unwrap();
    let mut child = Command::new(qemu)
        .args(["-cpu", cpu, env!("CARGO_BIN_EXE_mixnn")])
        .args(["-v", "node", "--listen", "127.0.0.1:0", "--state"])
        .arg(nodes.state(i))
        .env("MIXNN_NO_TUNABLES", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    nodes.children.push(child);
    let line = ready_line(stdout)
        .unwrap_or_else(|| panic!("emulated node not ready in 30 s: {}", nodes.log(i)));
    assert!(!line.is_empty(), "emulated node exited: {}", nodes.log(i));
    nodes.hops.push(parse_ready(&line));
}
