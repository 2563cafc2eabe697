//! Layered notes: private designer-to-hop data that rides with the header.
//!
//! Each hop's note is framed as `len: u16 LE ‖ bytes` and the frames of all
//! hops are layered with the shift-and-pad construction of
//! [`crate::layered`], over [`NOTES_LEN`] bytes. A hop sees its own note and
//! [`NOTES_LEN`] bytes of pseudo-random data; it cannot tell how many notes
//! follow or how long they are. The per-hop MAC covers the notes, so the
//! designer builds them first and MACs afterwards.

use crate::constants::{NOTES_LEN, NOTE_LEN_PREFIX};
use crate::crypto::HopKeys;
use crate::error::WireError;
use crate::header::Notes;
use crate::layered;
use crate::wrap::HopLayer;

/// Checks that the framed notes of a path fit in [`NOTES_LEN`] bytes.
pub(crate) fn check_fits<'a>(notes: impl Iterator<Item = &'a [u8]>) -> Result<(), WireError> {
    let needed: usize = notes.map(|n| NOTE_LEN_PREFIX + n.len()).sum();
    if needed > NOTES_LEN {
        return Err(WireError::NotesTooLong {
            needed,
            capacity: NOTES_LEN,
        });
    }
    Ok(())
}

/// `len ‖ note`; the caller checked the length fits.
fn frame(note: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(NOTE_LEN_PREFIX + note.len());
    // check_fits bounds note.len() by NOTES_LEN < u16::MAX.
    f.extend_from_slice(&(note.len() as u16).to_le_bytes());
    f.extend_from_slice(note);
    f
}

/// Designer: the notes each hop receives, outermost (hop 0) first.
pub(crate) fn build<'k, R: rand_core::RngCore + rand_core::CryptoRng>(
    keys: impl Iterator<Item = &'k HopKeys>,
    layers: &[HopLayer<'_>],
    rng: &mut R,
) -> Vec<Notes> {
    let frames: Vec<Vec<u8>> = layers.iter().map(|l| frame(l.note)).collect();
    let lens: Vec<usize> = frames.iter().map(Vec::len).collect();
    let streams: Vec<Vec<u8>> = keys
        .zip(&lens)
        .map(|(k, len)| layered::full_keystream(k.notes_stream(), NOTES_LEN + len))
        .collect();
    let n = frames.len();
    let phi = layered::filler(NOTES_LEN, &streams[..n - 1], &lens[..n - 1]);
    let mut out = vec![Notes::zeroed(); n];
    let mut inner = layered::innermost(NOTES_LEN, &frames[n - 1], &streams[n - 1], &phi, rng);
    out[n - 1].0.copy_from_slice(&inner);
    for i in (0..n - 1).rev() {
        layered::wrap_layer(&frames[i], &mut inner, &streams[i]);
        out[i].0.copy_from_slice(&inner);
    }
    out
}

/// Hop: decrypts the notes, returns this hop's note and the notes to forward.
pub(crate) fn peel(keys: &HopKeys, notes: &Notes) -> Result<(Vec<u8>, Notes), WireError> {
    let mut next = Notes::zeroed();
    let framed = layered::peel_area(&notes.0[..], &mut next.0[..], keys.notes_stream(), |p| {
        Ok(NOTE_LEN_PREFIX + usize::from(u16::from_le_bytes([p[0], p[1]])))
    })?;
    Ok((framed[NOTE_LEN_PREFIX..].to_vec(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fits_counts_length_prefixes() {
        let max = vec![0u8; NOTES_LEN - NOTE_LEN_PREFIX];
        assert!(check_fits([&max[..]].into_iter()).is_ok());
        let err = check_fits([&max[..], &[][..]].into_iter()).unwrap_err();
        assert_eq!(
            err,
            WireError::NotesTooLong {
                needed: NOTES_LEN + NOTE_LEN_PREFIX,
                capacity: NOTES_LEN
            }
        );
    }

    #[test]
    fn frame_prefixes_little_endian_length() {
        assert_eq!(frame(&[9; 3]), vec![3, 0, 9, 9, 9]);
    }
}
