//! A hop's side of audits (Byzantine hops): it commits to every forward and
//! backward it runs ([`mixnn_proto::audit`]) and keeps the openings of its
//! last [`KEPT`] steps, so the designer can audit any of them after the
//! fact. An audit of an older step is refused (and the designer treats a
//! refusal as a failed audit).
//!
//! With the `adversary` feature (tests only), `Adversary` makes the node
//! misbehave from a given step on.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use mixnn_model::stage::{Stage, StageState};
use mixnn_proto::audit::{commit_backward, commit_forward, digest_state, Opening};
use mixnn_proto::encode_state;
use mixnn_proto::trailer::{Slot, TrailerKeys};
use mixnn_wire::HopTag;

pub use mixnn_proto::audit::KEPT;

/// The commitments and openings of one session's stage.
pub(crate) struct Auditor {
    key: [u8; 32],
    /// The keys of this hop's trailer layer (its slot's tag and stream).
    trailer: TrailerKeys,
    /// The stage's state now (shared with the openings that start from
    /// it) and its digest.
    state: Arc<StageState>,
    digest: [u8; 32],
    /// Forwards waiting for their backward: step, state before, x, y.
    forwards: HashMap<HopTag, Kept>,
    openings: VecDeque<Kept>,
    /// The opening last encoded, with its step.
    encoded: Option<(u64, Vec<u8>)>,
}

/// An opening, with its state not yet encoded.
struct Kept {
    before: Arc<StageState>,
    opening: Opening,
}

impl Auditor {
    pub(crate) fn new(key: [u8; 32], stage: &Stage) -> Self {
        let mut a = Auditor {
            key,
            trailer: TrailerKeys::new(&key),
            state: Arc::new(StageState {
                steps: 0,
                tensors: Vec::new(),
            }),
            digest: [0; 32],
            forwards: HashMap::new(),
            openings: VecDeque::new(),
            encoded: None,
        };
        a.reset(stage);
        a
    }

    /// After a state load: the state is new, past steps are gone.
    pub(crate) fn reset(&mut self, stage: &Stage) {
        self.state = Arc::new(stage.state());
        self.digest = digest_state(&self.state);
        self.forwards.clear();
        self.openings.clear();
        self.encoded = None;
    }

    /// This hop's trailer keys.
    pub(crate) fn trailer_keys(&self) -> &TrailerKeys {
        &self.trailer
    }

    /// Records a forward of `step` (tag `tag`) and returns its slot: the
    /// digest of the state it ran on and its commitment.
    pub(crate) fn forward(&mut self, tag: HopTag, step: u64, x: &[u8], y: &[u8]) -> Slot {
        let c = commit_forward(&self.key, step, x, y, &self.digest);
        // The designer keeps few steps in flight; a forward whose backward
        // never comes is dropped with the oldest.
        if self.forwards.len() >= 4 * KEPT {
            self.forwards.clear();
        }
        self.forwards.insert(
            tag,
            Kept {
                before: Arc::clone(&self.state),
                opening: Opening {
                    step,
                    before: Vec::new(),
                    x: x.to_vec(),
                    y: y.to_vec(),
                    g_in: Vec::new(),
                    g_out: Vec::new(),
                    after: [0; 32],
                },
            },
        );
        Slot {
            digest: self.digest,
            commitment: c,
        }
    }

    /// Records the backward of the forward under `tag`, after the stage
    /// applied (`applied`) or kept (micro-batches) its update; returns its
    /// commitment.
    pub(crate) fn backward(
        &mut self,
        tag: HopTag,
        step: u64,
        g_in: &[u8],
        g_out: &[u8],
        stage: &Stage,
        applied: bool,
    ) -> Slot {
        if applied {
            self.state = Arc::new(stage.state());
            self.digest = digest_state(&self.state);
        }
        let c = commit_backward(&self.key, step, g_in, g_out, &self.digest);
        if let Some(mut k) = self.forwards.remove(&tag) {
            k.opening.g_in = g_in.to_vec();
            k.opening.g_out = g_out.to_vec();
            k.opening.after = self.digest;
            self.openings.push_back(k);
            while self.openings.len() > KEPT {
                self.openings.pop_front();
            }
        }
        Slot {
            digest: self.digest,
            commitment: c,
        }
    }

    /// Forgets the forwards of steps before `step`: their backward can no
    /// longer come, and each would pin the state it ran on (before, an
    /// audited session that sent forwards without their backward pinned up
    /// to 64 states while the budget counted 17).
    pub(crate) fn drop_forwards_before(&mut self, step: u64) {
        self.forwards.retain(|_, k| k.opening.step >= step);
    }

    /// Bytes of the tensors it keeps (forwards waiting for their backward,
    /// openings, the opening last encoded); the states they start from are
    /// counted in the session's weight (`2 + KEPT` states: the live stage,
    /// its state now and the one before each kept step).
    pub(crate) fn bytes(&self) -> u64 {
        let fwd: usize = self
            .forwards
            .values()
            .map(|k| k.opening.x.len() + k.opening.y.len())
            .sum();
        let kept: usize = self
            .openings
            .iter()
            .map(|k| {
                let o = &k.opening;
                o.x.len() + o.y.len() + o.g_in.len() + o.g_out.len()
            })
            .sum();
        let encoded = self.encoded.as_ref().map_or(0, |(_, b)| b.len());
        (fwd + kept + encoded) as u64
    }

    /// The stage's state changed outside a step (a test adversary): what
    /// the next forward runs on, and commits to, is the stage as it is now.
    #[cfg(feature = "adversary")]
    pub(crate) fn resync(&mut self, stage: &Stage) {
        self.state = Arc::new(stage.state());
        self.digest = digest_state(&self.state);
    }

    /// The encoded opening of `step`, if still kept. The designer asks for
    /// it chunk by chunk, so the last one encoded is kept too.
    pub(crate) fn opening(&mut self, step: u64) -> Option<&[u8]> {
        if self.encoded.as_ref().is_none_or(|(at, _)| *at != step) {
            let k = self.openings.iter().find(|k| k.opening.step == step)?;
            let bytes = Opening {
                before: encode_state(&k.before),
                ..k.opening.clone()
            }
            .encode();
            self.encoded = Some((step, bytes));
        }
        self.encoded.as_ref().map(|(_, b)| b.as_slice())
    }
}

/// How a test adversary misbehaves.
#[cfg(feature = "adversary")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdversaryMode {
    /// Adds noise to every forward output.
    Noise,
    /// Sends the negated input gradient back.
    FlipGradient,
    /// Advances the step counter but leaves parameters and momentum as
    /// they were.
    SkipUpdate,
    /// Commits to its honest forward output but sends a noisy one (only
    /// the neighbour checks of an audit catch it).
    HiddenNoise,
    /// Runs every step honestly and commits to the state each one left,
    /// then changes its parameters before the next step, whose forward it
    /// runs on the changed state and commits to truthfully: an audit of
    /// any one step re-executes it from the state it opened and passes.
    /// Only the chain of state digests across steps catches it.
    TamperBetweenSteps,
    /// Answers state fetches (checkpoints) with changed parameters, while
    /// it trains and commits honestly.
    FalseState,
    /// Overwrites the commitment trailer it received on every forward
    /// (the slots of every hop before it), to erase their commitments or
    /// get an honest hop blamed; its own slot is honest.
    ForgeSlots,
    /// Trains and commits honestly but answers every audit opening with a
    /// sealed chunk that does not open, and answers probes: a bad reply
    /// the designer cannot pin on one hop (a relay could have changed it).
    GarbleOpenings,
}

/// A node that misbehaves from step `from_step` on (tests only). It commits
/// to what it actually sends and holds, so an audit of it fails.
#[cfg(feature = "adversary")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adversary {
    /// What it does.
    pub mode: AdversaryMode,
    /// The first step it does it in.
    pub from_step: u64,
}

#[cfg(feature = "adversary")]
impl std::str::FromStr for Adversary {
    type Err = String;

    /// `MODE@STEP`, MODE one of `noise`, `flip-gradient`, `skip-update`,
    /// `hidden-noise`, `tamper-between-steps`, `forge-slots`,
    /// `false-state`, `garble-openings`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mode, step) = s
            .split_once('@')
            .ok_or_else(|| format!("{s}: expected MODE@STEP"))?;
        let mode = match mode {
            "noise" => AdversaryMode::Noise,
            "flip-gradient" => AdversaryMode::FlipGradient,
            "skip-update" => AdversaryMode::SkipUpdate,
            "hidden-noise" => AdversaryMode::HiddenNoise,
            "tamper-between-steps" => AdversaryMode::TamperBetweenSteps,
            "forge-slots" => AdversaryMode::ForgeSlots,
            "false-state" => AdversaryMode::FalseState,
            "garble-openings" => AdversaryMode::GarbleOpenings,
            other => return Err(format!("unknown adversary mode {other}")),
        };
        let from_step = step.parse().map_err(|e| format!("{step}: {e}"))?;
        Ok(Adversary { mode, from_step })
    }
}

#[cfg(feature = "adversary")]
impl Adversary {
    fn active(&self, mode: AdversaryMode, step: u64) -> bool {
        self.mode == mode && step >= self.from_step
    }

    /// The forward output it sends instead of `y`.
    pub(crate) fn forward(&self, step: u64, y: Vec<u8>) -> Vec<u8> {
        if !self.active(AdversaryMode::Noise, step) {
            return y;
        }
        perturb(y, |i, v| v + if i % 2 == 0 { 0.05 } else { -0.05 })
    }

    /// The forward output it sends instead of the `y` it committed to.
    pub(crate) fn hidden(&self, step: u64, y: Vec<u8>) -> Vec<u8> {
        if !self.active(AdversaryMode::HiddenNoise, step) {
            return y;
        }
        perturb(y, |i, v| v + if i % 2 == 0 { 0.05 } else { -0.05 })
    }

    /// The state it sends when fetched at `step` instead of `state`.
    pub(crate) fn fetched(&self, step: u64, mut state: StageState) -> StageState {
        if self.active(AdversaryMode::FalseState, step) {
            for t in state.tensors.iter_mut() {
                if let Some(v) = t.values.first_mut() {
                    *v += 0.5;
                }
            }
        }
        state
    }

    /// The sealed opening chunk of `step` it sends instead of `sealed`.
    pub(crate) fn opening(&self, step: u64, mut sealed: Vec<u8>) -> Vec<u8> {
        if self.active(AdversaryMode::GarbleOpenings, step) {
            if let Some(b) = sealed.last_mut() {
                *b ^= 1;
            }
        }
        sealed
    }

    /// The trailer it builds on instead of the `trailer` it received.
    pub(crate) fn trailer(&self, step: u64, trailer: &[u8]) -> Vec<u8> {
        let mut t = trailer.to_vec();
        if self.active(AdversaryMode::ForgeSlots, step) {
            for b in t.iter_mut().step_by(3) {
                *b ^= 0x5a;
            }
        }
        t
    }

    /// The input gradient it sends instead of `dx`.
    pub(crate) fn backward(&self, step: u64, dx: Vec<u8>) -> Vec<u8> {
        if !self.active(AdversaryMode::FlipGradient, step) || dx.is_empty() {
            return dx;
        }
        perturb(dx, |_, v| -v)
    }

    /// After step `step`'s update and commitment: changes the parameters
    /// (and the auditor's idea of them, so it commits truthfully to what its
    /// next forward runs on). Returns whether it did.
    pub(crate) fn between_steps(&self, step: u64, stage: &mut Stage) -> bool {
        if !self.active(AdversaryMode::TamperBetweenSteps, step) {
            return false;
        }
        let mut state = stage.state();
        for t in state
            .tensors
            .iter_mut()
            .filter(|t| !t.name.ends_with(".velocity"))
        {
            for (i, v) in t.values.iter_mut().enumerate() {
                if i % 7 == 0 {
                    *v += 0.01;
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

    /// Applies (or pretends to apply) the step's update.
    pub(crate) fn apply(&self, step: u64, stage: &mut Stage) {
        if !self.active(AdversaryMode::SkipUpdate, step) {
            return stage.apply();
        }
        let mut before = stage.state();
        stage.apply();
        before.steps = stage.steps();
        if let Err(e) = stage.load_state(&before) {
            tracing::warn!("adversary: {e}");
        }
    }
}

#[cfg(feature = "adversary")]
fn perturb(bytes: Vec<u8>, f: impl Fn(usize, f32) -> f32) -> Vec<u8> {
    match mixnn_model::tensor_bytes::TensorBytes::decode(&bytes) {
        Ok(t) => {
            let values: Vec<f32> = t.values.iter().enumerate().map(|(i, v)| f(i, *v)).collect();
            mixnn_model::tensor_bytes::TensorBytes::encode_f32(&t.shape, &values)
        }
        Err(_) => bytes,
    }
}
