//! The Sphinx shift-and-pad construction, shared by β and the notes.
//!
//! An *area* of `A` bytes carries one chunk per hop. Hop `i` XORs the area
//! with its keystream `ks_i`, takes the first `L_i` bytes as its chunk,
//! shifts the rest left and appends `ks_i[A..A + L_i]` (the keystream over
//! `L_i` zero bytes), so the area keeps its length at every hop and a hop
//! cannot tell how many chunks are left.
//!
//! The designer knows every `ks_i`, so it can predict what the hops append
//! (the *filler* φ) and build the areas from the innermost hop outwards:
//!
//! ```text
//! φ_0     = ε
//! φ_{i+1} = (φ_i ‖ 0^{L_i}) ⊕ ks_i[A - |φ_i| .. A + L_i]
//! C_{n-1} = ((chunk_{n-1} ‖ random) ⊕ ks_{n-1}[.. A - |φ_{n-1}|]) ‖ φ_{n-1}
//! C_i     = (chunk_i ‖ C_{i+1}[.. A - L_i]) ⊕ ks_i[.. A]
//! ```

use chacha20::ChaCha20;

use crate::crypto::keystream;
use crate::error::WireError;

/// `dst ^= src` (equal lengths).
fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// The filler φ_{n-1}: what hops `0..n-1` append before the last hop.
///
/// `streams[i]` is `ks_i` of length `area + lens[i]`; pass the streams and
/// lengths of all hops but the last. The caller checks `Σ lens ≤ area`.
pub(crate) fn filler(area: usize, streams: &[Vec<u8>], lens: &[usize]) -> Vec<u8> {
    let mut phi: Vec<u8> = Vec::with_capacity(lens.iter().sum());
    for (ks, &len) in streams.iter().zip(lens) {
        let start = area - phi.len();
        phi.resize(phi.len() + len, 0);
        xor_into(&mut phi, &ks[start..area + len]);
    }
    phi
}

/// The area the last hop receives: its chunk, random padding, then φ.
pub(crate) fn innermost<R: rand_core::RngCore + rand_core::CryptoRng>(
    area: usize,
    chunk: &[u8],
    ks: &[u8],
    phi: &[u8],
    rng: &mut R,
) -> Vec<u8> {
    let body = area - phi.len();
    let mut out = vec![0u8; area];
    out[..chunk.len()].copy_from_slice(chunk);
    rng.fill_bytes(&mut out[chunk.len()..body]);
    xor_into(&mut out[..body], &ks[..body]);
    out[body..].copy_from_slice(phi);
    out
}

/// One more onion layer, in place: `area ← (chunk ‖ area[.. A - L]) ⊕ ks[.. A]`.
pub(crate) fn wrap_layer(chunk: &[u8], area: &mut [u8], ks: &[u8]) {
    let len = area.len();
    area.copy_within(..len - chunk.len(), chunk.len());
    area[..chunk.len()].copy_from_slice(chunk);
    xor_into(area, &ks[..len]);
}

/// The keystream `ks` of a hop, `len` bytes from position 0.
pub(crate) fn full_keystream(mut cipher: ChaCha20, len: usize) -> Vec<u8> {
    let mut ks = vec![0u8; len];
    keystream(&mut cipher, &mut ks);
    ks
}

/// Hop side: peels one chunk off `input` into `out` (same length).
///
/// `chunk_len` reads the chunk length from the decrypted area; it must
/// return at most the area length. Returns the chunk (still framed).
pub(crate) fn peel_area(
    input: &[u8],
    out: &mut [u8],
    mut cipher: ChaCha20,
    chunk_len: impl FnOnce(&[u8]) -> Result<usize, WireError>,
) -> Result<Vec<u8>, WireError> {
    use chacha20::cipher::StreamCipher;
    let area = input.len();
    out.copy_from_slice(input);
    cipher.apply_keystream(out);
    let len = chunk_len(out)?;
    if len > area {
        return Err(WireError::Malformed {
            what: "layered area",
            reason: "chunk longer than the area",
        });
    }
    let chunk = out[..len].to_vec();
    out.copy_within(len.., 0);
    keystream(&mut cipher, &mut out[area - len..]);
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use chacha20::cipher::KeyIvInit;
    use rand_core::SeedableRng;

    use super::*;

    fn cipher(seed: u8) -> ChaCha20 {
        ChaCha20::new(&[seed; 32].into(), &[0u8; 12].into())
    }

    #[test]
    fn peel_recovers_every_chunk_with_varying_lengths() {
        let area = 64;
        let chunks: Vec<Vec<u8>> = vec![vec![1; 5], vec![2; 11], vec![3; 1], vec![4; 20]];
        let n = chunks.len();
        let streams: Vec<Vec<u8>> = (0..n)
            .map(|i| full_keystream(cipher(i as u8), area + chunks[i].len()))
            .collect();
        let lens: Vec<usize> = chunks.iter().map(Vec::len).collect();
        let phi = filler(area, &streams[..n - 1], &lens[..n - 1]);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut c = innermost(area, &chunks[n - 1], &streams[n - 1], &phi, &mut rng);
        for i in (0..n - 1).rev() {
            wrap_layer(&chunks[i], &mut c, &streams[i]);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let mut next = vec![0u8; area];
            let got = peel_area(&c, &mut next, cipher(i as u8), |_| Ok(chunk.len())).unwrap();
            assert_eq!(&got, chunk, "hop {i}");
            c = next;
        }
    }

    #[test]
    fn peel_rejects_a_chunk_longer_than_the_area() {
        let mut out = [0u8; 8];
        let r = peel_area(&[0u8; 8], &mut out, cipher(0), |_| Ok(9));
        assert!(matches!(r, Err(WireError::Malformed { .. })));
    }
}
