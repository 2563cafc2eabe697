//! The cascade half of the CLI: `mixnn train --cascade FILE` and
//! `--directory URL` (arguments in, notices out; the run itself is
//! [`mixnn_designer::run`]), and local node and directory processes for the
//! demo and the tests.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use mixnn_designer::directory::Directories;
pub use mixnn_designer::run::RunSettings as Recovery;
use mixnn_designer::run::{self, Notice, ReplacementSource};
use mixnn_designer::{CascadeFile, CascadeOptions, HopInfo};
use mixnn_model::seed::Purpose;
use mixnn_model::trainer::{Observer, RunMetrics};

use crate::node::parse_ready_line;
use crate::prepared::Prepared;

/// Checkpoints and crash recovery of `mixnn train --cascade`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RecoveryArgs {
    /// Write checkpoints (every stage's parameters, momentum and step,
    /// with the data order) to DIR; the newest 3 are kept.
    #[arg(long, value_name = "DIR")]
    pub checkpoints: Option<PathBuf>,

    /// Take a checkpoint every K steps (and at the end of each epoch).
    #[arg(long, default_value_t = 100, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,

    /// Replace failed nodes from the spare nodes listed in FILE (a cascade
    /// file) and continue from the last checkpoint instead of stopping.
    #[arg(long, value_name = "FILE")]
    pub spares: Option<PathBuf>,

    /// Continue the run whose checkpoints are in DIR (from the newest
    /// valid one), with the same settings; checkpoints keep going there.
    #[arg(long, value_name = "DIR", conflicts_with = "checkpoints")]
    pub resume: Option<PathBuf>,
}

/// How `mixnn train --directory URL` picks its cascade.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SelectionArgs {
    /// A directory's public key (hex), as it prints when it starts: its
    /// views are trusted only if signed by a pinned key (repeat for
    /// several directories).
    #[arg(long = "directory-key", value_name = "HEX")]
    pub directory_keys: Vec<String>,

    /// How many directories must list the same entry (address, keys,
    /// family) for a node to be drawn; its weight is their median.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub quorum: usize,

    /// LOCAL TESTING ONLY: let the draw put several hops in one /16 (e.g.
    /// every node on 127.0.0.1). On a real network this lets one party
    /// with one address block hold the whole cascade.
    #[arg(long)]
    pub allow_same_subnet: bool,

    /// Dummy hops hidden among the real stages (identity stages that see
    /// and send the same cells).
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub dummies: usize,

    /// Seed of the random draw of the nodes [default: derived from the
    /// run's seed, so `--seed` repeats the draw too].
    #[arg(long, value_name = "SEED")]
    pub selection_seed: Option<u64>,
}

/// Draws the cascade from the directories `urls`: sets the dummies in
/// `opts`, and (unless spares are given) replacements from the same
/// directories in `recovery`. Returns the hops.
pub fn from_directory(
    urls: &[String],
    args: &SelectionArgs,
    prepared: &Prepared,
    opts: &mut CascadeOptions,
    recovery: &mut Recovery,
) -> anyhow::Result<Vec<HopInfo>> {
    if args.directory_keys.is_empty() {
        bail!(
            "--directory needs --directory-key HEX (the key the directory printed when it started)"
        );
    }
    let pinned = args
        .directory_keys
        .iter()
        .map(|k| {
            let bytes = hex::decode(k.trim()).ok().filter(|b| b.len() == 32);
            bytes
                .map(|b| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(&b);
                    a
                })
                .with_context(|| format!("--directory-key {k:?} is not 64 hex digits"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dirs = Directories {
        urls: urls.to_vec(),
        pinned,
        quorum: args.quorum,
        diversity: if args.allow_same_subnet {
            mixnn_directory::Diversity::AllowSameSubnet
        } else {
            mixnn_directory::Diversity::Strict
        },
    };
    let seed = args
        .selection_seed
        .unwrap_or_else(|| prepared.cfg.seed.derive(Purpose::Selection));
    let (drawn, listed) = run::draw_cascade(&dirs, &prepared.model, opts, args.dummies, seed)?;
    crate::progress::say(&format!(
        "directory: {listed} nodes listed; drew {} hops ({} real, dummies at {:?})",
        drawn.hops.len(),
        opts.remote_stages(&prepared.model),
        drawn.dummies
    ));
    opts.dummies = drawn.dummies.clone();
    say_hops(&drawn.hops, &drawn.dummies);
    if matches!(recovery.replacements, ReplacementSource::None) {
        recovery.replacements = ReplacementSource::Directory {
            dirs,
            seed,
            drawn: drawn.clone(),
        };
    }
    Ok(drawn.hops)
}

/// Prints the cascade's hops in order (the designer's own view: who it
/// drew, and where the dummies are).
pub fn say_hops(hops: &[HopInfo], dummies: &[usize]) {
    for (i, h) in hops.iter().enumerate() {
        crate::progress::say(&format!(
            "  hop {} at {} (link key {}…){}",
            i + 1,
            h.addr,
            h.link.get(..16).unwrap_or(&h.link),
            if dummies.contains(&i) { ", dummy" } else { "" }
        ));
    }
}

impl RecoveryArgs {
    /// Loads the spares file and checks the flags.
    pub fn setup(&self) -> anyhow::Result<Recovery> {
        let replacements = match &self.spares {
            Some(f) => ReplacementSource::Spares(
                load_cascade(f).with_context(|| format!("--spares {}", f.display()))?,
            ),
            None => ReplacementSource::None,
        };
        Ok(Recovery {
            checkpoints: self.resume.clone().or_else(|| self.checkpoints.clone()),
            every: std::num::NonZeroU64::new(self.checkpoint_every),
            resume: self.resume.is_some(),
            replacements,
        })
    }

    /// Refuses recovery flags where they mean nothing (`--local`).
    pub fn local_only(&self) -> anyhow::Result<()> {
        if self.checkpoints.is_some() || self.spares.is_some() || self.resume.is_some() {
            bail!("--checkpoints, --spares and --resume work with --cascade only");
        }
        Ok(())
    }
}

/// Trains through the cascade `hops`.
pub fn run_cascade(
    prepared: &Prepared,
    hops: Vec<HopInfo>,
    opts: CascadeOptions,
    observer: &mut dyn Observer,
) -> anyhow::Result<(RunMetrics, Vec<u8>)> {
    run_cascade_with(prepared, hops, opts, &Recovery::default(), observer)
}

/// Trains through the cascade `hops` with checkpoints, recovery from
/// failed nodes, or resuming a run, as `recovery` says; prints what the
/// run reports.
pub fn run_cascade_with(
    prepared: &Prepared,
    hops: Vec<HopInfo>,
    opts: CascadeOptions,
    recovery: &Recovery,
    observer: &mut dyn Observer,
) -> anyhow::Result<(RunMetrics, Vec<u8>)> {
    let Prepared { model, split, cfg } = prepared;
    let mut print = |n: Notice| match n {
        Notice::ResumeWarning(_) => eprintln!("{n}"),
        n => crate::progress::say(&n.to_string()),
    };
    Ok(run::train(
        model,
        &split.train,
        &split.test,
        cfg,
        hops,
        opts,
        recovery,
        observer,
        &mut print,
    )?)
}

/// Loads a cascade file.
pub fn load_cascade(path: &Path) -> anyhow::Result<Vec<HopInfo>> {
    Ok(CascadeFile::load(path)?.hop)
}

/// Process ids of node processes this process started, for the signal
/// handler.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// More cleanup for the signal handler, run after the node processes are
/// stopped (e.g. removing the network namespaces of `mixnn bench`).
static HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Stops every node process this process started, runs the cleanup hooks,
/// then exits: installed for SIGINT and SIGTERM so that no node outlives
/// the demo.
pub fn install_cleanup() {
    let _ = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        kill_all();
        let hooks = HOOKS.lock().map(|v| v.clone()).unwrap_or_default();
        for hook in hooks {
            hook();
        }
        eprintln!("interrupted: stopped the node processes");
        std::process::exit(130);
    });
}

/// Set by the signal handler of [`install_cleanup`] before it stops the
/// nodes: an error the designer reports after that (its links closing) is
/// the interruption, not a failure.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether Ctrl-C (SIGINT/SIGTERM) was caught; the handler then ends the
/// process with status 130 once it has stopped every node.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Adds `hook` to what the signal handler of [`install_cleanup`] runs
/// (once per distinct hook).
pub fn add_cleanup_hook(hook: fn()) {
    if let Ok(mut v) = HOOKS.lock() {
        if !v.contains(&hook) {
            v.push(hook);
        }
    }
}

fn kill_all() {
    let pids = CHILDREN.lock().map(|v| v.clone()).unwrap_or_default();
    for pid in pids {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
}

/// How to start one node process: a command prefix that runs it (e.g.
/// `ip netns exec NS`; empty for none) and the address it listens on.
#[derive(Debug, Clone)]
pub struct NodeLaunch {
    /// Program and arguments put before the `mixnn node` command line.
    pub prefix: Vec<OsString>,
    /// `--listen` address.
    pub listen: String,
    /// More `mixnn node` arguments (e.g. `--directory URL`).
    pub args: Vec<String>,
}

impl NodeLaunch {
    /// A node on 127.0.0.1, port chosen by the kernel.
    pub fn loopback() -> Self {
        NodeLaunch {
            prefix: Vec::new(),
            listen: "127.0.0.1:0".into(),
            args: Vec::new(),
        }
    }
}

/// The first line a child process prints (its ready line), read on a
/// thread so that the caller can wait with a timeout.
fn first_line(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx
}

/// A `mixnn directory` process on 127.0.0.1 (for the demo), stopped when
/// this is dropped.
pub struct LocalDirectory {
    child: Child,
    /// Its URL.
    pub url: String,
    /// Its public key (hex), which designers pin.
    pub key: String,
    key_bytes: [u8; 32],
}

impl LocalDirectory {
    /// Starts a directory with its database in `dir`; nodes heartbeat
    /// every second.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the mixnn binary")?;
        let log = std::fs::File::create(dir.join("directory.log"))?;
        let mut child = Command::new(exe)
            .args([
                "directory",
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-interval",
                "1",
                // Every local node is on 127.0.0.1 (local testing only).
                "--allow-same-subnet",
                "--allow-local-addresses",
                "--db",
            ])
            .arg(dir.join("directory.db"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting the directory")?;
        if let Ok(mut v) = CHILDREN.lock() {
            v.push(child.id());
        }
        let stdout = child.stdout.take().context("directory stdout")?;
        let line = first_line(stdout);
        let mut me = LocalDirectory {
            child,
            url: String::new(),
            key: String::new(),
            key_bytes: [0; 32],
        };
        let line = line
            .recv_timeout(Duration::from_secs(20))
            .context("the directory did not start within 20 s")?;
        let ready = crate::directory::parse_directory_ready_line(&line).with_context(|| {
            format!(
                "the directory did not start; see {}",
                dir.join("directory.log").display()
            )
        })?;
        me.url = ready.url;
        me.key = hex::encode(ready.key);
        me.key_bytes = ready.key;
        Ok(me)
    }

    /// Waits until the directory's view lists `n` nodes.
    pub fn wait_for(&self, n: usize) -> anyhow::Result<()> {
        let client = mixnn_directory_client::DirectoryClient::new(&self.url)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listed = client
                .view()
                .and_then(|v| v.verify(&[self.key_bytes], mixnn_directory::unix_now()))
                .map(|v| v.nodes.len())
                .unwrap_or(0);
            if listed >= n {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("only {listed} of {n} nodes registered with the directory within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalDirectory {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Node processes (on 127.0.0.1 unless launched otherwise), each with its
/// own state directory; all are stopped when this is dropped.
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
        Self::start_with(&vec![NodeLaunch::loopback(); n])
    }

    /// Starts one node process per entry of `launches`.
    pub fn start_with(launches: &[NodeLaunch]) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("mixnn-nodes-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let exe = std::env::current_exe().context("locating the mixnn binary")?;
        let mut nodes = LocalNodes {
            children: Vec::new(),
            hops: Vec::new(),
            dir: dir.clone(),
            _tmp: Some(tmp),
        };
        for (i, launch) in launches.iter().enumerate() {
            let state = dir.join(format!("node-{i}"));
            let log = std::fs::File::create(dir.join(format!("node-{i}.log")))?;
            let mut command = match launch.prefix.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(&exe);
                    c
                }
                None => Command::new(&exe),
            };
            let mut child = command
                .args(["node", "--listen", &launch.listen, "--state"])
                .arg(&state)
                .args(&launch.args)
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
            let line = first_line(stdout)
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
