//! The adversary simulator's sanity anchors (issue #28): attacks that are
//! too weak would make MixNN look safe, so these runs pin what they must
//! reach. A real cascade (in-process nodes, real links and onions) trains
//! the paper's MLP on the Fashion-MNIST fixture while every node writes
//! down what it sees of the model (`NodeConfig::observe`); then, on
//! images the cascade never carried:
//!
//! - colluders holding **every** hop rebuild the designer's model exactly
//!   (agreement 1.0, positions known or not);
//! - colluders holding **none** get exactly the from-scratch baseline;
//! - colluders that see the **inputs and the labels** (the first and the
//!   last hop) get a surrogate within 0.03 of the designer's accuracy and
//!   agreeing with it on at least 90 % of the images;
//! - the hop before the loss reads the **labels off its gradient**, and
//!   hops two apart **regress** the hop between them (paper Figure 4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mixnn_adversary::chain::{Budget, Chain, Rows};
use mixnn_adversary::data::{LabelSource, Labeled};
use mixnn_adversary::view::HopView;
use mixnn_adversary::{Aux, Budgets, Positions, Scene, Truth, Unit};
use mixnn_designer::plan::layout::Layout;
use mixnn_designer::{CascadeOptions, CascadeRunner, Keep};
use mixnn_integration::{start_node_with, PAPER};
use mixnn_model::data::{load_dir, Dataset};
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::Sgd;
use mixnn_model::trainer::{run_training, Quiet, TrainConfig};
use mixnn_node::NodeConfig;

type Record = Arc<Mutex<Vec<Vec<u8>>>>;

fn part(d: &Dataset, r: std::ops::Range<usize>) -> Dataset {
    let f = d.features();
    Dataset {
        pixels: d.pixels[r.start * f..r.end * f].to_vec(),
        labels: d.labels[r].to_vec(),
        rows: d.rows,
        cols: d.cols,
        channels: d.channels,
    }
}

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

struct Run {
    truth: Truth,
    views: BTreeMap<usize, HopView>,
    eval: Labeled,
    aux: Labeled,
    reference: Vec<u32>,
    designer_accuracy: f64,
    _dir: tempfile::TempDir,
}

/// Trains the paper's MLP through five recording nodes.
fn record() -> Run {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist");
    let split = load_dir(&fixture).unwrap();
    let (train, aux) = (part(&split.train, 0..1500), part(&split.train, 1500..2000));
    let (test, eval) = (part(&split.test, 0..500), part(&split.test, 500..1000));
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let cfg = TrainConfig {
        epochs: 3,
        batch: 64,
        optimizer: Sgd {
            lr: 0.05,
            momentum: 0.9,
        }
        .into(),
        seed: RunSeed::from_number(28),
        ..TrainConfig::default()
    };
    let records: Vec<Record> = (0..5).map(|_| Arc::default()).collect();
    let hops = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            start_node_with(
                2800 + i as u64,
                NodeConfig {
                    observe: Some(r.clone()),
                    ..NodeConfig::default()
                },
            )
        })
        .collect();
    let mut runner = CascadeRunner::builder(&model, &cfg, hops)
        .options(CascadeOptions::default())
        .connect()
        .unwrap();
    let (_, weights) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    runner.close().unwrap();
    drop(runner);

    let dir = tempfile::tempdir().unwrap();
    let mut views = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        let mut file = Vec::new();
        for rec in r.lock().unwrap().iter() {
            file.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            file.extend_from_slice(rec);
        }
        let path = dir.path().join(format!("hop-{i}.bin"));
        std::fs::write(&path, file).unwrap();
        views.insert(i, HopView::load(&path).unwrap());
    }
    let layout = Layout::new(&model, Keep::None, &[], 5).unwrap();
    let truth = Truth {
        units: layout
            .hops
            .iter()
            .enumerate()
            .map(|(i, h)| Unit {
                spec: h.spec.clone(),
                hop: Some(i),
            })
            .collect(),
        data_shape: train.shape(),
        classes: 10,
        optimizer: cfg.optimizer,
    };
    let eval = labeled(&eval);
    let params = mixnn_model::weights::from_safetensors(&weights, 5).unwrap();
    let reference = Chain::of_model(&model, &params)
        .unwrap()
        .predict(&eval.x)
        .unwrap();
    let right = reference
        .iter()
        .zip(&eval.y)
        .filter(|(a, b)| a == b)
        .count();
    Run {
        truth,
        views,
        aux: labeled(&aux),
        designer_accuracy: right as f64 / eval.y.len() as f64,
        reference,
        eval,
        _dir: dir,
    }
}

#[test]
fn the_attacks_reach_their_anchors() {
    let run = record();
    let budget = Budget {
        batch: 64,
        epochs: 3,
        min_steps: 150,
        max_steps: 400,
    };
    let no_pixels = BTreeMap::new();
    let scene = Scene {
        truth: &run.truth,
        views: &run.views,
        eval: &run.eval,
        reference: &run.reference,
        budgets: Budgets {
            train: budget,
            regress: Budget {
                batch: 64,
                epochs: 30,
                min_steps: 500,
                max_steps: 1000,
            },
            invert_images: 64,
            invert_steps: 20,
        },
        seed: 1,
        truth_pixels: &no_pixels,
    };
    let aux = Aux {
        data: &run.aux,
        labeled: true,
    };
    assert!(
        run.designer_accuracy > 0.6,
        "the designer's model learned little: {}",
        run.designer_accuracy
    );

    // Every hop: the designer's model, bit for bit.
    for pos in [Positions::Known, Positions::Unknown] {
        let all = scene.attack(&[0, 1, 2, 3, 4], pos, &aux).unwrap();
        assert_eq!(all.best().agreement, 1.0, "{pos}: {all:?}");
        assert_eq!(all.best().accuracy, run.designer_accuracy);
        assert_eq!(all.order_right, (pos == Positions::Unknown).then_some(true));
    }

    // No hop: the baseline.
    let baseline = scene.baseline(&aux).unwrap();
    let none = scene.attack(&[], Positions::Known, &aux).unwrap();
    assert_eq!(none.best(), baseline);
    assert!(baseline.agreement < 0.97, "{baseline:?}");

    // Inputs and labels (both ends): near the original.
    let ends = scene.attack(&[0, 4], Positions::Known, &aux).unwrap();
    assert!(
        ends.sees_images && ends.labels == LabelSource::LossHop,
        "{ends:?}"
    );
    let best = ends.best();
    eprintln!(
        "designer accuracy {:.3}; baseline {baseline:?}; both ends {ends:?}",
        run.designer_accuracy
    );
    assert!(
        best.accuracy >= run.designer_accuracy - 0.03 && best.agreement >= 0.9,
        "both ends: {ends:?}, designer {}",
        run.designer_accuracy
    );
    assert!(
        best.agreement > baseline.agreement,
        "{best:?} vs {baseline:?}"
    );

    // The hop before the loss reads the labels off its gradient; hops two
    // apart regress the hop between them.
    let fourth = scene.attack(&[3], Positions::Known, &aux).unwrap();
    assert_eq!(fourth.labels, LabelSource::Gradient(3), "{fourth:?}");
    let apart = scene.attack(&[1, 3], Positions::Known, &aux).unwrap();
    assert!(apart.regress.is_some(), "{apart:?}");
    // Without auxiliary data, hops that never see an image steal nothing
    // better than chance.
    let blind = scene
        .attack(
            &[1, 3],
            Positions::Known,
            &Aux {
                data: &Labeled::default(),
                labeled: true,
            },
        )
        .unwrap();
    assert!(blind.best().accuracy < 0.35, "{blind:?}");
}
