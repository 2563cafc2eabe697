//! The MixNN stage protocol: what each hop reads in its note, and what the
//! bodies of messages carry, per op. Pure: bytes in, bytes out.
//!
//! | op | note (designer → this hop) | body in | body out |
//! |---|---|---|---|
//! | init | [`InitNote`]: stage spec, SGD, seed, padding and largest body, issue time, neighbours' link keys and addresses | empty | empty |
//! | forward | [`StepNote`] with the labels for the loss stage | activation | activation, or the loss to the designer |
//! | backward | [`StepNote`] (`need_input_grad`) | gradient (empty at the loss stage) | gradient, or empty to the designer |
//! | test | [`StepNote`] | activation | activation / output to the designer |
//! | loop | [`StepNote`] | anything | unchanged |
//! | fetch | [`StepNote`] with the chunk index | empty | [`ParamChunk`] of [`encode_state`] to the designer |
//! | load | [`StepNote`] with the chunk index | [`ParamChunk`] of [`encode_state`] | empty, to the designer |
//! | close | [`StepNote`] (step ignored) | empty | empty: passed on along the path, the last hop acknowledges to the designer; each hop drops its session |
//!
//! Every session note carries the training step it belongs to. A hop runs a
//! forward or test for step `s` only once it has applied `s` updates, and
//! refuses anything older: so packets may arrive early (the designer
//! pipelines), but a step is never applied twice nor out of order, and a
//! cascade computes exactly what the local trainer computes.
//!
//! All integers are little-endian.

pub mod audit;
pub mod trailer;

use std::net::SocketAddr;

use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::stage::{NamedParam, Sgd, StageState};
use mixnn_wire::{HopAddr, PaddingPolicy, ADDR_LEN, MAX_BODY_LEN};

/// A malformed note or body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The bytes end before the structure does.
    #[error("{what}: truncated at byte {at}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Where the bytes ran out.
        at: usize,
    },
    /// A field has a value the protocol does not allow.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, ProtoError>;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, at: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or(ProtoError::Truncated {
            what: self.what,
            at: self.bytes.len(),
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn key(&mut self) -> Result<[u8; 32]> {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.take(32)?);
        Ok(k)
    }
    /// An optional address: one zero byte, or a [`HopAddr`] encoding.
    fn addr(&mut self) -> Result<Option<SocketAddr>> {
        if self.bytes.get(self.at) == Some(&NO_ADDR) {
            self.at += 1;
            return Ok(None);
        }
        let raw: [u8; ADDR_LEN] =
            self.take(ADDR_LEN)?
                .try_into()
                .map_err(|_| ProtoError::Truncated {
                    what: self.what,
                    at: self.bytes.len(),
                })?;
        HopAddr::decode(&raw)
            .map(|a| Some(a.0))
            .map_err(|e| ProtoError::Invalid {
                what: self.what,
                reason: e.to_string(),
            })
    }
    fn end(&self) -> Result<()> {
        if self.at != self.bytes.len() {
            return Err(ProtoError::Invalid {
                what: self.what,
                reason: format!("{} trailing bytes", self.bytes.len() - self.at),
            });
        }
        Ok(())
    }
}

/// What a hop learns at init, besides its routing block.
#[derive(Debug, Clone, PartialEq)]
pub struct InitNote {
    /// The stage it runs (an identity stage for a dummy hop).
    pub stage: StageSpec,
    /// Optimiser settings.
    pub sgd: Sgd,
    /// Seed of the stage's parameter initialisation.
    pub seed: u64,
    /// Training steps the stage counts as applied when it starts (0 for a
    /// new run; a checkpoint's step when the designer rebuilds a cascade).
    pub start_step: u64,
    /// How the cascade pads its messages, with its largest body: no
    /// message of the session carries more (replies included), and the
    /// init itself is padded to it ([`PaddingPolicy::for_init`]).
    pub padding: PaddingPolicy,
    /// When the designer issued the init (seconds since the Unix epoch,
    /// its clock): a hop refuses inits issued outside a window around its
    /// own clock, and remembers the ones it accepted for that window, so a
    /// recorded init cannot set a session up again, not even after the
    /// hop restarts.
    pub issued_at: u64,
    /// Link key of whoever sends it forward traffic (previous hop or designer).
    pub prev_link: [u8; 32],
    /// Link key of whoever it sends forward traffic to (next hop or designer).
    pub next_link: [u8; 32],
    /// Link key of the designer (deliveries).
    pub designer_link: [u8; 32],
    /// Address of the previous hop, the only place this hop may send
    /// backward traffic to; `None` for the first hop (it delivers).
    pub prev_addr: Option<SocketAddr>,
    /// Address of the next hop, the only place this hop may send forward
    /// traffic to; `None` for the last hop (it delivers).
    pub next_addr: Option<SocketAddr>,
    /// Address of the designer, the only place this hop may deliver to;
    /// `None`: it may not deliver at all.
    pub designer_addr: Option<SocketAddr>,
    /// Key of this hop's audit commitments ([`audit`]), fresh per hop and
    /// session; `None`: the hop commits to nothing and carries no
    /// commitment trailer. Encoded only when present.
    pub audit_key: Option<[u8; 32]>,
}

const OP_LINEAR: u8 = 1;
const OP_RELU: u8 = 2;
const OP_IDENTITY: u8 = 3;
const OP_LOG_SOFTMAX: u8 = 4;
const OP_NLL_LOSS: u8 = 5;
const OP_NORMALIZE: u8 = 6;
const PAD_UNIFORM: u8 = 0;
const PAD_CLASSES: u8 = 1;
const NO_ADDR: u8 = 0;
/// Largest stage input/width accepted from a note.
pub const MAX_WIDTH: u32 = 1 << 20;
/// Most ops in one stage.
pub const MAX_OPS: usize = 64;

impl InitNote {
    /// Encodes the note.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(&(self.stage.input as u32).to_le_bytes());
        // At most MAX_OPS ops (checked when stages are built by the designer).
        out.push(self.stage.ops.len().min(255) as u8);
        for op in &self.stage.ops {
            match *op {
                OpSpec::Linear { input, output } => {
                    out.push(OP_LINEAR);
                    out.extend_from_slice(&(input as u32).to_le_bytes());
                    out.extend_from_slice(&(output as u32).to_le_bytes());
                }
                OpSpec::Normalize { mean, std } => {
                    out.push(OP_NORMALIZE);
                    out.extend_from_slice(&mean.to_bits().to_le_bytes());
                    out.extend_from_slice(&std.to_bits().to_le_bytes());
                }
                OpSpec::Relu => out.push(OP_RELU),
                OpSpec::LogSoftmax => out.push(OP_LOG_SOFTMAX),
                OpSpec::NllLoss => out.push(OP_NLL_LOSS),
                // Identity and any op added later without a wire code.
                _ => out.push(OP_IDENTITY),
            }
        }
        out.extend_from_slice(&self.sgd.lr.to_bits().to_le_bytes());
        out.extend_from_slice(&self.sgd.momentum.to_bits().to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.start_step.to_le_bytes());
        let (kind, max_body) = match self.padding {
            PaddingPolicy::Uniform { max_body } => (PAD_UNIFORM, max_body),
            PaddingPolicy::Classes { max_body } => (PAD_CLASSES, max_body),
        };
        out.push(kind);
        // At most MAX_BODY_LEN < 2^32 for a policy that encodes cells.
        out.extend_from_slice(&(max_body.min(MAX_BODY_LEN) as u32).to_le_bytes());
        out.extend_from_slice(&self.issued_at.to_le_bytes());
        out.extend_from_slice(&self.prev_link);
        out.extend_from_slice(&self.next_link);
        out.extend_from_slice(&self.designer_link);
        for addr in [self.prev_addr, self.next_addr, self.designer_addr] {
            match addr {
                // The address encoding starts with its family (4 or 6).
                Some(a) => out.extend_from_slice(&HopAddr(a).encode()),
                None => out.push(NO_ADDR),
            }
        }
        if let Some(k) = &self.audit_key {
            out.extend_from_slice(k);
        }
        out
    }

    /// Decodes and checks a note (the stage spec must chain).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let what = "init note";
        let mut r = Reader::new(bytes, what);
        let input = r.u32()?;
        let n = usize::from(r.u8()?);
        let invalid = |reason: String| ProtoError::Invalid { what, reason };
        if input == 0 || input > MAX_WIDTH || n == 0 || n > MAX_OPS {
            return Err(invalid(format!("stage input {input} with {n} ops")));
        }
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(match r.u8()? {
                OP_LINEAR => {
                    let (i, o) = (r.u32()?, r.u32()?);
                    if i == 0 || o == 0 || i > MAX_WIDTH || o > MAX_WIDTH {
                        return Err(invalid(format!("linear({i}, {o})")));
                    }
                    OpSpec::Linear {
                        input: i as usize,
                        output: o as usize,
                    }
                }
                OP_NORMALIZE => OpSpec::Normalize {
                    mean: r.f32()?,
                    std: r.f32()?,
                },
                OP_RELU => OpSpec::Relu,
                OP_IDENTITY => OpSpec::Identity,
                OP_LOG_SOFTMAX => OpSpec::LogSoftmax,
                OP_NLL_LOSS => OpSpec::NllLoss,
                other => return Err(invalid(format!("unknown op code {other}"))),
            });
        }
        let stage = StageSpec {
            input: input as usize,
            ops,
        };
        // The same checks as a model file: dimensions chain, loss last.
        mixnn_model::spec::ModelSpec::from_stages("stage".into(), stage.input, vec![stage.clone()])
            .map_err(|e| invalid(e.to_string()))?;
        let sgd = Sgd {
            lr: r.f32()?,
            momentum: r.f32()?,
        };
        if !sgd.lr.is_finite() || !sgd.momentum.is_finite() {
            return Err(invalid("non-finite optimiser settings".into()));
        }
        let seed = r.u64()?;
        let start_step = r.u64()?;
        let kind = r.u8()?;
        let max_body = r.u32()? as usize;
        if max_body > MAX_BODY_LEN {
            return Err(invalid(format!(
                "largest body {max_body} above {MAX_BODY_LEN}"
            )));
        }
        let padding = match kind {
            PAD_UNIFORM => PaddingPolicy::Uniform { max_body },
            PAD_CLASSES => PaddingPolicy::Classes { max_body },
            other => return Err(invalid(format!("unknown padding kind {other}"))),
        };
        let issued_at = r.u64()?;
        let (prev_link, next_link, designer_link) = (r.key()?, r.key()?, r.key()?);
        let note = InitNote {
            stage,
            sgd,
            seed,
            start_step,
            padding,
            issued_at,
            prev_link,
            next_link,
            designer_link,
            prev_addr: r.addr()?,
            next_addr: r.addr()?,
            designer_addr: r.addr()?,
            audit_key: None,
        };
        let note = if r.at < r.bytes.len() {
            InitNote {
                audit_key: Some(r.key()?),
                ..note
            }
        } else {
            note
        };
        r.end()?;
        Ok(note)
    }
}

/// The note of every session message: which step it belongs to, and what
/// else this hop needs for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepNote {
    /// Updates the stage must have applied before it acts (forward, test,
    /// fetch), or the step being completed (backward).
    pub step: u64,
    /// Backward: whether to compute and send the input gradient.
    pub need_input_grad: bool,
    /// Forward at the loss stage: one class per row.
    pub labels: Vec<u32>,
    /// Fetch: which chunk of the parameters to return.
    pub chunk: u32,
    /// Forward/backward: which micro-batch of the step this is (0-based).
    pub micro: u16,
    /// Backward: how many micro-batches the step has; the hop applies the
    /// update once it has the gradients of all of them.
    pub micros: u16,
    /// Forward at the loss stage: rows of the whole batch, which the loss
    /// is averaged over (0: the micro-batch's own rows).
    pub batch_rows: u32,
}

/// Most labels in one note.
pub const MAX_LABELS: usize = 1024;

impl StepNote {
    /// A note for `step` with nothing else.
    pub fn at(step: u64) -> Self {
        StepNote {
            step,
            need_input_grad: false,
            labels: Vec::new(),
            chunk: 0,
            micro: 0,
            micros: 1,
            batch_rows: 0,
        }
    }

    /// Encodes the note.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(23 + 2 * self.labels.len());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.push(u8::from(self.need_input_grad));
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&self.micro.to_le_bytes());
        out.extend_from_slice(&self.micros.to_le_bytes());
        out.extend_from_slice(&self.batch_rows.to_le_bytes());
        // At most MAX_LABELS (the designer's batches are far smaller).
        out.extend_from_slice(&(self.labels.len().min(MAX_LABELS) as u16).to_le_bytes());
        for l in self.labels.iter().take(MAX_LABELS) {
            // Classes above u16 are refused by the designer before this.
            out.extend_from_slice(&(*l as u16).to_le_bytes());
        }
        out
    }

    /// Decodes a note.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let what = "step note";
        let mut r = Reader::new(bytes, what);
        let step = r.u64()?;
        let need_input_grad = match r.u8()? {
            0 => false,
            1 => true,
            other => {
                return Err(ProtoError::Invalid {
                    what,
                    reason: format!("flag byte {other}"),
                })
            }
        };
        let chunk = r.u32()?;
        let micro = r.u16()?;
        let micros = r.u16()?;
        let batch_rows = r.u32()?;
        if micros == 0 || micro >= micros {
            return Err(ProtoError::Invalid {
                what,
                reason: format!("micro-batch {micro} of {micros}"),
            });
        }
        let n = usize::from(r.u16()?);
        if n > MAX_LABELS {
            return Err(ProtoError::Invalid {
                what,
                reason: format!("{n} labels"),
            });
        }
        let labels = (0..n)
            .map(|_| r.u16().map(u32::from))
            .collect::<Result<Vec<u32>>>()?;
        r.end()?;
        Ok(StepNote {
            step,
            need_input_grad,
            labels,
            chunk,
            micro,
            micros,
            batch_rows,
        })
    }
}

/// One chunk of a stage's serialised parameters, as a fetch returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamChunk {
    /// Length of the whole serialisation.
    pub total: u32,
    /// This chunk's bytes.
    pub bytes: Vec<u8>,
}

impl ParamChunk {
    /// Encodes `total ‖ bytes`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.bytes.len());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Decodes a chunk.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "parameter chunk");
        let total = r.u32()?;
        Ok(ParamChunk {
            total,
            bytes: bytes[4..].to_vec(),
        })
    }
}

/// Serialises a stage's state (a fetch's answer, a load's payload):
/// `steps u64 ‖` [`encode_params`] of its tensors.
pub fn encode_state(state: &StageState) -> Vec<u8> {
    let mut out = state.steps.to_le_bytes().to_vec();
    out.extend_from_slice(&encode_params(&state.tensors));
    out
}

/// Parses [`encode_state`] output.
pub fn decode_state(bytes: &[u8]) -> Result<StageState> {
    let mut r = Reader::new(bytes, "stage state");
    let steps = r.u64()?;
    Ok(StageState {
        steps,
        tensors: decode_params(&bytes[8..])?,
    })
}

/// Serialises parameters: `count u16`, then per tensor `name_len u16 ‖ name
/// ‖ rank u8 ‖ dims u32… ‖ f32…`.
pub fn encode_params(params: &[NamedParam]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(params.len() as u16).to_le_bytes());
    for p in params {
        out.extend_from_slice(&(p.name.len() as u16).to_le_bytes());
        out.extend_from_slice(p.name.as_bytes());
        out.push(p.shape.len() as u8);
        for d in &p.shape {
            out.extend_from_slice(&(*d as u32).to_le_bytes());
        }
        for v in &p.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Parses [`encode_params`] output.
pub fn decode_params(bytes: &[u8]) -> Result<Vec<NamedParam>> {
    let what = "parameters";
    let mut r = Reader::new(bytes, what);
    let n = r.u16()?;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let len = usize::from(r.u16()?);
        let name = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| ProtoError::Invalid {
            what,
            reason: "name is not UTF-8".into(),
        })?;
        let rank = usize::from(r.u8()?);
        let mut shape = Vec::with_capacity(rank);
        let mut count = 1usize;
        for _ in 0..rank {
            let d = r.u32()? as usize;
            count = count.saturating_mul(d);
            shape.push(d);
        }
        let raw = r.take(count.saturating_mul(4))?;
        let values = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push(NamedParam {
            name,
            shape,
            values,
        });
    }
    r.end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn note() -> InitNote {
        InitNote {
            stage: StageSpec {
                input: 784,
                ops: vec![
                    OpSpec::Linear {
                        input: 784,
                        output: 128,
                    },
                    OpSpec::Relu,
                ],
            },
            sgd: Sgd::default(),
            seed: 99,
            start_step: 7,
            padding: PaddingPolicy::Uniform { max_body: 50_000 },
            issued_at: 1_700_000_000,
            prev_link: [1; 32],
            next_link: [2; 32],
            designer_link: [3; 32],
            prev_addr: Some("10.0.0.1:7001".parse().unwrap()),
            next_addr: Some("[::1]:7002".parse().unwrap()),
            designer_addr: None,
            audit_key: None,
        }
    }

    #[test]
    fn init_note_round_trips_and_is_compact() {
        let n = note();
        let b = n.encode();
        assert_eq!(InitNote::decode(&b).unwrap(), n);
        assert!(b.len() < 210, "{}", b.len());
        let n = InitNote {
            padding: PaddingPolicy::Classes { max_body: 9_000 },
            prev_addr: None,
            designer_addr: Some("127.0.0.1:9".parse().unwrap()),
            audit_key: Some([4; 32]),
            ..note()
        };
        assert_eq!(InitNote::decode(&n.encode()).unwrap(), n);
    }

    #[test]
    fn init_note_rejects_a_body_cap_above_the_format() {
        let mut n = note();
        n.padding = PaddingPolicy::Classes {
            max_body: MAX_BODY_LEN,
        };
        let mut b = n.encode();
        let at = b.len() - 3 * 32 - 8 - 4 - 19 - 19 - 1;
        b[at..at + 4].copy_from_slice(&(MAX_BODY_LEN as u32 + 1).to_le_bytes());
        let err = InitNote::decode(&b).unwrap_err().to_string();
        assert!(err.contains("largest body"), "{err}");
    }

    #[test]
    fn init_note_rejects_a_broken_stage() {
        let mut n = note();
        n.stage.ops.push(OpSpec::Linear {
            input: 64,
            output: 10,
        });
        let err = InitNote::decode(&n.encode()).unwrap_err().to_string();
        assert!(
            err.contains("expects 64 input features but the previous op gives 128"),
            "{err}"
        );
        let mut b = note().encode();
        b[5] = 77;
        assert!(InitNote::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown op code 77"));
    }

    #[test]
    fn step_note_rejects_a_micro_batch_outside_the_step() {
        for (micro, micros) in [(0u16, 0u16), (4, 4), (9, 2)] {
            let n = StepNote {
                micro,
                micros,
                ..StepNote::at(3)
            };
            let err = StepNote::decode(&n.encode()).unwrap_err().to_string();
            assert!(err.contains("micro-batch"), "{err}");
        }
    }

    #[test]
    fn state_round_trips() {
        let s = StageState {
            steps: 77,
            tensors: vec![NamedParam {
                name: "1.weight.velocity".into(),
                shape: vec![1, 2],
                values: vec![0.5, -1.5],
            }],
        };
        assert_eq!(decode_state(&encode_state(&s)).unwrap(), s);
        assert!(decode_state(&encode_state(&s)[..12]).is_err());
    }

    #[test]
    fn params_round_trip() {
        let p = vec![NamedParam {
            name: "0.weight".into(),
            shape: vec![2, 3],
            values: vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.0],
        }];
        assert_eq!(decode_params(&encode_params(&p)).unwrap(), p);
    }

    proptest! {
        #[test]
        fn step_note_round_trips(step: u64, grad: bool, chunk: u32,
                                 (micros, micro) in (1u16..=64).prop_flat_map(|k| (Just(k), 0..k)),
                                 batch_rows: u32,
                                 labels in proptest::collection::vec(0u32..65536, 0..200)) {
            let n = StepNote { step, need_input_grad: grad, labels, chunk, micro, micros, batch_rows };
            prop_assert_eq!(StepNote::decode(&n.encode()).unwrap(), n);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = InitNote::decode(&bytes);
            let _ = StepNote::decode(&bytes);
            let _ = decode_params(&bytes);
            let _ = ParamChunk::decode(&bytes);
            let _ = decode_state(&bytes);
        }
    }
}
