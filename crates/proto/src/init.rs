//! The init note: what a hop learns when a session is set up.

use std::net::SocketAddr;

use mixnn_model::optim::Optimizer;
use mixnn_model::spec::StageSpec;
use mixnn_wire::{HopAddr, PaddingPolicy, MAX_BODY_LEN};

use crate::{ProtoError, Reader, Result, NO_ADDR};

/// What a hop learns at init, besides its routing block.
#[derive(Debug, Clone, PartialEq)]
pub struct InitNote {
    /// The arithmetic the designer computes (`docs/arithmetic.md`); a hop
    /// that computes another refuses the init, since none of its results
    /// could equal the designer's.
    pub arith: u32,
    /// The stage it runs (for a dummy hop, an identity stage or ops moved
    /// onto it that change nothing about the result).
    pub stage: StageSpec,
    /// Optimiser settings.
    pub optimizer: Optimizer,
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
    /// Key of this hop's sealed bodies ([`crate::reply`]): fetch and audit
    /// answers and loads travel through other hops, sealed with it.
    pub reply_key: [u8; 32],
    /// Key of this hop's audit commitments ([`crate::audit`]), fresh per hop and
    /// session; `None`: the hop commits to nothing and carries no
    /// commitment trailer. Encoded only when present.
    pub audit_key: Option<[u8; 32]>,
}

const PAD_UNIFORM: u8 = 0;
const PAD_CLASSES: u8 = 1;

/// Most ops in one stage, nested ops included.
pub const MAX_OPS: usize = mixnn_model::spec::MAX_OPS;

impl InitNote {
    /// Encodes the note.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(&self.arith.to_le_bytes());
        // The stage in the model's binary form (every op has a code there).
        out.extend_from_slice(&self.stage.encode());
        out.extend_from_slice(&self.optimizer.encode());
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
        out.extend_from_slice(&self.reply_key);
        if let Some(k) = &self.audit_key {
            out.extend_from_slice(k);
        }
        out
    }

    /// Decodes and checks a note (the stage spec must chain).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let what = "init note";
        let mut r = Reader::new(bytes, what);
        let arith = r.u32()?;
        let invalid = |reason: String| ProtoError::Invalid { what, reason };
        let (stage, used) = StageSpec::decode(r.rest()).map_err(invalid)?;
        r.skip(used)?;
        // The same checks as a model file: shapes chain, loss only last,
        // sizes within bounds.
        stage
            .check(1, stage.is_loss())
            .map_err(|e| invalid(e.to_string()))?;
        let (optimizer, used) = Optimizer::decode(r.rest()).map_err(invalid)?;
        r.skip(used)?;
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
            arith,
            stage,
            optimizer,
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
            reply_key: r.key()?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use mixnn_model::spec::{OpSpec, Shape};

    fn note() -> InitNote {
        InitNote {
            arith: 2,
            stage: StageSpec {
                input: Shape::flat(784),
                ops: vec![
                    OpSpec::Linear {
                        input: 784,
                        output: 128,
                    },
                    OpSpec::Relu,
                ],
            },
            optimizer: Optimizer::default(),
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
            reply_key: [5; 32],
            audit_key: None,
        }
    }

    #[test]
    fn init_note_round_trips_and_is_compact() {
        let n = note();
        let b = n.encode();
        assert_eq!(InitNote::decode(&b).unwrap(), n);
        assert!(b.len() < 246, "{}", b.len());
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
        let at = b.len() - 32 - 3 * 32 - 8 - 4 - 19 - 19 - 1;
        assert_eq!(
            u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize,
            MAX_BODY_LEN
        );
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
            err.contains("expects 64 input features but gets [128]"),
            "{err}"
        );
        let mut b = note().encode();
        // arith (4), rank (1), dims (4), op count (1), then the first op.
        b[10] = 77;
        assert!(InitNote::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown op code 77"));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = InitNote::decode(&bytes);
        }
    }
}
