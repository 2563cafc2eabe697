//! Byzantine hops: commitments and audits catch a hop that adds noise
//! (committed or hidden behind honest commitments), flips gradients or
//! skips updates; with spare nodes the run replaces it,
//! rolls back before its first bad step and ends byte-identical to the
//! local trainer. An honest run is never flagged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroU64;

use mixnn_designer::{
    AuditRate, CascadeOptions, CascadeRunner, Checkpoints, Culprit, DesignerError, HopInfo, Keep,
    MisbehaviourKind, Spares,
};
use mixnn_integration::{dataset, start_node, start_node_with};
use mixnn_model::data::Dataset;
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, LocalModel, Quiet, RunMetrics, TrainConfig};
use mixnn_node::{Adversary, AdversaryMode, NodeConfig};

use mixnn_integration::NARROW as MODEL;
/// The adversary's first bad step.
const FROM: u64 = 6;
/// Hop 1 runs Linear 16 → 16 (it has parameters and sends a gradient).
const BAD_HOP: usize = 1;
const AUDIT_SEED: u64 = 11;

fn cfg(epochs: u32) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: 16,
        optimizer: Optimizer::default(),
        seed: mixnn_model::seed::RunSeed::from_number(5),
        micro_batches: 1,
    }
}

/// `steps` steps an epoch.
fn data(steps: usize) -> (Dataset, Dataset) {
    (dataset(16 * steps, 1), dataset(64, 2))
}

fn local(model: &ModelSpec, cfg: &TrainConfig, train: &Dataset, test: &Dataset) -> RunMetrics {
    let mut local = LocalModel::new(model, &cfg.seed, cfg.optimizer);
    run_training(&mut local, model, train, test, cfg, &mut Quiet)
        .unwrap()
        .0
}

fn cascade(base: u64, mode: AdversaryMode) -> Vec<HopInfo> {
    cascade_at(base, mode, BAD_HOP)
}

fn cascade_at(base: u64, mode: AdversaryMode, bad: usize) -> Vec<HopInfo> {
    cascade_from(base, mode, bad, FROM)
}

/// Five hops, hop `bad` misbehaving in `mode` from step `from_step`.
fn cascade_from(base: u64, mode: AdversaryMode, bad: usize, from_step: u64) -> Vec<HopInfo> {
    (0..5)
        .map(|i| {
            let config = NodeConfig {
                adversary: (i == bad).then(|| Adversary::new(mode, from_step)),
                ..NodeConfig::default()
            };
            start_node_with(base + i as u64, config)
        })
        .collect()
}

/// A runner over `hops` with `spares` for replacements, audits at `rate`
/// (seeded) and a checkpoint every `every` steps.
fn with_spares(
    model: &ModelSpec,
    cfg: &TrainConfig,
    hops: &[HopInfo],
    spares: &[HopInfo],
    rate: f64,
    every: u64,
) -> CascadeRunner {
    CascadeRunner::builder(model, cfg, hops.to_vec())
        .options(CascadeOptions {
            audit_rate: AuditRate::new(rate),
            audit_seed: Some(AUDIT_SEED),
            ..CascadeOptions::default()
        })
        .checkpoints(Checkpoints {
            dir: None,
            every: NonZeroU64::new(every),
        })
        .replacements(Box::new(Spares::new(spares.to_vec())))
        .connect()
        .unwrap()
}

fn opts() -> CascadeOptions {
    CascadeOptions {
        audit_rate: AuditRate::new(0.05),
        audit_seed: Some(AUDIT_SEED),
        ..CascadeOptions::default()
    }
}

fn caught_and_recovered(base: u64, mode: AdversaryMode) {
    caught_and_recovered_at(base, mode, BAD_HOP);
}

fn caught_and_recovered_at(base: u64, mode: AdversaryMode, bad: usize) {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 60);
    let cfg = cfg(1);
    let lm = local(&model, &cfg, &train, &test);
    let hops = cascade_at(base, mode, bad);
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(base + 10 + i)).collect();
    let mut runner = CascadeRunner::builder(&model, &cfg, hops.clone())
        .options(opts())
        .checkpoints(Checkpoints {
            dir: None,
            every: NonZeroU64::new(8),
        })
        .replacements(Box::new(Spares::new(spares.clone())))
        .connect()
        .unwrap();
    let (cm, _) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let stats = runner.audit_stats().clone();
    assert_eq!(stats.failures.len(), 1, "{mode:?}: {stats:?}");
    let f = &stats.failures[0];
    assert_eq!(f.culprit.suspects()[0], bad, "{mode:?}: {f:?}");
    assert!(
        f.step >= FROM && f.step < FROM + 60,
        "{mode:?}: caught at step {}",
        f.step
    );
    let events = runner.recoveries();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].cause.starts_with("audit failed"), "{events:?}");
    assert!(events[0].resumed_at <= FROM, "{events:?}");
    assert_eq!(runner.hops()[bad], spares[0]);
    assert_eq!(events[0].replaced, vec![hops[bad].addr]);
    assert_eq!(lm.weights_sha256, cm.weights_sha256, "{mode:?}");
}

/// Hop `bad` hides noise behind an honest slot: what it says it sent to
/// `bad + 1` is not what that hop says it received. That shows at the
/// very delivery of the first bad step, without an audit (before: only
/// when an audit opened one side, about 2Q per step), but either hop may
/// be the liar: nobody is replaced or reported, the run goes back to its
/// checkpoint and, finding the same pair again, stops naming both (before:
/// both were replaced, one of them honest).
fn stops_naming_the_pair(base: u64, bad: usize) {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 60);
    let cfg = cfg(1);
    let hops = cascade_at(base, AdversaryMode::HiddenNoise, bad);
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(base + 10 + i)).collect();
    let mut runner = with_spares(&model, &cfg, &hops, &spares, 0.05, 8);
    let err = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap_err();
    let DesignerError::Misbehaved(m) = &err else {
        panic!("{err}");
    };
    assert_eq!(m.culprit, Culprit::Pair(bad, bad + 1), "{err}");
    assert_eq!(
        (m.step, m.kind),
        (FROM, MisbehaviourKind::Boundary),
        "{err}"
    );
    assert!(err.to_string().contains("none is replaced"), "{err}");
    let stats = runner.audit_stats();
    assert_eq!(stats.failures.len(), 2, "{stats:?}");
    let events = runner.recoveries();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].replaced.is_empty(), "{events:?}");
    assert_eq!(runner.hops(), &hops[..]);
}

#[test]
fn noise_is_caught_and_the_run_ends_as_an_honest_one() {
    caught_and_recovered(800, AdversaryMode::Noise);
}

#[test]
fn flipped_gradients_are_caught_and_the_run_ends_as_an_honest_one() {
    caught_and_recovered(820, AdversaryMode::FlipGradient);
}

#[test]
fn skipped_updates_are_caught_and_the_run_ends_as_an_honest_one() {
    caught_and_recovered(840, AdversaryMode::SkipUpdate);
}

#[test]
fn noise_behind_honest_commitments_is_caught_at_the_boundary() {
    stops_naming_the_pair(850, BAD_HOP);
}

/// Hop 2 (linear 16 → 10) hides noise behind honest commitments next to
/// hop 3, log-softmax, which has no parameters: the boundary is checked
/// at every delivery whatever the hops.
#[test]
fn noise_hidden_next_to_a_hop_without_parameters_is_caught() {
    stops_naming_the_pair(855, 2);
}

/// A hop that tampers with its parameters between steps, committing
/// truthfully to each step: every single-step audit passes. Before the
/// digest chain (forward slot of step s against the backward slot of
/// s − 1) it went unnoticed at this audit rate; now it is caught at the
/// first step after the tampering, without an audit, and replaced.
#[test]
fn tampering_between_steps_is_caught_by_the_digest_chain_at_the_next_step() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 60);
    let cfg = cfg(1);
    let lm = local(&model, &cfg, &train, &test);
    let hops = cascade(870, AdversaryMode::TamperBetweenSteps);
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(875 + i)).collect();
    // Audits open nothing here: the chain alone must catch it.
    let mut runner = with_spares(&model, &cfg, &hops, &spares, 1e-9, 8);
    let (cm, _) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let stats = runner.audit_stats().clone();
    assert_eq!(stats.failures.len(), 1, "{stats:?}");
    let f = &stats.failures[0];
    assert_eq!((f.blamed(), f.step), (Some(BAD_HOP), FROM + 1), "{f:?}");
    assert!(f.reason.contains("do not chain"), "{f:?}");
    assert_eq!(runner.recoveries().len(), 1);
    assert_eq!(runner.hops()[BAD_HOP], spares[0]);
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
}

/// The last hop overwrites the trailer it receives, trying to erase the
/// other hops' commitments or get one of them blamed. Each layer's tag
/// covers what it wraps, so the damage shows at the layer of the hop
/// before the forger, at once: the pair named holds the forger, nobody is
/// replaced or reported, and the run stops when the same pair comes back.
/// (Before the layered trailer a hop could write any hop's slot; before
/// tags covered what they wrap, a forger could get two honest hops further
/// back replaced.)
#[test]
fn a_last_hop_that_forges_slots_is_in_the_pair_named_and_nobody_is_replaced() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 40);
    let cfg = cfg(1);
    let last = 4;
    let hops = cascade_at(890, AdversaryMode::ForgeSlots, last);
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(896 + i)).collect();
    let mut runner = with_spares(&model, &cfg, &hops, &spares, 1e-9, 8);
    let err = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap_err();
    let DesignerError::Misbehaved(m) = &err else {
        panic!("{err}");
    };
    assert_eq!(m.culprit, Culprit::Pair(3, last), "{err}");
    assert_eq!((m.step, m.kind), (FROM, MisbehaviourKind::Trailer), "{err}");
    assert!(runner.recoveries().iter().all(|e| e.replaced.is_empty()));
    assert_eq!(runner.hops(), &hops[..]);
}

/// A hop that trains honestly but hands the designer another state when
/// a checkpoint fetches it: the fetched state's digest is checked against
/// the one its last step committed to, so the lie is caught at the first
/// checkpoint after it starts (no audit needed), the hop replaced, and the
/// run rolled back ends as an honest one.
#[test]
fn a_false_state_in_a_checkpoint_is_caught_against_the_commitment() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 30);
    let cfg = cfg(1);
    let lm = local(&model, &cfg, &train, &test);
    let hops = cascade(930, AdversaryMode::FalseState);
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(936 + i)).collect();
    let mut runner = with_spares(&model, &cfg, &hops, &spares, 1e-9, 4);
    let (cm, _) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let stats = runner.audit_stats().clone();
    assert_eq!(stats.failures.len(), 1, "{stats:?}");
    let f = &stats.failures[0];
    assert_eq!(f.blamed(), Some(BAD_HOP), "{f:?}");
    assert!(f.reason.contains("committed to"), "{f:?}");
    assert!(f.step >= FROM && f.step < FROM + 4, "{f:?}");
    assert_eq!(runner.hops()[BAD_HOP], spares[0]);
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
}

#[test]
fn without_spares_a_failed_audit_stops_the_run_naming_hop_and_step() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 60);
    let cfg = cfg(1);
    let hops = cascade(860, AdversaryMode::FlipGradient);
    let mut runner = CascadeRunner::connect(&model, hops, &cfg, opts()).unwrap();
    let err = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap_err();
    match &err {
        DesignerError::Misbehaved(m) => {
            assert_eq!(m.blamed(), Some(BAD_HOP));
            assert!(m.step >= FROM && m.step < FROM + 60, "{err}");
        }
        other => panic!("not an audit failure: {other}"),
    }
    let said = err.to_string();
    assert!(
        said.starts_with("hop 1 (") && said.contains("(audit failed)"),
        "{said}"
    );
}

#[test]
fn an_honest_run_over_two_epochs_is_never_flagged() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(40);
    let cfg = cfg(2);
    let lm = local(&model, &cfg, &train, &test);
    let hops: Vec<HopInfo> = (0..5).map(|i| start_node(880 + i)).collect();
    let mut runner = CascadeRunner::connect(&model, hops, &cfg, opts()).unwrap();
    let (cm, _) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let last = cm.epochs.last().unwrap();
    runner.check_accuracy(last.epoch, last.test_acc);
    let stats = runner.audit_stats();
    assert_eq!(stats.committed_steps, 80);
    assert!(stats.audits > 0, "{stats:?}");
    assert_eq!(stats.passed, stats.audits, "{stats:?}");
    // Openings are fetched while later steps run: the pipeline stops for
    // few audits (before, for every one of them).
    assert!(stats.in_flight > 0, "{stats:?}");
    assert!(stats.failures.is_empty(), "{stats:?}");
    assert!(!stats.suspect, "{stats:?}");
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
}

#[test]
fn an_honest_run_with_kept_stages_and_a_dummy_passes_its_audits() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(40);
    let cfg = cfg(1);
    let lm = local(&model, &cfg, &train, &test);
    // Stages 2–4 remote, a dummy between the first two of them.
    let hops: Vec<HopInfo> = (0..4).map(|i| start_node(895 + i)).collect();
    let opts = CascadeOptions {
        keep: Keep::Both,
        dummies: vec![1],
        audit_rate: AuditRate::new(0.2),
        audit_seed: Some(AUDIT_SEED),
        ..CascadeOptions::default()
    };
    let mut runner = CascadeRunner::connect(&model, hops, &cfg, opts).unwrap();
    let (cm, _) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let stats = runner.audit_stats();
    assert!(stats.audits > 0, "{stats:?}");
    assert_eq!(stats.passed, stats.audits, "{stats:?}");
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
}

#[test]
fn audits_refuse_micro_batches() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let cfg = TrainConfig {
        micro_batches: 2,
        ..cfg(1)
    };
    let hops: Vec<HopInfo> = (0..5).map(|i| start_node(890 + i)).collect();
    match CascadeRunner::connect(&model, hops, &cfg, opts()) {
        Err(DesignerError::Config { message }) => assert!(message.contains("micro-batch")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("audits with micro-batches accepted"),
    }
}

/// Only the ends of a cascade ever talk to the designer: through a run
/// with audits (openings fetched from every hop), checkpoints (states
/// fetched) and a recovery (a replacement in the middle loaded with a
/// checkpoint's state), no middle hop sends anything to the designer's
/// address — what each node sends to is what it records in its learned
/// peers file. The first hop's file names the designer (it delivers).
#[test]
fn middle_hops_never_reach_the_designer_through_audits_checkpoints_and_a_recovery() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(FROM as usize + 30);
    let cfg = cfg(1);
    let dir = tempfile::tempdir().unwrap();
    let file = |i: usize| dir.path().join(format!("node{i}.txt"));
    let start = |i: usize, adversary: Option<Adversary>| {
        let config = NodeConfig {
            adversary,
            learned_file: Some(file(i)),
            ..NodeConfig::default()
        };
        start_node_with(900 + i as u64, config)
    };
    let bad = Adversary::new(AdversaryMode::Noise, FROM);
    let hops: Vec<HopInfo> = (0..5)
        .map(|i| start(i, (i == BAD_HOP).then(|| bad.clone())))
        .collect();
    let spares: Vec<HopInfo> = (5..7).map(|i| start(i, None)).collect();
    let mut runner = with_spares(&model, &cfg, &hops, &spares, 0.2, 4);
    run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let events = runner.recoveries().to_vec();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        runner.hops()[BAD_HOP],
        spares[0],
        "the middle hop was replaced"
    );
    assert!(runner.audit_stats().audits > 0);
    drop(runner);
    let nodes: std::collections::HashSet<std::net::SocketAddr> =
        hops.iter().chain(&spares).map(|h| h.addr).collect();
    let learned = |i: usize| -> Vec<std::net::SocketAddr> {
        std::fs::read_to_string(file(i))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let designer: Vec<_> = learned(0)
        .into_iter()
        .filter(|a| !nodes.contains(a))
        .collect();
    assert_eq!(
        designer.len(),
        1,
        "the first hop delivers to the designer: {designer:?}"
    );
    // Positions 1-3 and the spare that replaced hop 1 are middle hops.
    for i in [1, 2, 3, 5] {
        let l = learned(i);
        assert!(!l.is_empty(), "node {i} sent nothing");
        assert!(
            l.iter().all(|a| nodes.contains(a)),
            "middle node {i} sent to a non-node address (the designer's is {}): {l:?}",
            designer[0]
        );
    }
}

/// A window as wide as the hops' audit window is refused with audits on:
/// a hop keeps the openings of its last `KEPT` steps, and with more steps
/// sent after an audited one an honest hop had dropped its opening when
/// asked (before: a window of 24 at Q = 0.2, "audit failed at hop 1:
/// hop refused to open step 0", an honest hop blamed).
#[test]
fn a_window_wider_than_the_audit_window_is_refused() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let cfg = cfg(1);
    let hops: Vec<HopInfo> = (0..5).map(|i| start_node(990 + i)).collect();
    let wide = CascadeOptions {
        window: 24,
        ..opts()
    };
    match CascadeRunner::connect(&model, hops.clone(), &cfg, wide) {
        Err(DesignerError::Config { message }) => {
            assert!(message.contains("window of 24"), "{message}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a window of 24 accepted with audits"),
    }
    // The widest window allowed trains through audits, all passed.
    let (train, test) = data(60);
    let widest = CascadeOptions {
        window: mixnn_proto::audit::KEPT - 1,
        audit_rate: AuditRate::new(0.2),
        ..opts()
    };
    let mut runner = CascadeRunner::connect(&model, hops, &cfg, widest).unwrap();
    let (cm, _) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let stats = runner.audit_stats();
    assert!(stats.audits > 0 && stats.failures.is_empty(), "{stats:?}");
    let lm = local(&model, &cfg, &train, &test);
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
}

/// A hop that trains honestly but garbles every audit opening it sends
/// (and answers probes) makes a transfer that does not open: changed by
/// the hop or by one of the hops that relayed it, no one can tell which.
/// Nobody is replaced or reported: the run goes back to its checkpoint
/// and, when the same route fails again, stops naming the hop and its
/// relays. Before: the other hops' openings of the failed fetch were taken
/// for answers to the next one ("chunk 0 of a transfer from hop 3"), 15
/// recoveries replaced honest hops found by probes until the spares ran
/// out, and the run ended after 40 s with "no spare node left"; then, 4
/// recoveries before stopping.
#[test]
fn a_bad_reply_that_keeps_coming_back_ends_the_run_instead_of_looping() {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let (train, test) = data(60);
    let cfg = cfg(1);
    let hops = cascade_from(1000, AdversaryMode::GarbleOpenings, 2, 0);
    let spares: Vec<HopInfo> = (0..2).map(|i| start_node(1010 + i)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut runner = with_spares(&model, &cfg, &hops, &spares, 0.5, 4);
        let r = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).map(|_| ());
        let replaced: usize = runner.recoveries().iter().map(|e| e.replaced.len()).sum();
        let _ = tx.send((r, runner.recoveries().len(), replaced));
    });
    let (r, recoveries, replaced) = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the run still recovering after 120 s");
    let err = r.unwrap_err();
    let DesignerError::Misbehaved(m) = &err else {
        panic!("{err}");
    };
    assert_eq!(m.culprit, Culprit::Route { hop: 2 }, "{err}");
    assert!(err.to_string().contains("does not open"), "{err}");
    assert_eq!((recoveries, replaced), (1, 0), "{err}");
}
