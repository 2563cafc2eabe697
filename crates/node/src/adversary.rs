//! A node that lies, for tests of audits (feature `adversary` only).
//!
//! The node's code calls the hooks of [`Hooks`] at every point where a
//! hop could deviate from the protocol: what it computes, what it sends,
//! what it writes in its slot, what it does to the trailer it received,
//! to its state between steps or after a load, what it hands over when
//! fetched or audited. Without the feature the hooks are the identity
//! ([`NoAdversary`]) and compile away.
//!
//! Over 600 lines: one hook per point where a hop can deviate and one mode
//! per way to cheat, listed together so that the fuzzer's and the audits'
//! coverage can be read off one file (feature `adversary` only).

use mixnn_model::stage::{Stage, StageState};
pub(crate) use mixnn_proto::trailer::Pass;
use mixnn_proto::trailer::Slot;
use mixnn_wire::Op;

use crate::audit::Auditor;
use crate::core::Outbound;

/// The points where a hop may deviate, as the node's code calls them.
/// Each returns what the hop uses or sends instead of what it was given.
pub(crate) trait Hooks {
    /// The payload it received, before it computes on it.
    fn input(&self, _step: u64, _pass: Pass, body: Vec<u8>) -> Vec<u8> {
        body
    }
    /// What it computed, before it commits to it.
    fn computed(&self, _step: u64, _pass: Pass, y: Vec<u8>) -> Vec<u8> {
        y
    }
    /// What it sends, after it committed.
    fn sent(&self, _step: u64, _pass: Pass, y: Vec<u8>, _loss: bool) -> Vec<u8> {
        y
    }
    /// The whole body it sends (payload and trailer).
    fn body_out(&self, _step: u64, _pass: Pass, body: Vec<u8>, _loss: bool) -> Vec<u8> {
        body
    }
    /// Its slot for the message.
    fn slot(&self, _step: u64, _pass: Pass, _slot: &mut Slot) {}
    /// The trailer it received, before it adds its layer.
    fn received_trailer(&self, _step: u64, _pass: Pass, _trailer: &mut Vec<u8>) {}
    /// Applies (or not) the step's update.
    fn apply(&self, _step: u64, stage: &mut Stage) {
        stage.apply()
    }
    /// After the step's update and commitment.
    fn between_steps(&self, _step: u64, _stage: &mut Stage, _auditor: &mut Auditor) {}
    /// After a state load.
    fn after_load(&self, _stage: &mut Stage, _auditor: Option<&mut Auditor>) {}
    /// After the session's stage is built from its init note.
    fn after_init(&self, _stage: &mut Stage, _auditor: Option<&mut Auditor>) {}
    /// Before a test batch at `step` runs.
    fn before_test(&self, _step: u64, _stage: &mut Stage, _auditor: Option<&mut Auditor>) {}
    /// The state it hands over when fetched at `step`; `fresh` when this
    /// is the first fetch of the step.
    fn fetched(&self, _step: u64, state: StageState) -> StageState {
        state
    }
    /// Whether to encode the state again for this fetch of `chunk`.
    fn refetch(&self, _step: u64, _chunk: u32) -> bool {
        false
    }
    /// A chunk of a fetch answer, before it is sealed.
    fn fetch_plain(&self, _step: u64, _chunk: u32, plain: Vec<u8>) -> Vec<u8> {
        plain
    }
    /// A sealed chunk of a fetch answer.
    fn fetch_chunk(&self, _step: u64, _chunk: u32, sealed: Vec<u8>) -> Vec<u8> {
        sealed
    }
    /// A sealed chunk of an audit opening.
    fn opening_chunk(&self, _step: u64, _chunk: u32, sealed: Vec<u8>) -> Vec<u8> {
        sealed
    }
    /// A chunk of an audit opening, before it is sealed.
    fn opening_plain(&self, _step: u64, _chunk: u32, plain: Vec<u8>) -> Vec<u8> {
        plain
    }
    /// A transfer's body it relays.
    fn relayed(&self, _step: u64, _body: &mut [u8]) {}
    /// A message it sends (op `op` of step `step`; `onward`: to its next
    /// hop): none, it, or more.
    fn outbound(&self, _op: Op, _step: u64, _onward: bool, o: Outbound) -> Vec<Outbound> {
        vec![o]
    }
    /// Messages it held back, sent now (before the next it sends).
    fn release(&self) -> Vec<Outbound> {
        Vec::new()
    }
}

/// No adversary: every hook is the identity.
#[cfg(not(feature = "adversary"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoAdversary;

#[cfg(not(feature = "adversary"))]
impl Hooks for NoAdversary {}

#[cfg(feature = "adversary")]
pub use lying::{Adversary, AdversaryMode, Mutation, MutationKind};

#[cfg(feature = "adversary")]
mod lying {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use mixnn_model::stage::{Stage, StageState};
    use mixnn_model::tensor_bytes::TensorBytes;
    use mixnn_proto::trailer::{Slot, SLOT_LEN, TRAILER_LEN};
    use mixnn_wire::Op;

    use super::{Hooks, Pass};
    use crate::audit::Auditor;
    use crate::core::Outbound;

    /// How a test adversary misbehaves.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum AdversaryMode {
        /// Adds noise to every forward output.
        Noise,
        /// Sends the negated input gradient back.
        FlipGradient,
        /// Advances the step counter but leaves parameters and momentum as
        /// they were.
        SkipUpdate,
        /// Commits to its honest forward output but sends a noisy one.
        HiddenNoise,
        /// Runs every step honestly and commits to the state each one
        /// left, then changes its parameters before the next step, whose
        /// forward it runs on the changed state and commits to truthfully.
        TamperBetweenSteps,
        /// Once, after step `from_step`: the same, but the slot of the
        /// next forward names the state the step before left (what the
        /// chain of digests expects), while its commitment is to the
        /// changed state it runs on.
        TamperHidden,
        /// Garbles its first fetch answer (so the designer sets the
        /// session up again and loads a checkpoint), and changes its
        /// parameters right after every state load, committing truthfully
        /// to what it then runs on.
        TamperAfterReload,
        /// Answers state fetches (checkpoints) with changed parameters,
        /// while it trains and commits honestly.
        FalseState,
        /// Answers the first fetch of a step honestly and every later
        /// fetch of the same step (the final weights) with changed
        /// parameters.
        FalseFinalState,
        /// Overwrites the commitment trailer it received on every forward.
        ForgeSlots,
        /// Flips one byte of the slot two hops back in the trailer it
        /// received on every forward (one slot spoiled).
        FlipEarlierSlot,
        /// Adds noise to the forward input it received, then computes on
        /// it and commits to it truthfully.
        InputNoise,
        /// At the loss stage: sends its loss without the trailer.
        ShortLoss,
        /// At the loss stage: sends bytes that are no tensor as its loss
        /// (its trailer as an honest hop's).
        BadLossTensor,
        /// Answers its first state fetch with a chunk of 3 bytes, sealed.
        TinyChunk,
        /// Adds noise to the test outputs it sends.
        TestNoise,
        /// Trains and commits honestly but answers every audit opening
        /// with a sealed chunk that does not open, and answers probes.
        GarbleOpenings,
        /// One mutation of what it sends, drawn by the byzantine fuzzer
        /// (`crates/integration/tests/fuzz.rs`); honest otherwise.
        Fuzz(Mutation),
    }

    /// What a fuzzed hop changes in what it sends or does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum MutationKind {
        /// A byte of the trailer it received (it takes the change as
        /// received, keeping its own tail).
        ReceivedTrailer(Pass),
        /// A byte of the trailer it sends on (its own layer, or one it
        /// wraps).
        SentTrailer(Pass),
        /// A byte of its slot's state digest.
        SlotDigest(Pass),
        /// A byte of its slot's input hash.
        SlotInput(Pass),
        /// A byte of its slot's output hash.
        SlotOutput(Pass),
        /// The values it sends, after its slot named the honest ones.
        SentValues(Pass),
        /// The values it computes, before its slot (a computation lie).
        ComputedValues(Pass),
        /// The values it received, before it computes on them (and names
        /// them in its slot).
        ReceivedValues(Pass),
        /// A byte of the tensor's header (dtype, shape) it sends.
        Shape(Pass),
        /// The body it sends, cut to half.
        Truncate(Pass),
        /// The step's update not applied (the step counter moves).
        SkipUpdate,
        /// Its parameters changed between two steps, committed truthfully.
        TamperState,
        /// The same, with the slot naming the state the chain expects.
        TamperHidden,
        /// Its parameters changed right after a state load.
        TamperAfterLoad,
        /// Its parameters changed when its stage is first built, before
        /// its first step, committed truthfully.
        TamperAtInit,
        /// Its parameters changed before a test batch, every test slot
        /// naming the state it held before.
        TamperTest,
        /// Another state handed over when fetched.
        FetchedState,
        /// A fetch chunk's plaintext cut to 3 bytes (sealed).
        FetchPlain,
        /// A byte of a sealed fetch chunk.
        SealedFetch,
        /// A byte of an audit opening's plaintext (some field of it).
        OpeningByte,
        /// Its forward outputs computed wrongly (committed to) from `at`
        /// on, and every opening refused (empty).
        RefuseOpening,
        /// A byte of a sealed opening chunk.
        SealedOpening,
        /// A byte of a transfer's body it relays.
        RelayedByte,
        /// A message of this op it would send, dropped.
        Drop(Op),
        /// A message of this op it would send on to its next hop (not
        /// back to the one before), dropped: what passes it one way.
        DropOnward(Op),
        /// A message of this op, sent twice.
        Duplicate(Op),
        /// A message of this op, held back and sent after the next two
        /// messages it handles (reordered, delayed).
        Delay(Op),
    }

    /// One mutation: what, from which step, once or every time.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Mutation {
        /// What it changes.
        pub kind: MutationKind,
        /// The first step (of the message's note) it applies at.
        pub at: u64,
        /// Only the first message it fits, or every one from `at` on.
        pub once: bool,
        /// Picks the byte or field changed.
        pub seed: u64,
    }

    const MODES: &[(&str, AdversaryMode)] = &[
        ("noise", AdversaryMode::Noise),
        ("flip-gradient", AdversaryMode::FlipGradient),
        ("skip-update", AdversaryMode::SkipUpdate),
        ("hidden-noise", AdversaryMode::HiddenNoise),
        ("tamper-between-steps", AdversaryMode::TamperBetweenSteps),
        ("tamper-hidden", AdversaryMode::TamperHidden),
        ("tamper-after-reload", AdversaryMode::TamperAfterReload),
        ("false-state", AdversaryMode::FalseState),
        ("false-final-state", AdversaryMode::FalseFinalState),
        ("forge-slots", AdversaryMode::ForgeSlots),
        ("flip-earlier-slot", AdversaryMode::FlipEarlierSlot),
        ("input-noise", AdversaryMode::InputNoise),
        ("short-loss", AdversaryMode::ShortLoss),
        ("bad-loss-tensor", AdversaryMode::BadLossTensor),
        ("tiny-chunk", AdversaryMode::TinyChunk),
        ("test-noise", AdversaryMode::TestNoise),
        ("garble-openings", AdversaryMode::GarbleOpenings),
    ];

    /// What a one-shot adversary remembers.
    #[derive(Default)]
    struct Memory {
        /// Times the fuzz mutation was applied.
        fired: u32,
        /// Messages held back, with the messages still to handle before
        /// they go.
        held: Vec<(u8, Outbound)>,
        /// The digest every later test slot names (after a test tamper).
        test_shown: Option<[u8; 32]>,
        /// Fetches answered (chunk 0 asked for), per step.
        fetches: HashMap<u64, u32>,
        /// Fetch answers garbled so far.
        garbled: u32,
        /// The digest the next forward's slot names instead of its own.
        shown: Option<[u8; 32]>,
    }

    /// A node that misbehaves from step `from_step` on (tests only).
    #[derive(Clone)]
    pub struct Adversary {
        /// What it does.
        pub mode: AdversaryMode,
        /// The first step it does it in.
        pub from_step: u64,
        memory: Arc<Mutex<Memory>>,
    }

    impl std::fmt::Debug for Adversary {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}@{}", self.mode, self.from_step)
        }
    }

    impl PartialEq for Adversary {
        fn eq(&self, other: &Self) -> bool {
            self.mode == other.mode && self.from_step == other.from_step
        }
    }

    impl Eq for Adversary {}

    impl Adversary {
        /// An adversary in `mode` from step `from_step` on.
        pub fn new(mode: AdversaryMode, from_step: u64) -> Self {
            Adversary {
                mode,
                from_step,
                memory: Arc::default(),
            }
        }

        /// A fuzzed hop that applies `m`.
        pub fn fuzz(m: Mutation) -> Self {
            Adversary::new(AdversaryMode::Fuzz(m), m.at)
        }

        /// How many times its fuzz mutation was applied.
        pub fn fired(&self) -> u32 {
            self.memory().fired
        }

        fn active(&self, mode: AdversaryMode, step: u64) -> bool {
            self.mode == mode && step >= self.from_step
        }

        /// Whether the fuzz mutation `kind` applies to a message of `step`
        /// now; counts it as applied.
        fn fires(&self, kind: MutationKind, step: u64) -> bool {
            let AdversaryMode::Fuzz(m) = self.mode else {
                return false;
            };
            let mut mem = self.memory();
            let fits = m.kind == kind && step >= m.at && !(m.once && mem.fired > 0);
            if fits {
                mem.fired += 1;
            }
            fits
        }

        /// The fuzz mutation's seed (0 without one).
        fn seed(&self) -> u64 {
            match self.mode {
                AdversaryMode::Fuzz(m) => m.seed,
                _ => 0,
            }
        }

        fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
            match self.memory.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            }
        }
    }

    impl std::str::FromStr for Adversary {
        type Err = String;

        /// `MODE@STEP`, MODE one of `noise`, `flip-gradient`,
        /// `skip-update`, `hidden-noise`, `tamper-between-steps`,
        /// `tamper-hidden`, `tamper-after-reload`, `false-state`,
        /// `false-final-state`, `forge-slots`, `flip-earlier-slot`,
        /// `input-noise`, `short-loss`, `bad-loss-tensor`, `tiny-chunk`,
        /// `test-noise`, `garble-openings`.
        fn from_str(s: &str) -> Result<Self, String> {
            let (mode, step) = s
                .split_once('@')
                .ok_or_else(|| format!("{s}: expected MODE@STEP"))?;
            let mode = MODES
                .iter()
                .find(|(name, _)| *name == mode)
                .map(|(_, m)| *m)
                .ok_or_else(|| format!("unknown adversary mode {mode}"))?;
            let from_step = step.parse().map_err(|e| format!("{step}: {e}"))?;
            Ok(Adversary::new(mode, from_step))
        }
    }

    fn flip(bytes: &mut [u8], seed: u64) {
        if !bytes.is_empty() {
            let at = (seed as usize) % bytes.len();
            bytes[at] ^= 1 << (seed % 8);
        }
    }

    /// Noise that changes a test's predictions, or a step's results.
    fn noisy_for(pass: Pass, bytes: Vec<u8>) -> Vec<u8> {
        match pass {
            Pass::Test => perturb(bytes, |i, v| v + if i % 3 == 0 { 5.0 } else { 0.0 }),
            _ => noisy(bytes),
        }
    }

    fn noisy(bytes: Vec<u8>) -> Vec<u8> {
        perturb(bytes, |i, v| v + if i % 2 == 0 { 0.05 } else { -0.05 })
    }

    fn perturb(bytes: Vec<u8>, f: impl Fn(usize, f32) -> f32) -> Vec<u8> {
        match TensorBytes::decode(&bytes) {
            Ok(t) => {
                let values: Vec<f32> = t.values.iter().enumerate().map(|(i, v)| f(i, *v)).collect();
                TensorBytes::encode_f32(&t.shape, &values)
            }
            Err(_) => bytes,
        }
    }

    /// Adds `by` to every seventh parameter (momentum left alone).
    fn tamper(stage: &mut Stage, by: f32) -> bool {
        let mut state = stage.state();
        for t in state
            .tensors
            .iter_mut()
            .filter(|t| !t.name.ends_with(".velocity"))
        {
            for (i, v) in t.values.iter_mut().enumerate() {
                if i % 7 == 0 {
                    *v += by;
                }
            }
        }
        match stage.load_state(&state) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("adversary: {e}");
                false
            }
        }
    }

    impl Hooks for Option<Adversary> {
        fn input(&self, step: u64, pass: Pass, body: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return body };
            if pass == Pass::Forward && a.active(AdversaryMode::InputNoise, step)
                || a.fires(MutationKind::ReceivedValues(pass), step)
            {
                return noisy(body);
            }
            body
        }

        fn computed(&self, step: u64, pass: Pass, y: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return y };
            if a.fires(MutationKind::ComputedValues(pass), step) {
                return noisy_for(pass, y);
            }
            // A lie it then refuses to open.
            if let AdversaryMode::Fuzz(m) = a.mode {
                if m.kind == MutationKind::RefuseOpening && pass == Pass::Forward && step >= m.at {
                    return noisy(y);
                }
            }
            match pass {
                Pass::Forward if a.active(AdversaryMode::Noise, step) => noisy(y),
                Pass::Backward if a.active(AdversaryMode::FlipGradient, step) && !y.is_empty() => {
                    perturb(y, |_, v| -v)
                }
                _ => y,
            }
        }

        fn sent(&self, step: u64, pass: Pass, y: Vec<u8>, loss: bool) -> Vec<u8> {
            let Some(a) = self else { return y };
            if a.fires(MutationKind::SentValues(pass), step) {
                return noisy_for(pass, y);
            }
            if a.fires(MutationKind::Shape(pass), step) {
                let mut y = y;
                let header = y.len().min(10);
                flip(&mut y[..header], a.seed());
                return y;
            }
            match pass {
                Pass::Forward if a.active(AdversaryMode::HiddenNoise, step) => noisy(y),
                Pass::Forward if loss && a.active(AdversaryMode::BadLossTensor, step) => {
                    let mut y = y;
                    if let Some(b) = y.get_mut(0) {
                        *b = 0xff;
                    }
                    y
                }
                Pass::Test if a.active(AdversaryMode::TestNoise, step) => {
                    perturb(y, |i, v| v + if i % 3 == 0 { 5.0 } else { 0.0 })
                }
                _ => y,
            }
        }

        fn body_out(&self, step: u64, pass: Pass, body: Vec<u8>, loss: bool) -> Vec<u8> {
            let Some(a) = self else { return body };
            let mut body = body;
            if a.fires(MutationKind::Truncate(pass), step) {
                body.truncate(body.len() / 2);
            }
            if a.fires(MutationKind::SentTrailer(pass), step) {
                let at = body.len().saturating_sub(TRAILER_LEN);
                flip(&mut body[at..], a.seed());
            }
            if pass == Pass::Forward && loss && a.active(AdversaryMode::ShortLoss, step) {
                body.truncate(100);
            }
            body
        }

        fn slot(&self, step: u64, pass: Pass, slot: &mut Slot) {
            let Some(a) = self else { return };
            if pass == Pass::Forward && a.mode == AdversaryMode::TamperHidden {
                if let Some(d) = a.memory().shown.take() {
                    slot.digest = d;
                }
            }
            if let AdversaryMode::Fuzz(m) = a.mode {
                if pass == Pass::Forward && m.kind == MutationKind::TamperHidden {
                    if let Some(d) = a.memory().shown.take() {
                        slot.digest = d;
                    }
                }
                if pass == Pass::Test && m.kind == MutationKind::TamperTest {
                    if let Some(d) = a.memory().test_shown {
                        slot.digest = d;
                    }
                }
            }
            let seed = a.seed();
            if a.fires(MutationKind::SlotDigest(pass), step) {
                flip(&mut slot.digest, seed);
            }
            if a.fires(MutationKind::SlotInput(pass), step) {
                flip(&mut slot.input, seed);
            }
            if a.fires(MutationKind::SlotOutput(pass), step) {
                flip(&mut slot.output, seed);
            }
        }

        fn received_trailer(&self, step: u64, pass: Pass, trailer: &mut Vec<u8>) {
            let Some(a) = self else { return };
            // Their own tail stays (the hop takes what it changed).
            let keep = trailer.len().saturating_sub(SLOT_LEN);
            if a.fires(MutationKind::ReceivedTrailer(pass), step) {
                flip(&mut trailer[..keep], a.seed());
            }
            if pass != Pass::Forward {
                return;
            }
            if a.active(AdversaryMode::ForgeSlots, step) {
                for b in trailer[..keep].iter_mut().step_by(3) {
                    *b ^= 0x5a;
                }
            }
            if a.active(AdversaryMode::FlipEarlierSlot, step) {
                if let Some(b) = trailer.get_mut(SLOT_LEN + 5) {
                    *b ^= 0x10;
                }
            }
        }

        fn apply(&self, step: u64, stage: &mut Stage) {
            match self {
                Some(a)
                    if a.active(AdversaryMode::SkipUpdate, step)
                        || a.fires(MutationKind::SkipUpdate, step) =>
                {
                    let mut before = stage.state();
                    stage.apply();
                    before.steps = stage.steps();
                    if let Err(e) = stage.load_state(&before) {
                        tracing::warn!("adversary: {e}");
                    }
                }
                _ => stage.apply(),
            }
        }

        fn between_steps(&self, step: u64, stage: &mut Stage, auditor: &mut Auditor) {
            let Some(a) = self else { return };
            let hidden = a.mode == AdversaryMode::TamperHidden && step == a.from_step
                || a.fires(MutationKind::TamperHidden, step);
            if !(hidden
                || a.active(AdversaryMode::TamperBetweenSteps, step)
                || a.fires(MutationKind::TamperState, step))
            {
                return;
            }
            let shown = auditor.digest();
            if tamper(stage, 0.01) {
                auditor.resync(stage);
                if hidden {
                    a.memory().shown = Some(shown);
                }
            }
        }

        fn after_load(&self, stage: &mut Stage, auditor: Option<&mut Auditor>) {
            let Some(a) = self else { return };
            let reload = a.mode == AdversaryMode::TamperAfterReload && a.memory().garbled > 0;
            if !(reload || a.fires(MutationKind::TamperAfterLoad, stage.steps())) {
                return;
            }
            if tamper(stage, 0.01) {
                if let Some(au) = auditor {
                    au.resync(stage);
                }
            }
        }

        fn after_init(&self, stage: &mut Stage, auditor: Option<&mut Auditor>) {
            let Some(a) = self else { return };
            // At the first init, whatever the step.
            if a.fires(MutationKind::TamperAtInit, u64::MAX) && tamper(stage, 0.01) {
                if let Some(au) = auditor {
                    au.resync(stage);
                }
            }
        }

        fn before_test(&self, step: u64, stage: &mut Stage, auditor: Option<&mut Auditor>) {
            let Some(a) = self else { return };
            if !a.fires(MutationKind::TamperTest, step) {
                return;
            }
            let shown = auditor.as_ref().map(|au| au.digest());
            // Enough to change predictions.
            if tamper(stage, 1.0) {
                if let Some(au) = auditor {
                    au.resync(stage);
                }
                let mut m = a.memory();
                if m.test_shown.is_none() {
                    m.test_shown = shown;
                }
            }
        }

        fn fetched(&self, step: u64, mut state: StageState) -> StageState {
            let Some(a) = self else { return state };
            let lie = a.active(AdversaryMode::FalseState, step)
                || (a.active(AdversaryMode::FalseFinalState, step)
                    && a.memory().fetches.get(&step).copied().unwrap_or(0) > 1)
                || a.fires(MutationKind::FetchedState, step);
            if lie {
                for t in state.tensors.iter_mut() {
                    if let Some(v) = t.values.first_mut() {
                        *v += 0.5;
                    }
                }
            }
            state
        }

        fn refetch(&self, step: u64, chunk: u32) -> bool {
            let Some(a) = self else { return false };
            if chunk == 0 {
                *a.memory().fetches.entry(step).or_default() += 1;
            }
            chunk == 0
                && (a.active(AdversaryMode::FalseFinalState, step)
                    || matches!(a.mode, AdversaryMode::Fuzz(m) if m.kind == MutationKind::FetchedState))
        }

        fn fetch_chunk(&self, step: u64, chunk: u32, mut sealed: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return sealed };
            let first = {
                let mut m = a.memory();
                let first = a.active(AdversaryMode::TamperAfterReload, step)
                    && chunk == 0
                    && m.garbled == 0;
                if first {
                    m.garbled += 1;
                }
                first
            };
            if first || a.fires(MutationKind::SealedFetch, step) {
                flip(&mut sealed, a.seed() | 1);
            }
            sealed
        }

        fn fetch_plain(&self, step: u64, chunk: u32, mut plain: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return plain };
            let tiny = {
                let mut m = a.memory();
                let tiny = a.active(AdversaryMode::TinyChunk, step) && chunk == 0 && m.garbled == 0;
                if tiny {
                    m.garbled += 1;
                }
                tiny
            };
            if tiny || a.fires(MutationKind::FetchPlain, step) {
                plain.truncate(3);
            }
            plain
        }

        fn opening_chunk(&self, step: u64, _chunk: u32, mut sealed: Vec<u8>) -> Vec<u8> {
            if let Some(a) = self {
                if a.active(AdversaryMode::GarbleOpenings, step) {
                    if let Some(b) = sealed.last_mut() {
                        *b ^= 1;
                    }
                }
                if a.fires(MutationKind::SealedOpening, step) {
                    flip(&mut sealed, a.seed());
                }
            }
            sealed
        }

        fn opening_plain(&self, step: u64, _chunk: u32, mut plain: Vec<u8>) -> Vec<u8> {
            if let Some(a) = self {
                if a.fires(MutationKind::OpeningByte, step) {
                    // Past the chunk's length field: a field of the opening.
                    let at = plain.len().min(4);
                    flip(&mut plain[at..], a.seed());
                }
                if a.fires(MutationKind::RefuseOpening, step) {
                    plain = 0u32.to_le_bytes().to_vec();
                }
            }
            plain
        }

        fn relayed(&self, step: u64, body: &mut [u8]) {
            if let Some(a) = self {
                if a.fires(MutationKind::RelayedByte, step) {
                    flip(body, a.seed());
                }
            }
        }

        fn outbound(&self, op: Op, step: u64, onward: bool, o: Outbound) -> Vec<Outbound> {
            let Some(a) = self else { return vec![o] };
            if a.fires(MutationKind::Drop(op), step)
                || onward && a.fires(MutationKind::DropOnward(op), step)
            {
                return Vec::new();
            }
            if a.fires(MutationKind::Duplicate(op), step) {
                let twice = Outbound {
                    addr: o.addr,
                    expect: o.expect,
                    cells: o.cells.clone(),
                    session: o.session,
                    sizes_cover: o.sizes_cover,
                };
                return vec![o, twice];
            }
            if a.fires(MutationKind::Delay(op), step) {
                a.memory().held.push((2, o));
                return Vec::new();
            }
            vec![o]
        }

        fn release(&self) -> Vec<Outbound> {
            let Some(a) = self else { return Vec::new() };
            let mut m = a.memory();
            let mut out = Vec::new();
            for (wait, o) in std::mem::take(&mut m.held) {
                if wait <= 1 {
                    out.push(o);
                } else {
                    m.held.push((wait - 1, o));
                }
            }
            out
        }
    }
}
