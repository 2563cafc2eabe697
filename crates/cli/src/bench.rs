//! `mixnn bench`: timed training runs.
//!
//! `mixnn bench local` trains on the paper's protocol in one process and
//! reports the training seconds of each epoch and their median, the
//! single-process baseline the cascade is compared with. `mixnn bench
//! paper` compares it with the cascade over a sweep of round-trip times
//! and micro-batch counts ([`paper`]); `mixnn bench cleanup` removes what
//! a crashed `--rtt` run left behind.

pub mod paper;
pub mod relay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use mixnn_model::arith::{dispatch, threads, KernelPath};
use mixnn_model::trainer::RunMetrics;
use serde::Serialize;

use crate::progress::{self, say, Progress};
use crate::train::{self, TrainArgs};

/// `mixnn bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Time the single-process trainer (median of the epochs).
    Local(BenchLocalArgs),
    /// Single process vs. cascade on the paper's protocol, over round-trip
    /// times (emulated WAN) and micro-batch counts: JSON, PNGs, table.
    Paper(paper::PaperArgs),
    /// Remove network namespaces, bridges and veths left by `--rtt` runs
    /// that are no longer running.
    Cleanup,
    /// (internal) A delaying TCP relay, run inside a node's namespace.
    #[command(hide = true)]
    Relay {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Address to relay to.
        #[arg(long)]
        to: SocketAddr,
        /// One-way delay in microseconds, each direction.
        #[arg(long, default_value_t = 0)]
        delay_us: u64,
        /// Also run a TCP echo server (for round-trip probes) here.
        #[arg(long)]
        echo: Option<SocketAddr>,
    },
    /// (internal) Median one-byte round trip to each echo server, in ms.
    #[command(hide = true)]
    Probe {
        /// Handshakes per address.
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// Addresses of echo servers.
        addrs: Vec<SocketAddr>,
    },
}

/// `mixnn bench local`.
#[derive(Debug, Args)]
pub struct BenchLocalArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Write `{"train_s": [...], "median_train_s": f, "test_acc": [...],
    /// "kernel_path": …, "threads": n, "paths": [...]}` to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also train once on every kernel path this machine supports (each
    /// forced in turn, the scalar and SSE2 paths for one epoch: they are
    /// tens of times slower) and report each path's median epoch.
    #[arg(long)]
    pub every_path: bool,
}

/// What `mixnn bench` writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Training seconds of each epoch (test phase excluded).
    pub train_s: Vec<f64>,
    /// Median of `train_s`.
    pub median_train_s: f64,
    /// Test accuracy after each epoch.
    pub test_acc: Vec<f64>,
    /// The kernel path the run used (the fastest, or `MIXNN_KERNELS`).
    pub kernel_path: String,
    /// Threads the kernels used.
    pub threads: usize,
    /// Every supported path: its time on the calibration workload and,
    /// with `--every-path`, its median training epoch.
    pub paths: Vec<PathReport>,
}

/// One kernel path's figures in a [`BenchReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathReport {
    /// The path's name (`MIXNN_KERNELS`).
    pub path: String,
    /// Its best time on the calibration workload, in microseconds.
    pub calibration_us: f64,
    /// Median training seconds per epoch with the path forced
    /// (`--every-path` only).
    pub median_train_s: Option<f64>,
    /// Whether the path's weights equal the main run's, bit for bit
    /// (`--every-path` only).
    pub same_weights: Option<bool>,
}

impl BenchReport {
    /// The figures of a run.
    pub fn of(m: &RunMetrics) -> Self {
        let train_s: Vec<f64> = m.epochs.iter().map(|e| e.train_s).collect();
        let path = dispatch::active();
        let choice = dispatch::choice().ok();
        let timings = match choice {
            Some(c) if !c.forced => c.timings.clone(),
            _ => dispatch::calibrate(),
        };
        BenchReport {
            median_train_s: progress::median(&train_s),
            test_acc: m.epochs.iter().map(|e| e.test_acc).collect(),
            train_s,
            kernel_path: path.name().to_string(),
            threads: threads::configured(),
            paths: timings
                .iter()
                .map(|t| PathReport {
                    path: t.path.name().to_string(),
                    calibration_us: t.time.as_secs_f64() * 1e6,
                    median_train_s: None,
                    same_weights: None,
                })
                .collect(),
        }
    }
}

/// `mixnn bench`.
pub fn run(cmd: &BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Local(args) => {
            let prepared = args.train.prepare()?;
            let mut observer = Progress::with_label("bench");
            let (metrics, weights) = train::run_local(&prepared, &mut observer)?;
            drop(observer);
            train::write_outputs(&args.train, &prepared, &metrics, &weights)?;
            let mut report = BenchReport::of(&metrics);
            say(&format!(
                "local: median {:.3} s/epoch over {} epochs ({} train images, batch {}; {} path, {} threads)",
                report.median_train_s,
                report.train_s.len(),
                prepared.split.train.len(),
                prepared.cfg.batch,
                report.kernel_path,
                report.threads,
            ));
            if args.every_path {
                for entry in &mut report.paths {
                    let path = KernelPath::parse(&entry.path)?;
                    let mut cfg = prepared.clone();
                    if matches!(path, KernelPath::Scalar | KernelPath::Sse2) {
                        cfg.cfg.epochs = 1;
                    }
                    let mut observer = Progress::with_label(path.name());
                    let (m, w) =
                        dispatch::with_path(path, || train::run_local(&cfg, &mut observer))??;
                    drop(observer);
                    let r = BenchReport::of(&m);
                    entry.median_train_s = Some(r.median_train_s);
                    // Fewer epochs end elsewhere: compare only full runs.
                    entry.same_weights =
                        (cfg.cfg.epochs == prepared.cfg.epochs).then_some(w == weights);
                    say(&format!(
                        "{:<7} median {:.3} s/epoch over {} epochs{}",
                        path.name(),
                        r.median_train_s,
                        r.train_s.len(),
                        match entry.same_weights {
                            Some(true) => ", same weights",
                            Some(false) => ", DIFFERENT WEIGHTS",
                            None => "",
                        }
                    ));
                }
                if report.paths.iter().any(|p| p.same_weights == Some(false)) {
                    anyhow::bail!(
                        "a kernel path wrote other weights than the {} path",
                        report.kernel_path
                    );
                }
            }
            if let Some(path) = &args.json {
                train::write_json(path, &report)?;
            }
            Ok(())
        }
        BenchCmd::Paper(args) => paper::run(args),
        BenchCmd::Cleanup => {
            crate::netns::require_root()?;
            let removed = crate::netns::remove_stale();
            if removed.is_empty() {
                say("nothing to remove");
            }
            for name in removed {
                say(&format!("removed {name}"));
            }
            Ok(())
        }
        BenchCmd::Relay {
            listen,
            to,
            delay_us,
            echo,
        } => relay::run_relay(*listen, *to, Duration::from_micros(*delay_us), *echo),
        BenchCmd::Probe { count, addrs } => relay::run_probe(addrs, *count),
    }
}
