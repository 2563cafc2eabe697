//! Detection rates, measured by running adversaries through the audits
//! (not by replaying the draw rule): a hop lies at every step (or test
//! batch) from the start, the designer audits at rate Q with no spares,
//! and the run stops at the first misbehaviour found. Over many runs, the
//! number of steps each lie survived gives the probability that one
//! lying step is caught (a geometric law: trials / steps exposed).
//!
//! `cargo test -p mixnn-integration --test detection -- --ignored --nocapture`
//! (`MIXNN_DETECTION_TRIALS`, default 40; `MIXNN_DETECTION_Q`, default
//! 0.1) prints the table of `docs/threat-model/binding.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_designer::{AuditRate, CascadeOptions, CascadeRunner, DesignerError, HopInfo};
use mixnn_integration::{dataset, start_stoppable_node, RunningNode, NARROW as MODEL};
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, EpochMetrics, Observer, TrainConfig};
use mixnn_node::{Adversary, Mutation, MutationKind, NodeConfig};
use mixnn_proto::trailer::Pass;

/// Steps of training and test batches offered to a lie.
const STEPS: usize = 40;
const TEST_BATCHES: usize = 40;
const BATCH: usize = 8;

/// Counts the test batches done.
#[derive(Default)]
struct Count {
    test: bool,
    tested: usize,
}

impl Observer for Count {
    fn phase(&mut self, _: u32, what: &str, _: usize) {
        self.test = what == "test";
    }
    fn tick(&mut self, _: Option<f32>) {
        if self.test {
            self.tested += 1;
        }
    }
    fn epoch_done(&mut self, _: &EpochMetrics) {}
}

/// One run with hop `hop` lying by `kind` at every step from 0: the
/// steps (or test batches) it lied in before and including the one found,
/// and whether it was found.
fn exposure(
    seed: u64,
    draws: u64,
    hop: usize,
    kind: MutationKind,
    q: f64,
    test: bool,
) -> (u64, bool) {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: BATCH,
        optimizer: Optimizer::default(),
        seed: mixnn_model::seed::RunSeed::from_number(seed),
        micro_batches: 1,
    };
    let train = dataset(BATCH * if test { 2 } else { STEPS }, seed);
    let data_test = dataset(BATCH * if test { TEST_BATCHES } else { 1 }, seed + 1);
    let mutation = Mutation {
        kind,
        at: 0,
        once: false,
        seed,
    };
    let nodes: Vec<RunningNode> = (0..5)
        .map(|i| {
            let config = NodeConfig {
                adversary: (i == hop).then(|| Adversary::fuzz(mutation)),
                ..NodeConfig::default()
            };
            start_stoppable_node(seed * 8 + i as u64, config)
        })
        .collect();
    let hops: Vec<HopInfo> = nodes.iter().map(|n| n.info.clone()).collect();
    let mut runner = CascadeRunner::connect(
        &model,
        hops,
        &cfg,
        CascadeOptions {
            audit_rate: AuditRate::new(q),
            audit_seed: Some(draws),
            ..CascadeOptions::default()
        },
    )
    .unwrap();
    let mut count = Count::default();
    let r = run_training(&mut runner, &model, &train, &data_test, &cfg, &mut count);
    match r {
        Err(DesignerError::Misbehaved(m)) => {
            assert!(m.culprit.suspects().contains(&hop), "{m}");
            if test {
                // "test batch N: …": the batch found.
                let batch = m
                    .reason
                    .strip_prefix("test batch ")
                    .and_then(|r| r.split(':').next())
                    .and_then(|b| b.parse::<u64>().ok())
                    .unwrap_or(count.tested as u64);
                (batch + 1, true)
            } else if matches!(kind, MutationKind::TamperState | MutationKind::TamperHidden) {
                // It changes its state after a step; the steps after run on
                // it: that is where the lie is (from step 1).
                (m.step, true)
            } else {
                (m.step + 1, true)
            }
        }
        Err(e) => panic!("{e}"),
        Ok(_) if test => (TEST_BATCHES as u64, false),
        Ok(_) => (STEPS as u64, false),
    }
}

/// The measured probability that one lying step of `kind` at `hop` is
/// caught, over `trials` runs, with its binomial standard error.
fn measure(name: &str, hop: usize, kind: MutationKind, q: f64, trials: u64, test: bool) {
    let (mut exposed, mut caught) = (0u64, 0u64);
    let class = u64::from_le_bytes(
        blake3::hash(name.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap(),
    );
    for t in 0..trials {
        let (steps, found) = exposure(100 + t, class ^ t, hop, kind, q, test);
        exposed += steps;
        caught += u64::from(found);
    }
    let p = caught as f64 / exposed as f64;
    let se = (p * (1.0 - p) / exposed as f64).sqrt();
    eprintln!(
        "| {name} | hop {hop} | {caught} caught in {exposed} lying {} | {:.3} ± {:.3} |",
        if test { "test batches" } else { "steps" },
        p,
        se
    );
}

#[test]
#[ignore = "long: run with --ignored --nocapture"]
fn measured_detection_rates() {
    let trials: u64 = std::env::var("MIXNN_DETECTION_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let q: f64 = std::env::var("MIXNN_DETECTION_Q")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.1);
    eprintln!("Q = {q}, {trials} runs per class");
    eprintln!("| adversary class | where | found | P(one lying step caught) |");
    eprintln!("|---|---|---|---|");
    let (f, t) = (Pass::Forward, Pass::Test);
    measure(
        "computes wrongly, commits to it (forward)",
        1,
        MutationKind::ComputedValues(f),
        q,
        trials,
        false,
    );
    measure(
        "skips its update",
        1,
        MutationKind::SkipUpdate,
        q,
        trials,
        false,
    );
    measure(
        "runs on another state, slot names the chained one",
        1,
        MutationKind::TamperHidden,
        q,
        trials,
        false,
    );
    measure(
        "the loss hop computes another loss, commits to it",
        4,
        MutationKind::ComputedValues(f),
        q,
        trials,
        false,
    );
    measure(
        "computes wrong test outputs, commits to them",
        1,
        MutationKind::ComputedValues(t),
        q,
        trials,
        true,
    );
    measure(
        "changes its state between steps (truthful slots)",
        1,
        MutationKind::TamperState,
        q,
        trials,
        false,
    );
    measure(
        "sends other values than its slot names",
        1,
        MutationKind::SentValues(f),
        q,
        trials,
        false,
    );
}
