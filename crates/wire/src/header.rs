//! The fixed-length parts of a message: routing [`Header`] and [`Notes`].
//!
//! ```text
//! Header (HEADER_LEN bytes, the same at every hop)
//! ┌──────────────┬──────────────────────────────────────────┬──────┐
//! │ prefix (32)  │ β: MAX_HOPS × BLOCK_LEN routing bytes    │ γ 16 │
//! └──────────────┴──────────────────────────────────────────┴──────┘
//!   init:    α, the hop's blinded X25519 group element
//!   session: token (16) ‖ ctr_field (16): the packet's lookup token
//!            (a PRF of the hop's packet counter) and the AES-encrypted
//!            counter; both differ in every packet
//! ```
//!
//! γ is a MAC over `prefix ‖ β ‖ notes` under the hop's key, so a change to
//! any byte of the header or the notes is caught before anything is parsed.
//!
//! A delivery to the designer ([`Onion::reply`]) has no onion layer left:
//! its header starts with the [`ReplyId`] the designer put in the last
//! hop's routing block, and is random after it, so on the link it looks
//! like any other message. Both ends read and write that id here, through
//! [`Onion::reply`] and [`Header::reply_id`], never by offset.

use rand_core::RngCore;

use crate::block::ReplyId;
use crate::constants::{BETA_LEN, HEADER_LEN, ID_LEN, MAC_LEN, NOTES_LEN, PREFIX_LEN};
use crate::error::WireError;

/// A routing header: `prefix ‖ β ‖ γ`, [`HEADER_LEN`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Header(pub(crate) Box<[u8; HEADER_LEN]>);

impl Header {
    /// Parses a header from exactly [`HEADER_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let mut h = Self::zeroed();
        if bytes.len() != HEADER_LEN {
            return Err(WireError::Length {
                what: "header",
                expected: HEADER_LEN,
                actual: bytes.len(),
            });
        }
        h.0.copy_from_slice(bytes);
        Ok(h)
    }

    pub(crate) fn zeroed() -> Self {
        Self(Box::new([0u8; HEADER_LEN]))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; HEADER_LEN] {
        &self.0
    }

    /// The prefix: α (init) or `token ‖ ctr_field` (session).
    pub fn prefix(&self) -> [u8; PREFIX_LEN] {
        let mut p = [0u8; PREFIX_LEN];
        p.copy_from_slice(&self.0[..PREFIX_LEN]);
        p
    }

    /// The lookup token of a session prefix.
    pub(crate) fn token(&self) -> [u8; ID_LEN] {
        self.id()
    }

    /// The reply id a delivery's header starts with ([`Onion::reply`]).
    pub fn reply_id(&self) -> ReplyId {
        ReplyId(self.id())
    }

    /// The first [`ID_LEN`] bytes: a session header's token or a
    /// delivery's reply id.
    fn id(&self) -> [u8; ID_LEN] {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&self.0[..ID_LEN]);
        id
    }

    /// The encrypted routing blocks β.
    pub fn beta(&self) -> &[u8] {
        &self.0[PREFIX_LEN..PREFIX_LEN + BETA_LEN]
    }

    /// The MAC γ.
    pub fn mac(&self) -> &[u8] {
        &self.0[PREFIX_LEN + BETA_LEN..]
    }

    pub(crate) fn set_prefix(&mut self, prefix: &[u8; PREFIX_LEN]) {
        self.0[..PREFIX_LEN].copy_from_slice(prefix);
    }

    pub(crate) fn beta_mut(&mut self) -> &mut [u8] {
        &mut self.0[PREFIX_LEN..PREFIX_LEN + BETA_LEN]
    }

    pub(crate) fn set_mac(&mut self, mac: &[u8; MAC_LEN]) {
        self.0[PREFIX_LEN + BETA_LEN..].copy_from_slice(mac);
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Header(..)")
    }
}

/// The layered designer-to-hop notes, [`NOTES_LEN`] bytes at every hop.
///
/// Each hop decrypts the notes with its own key, reads its note
/// (`len: u16 LE ‖ bytes`) and passes the rest on, shifted left and topped up
/// to [`NOTES_LEN`] with keystream the designer predicted.
#[derive(Clone, PartialEq, Eq)]
pub struct Notes(pub(crate) Box<[u8; NOTES_LEN]>);

impl Notes {
    /// Parses notes from exactly [`NOTES_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let mut n = Self::zeroed();
        if bytes.len() != NOTES_LEN {
            return Err(WireError::Length {
                what: "notes",
                expected: NOTES_LEN,
                actual: bytes.len(),
            });
        }
        n.0.copy_from_slice(bytes);
        Ok(n)
    }

    pub(crate) fn zeroed() -> Self {
        Self(Box::new([0u8; NOTES_LEN]))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; NOTES_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for Notes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notes(..)")
    }
}

/// What the designer sends and a hop forwards: a header with its notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onion {
    /// The routing header.
    pub header: Header,
    /// The layered notes.
    pub notes: Notes,
}

impl Onion {
    /// What the last hop of a path sends the designer: `reply_id` first in
    /// the header, random bytes everywhere else (header and notes), so the
    /// message looks like any other on the link. The designer reads the id
    /// back with [`Header::reply_id`].
    pub fn reply(reply_id: ReplyId, rng: &mut impl RngCore) -> Onion {
        let mut header = Header::zeroed();
        rng.fill_bytes(&mut header.0[..]);
        header.0[..ID_LEN].copy_from_slice(&reply_id.0);
        let mut notes = Notes::zeroed();
        rng.fill_bytes(&mut notes.0[..]);
        Onion { header, notes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bytes_rejects_truncated_input() {
        assert!(matches!(
            Header::from_bytes(&[0u8; HEADER_LEN - 1]),
            Err(WireError::Length { what: "header", .. })
        ));
        assert!(matches!(
            Notes::from_bytes(&[0u8; NOTES_LEN + 1]),
            Err(WireError::Length { what: "notes", .. })
        ));
    }

    #[test]
    fn a_reply_carries_its_id_and_nothing_else_fixed() {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let rid = ReplyId([0x5a; ID_LEN]);
        let a = Onion::reply(rid, &mut rng);
        let b = Onion::reply(rid, &mut rng);
        assert_eq!(a.header.reply_id(), rid);
        assert_eq!(b.header.reply_id(), rid);
        // Past the id, two replies share no header or notes bytes pattern.
        assert_ne!(a.header.as_bytes()[ID_LEN..], b.header.as_bytes()[ID_LEN..]);
        assert_ne!(a.notes, b.notes);
    }

    #[test]
    fn header_parts_cover_the_whole_header() {
        let mut raw = vec![0u8; HEADER_LEN];
        raw[0] = 1;
        raw[PREFIX_LEN] = 2;
        raw[HEADER_LEN - 1] = 3;
        let h = Header::from_bytes(&raw).unwrap();
        assert_eq!(h.prefix()[0], 1);
        assert_eq!(h.beta()[0], 2);
        assert_eq!(h.mac()[MAC_LEN - 1], 3);
        assert_eq!(PREFIX_LEN + h.beta().len() + h.mac().len(), HEADER_LEN);
    }
}
