//! `mixnn adversary`: what colluding hops can steal (issue #28).
//!
//! Trains the model through a real cascade of `mixnn node` processes
//! that each write down what they see of the model (`--record-tensors`,
//! a build with the `adversary` feature), then mounts the attacks of
//! `mixnn-adversary` for every colluding set asked for, positions known
//! and unknown, for each auxiliary data size, and reports accuracy and
//! agreement with the designer's model against the from-scratch
//! baseline. `--sweep` measures the extraction curve over three
//! cascades (plain, `--keep first,last`, two dummies) and draws it.
//! The attacks: `docs/threat-model/extraction.md`.
//!
//! Over 600 lines: the command's flags, the three recording cascades and
//! the report's table and plot, one flow from flags to figures; the attacks
//! themselves are in `crates/adversary`.

mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use mixnn_adversary::chain::{Budget, Chain, Rows};
use mixnn_adversary::data::{Key, Labeled};
use mixnn_adversary::report::{sweep_sets, Baseline, Report, Row, SetKind};
use mixnn_adversary::view::HopView;
use mixnn_adversary::{Aux, Budgets, Positions, Scene, Truth, Unit};
use mixnn_designer::plan::layout::Layout;
use mixnn_designer::{CascadeOptions, Keep};
use mixnn_model::data::{self, Dataset, Split};
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{Quiet, TrainConfig};

use crate::cascade::{install_cleanup, run_cascade, LocalNodes, NodeLaunch};
use crate::progress::say;
use crate::train::{CascadeArgs, Prepared, TrainArgs};

/// `mixnn adversary`.
#[derive(Debug, Args)]
pub struct AdversaryArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub cascade: CascadeArgs,

    /// A colluding set: 1-based hop positions, comma-separated (repeat
    /// for several sets) [default: every contiguous set, the alternating
    /// one and both ends]
    #[arg(long, value_name = "HOPS")]
    pub colluders: Vec<String>,

    /// The extraction curve: three cascades (plain, `--keep first,last`,
    /// and dummies at `--sweep-dummies`), each with every contiguous set
    /// of 1 … n − 1 colluding hops, the alternating set (hops 2, 4, …)
    /// and both ends. `--keep` and `--dummy-at` are then ignored.
    #[arg(long)]
    pub sweep: bool,

    /// Dummy positions (0-based) of the sweep's cascade with dummies.
    #[arg(long, value_delimiter = ',', default_value = "1,4", value_name = "K,K")]
    pub sweep_dummies: Vec<usize>,

    /// Auxiliary data sizes: the adversary's own images, taken from the
    /// training images after `--train-limit` (never sent through the
    /// cascade).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,100,1000,10000",
        value_name = "N,N"
    )]
    pub aux: Vec<usize>,

    /// The auxiliary images come without labels.
    #[arg(long)]
    pub aux_unlabeled: bool,

    /// What the colluders know of positions: `known`, `unknown` or
    /// `both`.
    #[arg(long, default_value = "both", value_name = "WHICH")]
    pub positions: String,

    /// Test images the surrogates are scored on: the last N of the test
    /// set, which the cascade never carries (its test phases use the
    /// ones before) [default: half of the test set]
    #[arg(long, value_name = "N")]
    pub eval_images: Option<usize>,

    /// Epochs of each attack's training (passes over its data).
    #[arg(long, default_value_t = 3, value_name = "E")]
    pub attack_epochs: usize,

    /// Fewest batches of each attack's training.
    #[arg(long, default_value_t = 300, value_name = "N")]
    pub attack_min_steps: usize,

    /// Most batches of each attack's training.
    #[arg(long, default_value_t = 3000, value_name = "N")]
    pub attack_max_steps: usize,

    /// Epochs of each regression of a hop the colluders do not hold.
    #[arg(long, default_value_t = 20, value_name = "E")]
    pub regress_epochs: usize,

    /// Fewest batches of each regression.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub regress_min_steps: usize,

    /// Most batches of each regression.
    #[arg(long, default_value_t = 5000, value_name = "N")]
    pub regress_max_steps: usize,

    /// Training images inverted by the inversion attack.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub invert_images: usize,

    /// Updates per inverted batch.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub invert_steps: usize,

    /// Seed of the attacks' stand-ins and data order.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub attack_seed: u64,

    /// Keep the hops' record files in DIR (default: a temporary
    /// directory, removed at the end).
    #[arg(long, value_name = "DIR")]
    pub records: Option<PathBuf>,

    /// Write the report (every outcome) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the tables (summary and every outcome, markdown) to FILE.
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,

    /// Draw the extraction curve (accuracy and agreement against k) to
    /// PNG.
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
}

/// One cascade to measure.
struct CascadeRun {
    name: String,
    opts: CascadeOptions,
}

/// `mixnn adversary`.
pub fn run(args: &AdversaryArgs) -> anyhow::Result<()> {
    if !cfg!(feature = "adversary") {
        bail!(
            "mixnn adversary needs nodes that record what they see (`mixnn node --record-tensors`): \
             build with `cargo build --release -p mixnn --features adversary`"
        );
    }
    let started = Instant::now();
    install_cleanup();
    let positions: Vec<Positions> = match args.positions.as_str() {
        "known" => vec![Positions::Known],
        "unknown" => vec![Positions::Unknown],
        "both" => vec![Positions::Known, Positions::Unknown],
        other => bail!("--positions must be known, unknown or both, not {other:?}"),
    };
    let (prepared, aux_pool, eval) = prepare(args)?;
    let Prepared { model, split, cfg } = &prepared;
    let classes = model
        .classes()
        .context("the model has no loss stage over classes")?;
    let base = args.cascade.options()?;
    let runs: Vec<CascadeRun> = if args.sweep {
        vec![
            CascadeRun {
                name: "plain".into(),
                opts: CascadeOptions {
                    keep: Keep::None,
                    dummies: Vec::new(),
                    ..base.clone()
                },
            },
            CascadeRun {
                name: "--keep first,last".into(),
                opts: CascadeOptions {
                    keep: Keep::Both,
                    dummies: Vec::new(),
                    ..base.clone()
                },
            },
            CascadeRun {
                name: format!("{} dummies", args.sweep_dummies.len()),
                opts: CascadeOptions {
                    keep: Keep::None,
                    dummies: args.sweep_dummies.clone(),
                    ..base.clone()
                },
            },
        ]
    } else {
        vec![CascadeRun {
            name: describe(&base),
            opts: base.clone(),
        }]
    };
    let budget = Budget {
        batch: cfg.batch,
        epochs: args.attack_epochs,
        min_steps: args.attack_min_steps,
        max_steps: args.attack_max_steps,
    };
    let budgets = Budgets {
        train: budget,
        regress: Budget {
            batch: cfg.batch,
            epochs: args.regress_epochs,
            min_steps: args.regress_min_steps,
            max_steps: args.regress_max_steps,
        },
        invert_images: args.invert_images,
        invert_steps: args.invert_steps,
    };
    let tmp = tempfile::Builder::new()
        .prefix("mixnn-adversary-")
        .tempdir()?;
    let records = args
        .records
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&records).with_context(|| format!("creating {}", records.display()))?;
    let aux_sets: Vec<Labeled> = args
        .aux
        .iter()
        .map(|n| labeled(&truncate(&aux_pool, *n)))
        .collect();
    let eval_set = labeled(&eval);

    let mut report = Report {
        model: model.name.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        train_images: split.train.len(),
        epochs: cfg.epochs,
        eval_images: eval.len(),
        aux_labeled: !args.aux_unlabeled,
        designer_accuracy: 0.0,
        budgets,
        baselines: Vec::new(),
        rows: Vec::new(),
        seconds: 0.0,
    };
    let mut reference: Option<(Vec<u32>, String)> = None;
    for (r, run) in runs.iter().enumerate() {
        let dir = records.join(format!("cascade-{r}"));
        std::fs::create_dir_all(&dir)?;
        say(&format!(
            "cascade {}: training through recording nodes …",
            run.name
        ));
        let (weights_sha, weights, views, truth) =
            record_cascade(&prepared, &run.opts, &dir, classes)?;
        if args.records.is_none() {
            // What the attacks use is in memory now; the files can be large.
            let _ = std::fs::remove_dir_all(&dir);
        }
        let predictions = designer_predictions(model, &weights, &eval_set)?;
        match &reference {
            None => {
                let right = predictions
                    .iter()
                    .zip(&eval_set.y)
                    .filter(|(p, y)| p == y)
                    .count();
                report.designer_accuracy = right as f64 / eval_set.y.len().max(1) as f64;
                say(&format!(
                    "designer's model: accuracy {:.4} on {} images the cascade never carried",
                    report.designer_accuracy,
                    eval_set.y.len()
                ));
                reference = Some((predictions.clone(), weights_sha));
            }
            Some((_, sha)) if *sha != weights_sha => bail!(
                "cascade {} trained other weights ({}) than the first ({sha})",
                run.name,
                &weights_sha
            ),
            Some(_) => {}
        }
        let truth_pixels = truth_pixels(&prepared, &args.train);
        let scene = Scene {
            truth: &truth,
            views: &views,
            eval: &eval_set,
            reference: &predictions,
            budgets,
            seed: args.attack_seed,
            truth_pixels: &truth_pixels,
        };
        if report.baselines.is_empty() {
            for (n, set) in args.aux.iter().zip(&aux_sets) {
                let score = scene.baseline(&Aux {
                    data: set,
                    labeled: !args.aux_unlabeled,
                })?;
                say(&format!(
                    "baseline (from scratch, {n} aux images): accuracy {:.4}, agreement {:.4}",
                    score.accuracy, score.agreement
                ));
                report.baselines.push(Baseline { aux: *n, score });
            }
        }
        let n = truth.hops();
        let sets = sets(args, n)?;
        for (kind, set) in &sets {
            for pos in &positions {
                for set_aux in &aux_sets {
                    let aux = Aux {
                        data: set_aux,
                        labeled: !args.aux_unlabeled,
                    };
                    let outcome = match scene.attack(set, *pos, &aux) {
                        Ok(o) => o,
                        Err(mixnn_adversary::AdversaryError::NoFiller { from, to }) => {
                            say(&format!(
                                "  {} {:?} positions {pos}: no stand-in from {from} to {to}; skipped",
                                kind.name(),
                                set
                            ));
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let best = outcome.best();
                    say(&format!(
                        "  {:<24} hops {:<14} positions {:<7} aux {:>5}: accuracy {:.4}, agreement {:.4} ({:.1} s)",
                        run.name,
                        format!("{:?}", outcome.hops),
                        pos.to_string(),
                        outcome.aux,
                        best.accuracy,
                        best.agreement,
                        outcome.seconds
                    ));
                    report.rows.push(Row {
                        cascade: run.name.clone(),
                        n,
                        kind: *kind,
                        outcome,
                    });
                }
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    say(&format!("\n{}", report.summary(Positions::Known)));
    say(&format!(
        "whole run: {:.0} s ({} outcomes)",
        report.seconds,
        report.rows.len()
    ));
    write_outputs(args, &report)
}

fn write_outputs(args: &AdversaryArgs, report: &Report) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        crate::train::write_json(path, report)?;
        say(&format!("report: {}", path.display()));
    }
    if let Some(path) = &args.table {
        let text = format!(
            "# {}: what k colluding hops can steal\n\n`{}`\n\n{} training images, {} epochs; scored on {} test images the cascade never carried; designer's model accuracy {:.4}; whole run {:.0} s.\n\nCells: accuracy / agreement with the designer's model, the strongest set of each size.\n\n## Positions known\n\n{}\n## Positions unknown\n\n{}\n## Every outcome\n\n{}",
            report.model,
            report.command,
            report.train_images,
            report.epochs,
            report.eval_images,
            report.designer_accuracy,
            report.seconds,
            report.summary(Positions::Known),
            report.summary(Positions::Unknown),
            report.full()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        say(&format!("tables: {}", path.display()));
    }
    if let Some(path) = &args.plot {
        plot::extraction(report, path)?;
        say(&format!("plot: {}", path.display()));
    }
    Ok(())
}

/// The cascade's options in words.
fn describe(o: &CascadeOptions) -> String {
    let mut parts = Vec::new();
    match o.keep {
        Keep::None => {}
        Keep::First => parts.push("--keep first".to_string()),
        Keep::Last => parts.push("--keep last".to_string()),
        Keep::Both => parts.push("--keep first,last".to_string()),
    }
    if !o.dummies.is_empty() {
        parts.push(format!("dummies at {:?}", o.dummies));
    }
    if parts.is_empty() {
        "plain".into()
    } else {
        parts.join(", ")
    }
}

/// The colluding sets (0-based) of a cascade of `n` hops.
fn sets(args: &AdversaryArgs, n: usize) -> anyhow::Result<Vec<(SetKind, Vec<usize>)>> {
    if args.colluders.is_empty() || args.sweep {
        return Ok(sweep_sets(n));
    }
    args.colluders
        .iter()
        .map(|s| {
            let hops: Vec<usize> = s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    p.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|h| (1..=n).contains(h))
                        .map(|h| h - 1)
                        .with_context(|| {
                            format!("--colluders {s:?}: hops are 1 … {n} in this cascade")
                        })
                })
                .collect::<anyhow::Result<_>>()?;
            Ok((SetKind::Chosen, hops))
        })
        .collect()
}

/// The designer's run (train images, cascade test images), the pool of
/// auxiliary images and the images scored.
fn prepare(args: &AdversaryArgs) -> anyhow::Result<(Prepared, Dataset, Dataset)> {
    crate::selftest::check_active()?;
    let t = &args.train;
    let model = crate::train::load_model(t.model.as_deref())?;
    let dir = crate::fetch::data_dir(&t.data)?;
    let all = data::load_dir(&dir)?;
    if !all.train.fits(&model.input) {
        bail!(
            "model {} takes samples of shape {} but the images in {} are {}",
            model.name,
            model.input,
            dir.display(),
            all.train.shape()
        );
    }
    let n_train = t.train_limit.min(all.train.len());
    let most_aux = args.aux.iter().copied().max().unwrap_or(0);
    if n_train + most_aux > all.train.len() {
        bail!(
            "{} training images and up to {most_aux} auxiliary ones, but {} has only {}: lower --train-limit or --aux",
            n_train,
            dir.display(),
            all.train.len()
        );
    }
    let test = match t.test_limit {
        Some(n) => all.test.clone().truncate(n),
        None => all.test.clone(),
    };
    let n_eval = args.eval_images.unwrap_or(test.len() / 2).min(test.len());
    if n_eval == 0 || n_eval == test.len() {
        bail!("--eval-images must leave images for both the cascade's test phases and the scoring");
    }
    let cascade_test = slice(&test, 0..test.len() - n_eval);
    let eval = slice(&test, test.len() - n_eval..test.len());
    let aux = slice(&all.train, n_train..n_train + most_aux);
    let train = slice(&all.train, 0..n_train);
    let cfg: TrainConfig = t.config(&model);
    Ok((
        Prepared {
            model,
            split: Split {
                train,
                test: cascade_test,
                dir,
            },
            cfg,
        },
        aux,
        eval,
    ))
}

fn slice(d: &Dataset, r: std::ops::Range<usize>) -> Dataset {
    let f = d.features();
    Dataset {
        pixels: d.pixels[r.start * f..r.end * f].to_vec(),
        labels: d.labels[r].to_vec(),
        rows: d.rows,
        cols: d.cols,
        channels: d.channels,
    }
}

fn truncate(d: &Dataset, n: usize) -> Dataset {
    slice(d, 0..n.min(d.len()))
}

/// Images as the model reads them, with labels.
fn labeled(d: &Dataset) -> Labeled {
    let all: Vec<u32> = (0..d.len() as u32).collect();
    Labeled {
        x: Rows {
            dim: d.features(),
            values: d.gather_f32(&all),
        },
        y: d.gather_labels(&all),
    }
}

/// What a recorded run gives: the weights' hash and bytes, every hop's
/// record, and the layout as it ran.
type Recording = (String, Vec<u8>, BTreeMap<usize, HopView>, Truth);

/// Trains through a cascade of recording nodes; returns the weights'
/// hash and bytes, every hop's record and the layout as it ran.
fn record_cascade(
    prepared: &Prepared,
    opts: &CascadeOptions,
    dir: &Path,
    classes: usize,
) -> anyhow::Result<Recording> {
    let model = &prepared.model;
    let n = opts.remote_stages(model) + opts.dummies.len();
    let layout = Layout::new(model, opts.keep, &opts.dummies, n)?;
    let launches: Vec<NodeLaunch> = (0..n)
        .map(|i| NodeLaunch {
            args: vec![
                "--record-tensors".into(),
                dir.join(format!("hop-{}.bin", i + 1)).display().to_string(),
            ],
            ..NodeLaunch::loopback()
        })
        .collect();
    let nodes = LocalNodes::start_with(&launches)?;
    let result = run_cascade(prepared, nodes.hops.clone(), opts.clone(), &mut Quiet);
    // The nodes write what they saw within 50 ms; the last of it is the
    // final state, recorded when the designer closed the session.
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(nodes);
    let (metrics, weights) = result?;
    if let Some(e) = metrics.epochs.last() {
        say(&format!(
            "  trained: {} epochs, test accuracy {:.4} on the cascade's test images; weights {}",
            metrics.epochs.len(),
            e.test_acc,
            &metrics.weights_sha256[..16]
        ));
    }
    let mut views = BTreeMap::new();
    for i in 0..n {
        let path = dir.join(format!("hop-{}.bin", i + 1));
        views.insert(i, HopView::load(&path)?);
    }
    let mut units = Vec::new();
    if opts.keep.first() {
        units.push(Unit {
            spec: model.stages[0].clone(),
            hop: None,
        });
    }
    for (i, h) in layout.hops.iter().enumerate() {
        units.push(Unit {
            spec: h.spec.clone(),
            hop: Some(i),
        });
    }
    if opts.keep.last() {
        if let Some(last) = model.stages.last() {
            units.push(Unit {
                spec: last.clone(),
                hop: None,
            });
        }
    }
    let truth = Truth {
        units,
        data_shape: prepared.split.train.shape(),
        classes,
        optimizer: prepared.cfg.optimizer,
    };
    Ok((metrics.weights_sha256, weights, views, truth))
}

/// The designer's model's predictions for `eval`.
fn designer_predictions(
    model: &ModelSpec,
    weights: &[u8],
    eval: &Labeled,
) -> anyhow::Result<Vec<u32>> {
    let params = mixnn_model::weights::from_safetensors(weights, model.stages.len())?;
    Ok(Chain::of_model(model, &params)?.predict(&eval.x)?)
}

/// The designer's training images of the first steps of the last epoch
/// (whole batches), by step: what the inversion attack is scored
/// against. None with augmentation (the images the hops saw differ).
fn truth_pixels(prepared: &Prepared, t: &TrainArgs) -> BTreeMap<Key, Vec<u8>> {
    let Prepared { model, split, cfg } = prepared;
    let mut out = BTreeMap::new();
    if model.augment.is_some() || cfg.epochs == 0 || t.micro_batches > 1 {
        return out;
    }
    let train = &split.train;
    let per_epoch = train.len().div_ceil(cfg.batch.max(1)) as u64;
    let last = cfg.epochs - 1;
    let order = data::epoch_order(&cfg.seed, last, train.len());
    for (b, chunk) in order.chunks(cfg.batch.max(1)).take(16).enumerate() {
        out.insert(
            (u64::from(last) * per_epoch + b as u64, 0),
            train.gather_pixels(chunk),
        );
    }
    out
}
