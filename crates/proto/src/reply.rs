//! End-to-end sealed bodies between the designer and one hop.
//!
//! A fetch, an audit opening and a load travel through other hops of the
//! cascade (the designer talks only to the ends: a chunk route goes out
//! to hop `j` and back along the same hops to the first, which delivers),
//! so their bodies — a hop's parameters, momentum and commitments — are
//! sealed for the two parties that share the hop's [`ReplyKey`], drawn
//! fresh per hop and session and sent in its [`crate::InitNote`]. The
//! hops that relay a sealed body see only its length, which the padding
//! hides.
//!
//! Format: `nonce (24) ‖ XChaCha20-Poly1305(key, nonce, aad, plain)`;
//! `aad = "mixnn-reply-v2" ‖ kind ‖ step_le64 ‖ chunk_le32 ‖ batch_le32`
//! (the test batch of a test opening, else 0), so a relay can neither
//! read a chunk nor swap it for another step's, chunk's, batch's or
//! kind's.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::{ProtoError, Result};

/// Bytes a sealed body adds to its plaintext (nonce and tag).
pub const SEAL_OVERHEAD: usize = 24 + 16;

/// The key a hop and the designer share for sealed bodies.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReplyKey(pub [u8; 32]);

impl std::fmt::Debug for ReplyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyKey(..)")
    }
}

/// What a sealed body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// A chunk of the hop's state, hop → designer.
    Fetch,
    /// A chunk of the hop's audit opening of a training step, hop →
    /// designer.
    Audit,
    /// A chunk of the hop's opening of a test batch, hop → designer.
    AuditTest {
        /// The test batch.
        batch: u32,
    },
    /// A chunk of a state to load, designer → hop.
    Load,
}

fn aad(kind: Sealed, step: u64, chunk: u32) -> [u8; 31] {
    let mut a = [0u8; 31];
    a[..14].copy_from_slice(b"mixnn-reply-v2");
    let (byte, batch) = match kind {
        Sealed::Fetch => (1, 0),
        Sealed::Audit => (2, 0),
        Sealed::Load => (3, 0),
        Sealed::AuditTest { batch } => (4, batch),
    };
    a[14] = byte;
    a[15..23].copy_from_slice(&step.to_le_bytes());
    a[23..27].copy_from_slice(&chunk.to_le_bytes());
    a[27..31].copy_from_slice(&batch.to_le_bytes());
    a
}

impl ReplyKey {
    /// Seals `plain` as chunk `chunk` of `kind` at `step`, with a nonce
    /// drawn by the caller (random: 24 bytes never repeat in practice).
    pub fn seal(
        &self,
        kind: Sealed,
        step: u64,
        chunk: u32,
        plain: &[u8],
        nonce: [u8; 24],
    ) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let aad = aad(kind, step, chunk);
        // Encryption fails only for plaintexts beyond 2^38 bytes; bodies
        // are at most a few MiB.
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(24 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a body [`ReplyKey::seal`] made for the same kind, step and
    /// chunk; refuses anything else (another hop's, a relay's change).
    pub fn open(&self, kind: Sealed, step: u64, chunk: u32, sealed: &[u8]) -> Result<Vec<u8>> {
        let what = "sealed body";
        if sealed.len() < SEAL_OVERHEAD {
            return Err(ProtoError::Truncated {
                what,
                at: sealed.len(),
            });
        }
        let (nonce, rest) = sealed.split_at(24);
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let aad = aad(kind, step, chunk);
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: rest, aad: &aad })
            .map_err(|_| ProtoError::Invalid {
                what,
                reason: format!(
                    "{kind:?} chunk {chunk} of step {step} does not open under the session's reply key"
                ),
            })
    }
}

/// A relay's layer on a loop body: the bytes XORed with a keystream under
/// this key and the relay's routing tag for the message. Every hop that
/// relays a transfer (out to its hop, or back to the first) adds its layer,
/// so no two hops see the same body bytes; the designer, who knows every
/// hop's key and every tag it drew, takes the layers off (or puts them on
/// in advance, for a load). XOR: applying a layer twice removes it.
pub fn relay_layer(key: &ReplyKey, tag: &[u8; 16], bytes: &mut [u8]) {
    let stream = blake3::derive_key("mixnn-proto v1 2026 relay layer key", &key.0);
    let mut h = blake3::Hasher::new_keyed(&stream);
    h.update(tag);
    xor_xof(&mut h.finalize_xof(), bytes);
}

/// XORs the next `bytes.len()` bytes of `reader` into `bytes`. The stream
/// is read in blocks of 4 KiB, not 64 bytes: BLAKE3 computes up to 16
/// output blocks at once only when asked for that many (a multi-megabyte
/// audit opening is relayed about 8 times faster). The bytes are those of
/// any other way of reading the stream.
pub(crate) fn xor_xof(reader: &mut blake3::OutputReader, bytes: &mut [u8]) {
    let mut block = [0u8; 4096];
    for chunk in bytes.chunks_mut(block.len()) {
        let ks = &mut block[..chunk.len()];
        reader.fill(ks);
        for (b, k) in chunk.iter_mut().zip(ks.iter()) {
            *b ^= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay layer is the keystream read 64 bytes at a time (its
    /// first form): reading it in larger blocks changes no byte.
    #[test]
    fn relay_layer_is_the_keystream_read_in_any_blocks() {
        let key = ReplyKey([3; 32]);
        let tag = [5u8; 16];
        for len in [0usize, 1, 63, 64, 65, 4095, 4096, 4097, 70_001] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut fast = plain.clone();
            relay_layer(&key, &tag, &mut fast);
            let stream = blake3::derive_key("mixnn-proto v1 2026 relay layer key", &key.0);
            let mut h = blake3::Hasher::new_keyed(&stream);
            h.update(&tag);
            let mut reader = h.finalize_xof();
            let mut slow = plain.clone();
            for chunk in slow.chunks_mut(64) {
                let mut block = [0u8; 64];
                reader.fill(&mut block[..chunk.len()]);
                for (b, k) in chunk.iter_mut().zip(&block) {
                    *b ^= k;
                }
            }
            assert_eq!(fast, slow, "{len} bytes");
            if len > 0 {
                assert_ne!(fast, plain, "{len} bytes: a layer changes the bytes");
            }
            relay_layer(&key, &tag, &mut fast);
            assert_eq!(fast, plain, "{len} bytes: a second layer removes the first");
        }
    }

    #[test]
    fn sealed_bodies_open_only_as_what_they_were_sealed_as() {
        let k = ReplyKey([7; 32]);
        let s = k.seal(Sealed::Fetch, 3, 1, b"state bytes", [9; 24]);
        assert_eq!(s.len(), b"state bytes".len() + SEAL_OVERHEAD);
        assert_eq!(k.open(Sealed::Fetch, 3, 1, &s).unwrap(), b"state bytes");
        assert!(k.open(Sealed::Audit, 3, 1, &s).is_err());
        let t = k.seal(Sealed::AuditTest { batch: 2 }, 3, 1, b"x", [9; 24]);
        assert!(k.open(Sealed::AuditTest { batch: 2 }, 3, 1, &t).is_ok());
        assert!(k.open(Sealed::AuditTest { batch: 3 }, 3, 1, &t).is_err());
        assert!(k.open(Sealed::Audit, 3, 1, &t).is_err());
        assert!(k.open(Sealed::Fetch, 4, 1, &s).is_err());
        assert!(k.open(Sealed::Fetch, 3, 0, &s).is_err());
        assert!(ReplyKey([8; 32]).open(Sealed::Fetch, 3, 1, &s).is_err());
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 1;
            assert!(k.open(Sealed::Fetch, 3, 1, &t).is_err(), "flip at {i}");
        }
        assert!(k.open(Sealed::Fetch, 3, 1, &s[..10]).is_err());
        // The plaintext does not show through.
        assert!(!s.windows(5).any(|w| w == b"state"));
    }

    #[test]
    fn relay_layers_undo_themselves_and_differ_per_key_and_tag() {
        let body = vec![0xA5u8; 300];
        let mut a = body.clone();
        relay_layer(&ReplyKey([1; 32]), &[2; 16], &mut a);
        assert_ne!(a, body);
        let mut b = body.clone();
        relay_layer(&ReplyKey([1; 32]), &[3; 16], &mut b);
        let mut c = body.clone();
        relay_layer(&ReplyKey([4; 32]), &[2; 16], &mut c);
        assert!(a.windows(8).all(|w| !b.windows(8).any(|v| v == w)));
        assert_ne!(a, c);
        relay_layer(&ReplyKey([1; 32]), &[2; 16], &mut a);
        assert_eq!(a, body);
    }
}
