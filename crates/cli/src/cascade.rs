//! The cascade half of the CLI: `mixnn train --cascade FILE`, and local
//! node processes for the demo and the tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use mixnn_designer::{CascadeFile, CascadeOptions, CascadeRunner, HopInfo};
use mixnn_model::trainer::{run_training, Observer, RunMetrics};

use crate::node::parse_ready_line;
use crate::train::Prepared;

/// Which stages the designer keeps in its own process (`--keep first,last`).
pub fn parse_keep(keep: Option<&str>) -> anyhow::Result<(bool, bool)> {
    let (mut first, mut last) = (false, false);
    for part in keep
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part {
            "first" => first = true,
            "last" => last = true,
            other => bail!("--keep takes first, last or first,last, not {other:?}"),
        }
    }
    Ok((first, last))
}

/// Trains through the cascade `hops`.
pub fn run_cascade(
    prepared: &Prepared,
    hops: Vec<HopInfo>,
    opts: CascadeOptions,
    observer: &mut dyn Observer,
) -> anyhow::Result<(RunMetrics, Vec<u8>)> {
    let Prepared { model, split, cfg } = prepared;
    let mut runner = CascadeRunner::connect(model, hops, cfg, opts)?;
    Ok(run_training(
        &mut runner,
        model,
        &split.train,
        &split.test,
        cfg,
        observer,
    )?)
}

/// Loads a cascade file.
pub fn load_cascade(path: &Path) -> anyhow::Result<Vec<HopInfo>> {
    Ok(CascadeFile::load(path)?.hop)
}

/// Process ids of node processes this process started, for the signal
/// handler.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Stops every node process this process started, then exits: installed
/// for SIGINT and SIGTERM so that no node outlives the demo.
pub fn install_cleanup() {
    let _ = ctrlc::set_handler(|| {
        kill_all();
        eprintln!("interrupted: stopped the node processes");
        std::process::exit(130);
    });
}

fn kill_all() {
    let pids = CHILDREN.lock().map(|v| v.clone()).unwrap_or_default();
    for pid in pids {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
}

/// Node processes on 127.0.0.1, each with its own state directory; all are
/// stopped when this is dropped.
pub struct LocalNodes {
    children: Vec<Child>,
    /// The nodes, in start order.
    pub hops: Vec<HopInfo>,
    /// Where their state directories and logs live.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl LocalNodes {
    /// Starts `n` node processes (this same binary, `mixnn node`).
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("mixnn-nodes-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let exe = std::env::current_exe().context("locating the mixnn binary")?;
        let mut nodes = LocalNodes {
            children: Vec::new(),
            hops: Vec::new(),
            dir: dir.clone(),
            _tmp: Some(tmp),
        };
        for i in 0..n {
            let state = dir.join(format!("node-{i}"));
            let log = std::fs::File::create(dir.join(format!("node-{i}.log")))?;
            let mut child = Command::new(&exe)
                .args(["node", "--listen", "127.0.0.1:0", "--state"])
                .arg(&state)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting node {i}"))?;
            if let Ok(mut v) = CHILDREN.lock() {
                v.push(child.id());
            }
            let stdout = child.stdout.take().context("node stdout")?;
            nodes.children.push(child);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .with_context(|| format!("node {i} did not start within 20 s"))?;
            let hop = parse_ready_line(line.trim()).with_context(|| {
                format!(
                    "node {i} did not start; see {}",
                    dir.join(format!("node-{i}.log")).display()
                )
            })?;
            nodes.hops.push(hop);
        }
        Ok(nodes)
    }
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
        }
        for c in &mut self.children {
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if let Ok(mut v) = CHILDREN.lock() {
            v.clear();
        }
    }
}
