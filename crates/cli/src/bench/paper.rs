//! `mixnn bench paper`: the paper's experiment as a benchmark sweep.
//!
//! For each micro-batch count k, trains once in one process; then, for
//! each round-trip time R, through a cascade of node processes (on
//! 127.0.0.1 for R = 0, in network namespaces with every link at
//! round-trip R otherwise, see [`crate::netns`]) with the same seed.
//! Writes, under `--out`:
//!
//! - `results.json`: every run's per-epoch figures, medians, ratio,
//!   measured round-trip times and byte identity ([`Results`]);
//! - `figure3-rtt{R}-k{K}.png`: the paper's Figure 3 for each pair;
//! - `ratio-vs-rtt-k{K}.png`: cascade/single-process ratio against R;
//! - `table.md`: one markdown row per pair.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use mixnn_model::trainer::{RunMetrics, TrainConfig};
use plotters::prelude::*;
use serde::Serialize;

use crate::cascade::{install_cleanup, run_cascade, LocalNodes};
use crate::netns::{self, MeasuredRtt, Wan};
use crate::plot::FONT_FAMILY;
use crate::progress::{self, say, Progress};
use crate::train::{self, CascadeArgs, TrainArgs};

/// `mixnn bench paper`.
#[derive(Debug, Args)]
pub struct PaperArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub cascade: CascadeArgs,
    /// Round-trip times to emulate, comma-separated (`0`, `500us`,
    /// `0.5ms`, `1ms`, `0.005s`); any R > 0 needs root (network
    /// namespaces).
    #[arg(long, value_delimiter = ',', default_value = "0", value_name = "LIST")]
    pub rtt: Vec<String>,
    /// Micro-batch counts to compare, comma-separated (each run as with
    /// `--micro-batches K`) [default: the --micro-batches value]
    #[arg(long, value_delimiter = ',', value_name = "LIST",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ks: Vec<u16>,
    /// Directory for results.json, the PNGs and table.md.
    #[arg(long, default_value = "docs/bench", value_name = "DIR")]
    pub out: PathBuf,
}

/// `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The command line that produced the file.
    pub command: String,
    /// Model name.
    pub model: String,
    /// Training and test images used.
    pub train_images: usize,
    /// Test images used.
    pub test_images: usize,
    /// Epochs, batch, optimiser, seed (micro-batches as in the first k).
    pub config: TrainConfig,
    /// Stages run by node processes (the rest stay in the designer).
    pub remote_stages: usize,
    /// CPUs available to this process and the 1-minute load average when
    /// the sweep began.
    pub cpus: usize,
    /// `/proc/loadavg`'s first field at the start (`None` if unreadable).
    pub load_avg_1m: Option<f64>,
    /// How R > 0 is emulated.
    pub wan: String,
    /// One entry per (R, k), R varying fastest.
    pub runs: Vec<PairResult>,
}

/// One (R, k) pair.
#[derive(Debug, Clone, Serialize)]
pub struct PairResult {
    /// Emulated round-trip time, ms (0: loopback, no namespaces).
    pub rtt_ms: f64,
    /// The label used in file names (`0`, `0.5ms`, …).
    pub rtt_label: String,
    /// Micro-batches per batch.
    pub micro_batches: usize,
    /// Measured round-trip times of the cascade's links (`None` at R = 0:
    /// loopback).
    pub measured: Option<MeasuredRtt>,
    /// Median over every measured link, ms.
    pub measured_rtt_ms: Option<f64>,
    /// The single-process run (one per k, shared by every R).
    pub local: RunMetrics,
    /// The cascade run.
    pub cascade: RunMetrics,
    /// Median of the single-process run's per-epoch training seconds.
    pub local_median_train_s: f64,
    /// Median of the cascade's per-epoch training seconds.
    pub cascade_median_train_s: f64,
    /// `cascade_median_train_s / local_median_train_s`.
    pub ratio: f64,
    /// Whether the final weights files are byte-identical.
    pub weights_identical: bool,
    /// Whether the test accuracy is identical after every epoch.
    pub accuracy_identical: bool,
    /// File name of this pair's Figure 3.
    pub figure3: String,
}

/// A round-trip time: `0`, `250us`, `0.5ms`, `1ms`, `0.01s` (a bare
/// number is milliseconds).
pub fn parse_rtt(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0 && *v <= 10_000.0)
        .with_context(|| {
            format!("--rtt: {text:?} is not a round-trip time like 0, 0.5ms or 1ms")
        })?;
    Ok(Duration::from_secs_f64(v * scale))
}

/// `0`, `0.5ms`, `1ms`, `0.25ms`.
pub fn rtt_label(rtt: Duration) -> String {
    if rtt.is_zero() {
        "0".into()
    } else {
        format!("{}ms", rtt.as_secs_f64() * 1e3)
    }
}

/// The training settings of the runs with `k` micro-batches.
pub fn config_for(base: &TrainConfig, k: usize) -> TrainConfig {
    TrainConfig {
        micro_batches: k,
        ..*base
    }
}

/// `mixnn bench paper`.
pub fn run(args: &PaperArgs) -> anyhow::Result<()> {
    install_cleanup();
    let rtts = args
        .rtt
        .iter()
        .map(|r| parse_rtt(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if rtts.is_empty() {
        bail!("--rtt needs at least one round-trip time");
    }
    let ks: Vec<usize> = if args.ks.is_empty() {
        vec![usize::from(args.train.micro_batches)]
    } else {
        args.ks.iter().map(|&k| usize::from(k)).collect()
    };
    if rtts.iter().any(|r| !r.is_zero()) {
        netns::require_root()?;
        for name in netns::remove_stale() {
            say(&format!("removed {name}, left by an earlier run"));
        }
    }
    let opts = args.cascade.options()?;
    let mut prepared = args.train.prepare()?;
    let remote = opts.remote_stages(&prepared.model);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let base = prepared.cfg;
    say(&format!(
        "mixnn bench paper: {} ({} stages, {remote} remote), {} train / {} test images, {} epochs, seed {}; RTT {}; k {}",
        prepared.model.name,
        prepared.model.stages.len(),
        prepared.split.train.len(),
        prepared.split.test.len(),
        base.epochs,
        base.seed,
        rtts.iter().map(|r| rtt_label(*r)).collect::<Vec<_>>().join(", "),
        ks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
    ));
    let mut results = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        model: prepared.model.name.clone(),
        train_images: prepared.split.train.len(),
        test_images: prepared.split.test.len(),
        config: config_for(&base, ks[0]),
        remote_stages: remote,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        load_avg_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok()),
        wan: "R = 0: nodes on 127.0.0.1. R > 0: one network namespace per node \
              (veth pairs to a bridge), every link (designer-node, node-node, \
              node-designer) through a user-space relay that holds each byte R/2 \
              in each direction"
            .into(),
        runs: Vec::new(),
    };
    for &k in &ks {
        prepared.cfg = config_for(&base, k);
        say(&format!("k = {k}: single-process run"));
        let mut observer = Progress::with_label(&format!("local k={k}"));
        let (local, local_weights) = train::run_local(&prepared, &mut observer)?;
        drop(observer);
        for &rtt in &rtts {
            let label = rtt_label(rtt);
            say(&format!("k = {k}, RTT {label}: cascade run"));
            let (cascade, cascade_weights, measured) = cascade_run(
                &prepared,
                &opts,
                remote,
                rtt,
                &format!("cascade rtt={label} k={k}"),
            )?;
            let pair = pair_result(rtt, k, local.clone(), cascade, measured);
            let pair = PairResult {
                weights_identical: local_weights == cascade_weights,
                ..pair
            };
            crate::plot::figure3(&pair.local, &pair.cascade, &args.out.join(&pair.figure3))?;
            say(&format!(
                "  RTT {label} k {k}: median {:.3} s local, {:.3} s cascade, ratio {:.2}, measured RTT {}, weights {}",
                pair.local_median_train_s,
                pair.cascade_median_train_s,
                pair.ratio,
                pair.measured_rtt_ms
                    .map_or("-".into(), |m| format!("{m:.3} ms")),
                if pair.weights_identical { "byte-identical" } else { "DIFFERENT" }
            ));
            results.runs.push(pair);
            // Written after every pair, so a long sweep leaves its results
            // so far if it is stopped.
            write_all(&args.out, &results)?;
        }
    }
    say(&format!("\n{}", table(&results)));
    say(&format!("results in {}", args.out.display()));
    if let Some(bad) = results.runs.iter().find(|p| !p.weights_identical) {
        bail!(
            "the cascade's weights differ from the single-process run's at RTT {} k {}",
            bad.rtt_label,
            bad.micro_batches
        );
    }
    Ok(())
}

/// One cascade run at round-trip time `rtt`.
fn cascade_run(
    prepared: &train::Prepared,
    opts: &mixnn_designer::CascadeOptions,
    remote: usize,
    rtt: Duration,
    label: &str,
) -> anyhow::Result<(RunMetrics, Vec<u8>, Option<MeasuredRtt>)> {
    let mut opts = opts.clone();
    if rtt.is_zero() {
        let nodes = LocalNodes::start(remote)?;
        let mut observer = Progress::with_label(label);
        let (m, w) = run_cascade(prepared, nodes.hops.clone(), opts, &mut observer)?;
        return Ok((m, w, None));
    }
    let wan = Wan::create(remote, rtt)?;
    let nodes = LocalNodes::start_with(&wan.launches())?;
    let hops = wan.advertise(&nodes.hops);
    let measured = wan.measure()?;
    say(&format!(
        "  measured RTT (ms): designer→node {}, node→node {}, node→designer {}",
        measured
            .designer_node_ms
            .iter()
            .map(|m| format!("{m:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
        measured
            .node_node_ms
            .map_or("-".into(), |m| format!("{m:.3}")),
        measured
            .node_designer_ms
            .map_or("-".into(), |m| format!("{m:.3}")),
    ));
    opts.listen = wan.designer_listen();
    let mut observer = Progress::with_label(label);
    let result = run_cascade(prepared, hops, opts, &mut observer);
    drop(observer);
    drop(nodes);
    drop(wan);
    let (m, w) = result?;
    Ok((m, w, Some(measured)))
}

fn pair_result(
    rtt: Duration,
    k: usize,
    local: RunMetrics,
    cascade: RunMetrics,
    measured: Option<MeasuredRtt>,
) -> PairResult {
    let times = |m: &RunMetrics| m.epochs.iter().map(|e| e.train_s).collect::<Vec<_>>();
    let acc = |m: &RunMetrics| m.epochs.iter().map(|e| e.test_acc).collect::<Vec<_>>();
    let lm = progress::median(&times(&local));
    let cm = progress::median(&times(&cascade));
    let label = rtt_label(rtt);
    PairResult {
        rtt_ms: rtt.as_secs_f64() * 1e3,
        figure3: format!("figure3-rtt{label}-k{k}.png"),
        rtt_label: label,
        micro_batches: k,
        measured_rtt_ms: measured.as_ref().map(MeasuredRtt::median_ms),
        measured,
        local_median_train_s: lm,
        cascade_median_train_s: cm,
        ratio: if lm > 0.0 { cm / lm } else { f64::NAN },
        weights_identical: local.weights_sha256 == cascade.weights_sha256,
        accuracy_identical: acc(&local) == acc(&cascade),
        local,
        cascade,
    }
}

/// `results.json`, `table.md` and the ratio plots.
fn write_all(out: &Path, results: &Results) -> anyhow::Result<()> {
    train::write_json(&out.join("results.json"), results)?;
    let md = format!(
        "`{}`\n\n{}\n",
        results.command.replace('`', "'"),
        table(results)
    );
    std::fs::write(out.join("table.md"), md)
        .with_context(|| format!("writing {}", out.join("table.md").display()))?;
    let mut ks: Vec<usize> = results.runs.iter().map(|p| p.micro_batches).collect();
    ks.dedup();
    for k in ks {
        let points: Vec<(f64, f64)> = results
            .runs
            .iter()
            .filter(|p| p.micro_batches == k)
            .map(|p| (p.rtt_ms, p.ratio))
            .collect();
        ratio_plot(k, &points, &out.join(format!("ratio-vs-rtt-k{k}.png")))?;
    }
    Ok(())
}

/// The markdown table: one row per (R, k).
pub fn table(results: &Results) -> String {
    let mut out = String::from(
        "| RTT | measured RTT (ms) | k | train s/epoch, one process | train s/epoch, cascade | ratio | test acc (last epoch) | Δacc | weights |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for p in &results.runs {
        let last = |m: &RunMetrics| m.epochs.last().map_or(f64::NAN, |e| e.test_acc);
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.4} | {} | {} |\n",
            p.rtt_label,
            p.measured_rtt_ms.map_or("-".into(), |m| format!("{m:.3}")),
            p.micro_batches,
            p.local_median_train_s,
            p.cascade_median_train_s,
            p.ratio,
            last(&p.cascade),
            if p.accuracy_identical {
                "0".to_string()
            } else {
                format!("{:+.4}", last(&p.cascade) - last(&p.local))
            },
            if p.weights_identical {
                format!(
                    "identical (`{}…`)",
                    p.cascade.weights_sha256.get(..12).unwrap_or("")
                )
            } else {
                "**different**".into()
            }
        ));
    }
    out.push_str(&format!(
        "\n{} train / {} test images, {} epochs (medians over the epochs), batch {}, seed {}, {} CPUs, load average {} at the start.\n",
        results.train_images,
        results.test_images,
        results.config.epochs,
        results.config.batch,
        results.config.seed,
        results.cpus,
        results.load_avg_1m.map_or("?".into(), |l| format!("{l:.2}")),
    ));
    out
}

fn ratio_plot(k: usize, points: &[(f64, f64)], out: &Path) -> anyhow::Result<()> {
    crate::plot::register_font()?;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", out.display());
    let root = BitMapBackend::new(out, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let x_max = points.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1.0) * 1.1;
    let y_max = points
        .iter()
        .map(|p| p.1)
        .filter(|r| r.is_finite())
        .fold(1.0f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("cascade / single-process train time vs. round-trip time (k = {k})"),
            (FONT_FAMILY, 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("round-trip time per link (ms)")
        .y_desc("ratio (median s/epoch)")
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 15))
        .draw()
        .map_err(|e| err(&e))?;
    let color = RGBColor(214, 39, 40);
    chart
        .draw_series(LineSeries::new(points.to_vec(), color.stroke_width(3)))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 6, color.filled())))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(points.iter().map(|&(x, y)| {
            Text::new(
                format!("{y:.2}"),
                (x, y + y_max * 0.03),
                (FONT_FAMILY, 14).into_font(),
            )
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtts_parse_with_units() {
        assert_eq!(parse_rtt("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_rtt("0.5ms").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_rtt("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_rtt("0.005s").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_rtt("2").unwrap(), Duration::from_millis(2));
        assert!(parse_rtt("fast").is_err());
        assert!(parse_rtt("-1ms").is_err());
    }

    #[test]
    fn labels_name_files() {
        assert_eq!(rtt_label(Duration::ZERO), "0");
        assert_eq!(rtt_label(Duration::from_micros(500)), "0.5ms");
        assert_eq!(rtt_label(Duration::from_millis(5)), "5ms");
    }

    #[test]
    fn ratio_plot_writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.png");
        ratio_plot(1, &[(0.0, 4.0), (1.0, 6.5), (5.0, 20.0)], &out).unwrap();
        assert!(std::fs::read(&out).unwrap().starts_with(b"\x89PNG"));
    }
}
