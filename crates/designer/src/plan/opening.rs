//! One audit of one hop for one step ([`AuditCase`]), and the check of an
//! opening against its commitments and a re-execution ([`verify`]); see
//! [`crate::plan::audit`] for the whole scheme.

use mixnn_model::optim::Optimizer;
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{Micro, Stage};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{stage_seed, Batch};
use mixnn_proto::audit::{state_digest, Opening};
use mixnn_proto::{decode_state, encode_state};

use crate::error::DesignerError;
use crate::misbehaviour::{Culprit, Misbehaviour, MisbehaviourKind};
use crate::plan::audit::Audits;
use crate::plan::layout::Layout;

/// What an audit found: nothing, or a misbehaviour (whom it is pinned
/// on, why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed.
    Pass,
    /// A check failed.
    Fail(Misbehaviour),
}

/// What an audit checks openings against, besides the slots.
pub struct AuditContext<'a> {
    /// The cascade.
    pub layout: &'a Layout,
    /// The optimiser the stages run.
    pub optimizer: Optimizer,
    /// The run's seed (a stage's seed decides its dropout masks).
    pub seed: &'a RunSeed,
    /// The audited step's batch (its labels, at the loss stage).
    pub batch: &'a Batch,
}

/// What one audit opens: a training step, or a test batch run at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audited {
    /// Training step `step`.
    Step(u64),
    /// Test batch `batch`, run at step `step`.
    Test {
        /// The step the test ran at.
        step: u64,
        /// The test batch.
        batch: u32,
    },
}

impl Audited {
    /// The step concerned.
    pub fn step(self) -> u64 {
        match self {
            Audited::Step(s) | Audited::Test { step: s, .. } => s,
        }
    }
}

/// One audit of hop `hop` for a step or a test batch: its opening, then
/// the openings of both its neighbours (any kind of hop: a dummy, the
/// loss, each re-run like any other, so a lie next to one is caught
/// too). Feed it the openings it asks for, in order
/// ([`AuditCase::next`], [`AuditCase::on_opening`]); it returns the
/// verdict as soon as one is reached.
#[derive(Debug)]
pub struct AuditCase {
    of: Audited,
    /// Hops to open, in order: the audited hop, then its neighbours.
    order: Vec<usize>,
    at: usize,
}

impl AuditCase {
    /// The audit of `hop` for training step `step` in `layout`.
    pub fn new(hop: usize, step: u64, layout: &Layout) -> Self {
        AuditCase::of(hop, Audited::Step(step), layout)
    }

    /// The audit of `hop` for `of` in `layout`.
    pub fn of(hop: usize, of: Audited, layout: &Layout) -> Self {
        let n = layout.len();
        let neighbours = [hop.checked_sub(1), (hop + 1 < n).then_some(hop + 1)];
        let mut order = vec![hop];
        order.extend(neighbours.into_iter().flatten());
        AuditCase { of, order, at: 0 }
    }

    /// The audited step.
    pub fn step(&self) -> u64 {
        self.of.step()
    }

    /// Every hop whose opening the audit may ask for, in order (fetch
    /// them at once; [`AuditCase::on_opening`] takes them in this order).
    pub fn asks(&self) -> &[usize] {
        &self.order
    }

    /// The hop whose opening to fetch next, until a verdict.
    pub fn next(&self) -> Option<usize> {
        self.order.get(self.at).copied()
    }

    /// The opening of [`AuditCase::next`] (`None`: it refused); the
    /// verdict once reached. Every opening is the hop's own (sealed with
    /// its reply key): a failure is pinned on it.
    pub fn on_opening(
        &mut self,
        audits: &Audits,
        ctx: &AuditContext<'_>,
        opening: Option<Opening>,
    ) -> Option<Verdict> {
        let k = self.next()?;
        self.at += 1;
        let step = self.of.step();
        let fail = |reason: String| {
            Some(Verdict::Fail(Misbehaviour::new(
                Culprit::Hop(k),
                step,
                MisbehaviourKind::Audit,
                reason,
            )))
        };
        let Some(o) = opening else {
            return fail(match self.of {
                Audited::Step(_) => format!("it refused to open step {step}"),
                Audited::Test { batch, .. } => {
                    format!("it refused to open test batch {batch} at step {step}")
                }
            });
        };
        let checked = match self.of {
            Audited::Step(step) => verify(audits, ctx, k, step, &o),
            Audited::Test { step, batch } => verify_test(audits, ctx.layout, k, step, batch, &o)
                .map_err(|r| format!("test batch {batch}: {r}")),
        };
        if let Err(r) = checked {
            return fail(r);
        }
        self.next().is_none().then_some(Verdict::Pass)
    }
}

/// Checks hop `j`'s opening `o` of `step` against its slots and a
/// re-execution of its stage.
pub fn verify(
    audits: &Audits,
    ctx: &AuditContext<'_>,
    j: usize,
    step: u64,
    o: &Opening,
) -> Result<(), String> {
    let (fwd, bwd) = audits.evidence(j, step)?;
    if o.step != step {
        return Err(format!("an opening of step {} for step {step}", o.step));
    }
    o.check(&fwd, &bwd)?;
    // Re-execution from the opened state.
    let mut stage = opened_stage(ctx.layout, ctx.optimizer, Some(ctx.seed), j, step, o)?;
    let spec = stage.spec().clone();
    let labels = spec.is_loss().then_some(ctx.batch.labels.as_slice());
    let micro = Micro {
        index: 0,
        batch_rows: ctx.batch.rows,
    };
    let (y, cache) = stage
        .forward_step_bytes(&o.x, labels, micro)
        .map_err(|e| format!("opened input: {e}"))?;
    if y != o.y {
        return Err("forward output differs from the re-execution".into());
    }
    let g = (!o.g_in.is_empty()).then_some(o.g_in.as_slice());
    let dx = stage
        .backward_micro_bytes(cache, g, ctx.layout.needs_input_grad(j), 0)
        .map_err(|e| format!("opened gradient: {e}"))?
        .unwrap_or_default();
    if dx != o.g_out {
        return Err("input gradient differs from the re-execution".into());
    }
    stage.apply();
    if state_digest(&encode_state(&stage.state())) != o.after {
        return Err("state after the update differs from the re-execution".into());
    }
    Ok(())
}

/// Checks hop `j`'s opening `o` of test batch `batch` at `step` against
/// its slot and a re-execution of its stage (no update).
pub fn verify_test(
    audits: &Audits,
    layout: &Layout,
    j: usize,
    step: u64,
    batch: u32,
    o: &Opening,
) -> Result<(), String> {
    let slot = audits.test_evidence(j, step, batch)?;
    if o.step != step {
        return Err(format!("an opening at step {} for step {step}", o.step));
    }
    o.check_test(&slot)?;
    // Evaluation runs no dropout: the stage's seed does not matter.
    let stage = opened_stage(layout, Optimizer::default(), None, j, step, o)?;
    let y = stage
        .eval_bytes(&o.x)
        .map_err(|e| format!("opened input: {e}"))?;
    if y != o.y {
        return Err("test output differs from the re-execution".into());
    }
    Ok(())
}

/// Hop `j`'s stage in the state its opening of `step` says it ran on,
/// seeded from the run's `seed` where its dropout masks matter.
fn opened_stage(
    layout: &Layout,
    optimizer: Optimizer,
    seed: Option<&RunSeed>,
    j: usize,
    step: u64,
    o: &Opening,
) -> Result<Stage, String> {
    let hop = layout.hops.get(j).ok_or("no such hop")?;
    let spec = &hop.spec;
    let before = decode_state(&o.before).map_err(|e| format!("opened state: {e}"))?;
    if before.steps != step {
        return Err(format!(
            "a state at step {} opened for step {step}",
            before.steps
        ));
    }
    // The hop's seed matters only to dropout, which only real stages run.
    let seed = match (hop.index, seed) {
        (Some(i), Some(seed)) => stage_seed(seed, i),
        _ => 0,
    };
    let mut stage = Stage::new(spec, seed, optimizer);
    stage
        .load_state(&before)
        .map_err(|e| format!("opened state: {e}"))?;
    Ok(stage)
}

/// One training step of the whole `model` on tensor messages, as the
/// cascade computes it (the rollback's re-execution).
pub fn local_step(
    stages: &mut [Stage],
    batch: &Batch,
    model: &ModelSpec,
) -> Result<(), DesignerError> {
    let mut x = TensorBytes::encode_pixels(&model.input.batched(batch.rows), &batch.pixels);
    let mut caches = Vec::with_capacity(stages.len());
    for s in stages.iter() {
        let labels = s.spec().is_loss().then_some(batch.labels.as_slice());
        let (y, c) = s.forward_micro_bytes(&x, labels, batch.rows)?;
        caches.push(c);
        x = y;
    }
    let mut g: Option<Vec<u8>> = None;
    for (i, (s, c)) in stages.iter_mut().zip(caches).enumerate().rev() {
        g = s.backward_micro_bytes(c, g.as_deref(), i > 0, 0)?;
    }
    for s in stages.iter_mut() {
        s.apply();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mixnn_model::stage::StageState;
    use mixnn_model::trainer::stage_seed;
    use mixnn_proto::audit::{digest_state, hash_tensor, split};
    use mixnn_proto::trailer::{add_layer, Pass, Slot, SlotContext, TrailerKeys};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::options::{AuditRate, Keep};
    use crate::plan::pending::Await;

    /// Three hops: two with parameters, then the loss (none).
    const MODEL: &str = r#"
name = "tiny"
input = 4

[[stage]]
ops = [{ op = "linear", in = 4, out = 3 }]

[[stage]]
ops = [{ op = "linear", in = 3, out = 3 }]

[[stage]]
ops = [{ op = "log_softmax" }, { op = "nll_loss" }]
"#;

    struct Step {
        layout: Layout,
        audits: Audits,
        batch: Batch,
        openings: Vec<Opening>,
        /// What the deliveries of the step found.
        found: Option<Misbehaviour>,
    }

    fn noisy(y: &[u8]) -> Vec<u8> {
        let t = TensorBytes::decode(y).unwrap();
        let mut v = t.values.clone();
        v[0] += 0.5;
        TensorBytes::encode_f32(&t.shape, &v)
    }

    /// Adds hop `k`'s layer to the trailer at the end of `body`, the way
    /// a node does.
    fn layer(audits: &Audits, k: usize, ctx: &SlotContext, slot: &Slot, body: &[u8]) -> Vec<u8> {
        let (_, t) = split(body).unwrap();
        add_layer(&TrailerKeys::new(&audits.key(k).unwrap()), ctx, slot, t).unwrap()
    }

    /// Step 0 of the tiny model through three simulated hops that commit
    /// as nodes do; with `noise`, hop 0's output reaches hop 1 perturbed
    /// (each hop honest about what it got and sent).
    fn step(noise: bool) -> Step {
        let model = ModelSpec::parse(MODEL, "tiny").unwrap();
        let layout = Layout::new(&model, Keep::None, &[], 3).unwrap();
        let batch = Batch {
            pixels: vec![10, 200, 30, 40, 250, 60, 70, 5],
            labels: vec![0, 2],
            rows: 2,
        };
        let mut audits = Audits::new(AuditRate::new(1.0), 1, 7).unwrap();
        audits.new_session(3, &mut ChaCha8Rng::seed_from_u64(9));
        let mut stages: Vec<Stage> = (0..3)
            .map(|i| {
                Stage::new(
                    &model.stages[i],
                    stage_seed(&mixnn_model::seed::RunSeed::from_number(1), i),
                    Optimizer::default(),
                )
            })
            .collect();
        for (k, s) in stages.iter().enumerate() {
            audits.know(k, 0, digest_state(&s.state()));
        }
        let fwd_ctx = SlotContext {
            step: 0,
            pass: Pass::Forward,
            index: 0,
        };
        let mut x = TensorBytes::encode_pixels(&[2, 4], &batch.pixels);
        let mut body = audits.pad(Pass::Forward, 0, 0, 3, &x).unwrap();
        let mut kept = Vec::new();
        for (k, s) in stages.iter().enumerate() {
            let before: StageState = s.state();
            let labels = s.spec().is_loss().then_some(batch.labels.as_slice());
            let (y, cache) = s.forward_micro_bytes(&x, labels, batch.rows).unwrap();
            let slot = Slot {
                digest: digest_state(&before),
                input: hash_tensor(&x),
                output: hash_tensor(&y),
            };
            let t = layer(&audits, k, &fwd_ctx, &slot, &body);
            let sent = if noise && k == 0 {
                noisy(&y)
            } else {
                y.clone()
            };
            kept.push((before, x, y, cache));
            body = [sent.as_slice(), &t].concat();
            x = sent;
        }
        let mut found = audits
            .take(Await::Output { step: 0, micro: 0 }, body, 3)
            .err();
        let bwd_ctx = SlotContext {
            pass: Pass::Backward,
            ..fwd_ctx
        };
        let mut body = audits.pad(Pass::Backward, 0, 0, 3, &[]).unwrap();
        let mut openings = vec![None; 3];
        let mut g: Option<Vec<u8>> = None;
        for k in (0..3).rev() {
            let (before, x, y, cache) = kept.pop().unwrap();
            let dx = stages[k]
                .backward_micro_bytes(cache, g.as_deref(), k > 0, 0)
                .unwrap()
                .unwrap_or_default();
            stages[k].apply();
            let after = digest_state(&stages[k].state());
            let g_in = g.clone().unwrap_or_default();
            let slot = Slot {
                digest: after,
                input: hash_tensor(&g_in),
                output: hash_tensor(&dx),
            };
            let t = layer(&audits, k, &bwd_ctx, &slot, &body);
            openings[k] = Some(Opening {
                step: 0,
                before: encode_state(&before),
                x,
                y,
                g_in,
                g_out: dx.clone(),
                after,
            });
            body = [dx.as_slice(), &t].concat();
            g = Some(dx);
        }
        let done = audits.take(Await::Done { step: 0, micro: 0 }, body, 3);
        found = found.or(done.err());
        Step {
            layout,
            audits,
            batch,
            openings: openings.into_iter().map(Option::unwrap).collect(),
            found: found.map(|e| match e {
                DesignerError::Misbehaved(m) => m,
                other => panic!("{other}"),
            }),
        }
    }

    /// Runs the audit of `hop`, answering each request from `openings`.
    fn audit(s: &Step, hop: usize, openings: &[Option<Opening>]) -> (Verdict, Vec<usize>) {
        let ctx = AuditContext {
            layout: &s.layout,
            optimizer: Optimizer::default(),
            seed: &mixnn_model::seed::RunSeed::from_number(1),
            batch: &s.batch,
        };
        let mut case = AuditCase::new(hop, 0, &s.layout);
        let mut asked = Vec::new();
        while let Some(k) = case.next() {
            asked.push(k);
            if let Some(v) = case.on_opening(&s.audits, &ctx, openings[k].clone()) {
                return (v, asked);
            }
        }
        panic!("no verdict after {asked:?}");
    }

    fn all(s: &Step) -> Vec<Option<Opening>> {
        s.openings.iter().cloned().map(Some).collect()
    }

    fn failed(v: &Verdict) -> (usize, &str) {
        match v {
            Verdict::Fail(m) => (m.blamed().expect("pinned on one hop"), m.reason.as_str()),
            Verdict::Pass => panic!("passed"),
        }
    }

    #[test]
    fn honest_openings_pass_and_every_neighbour_is_asked() {
        let s = step(false);
        assert_eq!(s.found, None);
        assert_eq!(audit(&s, 0, &all(&s)), (Verdict::Pass, vec![0, 1]));
        // Hop 2 (the loss) has no parameters: opened and re-run too.
        assert_eq!(audit(&s, 1, &all(&s)), (Verdict::Pass, vec![1, 0, 2]));
        assert_eq!(audit(&s, 2, &all(&s)), (Verdict::Pass, vec![2, 1]));
    }

    #[test]
    fn every_field_of_an_opening_is_held_to_the_slots_and_the_re_execution() {
        let s = step(false);
        type Lie = (&'static str, fn(&mut Opening));
        let lies: [Lie; 4] = [
            ("output its forward slot named", |o| o.y[12] ^= 1),
            ("state its forward slot named", |o| {
                // Another state, of the right step: what a hop that
                // tampered between steps, naming the chained digest in
                // its slot, would have to open.
                let mut st = decode_state(&o.before).unwrap();
                st.tensors[0].values[0] += 0.01;
                o.before = encode_state(&st);
            }),
            ("gradient out", |o| o.g_out[12] ^= 1),
            ("state after", |o| o.after[0] ^= 1),
        ];
        for (what, lie) in lies {
            let mut forged = all(&s);
            lie(forged[1].as_mut().unwrap());
            let (v, asked) = audit(&s, 1, &forged);
            let (hop, reason) = failed(&v);
            assert_eq!((hop, asked), (1, vec![1]), "{what}");
            assert!(reason.contains(what), "{what}: {reason}");
            // As a neighbour, the forgery is caught too.
            let (v, asked) = audit(&s, 0, &forged);
            assert_eq!(failed(&v).0, 1, "{what}");
            assert_eq!(asked, vec![0, 1]);
        }
    }

    #[test]
    fn a_refusal_fails_the_hop_that_refused() {
        let s = step(false);
        let mut refused = all(&s);
        refused[1] = None;
        for hop in [1, 0] {
            let (v, _) = audit(&s, hop, &refused);
            let (blamed, reason) = failed(&v);
            assert_eq!(blamed, 1);
            assert_eq!(reason, "it refused to open step 0");
        }
    }

    /// Hop 0 sends hop 1 another output than the one it computed and
    /// names in its slot: the delivery shows it at once (no audit), and
    /// pins it on the two of them, since either may lie about what
    /// passed. Each one's opening still checks out.
    #[test]
    fn a_boundary_that_disagrees_is_found_at_delivery_and_pinned_on_the_pair() {
        let s = step(true);
        let m = s.found.clone().expect("nothing found");
        assert_eq!(m.culprit, Culprit::Pair(0, 1), "{m}");
        assert_eq!(m.kind, MisbehaviourKind::Boundary);
    }

    #[test]
    fn an_opening_is_checked_against_the_step_it_was_asked_for() {
        let s = step(false);
        let ctx = AuditContext {
            layout: &s.layout,
            optimizer: Optimizer::default(),
            seed: &mixnn_model::seed::RunSeed::from_number(1),
            batch: &s.batch,
        };
        let err = verify(&s.audits, &ctx, 1, 3, &s.openings[1]).unwrap_err();
        assert_eq!(err, "no commitments kept for step 3");
        let mut other = s.openings[1].clone();
        other.step = 5;
        let err = verify(&s.audits, &ctx, 1, 0, &other).unwrap_err();
        assert!(err.contains("an opening of step 5"), "{err}");
    }
}
