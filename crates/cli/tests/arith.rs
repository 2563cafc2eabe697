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

/// Every image op (`arith = 2`) on Fashion-MNIST's shapes: padded and
/// strided convolutions, batch norm, both poolings, a residual block with
/// a projection, dropout, global pooling, flatten; AdamW; three stages.
const EVERY_IMAGE_OP: &str = r#"
name = "every-image-op"
input = [1, 28, 28]

[optimizer]
kind = "adamw"
lr = 0.01

[[stage]]
ops = [{ op = "normalize", mean = 0.5, std = 0.5 }, { op = "conv2d", in = 1, out = 4, kernel = 3, padding = 1 }, { op = "batch_norm2d", channels = 4 }, { op = "relu" }, { op = "max_pool2d", kernel = 2 }]

[[stage]]
ops = [{ op = "residual", ops = [{ op = "conv2d", in = 4, out = 6, kernel = 3, stride = 2, padding = 1, bias = false }, { op = "relu" }, { op = "conv2d", in = 6, out = 6, kernel = 3, padding = 1 }], shortcut = [{ op = "conv2d", in = 4, out = 6, kernel = 1, stride = 2 }] }, { op = "relu" }, { op = "avg_pool2d", kernel = 3, stride = 2, padding = 1 }]

[[stage]]
ops = [{ op = "dropout", p = 0.2 }, { op = "global_avg_pool" }, { op = "flatten" }, { op = "linear", in = 6, out = 10 }, { op = "log_softmax" }, { op = "nll_loss" }]
"#;

/// A small CNN on the CIFAR-10 fixture with random crops and flips.
const CIFAR_AUGMENTED: &str = r#"
name = "cifar-augmented"
input = [3, 32, 32]

[augment]
crop = 4
flip = true

[[stage]]
ops = [{ op = "conv2d", in = 3, out = 4, kernel = 3, padding = 1 }, { op = "relu" }, { op = "max_pool2d", kernel = 4 }]

[[stage]]
ops = [{ op = "flatten" }, { op = "linear", in = 256, out = 10 }, { op = "log_softmax" }, { op = "nll_loss" }]
"#;

/// SHA-256 of the weights the every-image-op run writes under arith 2.
const EVERY_IMAGE_OP_SHA256: &str =
    "93268d073e87cbcf4fa5febbe8ccdf945b2c62ac5881389482ad3c312636e77c";

/// The CIFAR-10 fixture, from the crate's directory.
const CIFAR: &str = "../../fixtures/cifar10";

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
fn every_image_op_writes_the_same_weights_on_every_path_and_emulated_cpu() {
    let t = tempfile::tempdir().unwrap();
    let cnn = write_model(t.path(), "every-image-op.toml", EVERY_IMAGE_OP);
    let cifar = write_model(t.path(), "cifar.toml", CIFAR_AUGMENTED);
    let data_cifar = std::path::absolute(CIFAR).unwrap();
    let data_cifar = data_cifar.to_str().unwrap();
    let runs_of = |model: &Path, data: Option<&str>, limit: &str| -> Vec<(String, Run)> {
        let args = [
            "--model",
            model.to_str().unwrap(),
            "--train-limit",
            limit,
            "--test-limit",
            "64",
            "--epochs",
            "1",
            "--batch",
            "32",
            "--micro-batches",
            "2",
            "--seed",
            "3",
        ];
        let stem = model.file_stem().unwrap().to_str().unwrap().to_string();
        let cmd = |name: &str| match data {
            Some(d) => train_cmd_on(d, t.path(), name, &["--local"], &args),
            None => train_cmd(t.path(), name, &["--local"], &args),
        };
        let mut runs = Vec::new();
        for path in supported_paths() {
            let name = format!("{stem}-native-{path}");
            let out = cmd(&name).env("MIXNN_KERNELS", &path).output().unwrap();
            said_ok(&out, &name);
            runs.push((name.clone(), Run::load(t.path(), &name)));
        }
        if let Some(q) = qemu() {
            for cpu in ["Westmere", "Haswell"] {
                let name = format!("{stem}-qemu-{cpu}");
                let out = emulated(&q, cpu, cmd(&name)).output().unwrap();
                said_ok(&out, &name);
                runs.push((name.clone(), Run::load(t.path(), &name)));
            }
        }
        runs
    };
    for (runs, pinned) in [
        (runs_of(&cnn, None, "128"), Some(EVERY_IMAGE_OP_SHA256)),
        (runs_of(&cifar, Some(data_cifar), "64"), None),
    ] {
        let (first, reference) = &runs[0];
        for (name, run) in &runs[1..] {
            assert!(
                run.weights == reference.weights,
                "{name} wrote other weights than {first}"
            );
            assert_same_run(reference, run);
        }
        let sha = reference.metrics["weights_sha256"].as_str().unwrap();
        eprintln!("{first}: weights {sha} ({} runs agree)", runs.len());
        if let Some(pinned) = pinned {
            assert_eq!(sha, pinned, "the arithmetic changed: new arith version?");
        }
    }
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
