//! `mixnn bench`: timed training runs.
//!
//! `mixnn bench local` trains on the paper's protocol in one process and
//! reports the training seconds of each epoch and their median, the
//! single-process baseline the cascade is compared with.

use std::path::PathBuf;

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
    }
}
