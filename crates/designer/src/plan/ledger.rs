//! What every hop committed to, and the checks that need no opening: run
//! on every delivery of a forward, backward or test message of an
//! audited session ([`Ledger::deliver`]).
//!
//! Every value a hop's slot names is bound to something the designer
//! holds:
//!
//! | slot field | bound at every delivery to | misbehaviour |
//! |---|---|---|
//! | the layer itself | its tag over the slot and all it wraps ([`mixnn_proto::trailer`]) | the last spoiled layer and the hop after it ([`Culprit::Pair`]); the last hop on the path alone |
//! | input hash, first hop | what the designer sent (its batch, its kept first stage's output, its kept last stage's gradient) | that hop |
//! | output hash, last hop | what it delivered (the loss, the kept last stage's input, a test output, the first hop's gradient) | that hop |
//! | output hash of a hop, input hash of the next | each other | the pair |
//! | state digest | the state the hop's last backward left, or the state the designer loaded into it or built it with | that hop |
//!
//! and, at an audit ([`crate::plan::opening`]), every field of the opening
//! to the slots and the slots to a re-execution.

use std::collections::{BTreeMap, HashMap};

use mixnn_proto::audit::{hash_tensor, split};
use mixnn_proto::trailer::{fill, open, Pass, Slot, SlotContext, TrailerKeys};

use crate::error::DesignerError;
use crate::misbehaviour::{Culprit, Misbehaviour, MisbehaviourKind};

/// The hops a message of `pass` visits in a cascade of `n`, in order.
pub fn visits(pass: Pass, n: usize) -> Vec<usize> {
    match pass {
        Pass::Forward | Pass::Test => (0..n).collect(),
        Pass::Backward => (0..n).rev().collect(),
    }
}

/// Slots of one training step: forward and backward, one per hop.
#[derive(Debug, Clone)]
struct Committed {
    fwd: Vec<Option<Slot>>,
    bwd: Vec<Option<Slot>>,
}

/// The slots of one session, the states the designer knows its hops
/// hold, and what it sent into the cascade.
#[derive(Debug)]
pub struct Ledger {
    keys: Vec<TrailerKeys>,
    /// Seeds the filler of every trailer the designer sends.
    fill_seed: [u8; 32],
    steps: BTreeMap<u64, Committed>,
    tests: BTreeMap<(u64, u32), Vec<Option<Slot>>>,
    /// Digests of states the designer knows a hop holds at the start of
    /// a step: built from its seed at step 0, or loaded.
    known: HashMap<(usize, u64), [u8; 32]>,
    /// Hash of the payload the designer sent with each message.
    sent: HashMap<SlotContext, [u8; 32]>,
}

impl Ledger {
    /// An empty ledger for hops with trailer keys `keys`, in position
    /// order.
    pub fn new(keys: Vec<TrailerKeys>, fill_seed: [u8; 32]) -> Self {
        Ledger {
            keys,
            fill_seed,
            steps: BTreeMap::new(),
            tests: BTreeMap::new(),
            known: HashMap::new(),
            sent: HashMap::new(),
        }
    }

    /// Hop `hop` holds the state of digest `digest` at the start of
    /// `step` (the designer built or loaded it).
    pub fn know(&mut self, hop: usize, step: u64, digest: [u8; 32]) {
        self.known.insert((hop, step), digest);
    }

    /// The digest of the state hop `hop` must run `step` on: the state
    /// its backward of `step − 1` left, or one the designer knows.
    pub fn expected_state(&self, hop: usize, step: u64) -> Option<[u8; 32]> {
        step.checked_sub(1)
            .and_then(|prev| self.steps.get(&prev))
            .and_then(|c| c.bwd.get(hop).copied().flatten())
            .map(|s| s.digest)
            .or_else(|| self.known.get(&(hop, step)).copied())
    }

    fn keys(&self, order: &[usize]) -> Result<Vec<&TrailerKeys>, DesignerError> {
        order
            .iter()
            .map(|&h| self.keys.get(h))
            .collect::<Option<_>>()
            .ok_or(DesignerError::Config {
                message: "no trailer keys for this cascade".into(),
            })
    }

    /// The trailer to send with `payload` as message `ctx` through `n`
    /// hops; remembers what was sent.
    pub fn trailer(
        &mut self,
        ctx: SlotContext,
        n: usize,
        payload: &[u8],
    ) -> Result<Vec<u8>, DesignerError> {
        let order = visits(ctx.pass, n);
        let t = fill(&self.keys(&order)?, &ctx, &self.fill_seed)?;
        self.sent.insert(ctx, hash_tensor(payload));
        Ok(t)
    }

    /// Checks the delivery `body` of message `ctx` through `n` hops and
    /// records its slots; returns its payload. A misbehaviour found is
    /// [`DesignerError::Misbehaved`].
    pub fn deliver(
        &mut self,
        ctx: SlotContext,
        n: usize,
        body: &[u8],
    ) -> Result<Vec<u8>, DesignerError> {
        let order = visits(ctx.pass, n);
        let Some(&end) = order.last() else {
            return Err(DesignerError::Config {
                message: "a delivery through no hop".into(),
            });
        };
        let step = ctx.step;
        let found = |culprit, kind, reason: String| {
            DesignerError::Misbehaved(Misbehaviour::new(culprit, step, kind, reason))
        };
        let what = pass_name(ctx.pass);
        let (payload, trailer) = split(body).map_err(|_| {
            found(
                Culprit::Hop(end),
                MisbehaviourKind::Malformed,
                format!(
                    "it delivered {} bytes as the {what} of step {step}, less than a trailer",
                    body.len()
                ),
            )
        })?;
        let sent = fill(&self.keys(&order)?, &ctx, &self.fill_seed)?;
        let opened = open(&self.keys(&order)?, &ctx, trailer, &sent)?;
        // A hop that changes what it received spoils the layer of the
        // hop before it, whose tag covers it, and none after: the last
        // spoiled layer is its sender's or the culprit's own doing.
        if let Some(at) = opened.slots.iter().rposition(Result::is_err) {
            let hop = order[at];
            let culprit = match order.get(at + 1) {
                Some(&next) => Culprit::Pair(hop, next),
                None => Culprit::Hop(hop),
            };
            return Err(found(
                culprit,
                MisbehaviourKind::Trailer,
                format!("hop {hop}'s layer of the {what} trailer of step {step} does not verify"),
            ));
        }
        let slots: Vec<Slot> = opened.slots.into_iter().flatten().collect();
        // Boundaries: what each side says passed, the designer's own
        // ends included.
        let sent_hash = self.sent.remove(&ctx);
        if sent_hash.is_some_and(|h| h != slots[0].input) {
            return Err(found(
                Culprit::Hop(order[0]),
                MisbehaviourKind::Boundary,
                format!(
                    "the input its {what} slot of step {step} names is not what the designer sent"
                ),
            ));
        }
        for (i, pair) in slots.windows(2).enumerate() {
            if pair[0].output != pair[1].input {
                let (a, b) = (order[i], order[i + 1]);
                return Err(found(
                    Culprit::Pair(a, b),
                    MisbehaviourKind::Boundary,
                    format!(
                        "what hop {a} says it sent in the {what} of step {step} is not what hop {b} says it received"
                    ),
                ));
            }
        }
        if slots[slots.len() - 1].output != hash_tensor(payload) {
            return Err(found(
                Culprit::Hop(end),
                MisbehaviourKind::Boundary,
                format!("what it delivered as the {what} of step {step} is not the output its slot names"),
            ));
        }
        self.record(ctx, &order, slots)?;
        Ok(payload.to_vec())
    }

    /// Records the slots of a delivery and checks each hop's state digest
    /// against the state it must have run on (or, for a backward, the
    /// state the next step ran on, if that came first).
    fn record(
        &mut self,
        ctx: SlotContext,
        order: &[usize],
        slots: Vec<Slot>,
    ) -> Result<(), DesignerError> {
        let n = self.keys.len();
        let step = ctx.step;
        let chain = |hop: usize, at: u64, reason: String| {
            DesignerError::Misbehaved(Misbehaviour::new(
                Culprit::Hop(hop),
                at,
                MisbehaviourKind::Chain,
                reason,
            ))
        };
        for (&hop, slot) in order.iter().zip(&slots) {
            match ctx.pass {
                Pass::Forward | Pass::Test => {
                    if let Some(want) = self.expected_state(hop, step) {
                        if want != slot.digest {
                            return Err(chain(
                                hop,
                                step,
                                format!(
                                    "the state its {} of step {step} ran on is not the one it held (digests do not chain: its last step left, or the designer loaded, another)",
                                    pass_name(ctx.pass)
                                ),
                            ));
                        }
                    }
                }
                Pass::Backward => {
                    let next = self
                        .steps
                        .get(&(step + 1))
                        .and_then(|c| c.fwd.get(hop).copied().flatten());
                    if next.is_some_and(|f| f.digest != slot.digest) {
                        return Err(chain(
                            hop,
                            step + 1,
                            format!(
                                "the state its step {} ran on is not the state its step {step} left (digests do not chain)",
                                step + 1
                            ),
                        ));
                    }
                }
            }
        }
        let fresh = || Committed {
            fwd: vec![None; n],
            bwd: vec![None; n],
        };
        for (&hop, slot) in order.iter().zip(slots) {
            match ctx.pass {
                Pass::Forward => self.steps.entry(step).or_insert_with(fresh).fwd[hop] = Some(slot),
                Pass::Backward => {
                    self.steps.entry(step).or_insert_with(fresh).bwd[hop] = Some(slot)
                }
                Pass::Test => {
                    self.tests
                        .entry((step, ctx.index))
                        .or_insert_with(|| vec![None; n])[hop] = Some(slot)
                }
            }
        }
        Ok(())
    }

    /// Forgets the slots and known states of steps before `horizon`, and
    /// test slots of steps before it.
    pub fn retain_from(&mut self, horizon: u64) {
        self.steps.retain(|s, _| *s >= horizon);
        self.tests.retain(|(s, _), _| *s >= horizon);
        self.known.retain(|(_, s), _| *s >= horizon);
    }

    /// Hop `j`'s forward and backward slots of `step`.
    pub fn slots(&self, j: usize, step: u64) -> Result<(Slot, Slot), String> {
        let c = self
            .steps
            .get(&step)
            .ok_or_else(|| format!("no commitments kept for step {step}"))?;
        match (
            c.fwd.get(j).copied().flatten(),
            c.bwd.get(j).copied().flatten(),
        ) {
            (Some(f), Some(b)) => Ok((f, b)),
            _ => Err("a commitment is missing".into()),
        }
    }

    /// Hop `j`'s slot of test batch `batch` at `step`.
    pub fn test_slot(&self, j: usize, step: u64, batch: u32) -> Result<Slot, String> {
        self.tests
            .get(&(step, batch))
            .and_then(|t| t.get(j).copied().flatten())
            .ok_or_else(|| format!("no commitment kept for test batch {batch} at step {step}"))
    }
}

fn pass_name(pass: Pass) -> &'static str {
    match pass {
        Pass::Forward => "forward",
        Pass::Backward => "backward",
        Pass::Test => "test",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mixnn_proto::audit::split;
    use mixnn_proto::trailer::add_layer;

    use super::*;

    const N: usize = 4;

    fn ledger() -> Ledger {
        let keys = (0..N)
            .map(|k| TrailerKeys::new(&[k as u8 + 1; 32]))
            .collect();
        Ledger::new(keys, [7; 32])
    }

    fn keys(k: usize) -> TrailerKeys {
        TrailerKeys::new(&[k as u8 + 1; 32])
    }

    fn ctx(pass: Pass, step: u64) -> SlotContext {
        SlotContext {
            step,
            pass,
            index: 0,
        }
    }

    /// What hop `k` holds at `step` (a stand-in digest).
    fn state(k: usize, step: u64) -> [u8; 32] {
        [(k as u8) << 4 | step as u8; 32]
    }

    /// A lie of one hop on the way.
    #[derive(Clone, Copy, PartialEq)]
    enum Lie {
        None,
        /// This hop sends another payload than its slot names.
        Sends(usize),
        /// This hop names another input than it received.
        Received(usize),
        /// This hop flips a byte of the trailer it received.
        Trailer(usize, usize),
        /// This hop names another state digest.
        State(usize),
    }

    /// Message `c` through the hops (each hop's output is its input with
    /// its index appended), delivered to the designer's ledger.
    fn deliver(l: &mut Ledger, c: SlotContext, lie: Lie) -> Result<Vec<u8>, DesignerError> {
        let order = visits(c.pass, N);
        let mut payload = vec![9u8; 3];
        let trailer = l.trailer(c, N, &payload).unwrap();
        let mut body = [payload.as_slice(), &trailer].concat();
        for &k in &order {
            let (p, t) = split(&body).unwrap();
            let (p, mut t) = (p.to_vec(), t.to_vec());
            let out = [p.as_slice(), &[k as u8]].concat();
            let digest = match c.pass {
                Pass::Backward => state(k, c.step + 1),
                _ => state(k, c.step),
            };
            let mut slot = Slot {
                digest,
                input: hash_tensor(&p),
                output: hash_tensor(&out),
            };
            let mut sent = out.clone();
            match lie {
                Lie::Sends(j) if j == k => sent.push(0),
                Lie::Received(j) if j == k => slot.input[0] ^= 1,
                Lie::State(j) if j == k => slot.digest[0] ^= 1,
                Lie::Trailer(j, at) if j == k => t[at] ^= 1,
                _ => {}
            }
            let layer = add_layer(&keys(k), &c, &slot, &t).unwrap();
            body = [sent.as_slice(), &layer].concat();
            payload = sent;
        }
        let _ = payload;
        l.deliver(c, N, &body)
    }

    fn found(r: Result<Vec<u8>, DesignerError>) -> (Culprit, MisbehaviourKind, u64) {
        match r {
            Err(DesignerError::Misbehaved(m)) => (m.culprit, m.kind, m.step),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("nothing found"),
        }
    }

    /// Steps 0..3, forward then backward, every hop starting from the
    /// state the designer built.
    fn honest() -> Ledger {
        let mut l = ledger();
        for k in 0..N {
            l.know(k, 0, state(k, 0));
        }
        for step in 0..3 {
            deliver(&mut l, ctx(Pass::Forward, step), Lie::None).unwrap();
            deliver(&mut l, ctx(Pass::Backward, step), Lie::None).unwrap();
        }
        l
    }

    #[test]
    fn honest_deliveries_pass_and_their_slots_are_kept() {
        let mut l = honest();
        let got = deliver(&mut l, ctx(Pass::Test, 3), Lie::None).unwrap();
        assert_eq!(got, vec![9, 9, 9, 0, 1, 2, 3]);
        let (f, b) = l.slots(2, 1).unwrap();
        assert_eq!((f.digest, b.digest), (state(2, 1), state(2, 2)));
        assert_eq!(l.test_slot(1, 3, 0).unwrap().digest, state(1, 3));
        assert_eq!(l.expected_state(3, 3), Some(state(3, 3)));
    }

    /// Each lie is found at the delivery, and pinned on the liar or on
    /// the pair holding it: never on hops further away.
    #[test]
    fn every_lie_in_a_delivery_is_pinned_where_it_was_told() {
        use Culprit::{Hop, Pair};
        use MisbehaviourKind::{Boundary, Chain, Trailer};
        let f = |step| ctx(Pass::Forward, step);
        let b = |step| ctx(Pass::Backward, step);
        let cases = [
            // The first hop names another input than the designer sent;
            // the last sends another output than it names (the loss).
            (f(3), Lie::Received(0), (Hop(0), Boundary)),
            (f(3), Lie::Sends(3), (Hop(3), Boundary)),
            (b(3), Lie::Sends(0), (Hop(0), Boundary)),
            // Between two hops: either may lie.
            (f(3), Lie::Sends(1), (Pair(1, 2), Boundary)),
            (f(3), Lie::Received(2), (Pair(1, 2), Boundary)),
            (b(3), Lie::Sends(2), (Pair(2, 1), Boundary)),
            // A byte of the trailer hop 3 received, in hop 0's layer three
            // layers in: it shows at hop 2's layer, the one before hop 3.
            (f(3), Lie::Trailer(3, 2 * 112 + 40), (Pair(2, 3), Trailer)),
            (f(3), Lie::Trailer(1, 5), (Pair(0, 1), Trailer)),
            // A state the hop did not hold.
            (f(3), Lie::State(2), (Hop(2), Chain)),
        ];
        for (c, lie, (culprit, kind)) in cases {
            let mut l = honest();
            let (got, k, step) = found(deliver(&mut l, c, lie));
            assert_eq!((got, k, step), (culprit, kind, c.step), "{culprit}");
        }
    }

    #[test]
    fn the_state_chain_holds_from_the_state_built_or_loaded() {
        // A hop whose first step runs on another state than it was built
        // with (no step before it: the designer's own record).
        let mut l = ledger();
        for k in 0..N {
            l.know(k, 5, state(k, 5));
        }
        let got = found(deliver(&mut l, ctx(Pass::Forward, 5), Lie::State(1)));
        assert_eq!(got, (Culprit::Hop(1), MisbehaviourKind::Chain, 5));
        // The next step's forward first, then a backward that left
        // another state: found when the backward comes.
        let mut l = honest();
        deliver(&mut l, ctx(Pass::Forward, 3), Lie::None).unwrap();
        let got = found(deliver(&mut l, ctx(Pass::Backward, 2), Lie::State(3)));
        assert_eq!(got, (Culprit::Hop(3), MisbehaviourKind::Chain, 3));
        // A test run on another state than the last step left.
        let mut l = honest();
        let got = found(deliver(&mut l, ctx(Pass::Test, 3), Lie::State(0)));
        assert_eq!(got, (Culprit::Hop(0), MisbehaviourKind::Chain, 3));
    }

    #[test]
    fn a_delivery_shorter_than_a_trailer_is_its_senders() {
        let mut l = honest();
        let got = found(l.deliver(ctx(Pass::Backward, 3), N, &[1, 2, 3]));
        assert_eq!(got, (Culprit::Hop(0), MisbehaviourKind::Malformed, 3));
    }
}
