//! A node that lies, for tests of audits (feature `adversary` only).
//!
//! The node's code calls the hooks of [`Hooks`] at every point where a
//! hop could deviate from the protocol: what it computes, what it sends,
//! what it writes in its slot, what it does to the trailer it received,
//! to its state between steps or after a load, what it hands over when
//! fetched or audited. Without the feature the hooks are the identity
//! ([`NoAdversary`]) and compile away.

use mixnn_model::stage::{Stage, StageState};
use mixnn_proto::trailer::Slot;

use crate::audit::Auditor;

/// Which pass of a step a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// A training forward.
    Forward,
    /// A training backward.
    Backward,
    /// A test forward.
    Test,
}

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
}

/// No adversary: every hook is the identity.
#[cfg(not(feature = "adversary"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoAdversary;

#[cfg(not(feature = "adversary"))]
impl Hooks for NoAdversary {}

#[cfg(feature = "adversary")]
pub use lying::{Adversary, AdversaryMode};

#[cfg(feature = "adversary")]
mod lying {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use mixnn_model::stage::{Stage, StageState};
    use mixnn_model::tensor_bytes::TensorBytes;
    use mixnn_proto::trailer::{Slot, SLOT_LEN};

    use super::{Hooks, Pass};
    use crate::audit::Auditor;

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
    #[derive(Debug, Default)]
    struct Memory {
        /// Fetches answered (chunk 0 asked for), per step.
        fetches: HashMap<u64, u32>,
        /// Fetch answers garbled so far.
        garbled: u32,
        /// The digest the next forward's slot names instead of its own.
        shown: Option<[u8; 32]>,
    }

    /// A node that misbehaves from step `from_step` on (tests only).
    #[derive(Debug, Clone)]
    pub struct Adversary {
        /// What it does.
        pub mode: AdversaryMode,
        /// The first step it does it in.
        pub from_step: u64,
        memory: Arc<Mutex<Memory>>,
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

        fn active(&self, mode: AdversaryMode, step: u64) -> bool {
            self.mode == mode && step >= self.from_step
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
            match self {
                Some(a) if pass == Pass::Forward && a.active(AdversaryMode::InputNoise, step) => {
                    noisy(body)
                }
                _ => body,
            }
        }

        fn computed(&self, step: u64, pass: Pass, y: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return y };
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
            match self {
                Some(a)
                    if pass == Pass::Forward
                        && loss
                        && a.active(AdversaryMode::ShortLoss, step) =>
                {
                    body[..body.len().min(100)].to_vec()
                }
                _ => body,
            }
        }

        fn slot(&self, _step: u64, pass: Pass, slot: &mut Slot) {
            let Some(a) = self else { return };
            if pass == Pass::Forward && a.mode == AdversaryMode::TamperHidden {
                if let Some(d) = a.memory().shown.take() {
                    slot.digest = d;
                }
            }
        }

        fn received_trailer(&self, step: u64, pass: Pass, trailer: &mut Vec<u8>) {
            let Some(a) = self else { return };
            if pass != Pass::Forward {
                return;
            }
            // Their own tail stays (the hop takes what it changed).
            let keep = trailer.len().saturating_sub(SLOT_LEN);
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
                Some(a) if a.active(AdversaryMode::SkipUpdate, step) => {
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
            let hidden = a.mode == AdversaryMode::TamperHidden && step == a.from_step;
            if !(hidden || a.active(AdversaryMode::TamperBetweenSteps, step)) {
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
            if a.mode != AdversaryMode::TamperAfterReload || a.memory().garbled == 0 {
                return;
            }
            if tamper(stage, 0.01) {
                if let Some(au) = auditor {
                    au.resync(stage);
                }
            }
        }

        fn fetched(&self, step: u64, mut state: StageState) -> StageState {
            let Some(a) = self else { return state };
            let lie = a.active(AdversaryMode::FalseState, step)
                || (a.active(AdversaryMode::FalseFinalState, step)
                    && a.memory().fetches.get(&step).copied().unwrap_or(0) > 1);
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
            chunk == 0 && a.active(AdversaryMode::FalseFinalState, step)
        }

        fn fetch_chunk(&self, step: u64, chunk: u32, mut sealed: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return sealed };
            let once = |mode| {
                let mut m = a.memory();
                let first = a.active(mode, step) && chunk == 0 && m.garbled == 0;
                if first {
                    m.garbled += 1;
                }
                first
            };
            if once(AdversaryMode::TamperAfterReload) {
                if let Some(b) = sealed.last_mut() {
                    *b ^= 1;
                }
            }
            sealed
        }

        fn fetch_plain(&self, step: u64, chunk: u32, mut plain: Vec<u8>) -> Vec<u8> {
            let Some(a) = self else { return plain };
            let mut m = a.memory();
            if a.active(AdversaryMode::TinyChunk, step) && chunk == 0 && m.garbled == 0 {
                m.garbled += 1;
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
            }
            sealed
        }
    }
}
