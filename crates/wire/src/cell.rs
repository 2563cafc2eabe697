//! Cells: every message on a MixNN link is 1..k cells of [`CELL_SIZE`] bytes.
//!
//! ```text
//! first cell    kind (1) ‖ cells (u16 LE) ‖ body_len (u32 LE) ‖ header ‖ notes ‖ body[..FIRST_CELL_BODY]
//!
//! `cells` lets a receiver that does not know the sender's policy yet (a
//! node before init) read the whole message; it checks the count against
//! the session's policy after peeling ([`PaddingPolicy::check`]).
//! next cells    body bytes
//! last cell     … ‖ zero padding up to the cell count the policy gives
//! ```
//!
//! The link (Noise) encrypts the stream, so an observer sees only a number of
//! cells; the [`PaddingPolicy`] decides how much that number tells.

use rand_core::{CryptoRng, RngCore};

use crate::constants::{
    CELL_SIZE, FIRST_CELL_BODY, HEADER_LEN, MAX_BODY_LEN, MAX_CELLS, NOTES_LEN, PREAMBLE_LEN,
};
use crate::error::WireError;
use crate::header::{Header, Notes, Onion};

/// What the first cell announces; carried inside the link encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum CellKind {
    /// An init onion: peel with [`crate::peel_init`].
    Init = 1,
    /// A session onion: peel with [`crate::peel_session`].
    Session = 2,
    /// Link-level cover traffic: random content, dropped by the receiver.
    Cover = 3,
}

impl TryFrom<u8> for CellKind {
    type Error = WireError;

    fn try_from(byte: u8) -> Result<Self, WireError> {
        match byte {
            1 => Ok(CellKind::Init),
            2 => Ok(CellKind::Session),
            3 => Ok(CellKind::Cover),
            _ => Err(WireError::UnknownKind { byte }),
        }
    }
}

/// How a cascade pads messages to a number of cells.
///
/// * `Uniform { max_body }` (the paper's rule, default): every message of the
///   cascade — init, forward, backward, test, loop, cover — takes the cells
///   of its largest message. A link observer learns nothing from sizes; the
///   cost is bandwidth when messages differ much in size.
/// * `Classes { max_body }`: a message takes the next power-of-two number of
///   cells, and no message carries more than `max_body` body bytes (the
///   cascade's largest). An observer learns each message's size class
///   (within a factor of two), which may tell which link carries which
///   stage's activations, and a forward pass from a backward one if their
///   sizes fall in different classes.
///
/// Under both, a session's init message is padded to the cells of a
/// `max_body`-byte body ([`PaddingPolicy::for_init`]): whoever sets up a
/// session sends, once, as many cells as the largest message the session
/// may make a hop send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingPolicy {
    /// Every message padded to the cells of a `max_body`-byte body.
    Uniform {
        /// The cascade's largest body, in bytes.
        max_body: usize,
    },
    /// Every message padded to the next power-of-two cell count.
    Classes {
        /// The cascade's largest body, in bytes.
        max_body: usize,
    },
}

impl Default for PaddingPolicy {
    /// `Uniform` with room for the first cell only; set `max_body` to the
    /// cascade's largest activation.
    fn default() -> Self {
        PaddingPolicy::Uniform {
            max_body: FIRST_CELL_BODY,
        }
    }
}

/// Cells needed, unpadded, for a body of `len` bytes.
fn raw_cells(len: usize) -> usize {
    1 + len.saturating_sub(FIRST_CELL_BODY).div_ceil(CELL_SIZE)
}

impl PaddingPolicy {
    /// Largest body this policy accepts.
    pub fn max_body(&self) -> usize {
        match *self {
            PaddingPolicy::Uniform { max_body } | PaddingPolicy::Classes { max_body } => {
                max_body.min(MAX_BODY_LEN)
            }
        }
    }

    /// The policy of the init message that sets up a session under this
    /// one: padded to the session's largest body, whatever the policy.
    pub fn for_init(&self) -> PaddingPolicy {
        PaddingPolicy::Uniform {
            max_body: self.max_body(),
        }
    }

    /// Checks that a message of `cells` cells carrying `len` body bytes
    /// follows this policy.
    pub fn check(&self, cells: usize, len: usize) -> Result<(), WireError> {
        let want = self.cells_for(len)?;
        if cells != want {
            return Err(WireError::CellCount {
                expected: want,
                actual: cells,
            });
        }
        Ok(())
    }

    /// The number of cells a body of `len` bytes is padded to.
    pub fn cells_for(&self, len: usize) -> Result<usize, WireError> {
        let (PaddingPolicy::Uniform { max_body } | PaddingPolicy::Classes { max_body }) = *self;
        if max_body > MAX_BODY_LEN {
            return Err(WireError::BadPolicy {
                reason: "max_body above MAX_BODY_LEN",
            });
        }
        let max = self.max_body();
        if len > max {
            return Err(WireError::BodyTooLong { len, max });
        }
        Ok(match *self {
            PaddingPolicy::Uniform { max_body } => raw_cells(max_body),
            PaddingPolicy::Classes { .. } => raw_cells(len).next_power_of_two().min(MAX_CELLS),
        })
    }
}

/// Encodes a message as cells: `kind`, header, notes and body, padded per
/// `policy` with zero bytes. The result is a multiple of [`CELL_SIZE`].
///
/// The padding is zero rather than random because nobody who could read it
/// learns anything from it: on the wire it is inside the link encryption,
/// and the next hop, which sees it in the clear, reads the body length from
/// the first cell anyway. Random padding cost a hop about as much as its
/// link encryption did.
pub fn encode_cells(
    kind: CellKind,
    onion: &Onion,
    body: &[u8],
    policy: &PaddingPolicy,
) -> Result<Vec<u8>, WireError> {
    let cells = policy.cells_for(body.len())?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::BodyTooLong {
        len: body.len(),
        max: MAX_BODY_LEN,
    })?;
    let mut out = Vec::with_capacity(cells * CELL_SIZE);
    out.push(kind as u8);
    // cells ≤ MAX_CELLS ≤ u16::MAX (constants test).
    out.extend_from_slice(&(cells as u16).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(onion.header.as_bytes());
    out.extend_from_slice(onion.notes.as_bytes());
    out.extend_from_slice(body);
    out.resize(cells * CELL_SIZE, 0);
    Ok(out)
}

/// Encodes link cover traffic: random header, notes and body of `body_len`.
pub fn encode_cover<R: RngCore + CryptoRng>(
    body_len: usize,
    policy: &PaddingPolicy,
    rng: &mut R,
) -> Result<Vec<u8>, WireError> {
    let cells = policy.cells_for(body_len)?;
    let mut out = vec![0u8; cells * CELL_SIZE];
    rng.fill_bytes(&mut out);
    out[0] = CellKind::Cover as u8;
    // body_len ≤ MAX_BODY_LEN ≤ u32::MAX (checked by cells_for).
    out[1..3].copy_from_slice(&(cells as u16).to_le_bytes());
    out[3..PREAMBLE_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(out)
}

/// A message read back from cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// What the first cell announced.
    pub kind: CellKind,
    /// Header and notes (random for [`CellKind::Cover`]).
    pub onion: Onion,
    /// The body, padding removed.
    pub body: Vec<u8>,
    /// How many cells carried it.
    pub cells: usize,
}

/// Reassembles one message: give it the first cell, then
/// [`CellReader::remaining`] more cells, then call [`CellReader::finish`].
#[derive(Debug)]
pub struct CellReader {
    kind: CellKind,
    onion: Onion,
    body: Vec<u8>,
    body_len: usize,
    expected: usize,
    received: usize,
}

fn cell_len(cell: &[u8]) -> Result<(), WireError> {
    if cell.len() == CELL_SIZE {
        Ok(())
    } else {
        Err(WireError::Length {
            what: "cell",
            expected: CELL_SIZE,
            actual: cell.len(),
        })
    }
}

impl CellReader {
    /// Parses the first cell; fails if its length field breaks `policy`.
    pub fn new(first: &[u8], policy: &PaddingPolicy) -> Result<Self, WireError> {
        let reader = Self::any_policy(first)?;
        policy.check(reader.expected, reader.body_len)?;
        Ok(reader)
    }

    /// Parses the first cell without knowing the sender's policy: trusts
    /// the announced cell count as far as it can hold the announced body
    /// (and at most [`MAX_CELLS`]). Check the count against the session's
    /// policy with [`PaddingPolicy::check`] before acting on the message.
    pub fn any_policy(first: &[u8]) -> Result<Self, WireError> {
        cell_len(first)?;
        let kind = CellKind::try_from(first[0])?;
        let expected = usize::from(u16::from_le_bytes([first[1], first[2]]));
        let body_len = u32::from_le_bytes([first[3], first[4], first[5], first[6]]) as usize;
        if body_len > MAX_BODY_LEN {
            return Err(WireError::BodyTooLong {
                len: body_len,
                max: MAX_BODY_LEN,
            });
        }
        if expected < raw_cells(body_len) || expected > MAX_CELLS {
            return Err(WireError::CellCount {
                expected: raw_cells(body_len),
                actual: expected,
            });
        }
        let h = PREAMBLE_LEN;
        let n = h + HEADER_LEN;
        let b = n + NOTES_LEN;
        let onion = Onion {
            header: Header::from_bytes(&first[h..n])?,
            notes: Notes::from_bytes(&first[n..b])?,
        };
        // Grow as cells arrive past 1 MiB: the length field is attacker-chosen.
        let mut body = Vec::with_capacity(body_len.min(1 << 20));
        body.extend_from_slice(&first[b..b + body_len.min(FIRST_CELL_BODY)]);
        Ok(Self {
            kind,
            onion,
            body,
            body_len,
            expected,
            received: 1,
        })
    }

    /// The kind announced by the first cell.
    pub fn kind(&self) -> CellKind {
        self.kind
    }

    /// The header the first cell carries: a receiver can find the
    /// message's session from it before reading the rest.
    pub fn header(&self) -> &Header {
        &self.onion.header
    }

    /// The body length the first cell announces.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Cells of the whole message, as announced.
    pub fn cells(&self) -> usize {
        self.expected
    }

    /// Cells still to come.
    pub fn remaining(&self) -> usize {
        self.expected - self.received
    }

    /// Adds the next cell of the message.
    pub fn push(&mut self, cell: &[u8]) -> Result<(), WireError> {
        cell_len(cell)?;
        if self.remaining() == 0 {
            return Err(WireError::CellCount {
                expected: self.expected,
                actual: self.received + 1,
            });
        }
        let want = (self.body_len - self.body.len()).min(CELL_SIZE);
        self.body.extend_from_slice(&cell[..want]);
        self.received += 1;
        Ok(())
    }

    /// The message, once every cell has arrived.
    pub fn finish(self) -> Result<Message, WireError> {
        if self.remaining() != 0 {
            return Err(WireError::CellCount {
                expected: self.expected,
                actual: self.received,
            });
        }
        Ok(Message {
            kind: self.kind,
            onion: self.onion,
            body: self.body,
            cells: self.expected,
        })
    }
}

/// Decodes a whole message from `bytes` (exactly its cells).
pub fn decode_cells(bytes: &[u8], policy: &PaddingPolicy) -> Result<Message, WireError> {
    let first = bytes.get(..CELL_SIZE).ok_or(WireError::Length {
        what: "cell",
        expected: CELL_SIZE,
        actual: bytes.len(),
    })?;
    let mut reader = CellReader::new(first, policy)?;
    let rest = &bytes[CELL_SIZE..];
    if rest.len() != reader.remaining() * CELL_SIZE {
        return Err(WireError::CellCount {
            expected: reader.expected,
            actual: 1 + rest.len().div_ceil(CELL_SIZE),
        });
    }
    for cell in rest.chunks(CELL_SIZE) {
        reader.push(cell)?;
    }
    reader.finish()
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;

    fn onion() -> Onion {
        Onion {
            header: Header::from_bytes(&[7u8; HEADER_LEN]).unwrap(),
            notes: Notes::from_bytes(&[8u8; NOTES_LEN]).unwrap(),
        }
    }

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(3)
    }

    #[test]
    fn cells_round_trip_across_cell_boundaries() {
        let policy = PaddingPolicy::Classes {
            max_body: MAX_BODY_LEN,
        };
        for len in [
            0,
            1,
            FIRST_CELL_BODY,
            FIRST_CELL_BODY + 1,
            3 * CELL_SIZE + 5,
        ] {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = encode_cells(CellKind::Session, &onion(), &body, &policy).unwrap();
            assert_eq!(bytes.len() % CELL_SIZE, 0);
            let msg = decode_cells(&bytes, &policy).unwrap();
            assert_eq!(
                (msg.kind, msg.onion, msg.body),
                (CellKind::Session, onion(), body)
            );
        }
    }

    #[test]
    fn uniform_policy_gives_every_message_the_same_cell_count() {
        let policy = PaddingPolicy::Uniform { max_body: 200_000 };
        let sizes: Vec<usize> = [0, 2_500, 32_768, 200_000]
            .iter()
            .map(|&len| {
                encode_cells(CellKind::Init, &onion(), &vec![1; len], &policy)
                    .unwrap()
                    .len()
            })
            .collect();
        assert!(sizes.iter().all(|&s| s == sizes[0]), "{sizes:?}");
        assert_eq!(
            encode_cover(10, &policy, &mut rng()).unwrap().len(),
            sizes[0]
        );
    }

    #[test]
    fn classes_policy_rounds_cell_counts_to_powers_of_two() {
        let p = PaddingPolicy::Classes {
            max_body: MAX_BODY_LEN,
        };
        assert_eq!(p.cells_for(0), Ok(1));
        assert_eq!(p.cells_for(FIRST_CELL_BODY + 1), Ok(2));
        assert_eq!(p.cells_for(FIRST_CELL_BODY + CELL_SIZE + 1), Ok(4));
    }

    #[test]
    fn classes_policy_caps_bodies_and_pads_its_init_to_the_cap() {
        let cap = FIRST_CELL_BODY + 3 * CELL_SIZE;
        let p = PaddingPolicy::Classes { max_body: cap };
        assert_eq!(p.max_body(), cap);
        assert_eq!(
            p.cells_for(cap + 1),
            Err(WireError::BodyTooLong {
                len: cap + 1,
                max: cap
            })
        );
        // A session message of one cell, its init of the cap's four.
        assert_eq!(p.cells_for(0), Ok(1));
        assert_eq!(p.for_init().cells_for(0), Ok(4));
        assert_eq!(
            PaddingPolicy::Uniform { max_body: cap }.for_init(),
            PaddingPolicy::Uniform { max_body: cap }
        );
        assert!(PaddingPolicy::Classes {
            max_body: MAX_BODY_LEN + 1
        }
        .cells_for(0)
        .is_err());
    }

    #[test]
    fn reader_rejects_lengths_beyond_the_policy() {
        let policy = PaddingPolicy::Uniform { max_body: 100 };
        let mut first = vec![0u8; CELL_SIZE];
        first[0] = CellKind::Session as u8;
        first[1..3].copy_from_slice(&1u16.to_le_bytes());
        first[3..7].copy_from_slice(&101u32.to_le_bytes());
        assert_eq!(
            CellReader::new(&first, &policy).unwrap_err(),
            WireError::BodyTooLong { len: 101, max: 100 }
        );
        // A count that cannot hold the body, or more than MAX_CELLS.
        first[3..7].copy_from_slice(&(FIRST_CELL_BODY as u32 + 1).to_le_bytes());
        assert!(matches!(
            CellReader::any_policy(&first),
            Err(WireError::CellCount { .. })
        ));
        first[1..3].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            CellReader::any_policy(&first),
            Err(WireError::CellCount { .. })
        ));
        // A count the policy would not produce.
        first[1..3].copy_from_slice(&3u16.to_le_bytes());
        first[3..7].copy_from_slice(&10u32.to_le_bytes());
        assert!(CellReader::any_policy(&first).is_ok());
        assert!(matches!(
            CellReader::new(&first, &policy),
            Err(WireError::CellCount {
                expected: 1,
                actual: 3
            })
        ));
        first[3..7].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            CellReader::new(
                &first,
                &PaddingPolicy::Classes {
                    max_body: MAX_BODY_LEN
                }
            ),
            Err(WireError::BodyTooLong { .. })
        ));
    }

    #[test]
    fn reader_rejects_truncation_extra_cells_and_unknown_kind() {
        let policy = PaddingPolicy::Classes {
            max_body: MAX_BODY_LEN,
        };
        let bytes = encode_cells(CellKind::Session, &onion(), &vec![1; 20_000], &policy).unwrap();
        assert!(matches!(
            decode_cells(&bytes[..bytes.len() - 1], &policy),
            Err(WireError::CellCount { .. })
        ));
        assert!(matches!(
            decode_cells(&bytes[..CELL_SIZE - 1], &policy),
            Err(WireError::Length { .. })
        ));
        let mut reader = CellReader::new(&bytes[..CELL_SIZE], &policy).unwrap();
        assert!(reader.push(&bytes[..CELL_SIZE - 1]).is_err());
        reader.push(&bytes[CELL_SIZE..2 * CELL_SIZE]).unwrap();
        assert!(matches!(
            reader.push(&bytes[..CELL_SIZE]),
            Err(WireError::CellCount { .. })
        ));
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert_eq!(
            decode_cells(&bad, &policy).unwrap_err(),
            WireError::UnknownKind { byte: 9 }
        );
    }

    #[test]
    fn uniform_policy_above_the_cap_is_rejected() {
        let p = PaddingPolicy::Uniform {
            max_body: MAX_BODY_LEN + 1,
        };
        assert!(matches!(p.cells_for(1), Err(WireError::BadPolicy { .. })));
    }
}
