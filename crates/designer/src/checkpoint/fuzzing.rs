//! Fuzz target body of the checkpoint decoder, as a plain function (the
//! pattern of `mixnn_wire::fuzzing`): `fuzz/` calls it under cargo-fuzz,
//! `tests/decoders.rs` on stable with arbitrary bytes and mutated valid
//! files. It must return normally for every input.

use sha2::{Digest, Sha256};

use super::Checkpoint;

/// `Checkpoint::decode` on `data` as it is, and on `data` with a valid
/// SHA-256 trailer appended: a file whose checksum holds but whose
/// contents were changed (by hand, by a bug, by whoever can write the
/// checkpoint directory) reaches the parser behind the checksum. What
/// decodes re-encodes to a file that decodes to the same encoding.
pub fn checkpoint(data: &[u8]) {
    let mut signed = data.to_vec();
    signed.extend_from_slice(&Sha256::digest(data));
    for bytes in [data, &signed[..]] {
        if let Ok(c) = Checkpoint::decode(bytes) {
            let encoded = c.encode();
            let again = Checkpoint::decode(&encoded).map(|c| c.encode());
            assert!(
                again.as_ref().is_ok_and(|e| *e == encoded),
                "checkpoint round trip"
            );
        }
    }
}
