//! The byzantine fuzzer, in the spirit of Twins (systematic byzantine
//! behaviour for BFT protocols) and Jepsen: in each trial one hop, or two
//! colluding hops, of a five-hop cascade change one thing they send
//! ([`MutationKind`]: a trailer byte, a slot field, a tensor's values or
//! header, the body's length, their state, a fetched state, an opening, a
//! sealed chunk, a relayed body) or drop, duplicate or delay one message
//! of any op (loops and probes included), once or from a drawn step on.
//! Every hop is audited at every step and test batch (Q = 1), so that
//! every lie the checks can see is seen in the trial itself.
//!
//! The invariant checked on every trial: the run ends as the local
//! trainer's (losses, test accuracy, weights, bit for bit), or it stops
//! (or recovers) having found a misbehaviour whose suspects hold an
//! adversary; no honest hop is ever replaced, reported, or blamed alone
//! (a misbehaviour pinned on a pair or a route must hold an adversary).
//! A run that stops on a timeout or on no progress names nobody: an
//! adversary that drops messages is not told apart from a crash.
//!
//! Seeded: a failing trial replays with `MIXNN_FUZZ_SEED=<seed>`. The
//! short run (one trial per check of the designer, `fuzz_short`) runs in
//! CI; the long run is
//! `MIXNN_FUZZ_TRIALS=2000 cargo test -p mixnn-integration --test fuzz -- --ignored --nocapture`.
//!
//! Over 600 lines: one harness (the in-process cascade, every mutation
//! kind, the invariant and its tally) that a split would only scatter; each
//! mutation kind sits next to the code that applies it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mixnn_designer::{
    AuditRate, CascadeOptions, CascadeRunner, Checkpoints, DesignerError, HopInfo, Misbehaviour,
    Replacements, Spares,
};
use mixnn_integration::{dataset, start_stoppable_node, RunningNode, NARROW as MODEL};
use mixnn_model::data::Dataset;
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, LocalModel, Quiet, RunMetrics, TrainConfig};
use mixnn_node::{Adversary, Mutation, MutationKind, NodeConfig};
use mixnn_proto::trailer::Pass;
use mixnn_wire::Op;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Hops of the cascade.
const HOPS: usize = 5;
/// Training steps (one epoch) and test batches.
const STEPS: u64 = 8;
const TEST_BATCHES: usize = 2;
const BATCH: usize = 8;

const PASSES: [Pass; 3] = [Pass::Forward, Pass::Backward, Pass::Test];
const OPS: [Op; 7] = [
    Op::Forward,
    Op::Backward,
    Op::Test,
    Op::Loop,
    Op::Fetch,
    Op::Audit,
    Op::Load,
];

/// Every mutation kind the fuzzer draws from.
fn kinds() -> Vec<MutationKind> {
    let mut k = Vec::new();
    for p in PASSES {
        k.extend([
            MutationKind::ReceivedTrailer(p),
            MutationKind::SentTrailer(p),
            MutationKind::SlotDigest(p),
            MutationKind::SlotInput(p),
            MutationKind::SlotOutput(p),
            MutationKind::SentValues(p),
            MutationKind::ComputedValues(p),
            MutationKind::ReceivedValues(p),
            MutationKind::Shape(p),
            MutationKind::Truncate(p),
        ]);
    }
    k.extend([
        MutationKind::SkipUpdate,
        MutationKind::TamperState,
        MutationKind::TamperHidden,
        MutationKind::TamperAfterLoad,
        MutationKind::TamperAtInit,
        MutationKind::TamperTest,
        MutationKind::FetchedState,
        MutationKind::FetchPlain,
        MutationKind::SealedFetch,
        MutationKind::OpeningByte,
        MutationKind::RefuseOpening,
        MutationKind::SealedOpening,
        MutationKind::RelayedByte,
    ]);
    for op in OPS {
        k.extend([
            MutationKind::Drop(op),
            MutationKind::Duplicate(op),
            MutationKind::Delay(op),
        ]);
        // Only these go on to the next hop (a backward goes back; a
        // transfer's hop answers back).
        if matches!(op, Op::Forward | Op::Test | Op::Loop) {
            k.push(MutationKind::DropOnward(op));
        }
    }
    k
}

/// One trial: which hops lie, and how.
#[derive(Debug, Clone)]
struct Trial {
    seed: u64,
    adversaries: Vec<(usize, Mutation)>,
}

fn mutation(rng: &mut ChaCha8Rng, kind: MutationKind) -> Mutation {
    Mutation {
        kind,
        at: rng.next_u64() % STEPS,
        once: !rng.next_u32().is_multiple_of(4),
        seed: rng.next_u64(),
    }
}

/// The trial of `seed`.
fn draw(seed: u64) -> Trial {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let all = kinds();
    let kind = all[rng.next_u32() as usize % all.len()];
    let hop = rng.next_u32() as usize % HOPS;
    let mut adversaries = vec![(hop, mutation(&mut rng, kind))];
    // One trial in four: a colluding second hop, a neighbour or any other,
    // lying in a way of its own.
    if rng.next_u32().is_multiple_of(4) {
        let other = if rng.next_u32().is_multiple_of(2) {
            if hop + 1 < HOPS {
                hop + 1
            } else {
                hop - 1
            }
        } else {
            (hop + 1 + rng.next_u32() as usize % (HOPS - 1)) % HOPS
        };
        let k = all[rng.next_u32() as usize % all.len()];
        adversaries.push((other, mutation(&mut rng, k)));
    }
    Trial { seed, adversaries }
}

/// What one trial did.
#[derive(Debug)]
struct Report {
    trial: Trial,
    /// Times each adversary's mutation was applied.
    fired: Vec<u32>,
    /// "as local", "recovered" or "stopped: …".
    outcome: String,
    violations: Vec<String>,
    seconds: f64,
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

/// The model, the data and the local trainer's run, shared by trials.
struct World {
    model: ModelSpec,
    cfg: TrainConfig,
    train: Dataset,
    test: Dataset,
    local: RunMetrics,
}

impl World {
    fn new() -> Self {
        let model = ModelSpec::parse(MODEL, "narrow").unwrap();
        let cfg = TrainConfig {
            epochs: 1,
            batch: BATCH,
            optimizer: Optimizer::default(),
            seed: mixnn_model::seed::RunSeed::from_number(3),
            micro_batches: 1,
        };
        let train = dataset(BATCH * STEPS as usize, 1);
        let test = dataset(BATCH * TEST_BATCHES, 2);
        let mut local = LocalModel::new(&model, &cfg.seed, cfg.optimizer);
        let local = run_training(&mut local, &model, &train, &test, &cfg, &mut Quiet)
            .unwrap()
            .0;
        World {
            model,
            cfg,
            train,
            test,
            local,
        }
    }
}

/// Whether `m` holds an adversary among its suspects (pinned on one hop:
/// that hop is one).
fn names_an_adversary(m: &Misbehaviour, bad: &BTreeSet<SocketAddr>) -> bool {
    match m.blamed() {
        Some(_) => m.addrs.first().is_some_and(|a| bad.contains(a)),
        None => m.addrs.iter().any(|a| bad.contains(a)),
    }
}

fn same_run(a: &RunMetrics, b: &RunMetrics) -> bool {
    a.weights_sha256 == b.weights_sha256
        && a.epochs.len() == b.epochs.len()
        && a.epochs
            .iter()
            .zip(&b.epochs)
            .all(|(x, y)| x.loss.to_bits() == y.loss.to_bits() && x.test_acc == y.test_acc)
}

/// Runs `trial` on a thread of its own; a trial that has not ended after
/// 180 s is a violation (a wedged run).
fn run(world: &Arc<World>, trial: &Trial) -> Report {
    let (tx, rx) = std::sync::mpsc::channel();
    let (w, t) = (Arc::clone(world), trial.clone());
    std::thread::spawn(move || {
        let _ = tx.send(run_here(&w, &t));
    });
    rx.recv_timeout(Duration::from_secs(180))
        .unwrap_or_else(|_| Report {
            trial: trial.clone(),
            fired: Vec::new(),
            outcome: "WEDGED".into(),
            violations: vec!["the run had not ended after 180 s".into()],
            seconds: 180.0,
        })
}

/// Whether `e` may end a trial's run: a misbehaviour found, or a failure
/// no probe pins on a hop (a timeout, no progress, a link). A decoding or
/// designer error ending the run means an answer was taken without a
/// check that blames its sender.
fn may_stop_on(e: &DesignerError) -> bool {
    matches!(
        e,
        DesignerError::Misbehaved(_)
            | DesignerError::Timeout { .. }
            | DesignerError::Recovery(_)
            | DesignerError::Link { .. }
            | DesignerError::NoLink { .. }
            | DesignerError::LinksClosed
            | DesignerError::UnexpectedReply { .. }
    )
}

fn run_here(world: &World, trial: &Trial) -> Report {
    let started = Instant::now();
    let base = trial.seed.wrapping_mul(16);
    let adversaries: Vec<Adversary> = trial
        .adversaries
        .iter()
        .map(|(_, m)| Adversary::fuzz(*m))
        .collect();
    let nodes: Vec<RunningNode> = (0..HOPS)
        .map(|i| {
            let adversary = trial
                .adversaries
                .iter()
                .position(|(h, _)| *h == i)
                .map(|k| adversaries[k].clone());
            let config = NodeConfig {
                adversary,
                ..NodeConfig::default()
            };
            start_stoppable_node(base + i as u64, config)
        })
        .collect();
    let spares: Vec<RunningNode> = (0..3)
        .map(|i| start_stoppable_node(base + 8 + i, NodeConfig::default()))
        .collect();
    let hops: Vec<HopInfo> = nodes.iter().map(|n| n.info.clone()).collect();
    let bad: BTreeSet<SocketAddr> = trial
        .adversaries
        .iter()
        .map(|(h, _)| hops[*h].addr)
        .collect();
    let reported = Arc::new(Mutex::new(Vec::new()));
    let replacements = Recorded {
        spares: Spares::new(spares.iter().map(|n| n.info.clone()).collect()),
        reported: Arc::clone(&reported),
    };
    let mut violations = Vec::new();
    let runner = CascadeRunner::builder(&world.model, &world.cfg, hops.clone())
        .options(CascadeOptions {
            audit_rate: AuditRate::new(1.0),
            audit_seed: Some(trial.seed),
            timeout: Duration::from_secs(10),
            ..CascadeOptions::default()
        })
        .checkpoints(Checkpoints {
            dir: None,
            every: NonZeroU64::new(4),
        })
        .replacements(Box::new(replacements))
        .connect();
    let outcome = match runner {
        // An adversary can only make the set-up fail by dropping the
        // init, which it never touches.
        Err(e) => {
            violations.push(format!("could not connect: {e}"));
            format!("no connection: {e}")
        }
        Ok(mut runner) => {
            let result = run_training(
                &mut runner,
                &world.model,
                &world.train,
                &world.test,
                &world.cfg,
                &mut Quiet,
            );
            // Each lie costs a bounded number of recoveries: a run that
            // goes round in circles is wedged in all but name.
            if runner.recoveries().len() > 8 {
                violations.push(format!(
                    "{} recoveries: going round in circles",
                    runner.recoveries().len()
                ));
            }
            for e in runner.recoveries() {
                for a in &e.replaced {
                    if !bad.contains(a) {
                        violations.push(format!("honest {a} replaced ({})", e.cause));
                    }
                }
            }
            for m in &runner.audit_stats().failures {
                if !names_an_adversary(m, &bad) {
                    violations.push(format!("an honest hop blamed: {m}"));
                }
            }
            match &result {
                Ok((m, _)) if same_run(m, &world.local) => {
                    if runner.recoveries().is_empty() {
                        "as local".into()
                    } else {
                        "recovered, as local".into()
                    }
                }
                Ok((m, _)) => {
                    violations.push(format!(
                        "the run ended otherwise than the local one (weights {} vs {})",
                        m.weights_sha256, world.local.weights_sha256
                    ));
                    "OTHER RESULT".into()
                }
                Err(DesignerError::Misbehaved(m)) => {
                    if !names_an_adversary(m, &bad) {
                        violations.push(format!("stopped naming honest hops: {m}"));
                    }
                    format!("stopped: {m}")
                }
                Err(e) => {
                    if !may_stop_on(e) {
                        violations.push(format!("stopped on an error that blames nobody: {e}"));
                    }
                    format!("stopped: {e}")
                }
            }
        }
    };
    for a in reported.lock().unwrap().iter() {
        if !bad.contains(a) {
            violations.push(format!("honest {a} reported"));
        }
    }
    drop(nodes);
    drop(spares);
    Report {
        trial: trial.clone(),
        fired: adversaries.iter().map(Adversary::fired).collect(),
        outcome,
        violations,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Runs `trials`, printing one line each; returns the reports (with
/// `MIXNN_FUZZ_FAIL_FAST` set, up to the first that breaks the invariant).
fn run_all(world: &Arc<World>, trials: impl IntoIterator<Item = Trial>) -> Vec<Report> {
    let fail_fast = std::env::var_os("MIXNN_FUZZ_FAIL_FAST").is_some();
    let mut reports = Vec::new();
    for t in trials {
        if fail_fast && reports.iter().any(|r: &Report| !r.violations.is_empty()) {
            break;
        }
        let r = run(world, &t);
        let what: Vec<String> = r
            .trial
            .adversaries
            .iter()
            .zip(&r.fired)
            .map(|((h, m), f)| {
                format!(
                    "hop {h} {:?} at {} {} (fired {f})",
                    m.kind,
                    m.at,
                    if m.once { "once" } else { "on" }
                )
            })
            .collect();
        eprintln!(
            "trial {}: {} → {} [{:.1} s]{}",
            t.seed,
            what.join(" + "),
            r.outcome.chars().take(160).collect::<String>(),
            r.seconds,
            if r.violations.is_empty() {
                String::new()
            } else {
                format!(" VIOLATIONS {:?}", r.violations)
            }
        );
        reports.push(r);
    }
    reports
}

/// Figures of a set of trials.
fn summary(reports: &[Report]) -> String {
    let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut steps = BTreeSet::new();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut violations = 0;
    for r in reports {
        for ((_, m), f) in r.trial.adversaries.iter().zip(&r.fired) {
            let e = by_kind.entry(format!("{:?}", m.kind)).or_default();
            e.0 += 1;
            if *f > 0 {
                e.1 += 1;
                steps.insert(m.at);
            }
        }
        let o = if r.outcome.starts_with("as local") {
            "as local, nothing found"
        } else if r.outcome.starts_with("recovered") {
            "recovered, as local"
        } else if r.outcome.starts_with("stopped: hop") {
            "stopped naming suspects"
        } else if r.outcome.starts_with("stopped") {
            "stopped (timeout / no progress)"
        } else {
            "other"
        };
        *outcomes.entry(o).or_default() += 1;
        violations += r.violations.len();
    }
    let fired_kinds = by_kind.values().filter(|(_, f)| *f > 0).count();
    format!(
        "{} trials, {} mutation kinds drawn ({} applied at least once), mutations applied at steps {:?}; outcomes {:?}; {} invariant violations; {:.0} s",
        reports.len(),
        by_kind.len(),
        fired_kinds,
        steps,
        outcomes,
        violations,
        reports.iter().map(|r| r.seconds).sum::<f64>()
    )
}

/// A trial of the given adversaries: (hop, what, from step, once).
fn trial(seed: u64, adversaries: &[(usize, MutationKind, u64, bool)]) -> Trial {
    Trial {
        seed,
        adversaries: adversaries
            .iter()
            .map(|&(hop, kind, at, once)| {
                (
                    hop,
                    Mutation {
                        kind,
                        at,
                        once,
                        seed: seed.wrapping_mul(31).wrapping_add(hop as u64),
                    },
                )
            })
            .collect(),
    }
}

/// The short run, in CI: trials chosen so that each check of the designer
/// is the one that sees some trial's lie (the mutation check of the
/// fuzzer: with any one check commented out, one of these fails; see
/// `docs/threat-model/binding.md`). `MIXNN_FUZZ_SEED=<seed>` replays one
/// trial of the long run instead.
#[test]
fn fuzz_short() {
    use MutationKind as K;
    let world = Arc::new(World::new());
    let (f, b, t) = (Pass::Forward, Pass::Backward, Pass::Test);
    let cases: Vec<Vec<(usize, MutationKind, u64, bool)>> = vec![
        // Trailer layers: the tag over what a layer wraps.
        vec![(2, K::ReceivedTrailer(f), 3, true)],
        vec![(1, K::SentTrailer(b), 3, true)],
        // Slots: the state chain, the boundaries (between hops, at the
        // designer's ends: its batch, the loss).
        vec![(2, K::SlotDigest(f), 2, true)],
        vec![(2, K::SlotInput(b), 3, true)],
        vec![(0, K::SlotOutput(t), 0, false)],
        vec![(2, K::SentValues(f), 5, true)],
        vec![(4, K::SentValues(f), 5, true)],
        vec![(0, K::ReceivedValues(f), 4, true)],
        // Re-execution of openings: output, input gradient, state after,
        // test output; every opened field against the slots.
        vec![(1, K::ComputedValues(f), 6, true)],
        vec![(1, K::ComputedValues(b), 5, true)],
        vec![(2, K::ComputedValues(t), 0, true)],
        vec![(1, K::SkipUpdate, 2, true)],
        vec![(0, K::TamperHidden, 2, true)],
        vec![(2, K::TamperTest, 0, true)],
        vec![(1, K::OpeningByte, 1, true)],
        vec![(1, K::RefuseOpening, 6, false)],
        // Known states: the chain from the built state, from a loaded
        // one (a dropped message forces the rebuild), across steps in
        // either order of arrival.
        vec![(1, K::TamperState, 3, true)],
        vec![(1, K::TamperAtInit, 0, true)],
        vec![
            (1, K::TamperAfterLoad, 0, true),
            (3, K::Drop(Op::Forward), 5, true),
        ],
        vec![
            (0, K::Delay(Op::Backward), 4, true),
            (2, K::TamperState, 4, true),
        ],
        // Fetched states and transfers.
        vec![(0, K::FetchedState, 4, false)],
        vec![(2, K::FetchPlain, 4, true)],
        vec![(2, K::RelayedByte, 5, true)],
        vec![(4, K::SealedOpening, 2, false)],
        // Malformed bodies, and messages dropped, doubled, delayed.
        vec![(2, K::Shape(t), 0, true)],
        vec![(3, K::Truncate(f), 4, true)],
        vec![(2, K::Drop(Op::Backward), 0, true)],
        vec![(3, K::Duplicate(Op::Forward), 2, false)],
        vec![(1, K::Delay(Op::Loop), 3, true)],
        vec![(1, K::Drop(Op::Loop), 0, false)],
        // A hop that drops the loops it passes on (transfers' and probes'
        // relays) but answers its own: the probe from the other end still
        // reaches the hop after it, so nobody is found dead.
        vec![(1, K::DropOnward(Op::Loop), 3, false)],
    ];
    let trials: Vec<Trial> = match std::env::var("MIXNN_FUZZ_SEED") {
        Ok(s) => vec![draw(s.parse().unwrap())],
        Err(_) => cases
            .iter()
            .enumerate()
            .map(|(i, c)| trial(7000 + i as u64, c))
            .collect(),
    };
    let reports = run_all(&world, trials);
    eprintln!("{}", summary(&reports));
    let bad: Vec<&Report> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// The long run: `MIXNN_FUZZ_TRIALS` trials (default 2000) of drawn
/// mutations, from `MIXNN_FUZZ_FROM` (default 1).
#[test]
#[ignore = "long: run with --ignored (MIXNN_FUZZ_TRIALS, MIXNN_FUZZ_FROM)"]
fn fuzz_long() {
    let world = Arc::new(World::new());
    let n: u64 = std::env::var("MIXNN_FUZZ_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let from: u64 = std::env::var("MIXNN_FUZZ_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let reports = run_all(&world, (from..from + n).map(draw));
    eprintln!("{}", summary(&reports));
    let bad: Vec<&Report> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .collect();
    assert!(bad.is_empty(), "{} violating trials: {bad:#?}", bad.len());
}
