//! One audit of one hop for one step ([`AuditCase`]), and the check of an
//! opening against its commitments and a re-execution ([`verify`]); see
//! [`crate::plan::audit`] for the whole scheme.

use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{Sgd, Stage};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::Batch;
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

/// What an audit checks openings against, besides the commitments.
pub struct AuditContext<'a> {
    /// The cascade.
    pub layout: &'a Layout,
    /// The optimiser the stages run.
    pub sgd: Sgd,
    /// The audited step's batch.
    pub batch: &'a Batch,
}

/// One audit of hop `hop` for `step`: its opening, then the openings of
/// both its neighbours. Feed it the openings it asks for, in
/// order ([`AuditCase::next`], [`AuditCase::on_opening`]); it returns the
/// verdict as soon as one is reached.
#[derive(Debug)]
pub struct AuditCase {
    hop: usize,
    step: u64,
    /// Hops to open, in order: the audited hop, then its neighbours.
    order: Vec<usize>,
    at: usize,
    opened: Option<Opening>,
}

impl AuditCase {
    /// The audit of `hop` for `step` in `layout`.
    pub fn new(hop: usize, step: u64, layout: &Layout) -> Self {
        let n = layout.len();
        let neighbours = [hop.checked_sub(1), (hop + 1 < n).then_some(hop + 1)];
        // Neighbours of every kind: a hop without parameters (a dummy,
        // log-softmax, the loss) opens and is re-run like any other (its
        // ops are cheap), so hidden noise next to one is caught too. Its
        // answer comes back through the first hop like every transfer.
        let mut order = vec![hop];
        order.extend(neighbours.into_iter().flatten());
        AuditCase {
            hop,
            step,
            order,
            at: 0,
            opened: None,
        }
    }

    /// The audited step.
    pub fn step(&self) -> u64 {
        self.step
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
    /// verdict once reached.
    pub fn on_opening(
        &mut self,
        audits: &Audits,
        ctx: &AuditContext<'_>,
        opening: Option<Opening>,
    ) -> Option<Verdict> {
        let k = self.next()?;
        self.at += 1;
        let step = self.step;
        let fail = |hop: usize, reason: String, also: Option<usize>| {
            let culprit = match also {
                Some(b) => Culprit::Pair(hop, b),
                None => Culprit::Hop(hop),
            };
            let kind = if also.is_some() {
                MisbehaviourKind::Boundary
            } else {
                MisbehaviourKind::Audit
            };
            Some(Verdict::Fail(Misbehaviour::new(
                culprit, step, kind, reason,
            )))
        };
        let Some(o) = opening else {
            return fail(k, format!("hop refused to open step {}", self.step), None);
        };
        if let Err(r) = verify(audits, ctx, k, self.step, &o) {
            return fail(k, r, None);
        }
        if k == self.hop {
            if k == 0 && !ctx.layout.keep.first() {
                let x = TensorBytes::encode_pixels(
                    &[ctx.batch.rows, ctx.layout.input],
                    &ctx.batch.pixels,
                );
                if o.x != x {
                    return fail(
                        k,
                        "forward input is not what the designer sent".into(),
                        None,
                    );
                }
            }
            self.opened = Some(o);
        } else if let Some(mine) = &self.opened {
            // `a` sends the activation to `b`, `b` the gradient to `a`.
            let j = self.hop;
            let ((a, oa), (b, ob)) = if k < j {
                ((k, &o), (j, mine))
            } else {
                ((j, mine), (k, &o))
            };
            if oa.y != ob.x || oa.g_in != ob.g_out {
                return fail(
                    a,
                    format!("hop {a} and hop {b} disagree on what passed between them"),
                    Some(b),
                );
            }
        }
        self.next().is_none().then_some(Verdict::Pass)
    }
}

/// Checks hop `j`'s opening `o` of `step` against its commitments and a
/// re-execution of its stage.
pub fn verify(
    audits: &Audits,
    ctx: &AuditContext<'_>,
    j: usize,
    step: u64,
    o: &Opening,
) -> Result<(), String> {
    let (fwd, bwd, key) = audits.evidence(j, step)?;
    if o.step != step {
        return Err(format!("an opening of step {} for step {step}", o.step));
    }
    o.check(&key, &fwd, &bwd)?;
    // Re-execution from the opened state.
    let spec = &ctx.layout.hops.get(j).ok_or("no such hop")?.spec;
    let before = decode_state(&o.before).map_err(|e| format!("opened state: {e}"))?;
    if before.steps != step {
        return Err(format!(
            "a state at step {} opened for step {step}",
            before.steps
        ));
    }
    let mut stage = Stage::new(spec, 0, ctx.sgd);
    stage
        .load_state(&before)
        .map_err(|e| format!("opened state: {e}"))?;
    let labels = spec.is_loss().then_some(ctx.batch.labels.as_slice());
    let (y, cache) = stage
        .forward_micro_bytes(&o.x, labels, ctx.batch.rows)
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

/// One training step of the whole `model` on tensor messages, as the
/// cascade computes it (the rollback's re-execution).
pub fn local_step(
    stages: &mut [Stage],
    batch: &Batch,
    model: &ModelSpec,
) -> Result<(), DesignerError> {
    let mut x = TensorBytes::encode_pixels(&[batch.rows, model.input], &batch.pixels);
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
    use mixnn_proto::audit::{commit_backward, commit_forward, digest_state};
    use mixnn_proto::trailer::{add_layer, Direction, Slot, SlotContext, TrailerKeys};

    use mixnn_proto::audit::TRAILER_LEN;
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
    }

    fn noisy(y: &[u8]) -> Vec<u8> {
        let t = TensorBytes::decode(y).unwrap();
        let mut v = t.values.clone();
        v[0] += 0.5;
        TensorBytes::encode_f32(&t.shape, &v)
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
        let key = |k: usize| audits.key(k).unwrap();
        let mut stages: Vec<Stage> = (0..3)
            .map(|i| {
                Stage::new(
                    &model.stages[i],
                    stage_seed(&mixnn_model::seed::RunSeed::from_number(1), i),
                    Sgd::default(),
                )
            })
            .collect();
        let mut x = TensorBytes::encode_pixels(&[2, 4], &batch.pixels);
        let mut fwd = Vec::new();
        let mut kept = Vec::new();
        for (k, s) in stages.iter().enumerate() {
            let before: StageState = s.state();
            let labels = s.spec().is_loss().then_some(batch.labels.as_slice());
            let (y, cache) = s.forward_micro_bytes(&x, labels, batch.rows).unwrap();
            let d = digest_state(&before);
            fwd.push(Slot {
                digest: d,
                commitment: commit_forward(&key(k), 0, &x, &y, &d),
            });
            let sent = if noise && k == 0 {
                noisy(&y)
            } else {
                y.clone()
            };
            kept.push((before, x, y, cache));
            x = sent;
        }
        let mut bwd = vec![
            Slot {
                digest: [0; 32],
                commitment: [0; 32],
            };
            3
        ];
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
            bwd[k] = Slot {
                digest: after,
                commitment: commit_backward(&key(k), 0, &g_in, &dx, &after),
            };
            openings[k] = Some(Opening {
                step: 0,
                before: encode_state(&before),
                x,
                y,
                g_in,
                g_out: dx.clone(),
                after,
            });
            g = Some(dx);
        }
        // The trailers as the designer receives them: hops add their
        // layer in the order they are visited.
        let deliver = |order: &[usize], slots: &[Slot], direction| {
            let ctx = SlotContext {
                step: 0,
                direction,
                micro: 0,
            };
            let mut t = vec![0u8; TRAILER_LEN];
            for &k in order {
                t = add_layer(&TrailerKeys::new(&key(k)), &ctx, &slots[k], &t).unwrap();
            }
            t
        };
        let out = deliver(&[0, 1, 2], &fwd, Direction::Forward);
        let done = deliver(&[2, 1, 0], &bwd, Direction::Backward);
        audits
            .take(Await::Output { step: 0, micro: 0 }, out, 3)
            .unwrap();
        audits
            .take(Await::Done { step: 0, micro: 0 }, done, 3)
            .unwrap();
        Step {
            layout,
            audits,
            batch,
            openings: openings.into_iter().map(Option::unwrap).collect(),
        }
    }

    /// Runs the audit of `hop`, answering each request from `openings`.
    fn audit(s: &Step, hop: usize, openings: &[Option<Opening>]) -> (Verdict, Vec<usize>) {
        let ctx = AuditContext {
            layout: &s.layout,
            sgd: Sgd::default(),
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

    fn failed(v: &Verdict) -> (usize, &str, Option<usize>) {
        match v {
            Verdict::Fail(m) => match m.culprit {
                Culprit::Hop(j) => (j, m.reason.as_str(), None),
                Culprit::Pair(a, b) => (a, m.reason.as_str(), Some(b)),
                Culprit::Route { hop } => (hop, m.reason.as_str(), None),
            },
            Verdict::Pass => panic!("passed"),
        }
    }

    #[test]
    fn honest_openings_pass_and_every_neighbour_is_asked() {
        let s = step(false);
        assert_eq!(audit(&s, 0, &all(&s)), (Verdict::Pass, vec![0, 1]));
        // Hop 2 (the loss) has no parameters: opened and re-run too.
        assert_eq!(audit(&s, 1, &all(&s)), (Verdict::Pass, vec![1, 0, 2]));
        assert_eq!(audit(&s, 2, &all(&s)), (Verdict::Pass, vec![2, 1]));
    }

    #[test]
    fn a_forged_opening_fails_at_its_hop() {
        let s = step(false);
        let mut forged = all(&s);
        forged[1].as_mut().unwrap().y[12] ^= 1;
        let (v, asked) = audit(&s, 1, &forged);
        let (hop, reason, also) = failed(&v);
        assert_eq!((hop, also, asked), (1, None, vec![1]));
        assert!(reason.contains("forward commitment"), "{reason}");
        // As a neighbour, the forgery is caught too.
        let (v, asked) = audit(&s, 0, &forged);
        assert_eq!(failed(&v).0, 1);
        assert_eq!(asked, vec![0, 1]);
    }

    #[test]
    fn a_refusal_fails_the_hop_that_refused() {
        let s = step(false);
        let mut refused = all(&s);
        refused[1] = None;
        for hop in [1, 0] {
            let (v, _) = audit(&s, hop, &refused);
            let (blamed, reason, _) = failed(&v);
            assert_eq!(blamed, 1);
            assert_eq!(reason, "hop refused to open step 0");
        }
    }

    #[test]
    fn a_boundary_that_disagrees_blames_both_sides() {
        let s = step(true);
        // Each hop's own opening checks out: only the boundary shows it.
        let (v, asked) = audit(&s, 0, &all(&s));
        let (hop, reason, also) = failed(&v);
        assert_eq!((hop, also, asked), (0, Some(1), vec![0, 1]));
        assert!(reason.contains("disagree"), "{reason}");
        let (v, _) = audit(&s, 1, &all(&s));
        assert_eq!(failed(&v).2, Some(1));
    }

    #[test]
    fn an_opening_is_checked_against_the_step_it_was_asked_for() {
        let s = step(false);
        let ctx = AuditContext {
            layout: &s.layout,
            sgd: Sgd::default(),
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
