//! Every value a hop sends is bound: one test per way around the checks
//! that a review of the audits found (issue 26), each a hop that lies in
//! one way while honest in every other. Each run is compared with the
//! local trainer (losses, test accuracy and weights), and no honest hop
//! may be replaced, reported or blamed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use mixnn_designer::{
    AuditRate, CascadeOptions, CascadeRunner, Checkpoints, DesignerError, HopInfo, Keep,
    Misbehaviour, Replacements, Spares,
};
use mixnn_integration::{dataset, start_node, start_node_with, NARROW as MODEL};
use mixnn_model::data::Dataset;
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, LocalModel, Quiet, RunMetrics, TrainConfig};
use mixnn_node::{Adversary, AdversaryMode, NodeConfig};

/// The adversary's first bad step.
const FROM: u64 = 6;
/// Steps of the run (one epoch).
const STEPS: usize = 20;

fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch: 16,
        optimizer: Optimizer::default(),
        seed: mixnn_model::seed::RunSeed::from_number(5),
        micro_batches: 1,
    }
}

fn data() -> (Dataset, Dataset) {
    (dataset(16 * STEPS, 1), dataset(64, 2))
}

/// Spares that remember what was reported to them.
struct Recorded {
    spares: Spares,
    reported: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Replacements for Recorded {
    fn replace(
        &mut self,
        failed: &[HopInfo],
        in_use: &[HopInfo],
    ) -> Result<Vec<HopInfo>, DesignerError> {
        self.spares.replace(failed, in_use)
    }

    fn report(&mut self, failed: &HopInfo, _step: u64, _reason: &str) {
        self.reported.lock().unwrap().push(failed.addr);
    }
}

/// How one run ended.
struct Outcome {
    result: Result<RunMetrics, DesignerError>,
    local: RunMetrics,
    hops: Vec<HopInfo>,
    spares: Vec<HopInfo>,
    replaced: Vec<SocketAddr>,
    reported: Vec<SocketAddr>,
    failures: Vec<Misbehaviour>,
}

impl Outcome {
    /// The run ended as the local one: same losses, accuracies, weights.
    fn assert_as_local(&self) {
        let m = self.result.as_ref().expect("the run failed");
        assert_eq!(m.weights_sha256, self.local.weights_sha256, "weights");
        for (a, b) in m.epochs.iter().zip(&self.local.epochs) {
            assert_eq!(a.loss, b.loss, "epoch loss");
            assert_eq!(a.test_acc, b.test_acc, "test accuracy");
        }
    }

    /// Only the hop at `bad` was replaced and reported, every
    /// misbehaviour found has it among its suspects, and one is pinned on
    /// it.
    fn assert_only(&self, bad: usize) {
        let addr = self.hops[bad].addr;
        assert_eq!(self.replaced, vec![addr], "replaced");
        assert_eq!(self.reported, vec![addr], "reported");
        assert!(
            self.failures.iter().any(|f| f.blamed() == Some(bad)),
            "not pinned on hop {bad}: {:?}",
            self.failures
        );
        for f in &self.failures {
            assert!(f.culprit.suspects().contains(&bad), "{f}");
            assert!(f.blamed().is_none_or(|j| j == bad), "{f}");
        }
    }

    /// Nobody was replaced or reported.
    fn assert_nobody_replaced(&self) {
        assert!(self.replaced.is_empty(), "replaced {:?}", self.replaced);
        assert!(self.reported.is_empty(), "reported {:?}", self.reported);
    }
}

/// A run of the narrow model over five hops (fewer with kept stages),
/// hop `bad` an adversary, audits at `rate`, checkpoints every 8 steps,
/// two spares.
fn run(base: u64, adversary: Adversary, bad: usize, keep: Keep, rate: f64) -> Outcome {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data();
    let cfg = cfg();
    let mut local = LocalModel::new(&model, &cfg.seed, cfg.optimizer);
    let local = run_training(&mut local, &model, &train, &test, &cfg, &mut Quiet)
        .unwrap()
        .0;
    let n = 5 - usize::from(keep.first()) - usize::from(keep.last());
    let hops: Vec<HopInfo> = (0..n)
        .map(|i| {
            let config = NodeConfig {
                adversary: (i == bad).then(|| adversary.clone()),
                ..NodeConfig::default()
            };
            start_node_with(base + i as u64, config)
        })
        .collect();
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(base + 10 + i)).collect();
    let reported = Arc::new(Mutex::new(Vec::new()));
    let mut runner = CascadeRunner::builder(&model, &cfg, hops.clone())
        .options(CascadeOptions {
            keep,
            audit_rate: AuditRate::new(rate),
            audit_seed: Some(11),
            ..CascadeOptions::default()
        })
        .checkpoints(Checkpoints {
            dir: None,
            every: NonZeroU64::new(8),
        })
        .replacements(Box::new(Recorded {
            spares: Spares::new(spares.clone()),
            reported: Arc::clone(&reported),
        }))
        .connect()
        .unwrap();
    let result = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).map(|r| r.0);
    let replaced = runner
        .recoveries()
        .iter()
        .flat_map(|e| e.replaced.clone())
        .collect();
    let failures = runner.audit_stats().failures.clone();
    let reported = reported.lock().unwrap().clone();
    eprintln!(
        "{:?}@{} at hop {bad}: {}; found {:?}; replaced {replaced:?}",
        adversary.mode,
        adversary.from_step,
        match &result {
            Ok(m) if m.weights_sha256 == local.weights_sha256 => "weights as local".to_string(),
            Ok(_) => "OTHER WEIGHTS".to_string(),
            Err(e) => format!("error: {e}"),
        },
        failures.iter().map(ToString::to_string).collect::<Vec<_>>(),
    );
    Outcome {
        result,
        local,
        hops,
        spares,
        replaced,
        reported,
        failures,
    }
}

/// A hop changes its parameters once between two steps and runs the next
/// step on them, committing to the changed state, but names in its slot
/// the state its last step left (what the chain of digests expects).
/// Before, the designer checked the chain on the slot's digest and the
/// audit on the commitment, and nothing tied one to the other: even with
/// every step audited, nothing was found and the run ended with other
/// weights. Now the opening's state must be the one the slot names.
#[test]
fn a_slot_that_names_another_state_than_the_one_run_is_caught() {
    let o = run(
        1100,
        Adversary::new(AdversaryMode::TamperHidden, FROM),
        1,
        Keep::None,
        1.0,
    );
    o.assert_only(1);
    assert!(o.failures[0].step <= FROM + 1, "{}", o.failures[0]);
    o.assert_as_local();
}

/// A hop makes one fetch fail (so the designer sets the session up again
/// and loads the last checkpoint), then changes the state it was loaded
/// with and trains on it, committing truthfully. Before, the designer's
/// ledger was empty after the rebuild, so the first step after the load
/// was not chained to anything: the run ended with other weights. Now the
/// designer knows every state it loads.
#[test]
fn a_state_changed_right_after_a_load_is_caught() {
    let o = run(
        1120,
        Adversary::new(AdversaryMode::TamperAfterReload, FROM),
        1,
        Keep::None,
        1e-9,
    );
    o.assert_only(1);
    o.assert_as_local();
}

/// Hop 3 flips one byte of hop 1's slot in every forward trailer it
/// passes on. Before, only hop 1's slot was spoiled and the blame rule
/// replaced hops 1 and 2, both honest, and reported them, while the
/// forger stayed. Now each layer authenticates what it wraps: the damage
/// shows at hop 2's layer, in hop 3's hands, and since either could have
/// done it neither is replaced; the run stops naming both.
#[test]
fn a_hop_that_spoils_an_earlier_slot_gets_no_honest_hop_replaced() {
    let o = run(
        1140,
        Adversary::new(AdversaryMode::FlipEarlierSlot, FROM),
        3,
        Keep::None,
        1e-9,
    );
    o.assert_nobody_replaced();
    let err = o.result.as_ref().expect_err("the run went on").to_string();
    assert!(err.contains("hop 2 or hop 3"), "{err}");
    for f in &o.failures {
        assert!(f.culprit.suspects().contains(&3), "{f}");
    }
}

/// With the first stage kept, hop 0 adds noise to the input it receives
/// and commits to it truthfully. Before, the boundary between the
/// designer's kept stage and hop 0 was never checked: nothing found, other
/// weights. Now what hop 0 says it received must be what the designer sent.
#[test]
fn the_boundary_with_a_kept_first_stage_is_checked() {
    let o = run(
        1160,
        Adversary::new(AdversaryMode::InputNoise, FROM),
        0,
        Keep::First,
        1e-9,
    );
    o.assert_only(0);
    o.assert_as_local();
}

/// With the last stage kept, the last remote hop commits to its output
/// but sends the designer a noisy one. Before: never checked, other
/// weights. Now what it says it sent must be what the designer received.
#[test]
fn the_boundary_with_a_kept_last_stage_is_checked() {
    let o = run(
        1180,
        Adversary::new(AdversaryMode::HiddenNoise, FROM),
        3,
        Keep::Last,
        1e-9,
    );
    o.assert_only(3);
    o.assert_as_local();
}

/// The loss hop reports another loss than the one it computed (and
/// committed to). Before, the loss was never checked: the run "succeeded"
/// with other losses. Now the loss is the loss hop's committed output.
#[test]
fn a_false_loss_is_caught() {
    let o = run(
        1200,
        Adversary::new(AdversaryMode::HiddenNoise, FROM),
        4,
        Keep::None,
        1e-9,
    );
    o.assert_only(4);
    o.assert_as_local();
}

/// The last hop sends noisy test outputs. Before, the test phase was not
/// under commitments: the accuracy was the adversary's. Now test outputs
/// carry slots like training outputs, and the noise is caught at the
/// designer's boundary.
#[test]
fn false_test_outputs_are_caught() {
    let o = run(
        1220,
        Adversary::new(AdversaryMode::TestNoise, 0),
        4,
        Keep::None,
        1e-9,
    );
    o.assert_only(4);
    o.assert_as_local();
}

/// The loss hop sends its loss without the trailer. Before: "reply:
/// commitment trailer: truncated", the run ended, nobody was blamed. Now
/// a malformed answer from an end of the cascade is that end's doing.
#[test]
fn a_short_trailer_is_the_sending_hops_misbehaviour() {
    let o = run(
        1240,
        Adversary::new(AdversaryMode::ShortLoss, FROM),
        4,
        Keep::None,
        1e-9,
    );
    o.assert_only(4);
    o.assert_as_local();
}

/// The loss hop sends bytes that are no tensor as its loss. Before: the
/// run ended on a decoding error, nobody blamed.
#[test]
fn an_undecodable_loss_is_the_sending_hops_misbehaviour() {
    let o = run(
        1260,
        Adversary::new(AdversaryMode::BadLossTensor, FROM),
        4,
        Keep::None,
        1e-9,
    );
    o.assert_only(4);
    o.assert_as_local();
}

/// Hop 1 answers one state fetch with a sealed chunk of 3 bytes. Before:
/// "reply: chunk: truncated", the run ended, nobody blamed. A chunk that
/// opens under the hop's reply key is the hop's own doing.
#[test]
fn a_tiny_sealed_chunk_is_the_sending_hops_misbehaviour() {
    let o = run(
        1280,
        Adversary::new(AdversaryMode::TinyChunk, FROM),
        1,
        Keep::None,
        1e-9,
    );
    o.assert_only(1);
    o.assert_as_local();
}

/// Hop 1 hands the designer a false state when it fetches the final
/// weights (after an honest end-of-training checkpoint). Before, the lie
/// was found but the run stopped on it ("plain abort"): the hop was
/// neither replaced nor reported. Now it is, and the fetch is done again.
#[test]
fn a_false_final_state_is_replaced_not_a_plain_abort() {
    let o = run(
        1300,
        Adversary::new(AdversaryMode::FalseFinalState, 0),
        1,
        Keep::None,
        1e-9,
    );
    o.assert_only(1);
    o.assert_as_local();
    assert_eq!(o.spares.len(), 2);
}
