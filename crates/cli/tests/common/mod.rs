//! Shared by the process-level tests: start `mixnn node` processes, run
//! `mixnn train`, compare runs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository's fixture: the first 2,000 training and 1,000 test
/// images of Fashion-MNIST (`fixtures/fashion-mnist/README.md`). Every test
/// that trains uses it.
pub const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist");

/// Training and test images in [`DATA`].
pub const DATA_TRAIN: usize = 2000;
pub const DATA_TEST: usize = 1000;

/// Whether this run must not skip tests for want of the network or the
/// full dataset: CI sets `CI=true`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The full Fashion-MNIST set found the way `mixnn` finds it (`$MIXNN_DATA`,
/// Debian's install path, the per-user cache), or why there is none: for
/// tests that need all 60,000/10,000 images, which skip with that reason.
pub fn full_dataset() -> Result<PathBuf, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("mixnn/fashion-mnist"));
    let candidates = std::env::var_os("MIXNN_DATA")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(mixnn_model::data::DEBIAN_FASHION_MNIST)])
        .chain(cache);
    let mut tried = Vec::new();
    for dir in candidates {
        let has = |f: &str| dir.join(f).is_file() || dir.join(format!("{f}.gz")).is_file();
        if [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ]
        .iter()
        .all(|f| has(f))
        {
            return Ok(dir);
        }
        tried.push(dir.display().to_string());
    }
    Err(format!(
        "no full Fashion-MNIST in {} (set MIXNN_DATA, or run `mixnn demo` once to fetch it)",
        tried.join(", ")
    ))
}

/// Asserts that `full` is the whole Fashion-MNIST (60,000 training and
/// 10,000 test images) and that [`DATA`] is its start, byte for byte.
pub fn assert_fixture_is_the_start_of(full: &Path) {
    let full = mixnn_model::data::load_dir(full).unwrap();
    let fixture = mixnn_model::data::load_dir(Path::new(DATA)).unwrap();
    assert_eq!((full.train.len(), full.test.len()), (60_000, 10_000));
    for (part, big) in [(&fixture.train, &full.train), (&fixture.test, &full.test)] {
        let n = part.len();
        assert!(part.labels == big.labels[..n], "labels differ");
        assert!(
            part.pixels == big.pixels[..n * big.features()],
            "pixels differ"
        );
    }
}

pub fn mixnn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mixnn"));
    c.env_remove("RUST_LOG").env_remove("MIXNN_DATA");
    c
}

/// One node as its ready line describes it.
#[derive(Debug, Clone)]
pub struct Hop {
    pub addr: SocketAddr,
    pub onion: String,
    pub link: String,
}

/// The first line a child process writes to `stdout` (its ready line;
/// empty if it exits first), or `None` after 30 s.
pub fn ready_line(stdout: std::process::ChildStdout) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(30)).ok()
}

pub fn parse_ready(line: &str) -> Hop {
    let rest = line
        .trim()
        .strip_prefix("mixnn node ready: ")
        .unwrap_or_else(|| panic!("not a ready line: {line:?}"));
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    Hop {
        addr: field("addr").parse().unwrap(),
        onion: field("onion"),
        link: field("link"),
    }
}

/// `mixnn node` processes on 127.0.0.1:0, each with its own state dir
/// (`DIR/node-i`) and log (`DIR/node-i.log`). Dropping it (also while a
/// test panics) stops them all.
pub struct Nodes {
    pub children: Vec<Child>,
    pub hops: Vec<Hop>,
    pub dir: PathBuf,
}

impl Nodes {
    pub fn start(dir: &Path, n: usize) -> Nodes {
        Nodes::start_with(dir, n, &[])
    }

    /// Like [`Nodes::start`], every node with `extra` arguments.
    pub fn start_with(dir: &Path, n: usize, extra: &[&str]) -> Nodes {
        let mut nodes = Nodes {
            children: Vec::new(),
            hops: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for _ in 0..n {
            nodes.start_one(extra);
        }
        nodes
    }

    /// Starts one more `mixnn node` with `extra` arguments and adds it.
    pub fn start_one(&mut self, extra: &[&str]) {
        let i = self.children.len();
        let log = File::create(self.log_path(i)).unwrap();
        let mut child = mixnn()
            .args(["node", "--listen", "127.0.0.1:0", "--state"])
            .arg(self.state(i))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Pushed before waiting, so the guard stops it if it never becomes
        // ready.
        self.children.push(child);
        let line = ready_line(stdout)
            .unwrap_or_else(|| panic!("node {i} not ready in 30 s: {}", self.log(i)));
        assert!(!line.is_empty(), "node {i} exited: {}", self.log(i));
        self.hops.push(parse_ready(&line));
    }

    pub fn state(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}"))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}.log"))
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Writes a cascade file listing `self.hops` in order; returns its path.
    pub fn cascade_file(&self, name: &str) -> PathBuf {
        let mut text = String::new();
        for h in &self.hops {
            text.push_str(&format!(
                "[[hop]]\naddr = \"{}\"\nonion = \"{}\"\nlink = \"{}\"\n\n",
                h.addr, h.onion, h.link
            ));
        }
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Whether node `i` is still running.
    pub fn running(&mut self, i: usize) -> bool {
        self.children[i].try_wait().unwrap().is_none()
    }

    pub fn kill_hard(&mut self, i: usize) {
        self.children[i].kill().unwrap();
        self.children[i].wait().unwrap();
    }

    /// SIGTERM to every node (they shut down cleanly on it), SIGKILL to any
    /// still running after 3 s; reaps them all.
    pub fn stop(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill").arg(c.id().to_string()).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The args of a small run; `mode` is `["--local"]` or `["--cascade", F]`.
pub fn train_cmd(dir: &Path, name: &str, mode: &[&str], extra: &[&str]) -> Command {
    train_cmd_on(DATA, dir, name, mode, extra)
}

/// [`train_cmd`] on the data in `data`.
pub fn train_cmd_on(data: &str, dir: &Path, name: &str, mode: &[&str], extra: &[&str]) -> Command {
    let mut c = mixnn();
    c.arg("train")
        .args(mode)
        .args(["--data", data, "--no-fetch"])
        .arg("--metrics")
        .arg(dir.join(format!("{name}.json")))
        .arg("--weights")
        .arg(dir.join(format!("{name}.safetensors")))
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null());
    // The default seed is random: runs compared with each other share one.
    if !extra.contains(&"--seed") {
        c.args(["--seed", "1"]);
    }
    c
}

pub struct Run {
    pub metrics: serde_json::Value,
    pub weights: Vec<u8>,
}

impl Run {
    /// The metrics and weights a run named `name` wrote in `dir`.
    pub fn load(dir: &Path, name: &str) -> Run {
        let metrics = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        Run {
            metrics: serde_json::from_str(&metrics).unwrap(),
            weights: std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap(),
        }
    }
}

/// What a finished command printed, stdout then stderr; panics (with all
/// of it) if it failed.
pub fn said_ok(out: &Output, what: &str) -> String {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {said}");
    said
}

pub fn train(dir: &Path, name: &str, mode: &[&str], extra: &[&str]) -> Run {
    let out: Output = train_cmd(dir, name, mode, extra).output().unwrap();
    assert!(
        out.status.success(),
        "{name} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Run::load(dir, name)
}

/// Asserts two runs are the same run: weights file, its hash, and every
/// epoch's loss and test accuracy (bit for bit; train_s may differ).
pub fn assert_same_run(local: &Run, cascade: &Run) {
    assert!(!local.weights.is_empty());
    assert!(local.weights == cascade.weights, "weights files differ");
    let sha = &local.metrics["weights_sha256"];
    assert!(sha.is_string(), "{}", local.metrics);
    assert_eq!(sha, &cascade.metrics["weights_sha256"]);
    let (l, c) = (
        local.metrics["epochs"].as_array().unwrap(),
        cascade.metrics["epochs"].as_array().unwrap(),
    );
    assert!(!l.is_empty());
    assert_eq!(l.len(), c.len());
    for (l, c) in l.iter().zip(c) {
        for key in ["epoch", "loss", "test_acc"] {
            let (a, b) = (l[key].as_f64().unwrap(), c[key].as_f64().unwrap());
            assert_eq!(a.to_bits(), b.to_bits(), "{key}: local {l} cascade {c}");
        }
    }
}

/// A `mixnn directory` on a free port; stopped on drop.
pub struct Directory {
    pub child: Child,
    pub url: String,
    pub key: String,
}

impl Directory {
    pub fn start(dir: &Path) -> Directory {
        let mut child = mixnn()
            .args(["directory", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.join("directory.db"))
            .args([
                "--heartbeat-interval",
                "1",
                "--allow-same-subnet",
                "--allow-local-addresses",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(dir.join("directory.log")).unwrap())
            .spawn()
            .unwrap();
        let line = ready_line(child.stdout.take().unwrap()).expect("directory ready in 30 s");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        let (url, key) = (field("url"), field("key"));
        Directory { child, url, key }
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 100 ms until it holds, for at most `secs`.
pub fn wait_until(secs: u64, what: impl Fn() -> String, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "not within {secs} s: {}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lines of node `i`'s log containing `what`.
pub fn log_lines(nodes: &Nodes, i: usize, what: &str) -> usize {
    nodes.log(i).lines().filter(|l| l.contains(what)).count()
}

/// Waits until node `i`'s log has `n` lines containing `what`.
pub fn wait_log(nodes: &Nodes, i: usize, what: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while log_lines(nodes, i, what) < n {
        assert!(
            Instant::now() < deadline,
            "node {i} logged {} of {n} lines with {what:?}: {}",
            log_lines(nodes, i, what),
            nodes.log(i)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory of process `pid`, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    kib * 1024
}

/// Peak resident memory of process `pid` so far (`VmHWM`), from /proc.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    kib * 1024
}
