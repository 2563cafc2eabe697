//! Session notes: what the designer tells one hop in one session message,
//! typed per op.
//!
//! Each op has its own note with only the fields it reads; a hop decodes
//! the note for the op of the routing block it peeled
//! ([`SessionNote::decode`]), so a fetch cannot carry labels and a
//! forward cannot lack its batch size. Every note starts with the step:
//!
//! ```text
//! forward   step u64 ‖ micro u16 ‖ micros u16 ‖ batch_rows u32 ‖ n u16 ‖ labels u16 × n
//! backward  step u64 ‖ micro u16 ‖ micros u16 ‖ need_input_grad u8 (0 or 1)
//! test      step u64 ‖ batch u32
//! loop      step u64
//! fetch     step u64 ‖ chunk u32
//! load      step u64 ‖ chunk u32
//! audit     step u64 ‖ chunk u32 ‖ 0            (the opening of a training step)
//!           step u64 ‖ chunk u32 ‖ 1 ‖ batch u32 (the opening of a test batch)
//! ```
//!
//! Notes travel inside the layered notes of the onion, which every hop
//! sees at the same length whatever its note, so their sizes reveal
//! nothing.

use mixnn_wire::Op;

use crate::{ProtoError, Reader, Result};

/// Most labels in one note.
pub const MAX_LABELS: usize = 1024;

/// Which micro-batch of its step a forward or backward carries: index
/// `index` of `count`, `index < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Micro {
    index: u16,
    count: u16,
}

impl Micro {
    /// The whole batch in one piece.
    pub const WHOLE: Micro = Micro { index: 0, count: 1 };

    /// Micro-batch `index` of `count`; refused unless `index < count`.
    pub fn new(index: u16, count: u16) -> Result<Micro> {
        if count == 0 || index >= count {
            return Err(ProtoError::Invalid {
                what: "micro-batch",
                reason: format!("micro-batch {index} of {count}"),
            });
        }
        Ok(Micro { index, count })
    }

    /// 0-based position in the step.
    pub fn index(self) -> u16 {
        self.index
    }

    /// Micro-batches in the step: a hop applies the update once it has
    /// the gradients of all of them.
    pub fn count(self) -> u16 {
        self.count
    }

    fn read(r: &mut Reader<'_>) -> Result<Micro> {
        let (index, count) = (r.u16()?, r.u16()?);
        Micro::new(index, count)
    }

    fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
    }
}

/// The note of a forward: which micro-batch, and what the loss stage needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardNote {
    /// Updates the stage must have applied before it runs this forward.
    pub step: u64,
    /// Which micro-batch of the step this is.
    pub micro: Micro,
    /// Rows of the whole batch, which a loss stage averages over (the
    /// model reads 0 as the micro-batch's own rows).
    pub batch_rows: u32,
    /// At the loss stage: one class per row; empty elsewhere.
    pub labels: Vec<u32>,
}

/// The note of a backward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackwardNote {
    /// The step this backward completes.
    pub step: u64,
    /// Which micro-batch of the step this is.
    pub micro: Micro,
    /// Whether to compute and send the input gradient (not at the first
    /// hop, unless the designer keeps the first stage).
    pub need_input_grad: bool,
}

/// The note of a chunked transfer (fetch, load, audit opening).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkNote {
    /// Fetch: updates the stage must have applied; load: the step of the
    /// state; audit: the step to open.
    pub step: u64,
    /// Which chunk of the transfer this message asks for or carries.
    pub chunk: u32,
}

/// What an audit opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opens {
    /// The training step of the note.
    Step,
    /// Test batch `batch` of the test phase at the note's step.
    Test {
        /// The test batch.
        batch: u32,
    },
}

/// The note of an audit: one chunk of the opening of a training step or
/// of a test batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditNote {
    /// The step opened (a test batch: the step the test ran at).
    pub step: u64,
    /// Which chunk of the opening this message asks for.
    pub chunk: u32,
    /// A training step or a test batch.
    pub opens: Opens,
}

/// The note of one session message, by op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionNote {
    /// A forward of one micro-batch.
    Forward(ForwardNote),
    /// A backward of one micro-batch.
    Backward(BackwardNote),
    /// A test forward (no cache, no update) of test batch `batch` at
    /// `step`.
    Test {
        /// Updates the stage must have applied.
        step: u64,
        /// Which test batch (audited sessions commit to each).
        batch: u32,
    },
    /// A loop (the hop forwards the body unchanged), sent at `step`.
    Loop {
        /// The designer's step when it sent the loop.
        step: u64,
    },
    /// One chunk of the stage's state, to the designer.
    Fetch(ChunkNote),
    /// One chunk of a state to load, from the designer.
    Load(ChunkNote),
    /// One chunk of the opening of a past step or test batch, to the
    /// designer.
    Audit(AuditNote),
    /// The designer ends the session: each hop passes it on and drops the
    /// session; the last hop acknowledges (`step` is the designer's step,
    /// not checked).
    Close {
        /// The designer's step when it closed the session.
        step: u64,
    },
}

impl SessionNote {
    /// The op this note goes with (the op of its hop's routing block).
    pub fn op(&self) -> Op {
        match self {
            SessionNote::Forward(_) => Op::Forward,
            SessionNote::Backward(_) => Op::Backward,
            SessionNote::Test { .. } => Op::Test,
            SessionNote::Loop { .. } => Op::Loop,
            SessionNote::Fetch(_) => Op::Fetch,
            SessionNote::Load(_) => Op::Load,
            SessionNote::Audit(_) => Op::Audit,
            SessionNote::Close { .. } => Op::Close,
        }
    }

    /// The training step the message belongs to.
    pub fn step(&self) -> u64 {
        match self {
            SessionNote::Forward(n) => n.step,
            SessionNote::Backward(n) => n.step,
            SessionNote::Test { step, .. }
            | SessionNote::Loop { step }
            | SessionNote::Close { step } => *step,
            SessionNote::Fetch(n) | SessionNote::Load(n) => n.step,
            SessionNote::Audit(n) => n.step,
        }
    }

    /// Encodes the note (layouts in the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.step().to_le_bytes());
        match self {
            SessionNote::Forward(n) => {
                n.micro.write(&mut out);
                out.extend_from_slice(&n.batch_rows.to_le_bytes());
                // At most MAX_LABELS (the designer's batches are far smaller).
                let labels = &n.labels[..n.labels.len().min(MAX_LABELS)];
                out.extend_from_slice(&(labels.len() as u16).to_le_bytes());
                for l in labels {
                    // Classes above u16 are refused by the designer before this.
                    out.extend_from_slice(&(*l as u16).to_le_bytes());
                }
            }
            SessionNote::Backward(n) => {
                n.micro.write(&mut out);
                out.push(u8::from(n.need_input_grad));
            }
            SessionNote::Test { batch, .. } => out.extend_from_slice(&batch.to_le_bytes()),
            SessionNote::Loop { .. } | SessionNote::Close { .. } => {}
            SessionNote::Fetch(n) | SessionNote::Load(n) => {
                out.extend_from_slice(&n.chunk.to_le_bytes());
            }
            SessionNote::Audit(n) => {
                out.extend_from_slice(&n.chunk.to_le_bytes());
                match n.opens {
                    Opens::Step => out.push(0),
                    Opens::Test { batch } => {
                        out.push(1);
                        out.extend_from_slice(&batch.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// Decodes the note of a message whose routing block says `op`. Init
    /// and cover messages carry no session note and are refused.
    pub fn decode(op: Op, bytes: &[u8]) -> Result<Self> {
        let what = "session note";
        let mut r = Reader::new(bytes, what);
        let step = r.u64()?;
        let chunk = |r: &mut Reader<'_>| -> Result<ChunkNote> {
            Ok(ChunkNote {
                step,
                chunk: r.u32()?,
            })
        };
        let note = match op {
            Op::Forward => {
                let micro = Micro::read(&mut r)?;
                let batch_rows = r.u32()?;
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
                SessionNote::Forward(ForwardNote {
                    step,
                    micro,
                    batch_rows,
                    labels,
                })
            }
            Op::Backward => {
                let micro = Micro::read(&mut r)?;
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
                SessionNote::Backward(BackwardNote {
                    step,
                    micro,
                    need_input_grad,
                })
            }
            Op::Test => SessionNote::Test {
                step,
                batch: r.u32()?,
            },
            Op::Loop => SessionNote::Loop { step },
            Op::Fetch => SessionNote::Fetch(chunk(&mut r)?),
            Op::Load => SessionNote::Load(chunk(&mut r)?),
            Op::Audit => {
                let chunk = r.u32()?;
                let opens = match r.u8()? {
                    0 => Opens::Step,
                    1 => Opens::Test { batch: r.u32()? },
                    other => {
                        return Err(ProtoError::Invalid {
                            what,
                            reason: format!("audit of kind {other}"),
                        })
                    }
                };
                SessionNote::Audit(AuditNote { step, chunk, opens })
            }
            Op::Close => SessionNote::Close { step },
            other => {
                return Err(ProtoError::Invalid {
                    what,
                    reason: format!("op {other:?} has no session note"),
                })
            }
        };
        r.end()?;
        Ok(note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::fuzzing::SESSION_OPS as OPS;

    #[test]
    fn a_micro_batch_outside_its_step_is_refused() {
        for (micro, micros) in [(0u16, 0u16), (4, 4), (9, 2)] {
            assert!(Micro::new(micro, micros).is_err());
            // The same, forged on the wire.
            let mut b = SessionNote::Backward(BackwardNote {
                step: 3,
                micro: Micro::WHOLE,
                need_input_grad: false,
            })
            .encode();
            b[8..10].copy_from_slice(&micro.to_le_bytes());
            b[10..12].copy_from_slice(&micros.to_le_bytes());
            let err = SessionNote::decode(Op::Backward, &b)
                .unwrap_err()
                .to_string();
            assert!(err.contains("micro-batch"), "{err}");
        }
    }

    #[test]
    fn each_op_reads_only_its_own_note() {
        let fetch = SessionNote::Fetch(ChunkNote { step: 5, chunk: 2 }).encode();
        // A fetch note is too short for a forward or an audit and too
        // long for a loop.
        assert!(SessionNote::decode(Op::Forward, &fetch).is_err());
        assert!(SessionNote::decode(Op::Audit, &fetch).is_err());
        assert!(SessionNote::decode(Op::Loop, &fetch).is_err());
        assert_eq!(
            SessionNote::decode(Op::Load, &fetch).unwrap(),
            SessionNote::Load(ChunkNote { step: 5, chunk: 2 })
        );
        for op in [Op::Init, Op::Cover] {
            assert!(SessionNote::decode(op, &fetch).is_err());
        }
    }

    fn any_note() -> impl Strategy<Value = SessionNote> {
        let micro = (1u16..=64).prop_flat_map(|k| (0..k, Just(k)));
        prop_oneof![
            (
                any::<u64>(),
                micro.clone(),
                any::<u32>(),
                proptest::collection::vec(0u32..65536, 0..200)
            )
                .prop_map(|(step, (i, k), batch_rows, labels)| {
                    SessionNote::Forward(ForwardNote {
                        step,
                        micro: Micro::new(i, k).unwrap(),
                        batch_rows,
                        labels,
                    })
                }),
            (any::<u64>(), micro, any::<bool>()).prop_map(|(step, (i, k), need_input_grad)| {
                SessionNote::Backward(BackwardNote {
                    step,
                    micro: Micro::new(i, k).unwrap(),
                    need_input_grad,
                })
            }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(step, batch)| SessionNote::Test { step, batch }),
            any::<u64>().prop_map(|step| SessionNote::Loop { step }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(step, chunk)| SessionNote::Fetch(ChunkNote { step, chunk })),
            (any::<u64>(), any::<u32>())
                .prop_map(|(step, chunk)| SessionNote::Load(ChunkNote { step, chunk })),
            (
                any::<u64>(),
                any::<u32>(),
                proptest::option::of(any::<u32>())
            )
                .prop_map(|(step, chunk, batch)| SessionNote::Audit(AuditNote {
                    step,
                    chunk,
                    opens: batch.map_or(Opens::Step, |batch| Opens::Test { batch }),
                })),
            any::<u64>().prop_map(|step| SessionNote::Close { step }),
        ]
    }

    proptest! {
        #[test]
        fn session_notes_round_trip(n in any_note()) {
            prop_assert_eq!(SessionNote::decode(n.op(), &n.encode()).unwrap(), n);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            for op in OPS {
                let _ = SessionNote::decode(op, &bytes);
            }
        }
    }
}
