#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::trainer::stage_seed;

use super::*;

const MODEL: &str = r#"
name = "tiny"
input = 4

[[stage]]
ops = [{ op = "linear", in = 4, out = 3 }]

[[stage]]
ops = [{ op = "log_softmax" }, { op = "nll_loss" }]
"#;

fn model() -> ModelSpec {
    ModelSpec::parse(MODEL, "tiny").unwrap()
}

#[test]
fn the_bound_is_twenty_times_the_slowest_answer_within_a_second_and_the_timeout() {
    let timeout = Duration::from_secs(3);
    let mut loose = DetectionBound::new(timeout, false);
    loose.observe(Duration::from_millis(1));
    assert_eq!(loose.bound(), timeout);
    let mut b = DetectionBound::new(timeout, true);
    assert_eq!(b.bound(), Duration::from_secs(1));
    b.observe(Duration::from_millis(10));
    assert_eq!(b.bound(), Duration::from_secs(1));
    b.observe(Duration::from_millis(100));
    assert_eq!(b.bound(), Duration::from_secs(2));
    b.observe(Duration::from_millis(20));
    assert_eq!(b.bound(), Duration::from_secs(2), "the slowest counts");
    b.observe(Duration::from_secs(1));
    assert_eq!(b.bound(), timeout);
}

/// The probe of four hops where `dead` answers nothing and `dropper`
/// drops every loop it would send on to `towards` (a neighbour).
fn probe(dead: Option<usize>, dropper: Option<(usize, usize)>) -> Probe {
    let mut p = Probe::new(4);
    let passes = |path: &[usize]| {
        path.iter().all(|h| Some(*h) != dead)
            && path
                .windows(2)
                .all(|w| dropper.is_none_or(|(d, t)| (w[0], w[1]) != (d, t)))
    };
    for j in 0..4 {
        let out: Vec<usize> = (0..=j).chain((0..j).rev()).collect();
        if passes(&out) {
            p.back(j);
        }
        let back: Vec<usize> = (j..4).rev().chain(j + 1..4).collect();
        if passes(&back) {
            p.back_from_last(j);
        }
    }
    p
}

#[test]
fn a_hop_is_dead_only_if_neither_end_reaches_it() {
    // Nothing back: no one hop explains it.
    assert_eq!(Probe::new(4).verdict(), ProbeVerdict::Unclear);
    for dead in 0..4 {
        assert_eq!(probe(Some(dead), None).verdict(), ProbeVerdict::Dead(dead));
        assert_eq!(probe(Some(dead), None).failed(), Some(dead));
    }
    assert_eq!(probe(None, None).verdict(), ProbeVerdict::AllBack);
    // Hop 1 drops what it would pass on to hop 2 (the loops from the
    // first hop past it, and those from the last hop that turn at it):
    // on the code before, hop 2, honest, was found dead and replaced.
    assert_eq!(
        probe(None, Some((1, 2))).verdict(),
        ProbeVerdict::Link(1, 2)
    );
    assert_eq!(
        probe(None, Some((2, 1))).verdict(),
        ProbeVerdict::Link(1, 2)
    );
    for (d, t) in [(0, 1), (1, 0), (2, 3), (3, 2)] {
        let v = probe(None, Some((d, t))).verdict();
        assert_eq!(v, ProbeVerdict::Link(d.min(t), d.max(t)), "{d} → {t}");
        assert_eq!(probe(None, Some((d, t))).failed(), None);
    }
    let mut p = probe(None, None);
    assert!(p.all_back());
    p.back(9);
    p.back_from_last(9);
    assert!(p.all_back());
}

#[test]
fn only_failures_of_the_cascade_are_recovered() {
    let timeout = DesignerError::Timeout {
        what: "the loss",
        step: 3,
        secs: 1.0,
    };
    assert!(recoverable(&timeout));
    assert!(recoverable(&DesignerError::LinksClosed));
    assert!(recoverable(&crate::error::BadReply::EmptyLoss.into()));
    let config = DesignerError::Config {
        message: "x".into(),
    };
    assert!(!recoverable(&config));
    let audit = DesignerError::Misbehaved(crate::misbehaviour::Misbehaviour::new(
        crate::misbehaviour::Culprit::Hop(1),
        3,
        crate::misbehaviour::MisbehaviourKind::Audit,
        "r",
    ));
    assert!(!recoverable(&audit), "audits have their own recovery");
}

fn checkpoint(c: &Checkpoints, step: u64) -> Checkpoint {
    c.make(step, Vec::new(), &[], &TrainConfig::default())
}

#[test]
fn checkpoints_are_due_at_the_start_every_k_steps_and_once_per_step() {
    let off = Checkpoints::new(&model(), false, NonZeroU64::new(2));
    assert!(!off.wanted(0) && !off.wanted(2));
    let mut c = Checkpoints::new(&model(), true, NonZeroU64::new(8));
    assert!(c.wanted(3), "the first is due whatever the step");
    c.keep(checkpoint(&c, 0));
    assert!(!c.wanted(0) && !c.wanted(5));
    assert!(c.wanted(8) && c.wanted(16));
    c.keep(checkpoint(&c, 8));
    assert!(!c.wanted(8));
    let none = Checkpoints::new(&model(), true, None);
    assert!(none.wanted(0));
}

#[test]
fn the_last_few_checkpoints_are_kept_and_a_rollback_drops_later_ones() {
    let mut c = Checkpoints::new(&model(), true, NonZeroU64::new(1));
    for step in 0..12 {
        c.keep(checkpoint(&c, step));
    }
    let steps: Vec<u64> = c.kept().iter().map(|k| k.step).collect();
    assert_eq!(steps, (4..12).collect::<Vec<_>>());
    let back = c.kept()[2].clone();
    c.rolled_back_to(&back);
    assert_eq!(c.last().map(|k| k.step), Some(6));
    assert_eq!(c.kept().back().map(|k| k.step), Some(6));
    // A checkpoint taken again at an earlier step replaces the later ones.
    c.keep(checkpoint(&c, 5));
    assert_eq!(c.kept().back().map(|k| k.step), Some(5));
    assert_eq!(c.kept().len(), 2);
}

#[test]
fn a_checkpoint_records_the_epoch_and_its_resumed_losses() {
    let mut c = Checkpoints::new(&model(), true, None);
    c.begin_epoch(2, &[], &[0.5, 0.25], 40);
    let k = c.make(43, Vec::new(), &[0.125], &TrainConfig::default());
    assert_eq!((k.epoch, k.position), (2, 5));
    assert_eq!(k.epoch_losses, vec![0.5, 0.25, 0.125]);
    assert_eq!(k.model_digest, model_digest(&model()));
}

/// Checkpoints of an honest local run at steps 0, 2 and 4 of
/// `batches`, the one at 4 with a corrupted weight if `corrupt`.
fn honest_run(batches: &[Batch], corrupt: bool) -> Checkpoints {
    let m = model();
    let mut stages: Vec<Stage> = m
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Stage::new(
                s,
                stage_seed(&mixnn_model::seed::RunSeed::from_number(1), i),
                Optimizer::default(),
            )
        })
        .collect();
    let mut c = Checkpoints::new(&m, true, NonZeroU64::new(2));
    for step in 0..=4u64 {
        if step % 2 == 0 {
            let mut states: Vec<StageState> = stages.iter().map(Stage::state).collect();
            if corrupt && step == 4 {
                states[0].tensors[0].values[0] += 1.0;
            }
            let k = c.make(step, states, &[], &TrainConfig::default());
            c.keep(k);
        }
        if step < 4 {
            local_step(&mut stages, &batches[step as usize], &m).unwrap();
        }
    }
    c
}

fn batches() -> Vec<Batch> {
    (0..4u8)
        .map(|i| Batch {
            pixels: (0..8).map(|p| p * 30 + i).collect(),
            labels: vec![u32::from(i % 2), 1],
            rows: 2,
        })
        .collect()
}

#[test]
fn the_rollback_goes_to_the_last_checkpoint_the_re_execution_reproduces() {
    let b = batches();
    let m = model();
    let honest = honest_run(&b, false);
    let c = rollback_point(
        honest.kept(),
        4,
        &b,
        0,
        &m,
        Optimizer::default(),
        &RunSeed::from_number(1),
    )
    .unwrap();
    assert_eq!(c.step, 4);
    // A bad update before step 4 shows in its checkpoint: back to 2.
    let bad = honest_run(&b, true);
    let c = rollback_point(
        bad.kept(),
        4,
        &b,
        0,
        &m,
        Optimizer::default(),
        &RunSeed::from_number(1),
    )
    .unwrap();
    assert_eq!(c.step, 2);
    // Never past the bad step, never before the epoch.
    let c = rollback_point(
        bad.kept(),
        3,
        &b,
        0,
        &m,
        Optimizer::default(),
        &RunSeed::from_number(1),
    )
    .unwrap();
    assert_eq!(c.step, 2);
    let err = rollback_point(
        bad.kept(),
        1,
        &b,
        2,
        &m,
        Optimizer::default(),
        &RunSeed::from_number(1),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        DesignerError::Recovery(RecoveryError::NoRollbackPoint { bad: 1 })
    ));
}
