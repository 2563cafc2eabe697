//! `mixnn demo`: the paper's experiment, end to end.
//!
//! Trains the paper's MLP on Fashion-MNIST (30k/10k) twice with the same
//! seed: in this process, and through a cascade of node processes on
//! 127.0.0.1 (one per remote stage, real sockets, real onions). Prints both
//! runs epoch by epoch with the accuracy difference and the time ratio,
//! writes `{"local": …, "cascade": …}` and draws Figure 3. Every node
//! process it started is stopped at the end, on error and on Ctrl-C.

use std::path::PathBuf;

use clap::Args;
use mixnn_model::trainer::RunMetrics;

use crate::cascade::{
    from_directory, install_cleanup, run_cascade, LocalDirectory, LocalNodes, NodeLaunch, Recovery,
    SelectionArgs,
};
use crate::progress::{say, Progress};
use crate::train::{self, CascadeArgs, TrainArgs};

/// `mixnn demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub cascade: CascadeArgs,
    /// Where to draw Figure 3 (accuracy and time per epoch, both runs).
    #[arg(long, default_value = "mixnn-figure3.png", value_name = "PNG")]
    pub plot: PathBuf,

    /// Dummy hops hidden among the real stages (paper §2.2).
    #[arg(long, default_value_t = 2, value_name = "R")]
    pub dummies: usize,

    /// Skip the directory: start exactly one node per remote stage and use
    /// them in order, without dummies.
    #[arg(long)]
    pub no_directory: bool,
}

/// Both runs of the demo, as written to `--metrics`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DemoMetrics {
    /// The single-process run.
    pub local: RunMetrics,
    /// The cascade run.
    pub cascade: RunMetrics,
}

/// `mixnn demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    install_cleanup();
    let prepared = args.train.prepare()?;
    let opts = args.cascade.options()?;
    let remote = opts.remote_stages(&prepared.model);
    say(&format!(
        "MixNN demo: {} ({} stages), {} train / {} test images, {} epochs, seed {}",
        prepared.model.name,
        prepared.model.stages.len(),
        prepared.split.train.len(),
        prepared.split.test.len(),
        prepared.cfg.epochs,
        prepared.cfg.seed
    ));
    say("single-process run:");
    let mut observer = Progress::with_label("local");
    let (local, local_weights) = train::run_local(&prepared, &mut observer)?;
    drop(observer);

    let mut opts = opts;
    // Constant-rate links: the nodes pace theirs as the designer does.
    let paced: Vec<String> = match opts.link_pacing {
        Some(p) => vec![
            "--link-rate".into(),
            p.rate.to_string(),
            "--link-jitter".into(),
            p.jitter.to_string(),
        ],
        None => Vec::new(),
    };
    let (nodes, directory, hops) = if args.no_directory {
        say(&format!("starting {remote} node processes on 127.0.0.1 …"));
        let launch = NodeLaunch {
            args: paced.clone(),
            ..NodeLaunch::loopback()
        };
        let nodes = LocalNodes::start_with(&vec![launch; remote])?;
        let hops = nodes.hops.clone();
        (nodes, None, hops)
    } else {
        // One more node than the cascade needs, so that the draw chooses.
        let n = remote + args.dummies + 1;
        let tmp = tempfile::Builder::new()
            .prefix("mixnn-directory-")
            .tempdir()?;
        let directory = LocalDirectory::start(tmp.path())?;
        say(&format!(
            "directory at {} (key {}…); starting {n} node processes that register there …",
            directory.url,
            &directory.key[..16]
        ));
        let launch = NodeLaunch {
            args: [
                vec![
                    "--directory".into(),
                    directory.url.clone(),
                    "--heartbeat".into(),
                    "1".into(),
                ],
                paced,
            ]
            .concat(),
            ..NodeLaunch::loopback()
        };
        let nodes = LocalNodes::start_with(&vec![launch; n])?;
        directory.wait_for(n)?;
        let selection = SelectionArgs {
            directory_keys: vec![directory.key.clone()],
            quorum: 1,
            // Every demo node is on 127.0.0.1 (local testing only).
            allow_same_subnet: true,
            dummies: args.dummies,
            selection_seed: None,
        };
        let hops = from_directory(
            std::slice::from_ref(&directory.url),
            &selection,
            &prepared,
            &mut opts,
            &mut Recovery::default(),
        )?;
        (nodes, Some((directory, tmp)), hops)
    };
    say(&format!(
        "  state directories and logs under {}",
        nodes.dir.display()
    ));
    if directory.is_none() {
        crate::cascade::say_hops(&hops, &opts.dummies);
    }
    say("cascade run:");
    let mut observer = Progress::with_label("cascade");
    let result = run_cascade(&prepared, hops, opts, &mut observer);
    drop(observer);
    drop(nodes);
    drop(directory);
    let (cascade, cascade_weights) = result?;

    say(&table(&local, &cascade));
    say(&format!(
        "final weights: {} (local) vs {} (cascade): {}",
        &local.weights_sha256[..16],
        &cascade.weights_sha256[..16],
        if local_weights == cascade_weights {
            "byte-identical"
        } else {
            "DIFFERENT"
        }
    ));
    let both = DemoMetrics { local, cascade };
    if let Some(path) = &args.train.metrics {
        train::write_json(path, &both)?;
        say(&format!("metrics: {}", path.display()));
    }
    if let Some(path) = &args.train.weights {
        std::fs::write(path, &cascade_weights)?;
    }
    crate::plot::figure3(&both.local, &both.cascade, &args.plot)?;
    say(&format!("Figure 3: {}", args.plot.display()));
    if local_weights != cascade_weights {
        anyhow::bail!("the cascade's weights differ from the single-process run's");
    }
    Ok(())
}

/// The per-epoch comparison table.
pub fn table(local: &RunMetrics, cascade: &RunMetrics) -> String {
    let mut out = String::from(
        "epoch  acc local  acc cascade  Δacc      train s local  train s cascade  ratio\n",
    );
    for (l, c) in local.epochs.iter().zip(&cascade.epochs) {
        out.push_str(&format!(
            "{:>5}  {:>9.4}  {:>11.4}  {:>+8.4}  {:>13.3}  {:>15.3}  {:>5.2}\n",
            l.epoch,
            l.test_acc,
            c.test_acc,
            c.test_acc - l.test_acc,
            l.train_s,
            c.train_s,
            c.train_s / l.train_s
        ));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut lt: Vec<f64> = local.epochs.iter().map(|e| e.train_s).collect();
    let mut ct: Vec<f64> = cascade.epochs.iter().map(|e| e.train_s).collect();
    let (ml, mc) = (median(&mut lt), median(&mut ct));
    out.push_str(&format!(
        "median train s per epoch: local {ml:.3}, cascade {mc:.3}, ratio {:.2}",
        mc / ml
    ));
    out
}
