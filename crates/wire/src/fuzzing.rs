//! Fuzz target bodies, one per decoder, as plain functions.
//!
//! The `fuzz/` directory (cargo-fuzz) calls these, and the crate's proptests
//! call them with arbitrary bytes, so they run even without a nightly
//! toolchain. Each must return normally for every input: a panic is a bug.

use crate::block::{BlockPlaintext, HopAddr, SessionId, ADDR_LEN};
use crate::cell::{CellReader, PaddingPolicy};
use crate::constants::{BLOCK_LEN, CELL_SIZE, HEADER_LEN, ID_LEN, NOTES_LEN};
use crate::header::{Header, Notes};
use crate::peel::{peel_init, HopSession, OnionSecret};
use crate::replay::InitReplayCache;

/// Stretches `data` to exactly `len` bytes (cycled; zero if empty).
fn stretch(data: &[u8], len: usize) -> Vec<u8> {
    if data.is_empty() {
        return vec![0; len];
    }
    data.iter().copied().cycle().take(len).collect()
}

/// Routing block and address decoders: if a block decodes, it re-encodes
/// to the same bytes.
pub fn block_decode(data: &[u8]) {
    let raw: [u8; BLOCK_LEN] = match stretch(data, BLOCK_LEN).try_into() {
        Ok(raw) => raw,
        Err(_) => return,
    };
    if let Ok(plain) = BlockPlaintext::decode(&raw) {
        assert_eq!(plain.encode(), raw, "block decode/encode round trip");
    }
    let addr: [u8; ADDR_LEN] = match stretch(data, ADDR_LEN).try_into() {
        Ok(addr) => addr,
        Err(_) => return,
    };
    if let Ok(a) = HopAddr::decode(&addr) {
        assert_eq!(a.encode(), addr, "address decode/encode round trip");
    }
}

/// Cell reader: the first byte picks a policy, the rest is cut into cells.
pub fn cell_reader(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let policy = if sel & 1 == 0 {
        PaddingPolicy::Classes {
            max_body: usize::from(sel) << 16,
        }
    } else {
        PaddingPolicy::Uniform {
            max_body: usize::from(sel) * 1000,
        }
    };
    // Lay the fuzz bytes over the start of the first cell and over the
    // following cells, so short inputs still reach the length checks.
    let mut first = vec![0u8; CELL_SIZE];
    let head = rest.len().min(CELL_SIZE);
    first[..head].copy_from_slice(&rest[..head]);
    let Ok(mut reader) = CellReader::new(&first, &policy) else {
        return;
    };
    for cell in rest[head..].chunks(CELL_SIZE) {
        if reader.push(cell).is_err() {
            return;
        }
    }
    let pad = vec![0u8; CELL_SIZE];
    while reader.remaining() > 0 && reader.remaining() < 64 {
        if reader.push(&pad).is_err() {
            return;
        }
    }
    if reader.remaining() == 0 {
        if let Ok(msg) = reader.finish() {
            assert!(msg.body.len() <= policy.max_body());
        }
    }
}

fn onion_from(data: &[u8]) -> Option<(Header, Notes)> {
    let bytes = stretch(data, HEADER_LEN + NOTES_LEN);
    let header = Header::from_bytes(&bytes[..HEADER_LEN]).ok()?;
    let notes = Notes::from_bytes(&bytes[HEADER_LEN..]).ok()?;
    Some((header, notes))
}

/// Init peel with a fixed onion key over attacker-chosen header and notes.
pub fn peel_init_bytes(data: &[u8]) {
    let secret = OnionSecret::from_bytes([0x42; 32]);
    let seen = InitReplayCache::new(4);
    if let Some((header, notes)) = onion_from(data) {
        let _ = peel_init(&secret, &seen, &header, &notes);
    }
}

/// Session peel with a fixed session; the header's session id is forced to
/// match so the input reaches the counter, MAC and block checks.
pub fn peel_session_bytes(data: &[u8]) {
    let id = SessionId([0x17; ID_LEN]);
    let mut session = HopSession::from_shared(id, &[0x42; 32]);
    if let Some((header, notes)) = onion_from(data) {
        let mut raw = header.as_bytes().to_vec();
        raw[..ID_LEN].copy_from_slice(&id.0);
        if let Ok(header) = Header::from_bytes(&raw) {
            let _ = session.peel(&header, &notes);
        }
    }
}
