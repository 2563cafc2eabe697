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
    /// Write `{"train_s": [...], "median_train_s": f, "test_acc": [...]}` to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
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
}

impl BenchReport {
    /// The figures of a run.
    pub fn of(m: &RunMetrics) -> Self {
        let train_s: Vec<f64> = m.epochs.iter().map(|e| e.train_s).collect();
        BenchReport {
            median_train_s: progress::median(&train_s),
            test_acc: m.epochs.iter().map(|e| e.test_acc).collect(),
            train_s,
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
            train::write_outputs(&args.train, &metrics, &weights)?;
            let report = BenchReport::of(&metrics);
            say(&format!(
                "local: median {:.3} s/epoch over {} epochs ({} train images, batch {})",
                report.median_train_s,
                report.train_s.len(),
                prepared.split.train.len(),
                prepared.cfg.batch
            ));
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
