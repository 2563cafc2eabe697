//! The MixNN stage protocol: what each hop reads in its note, and what the
//! bodies of messages carry, per op. Pure: bytes in, bytes out.
//!
//! | op | note (designer → this hop) | body in | body out |
//! |---|---|---|---|
//! | init | [`InitNote`]: stage spec, SGD, seed, padding and largest body, issue time, neighbours' link keys and addresses | empty | empty |
//! | forward | [`ForwardNote`]: micro-batch, batch rows, labels for the loss stage | activation | activation, or the loss to the designer |
//! | backward | [`BackwardNote`]: micro-batch, `need_input_grad` | gradient (empty at the loss stage) | gradient, or empty to the designer |
//! | test | [`SessionNote::Test`]: the test batch | activation | activation / output to the designer |
//! | loop | [`SessionNote::Loop`] | anything | unchanged |
//! | fetch | [`ChunkNote`] | empty | [`ParamChunk`] of [`encode_state`], [sealed](reply), back along the route to the designer |
//! | load | [`ChunkNote`] | [sealed](reply) [`ParamChunk`] of [`encode_state`] | empty, back along the route to the designer |
//! | audit | [`AuditNote`]: a training step or a test batch | empty | [`ParamChunk`] of an [`audit::Opening`], [sealed](reply), back along the route to the designer |
//! | close | [`SessionNote::Close`] | empty | empty: passed on along the path, the last hop acknowledges to the designer; each hop drops its session |
//!
//! A session note is decoded for the op of the routing block it came with
//! ([`SessionNote::decode`]), so each op reads only its own fields.
//! Every session note carries the training step it belongs to. A hop runs a
//! forward or test for step `s` only once it has applied `s` updates, and
//! refuses anything older: so packets may arrive early (the designer
//! pipelines), but a step is never applied twice nor out of order, and a
//! cascade computes exactly what the local trainer computes.
//!
//! All integers are little-endian.
//!
//! [`observed`] is not part of the protocol: it is the record format of a
//! curious hop (the adversary simulator's input), shared by the node that
//! writes it and the simulator that reads it.

pub mod audit;
pub mod fuzzing;
mod init;
mod note;
pub mod observed;
pub mod reply;
mod state;
pub mod trailer;

pub use init::{InitNote, MAX_OPS};
pub use note::{
    AuditNote, BackwardNote, ChunkNote, ForwardNote, Micro, Opens, SessionNote, MAX_LABELS,
};
pub use state::{
    chunk_room, decode_params, decode_state, encode_params, encode_state, state_bound, ParamChunk,
};

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

pub(crate) type Result<T> = std::result::Result<T, ProtoError>;

/// The byte that stands for "no address" in a note.
pub(crate) const NO_ADDR: u8 = 0;

/// Bounds-checked little-endian reader.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, at: 0, what }
    }
    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at.min(self.bytes.len())..]
    }
    /// Skips `n` bytes.
    pub(crate) fn skip(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or(ProtoError::Truncated {
            what: self.what,
            at: self.bytes.len(),
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn key(&mut self) -> Result<[u8; 32]> {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.take(32)?);
        Ok(k)
    }
    /// An optional address: one zero byte, or a [`mixnn_wire::HopAddr`]
    /// encoding (which starts with its family, 4 or 6).
    pub(crate) fn addr(&mut self) -> Result<Option<std::net::SocketAddr>> {
        if self.bytes.get(self.at) == Some(&NO_ADDR) {
            self.at += 1;
            return Ok(None);
        }
        let raw: [u8; mixnn_wire::ADDR_LEN] =
            self.take(mixnn_wire::ADDR_LEN)?
                .try_into()
                .map_err(|_| ProtoError::Truncated {
                    what: self.what,
                    at: self.bytes.len(),
                })?;
        mixnn_wire::HopAddr::decode(&raw)
            .map(|a| Some(a.0))
            .map_err(|e| ProtoError::Invalid {
                what: self.what,
                reason: e.to_string(),
            })
    }
    pub(crate) fn end(&self) -> Result<()> {
        if self.at != self.bytes.len() {
            return Err(ProtoError::Invalid {
                what: self.what,
                reason: format!("{} trailing bytes", self.bytes.len() - self.at),
            });
        }
        Ok(())
    }
}
