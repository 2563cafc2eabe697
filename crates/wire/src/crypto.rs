//! The primitives behind an onion layer, each behind a small function.
//!
//! * KDF and MAC: BLAKE3 (`derive_key` contexts, keyed hash truncated to
//!   [`MAC_LEN`]).
//! * Stream cipher: ChaCha20 (IETF), all-zero nonce, one fresh key per
//!   (hop, packet), so a key never encrypts twice.
//! * Counter field: AES-128 as a PRP on one block, so the per-hop counter is
//!   pseudo-random on the wire and yet invertible by the hop.
//! * Group: X25519 with Sphinx blinding `α' = b·α`, `b = H(α, s)`.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::Scalar;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::constants::{CTR_FIELD_LEN, ID_LEN, KEY_LEN, MAC_LEN, PREFIX_LEN};
use crate::error::WireError;

const CTX_INIT_KEYS: &str = "mixnn-wire v1 2025 init hop keys";
const CTX_SESSION_ROOT: &str = "mixnn-wire v1 2025 session root";
const CTX_REPLAY_TAG: &str = "mixnn-wire v1 2025 init replay tag";
const CTX_BLIND: &str = "mixnn-wire v1 2025 sphinx blinding factor";
const CTX_PRP: &str = "mixnn-wire v1 2025 counter prp";
const CTX_TOKEN: &str = "mixnn-wire v2 2026 session lookup token prp";
const CTX_PACKET: &str = "mixnn-wire v1 2025 session packet keys";

/// The three keys one hop uses on one packet.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct HopKeys {
    /// Keys the MAC γ over `prefix ‖ β ‖ notes`.
    pub mac: [u8; KEY_LEN],
    /// ChaCha20 key for β.
    pub beta: [u8; KEY_LEN],
    /// ChaCha20 key for the notes.
    pub notes: [u8; KEY_LEN],
}

impl HopKeys {
    fn from_xof(mut reader: blake3::OutputReader) -> Self {
        let mut keys = HopKeys {
            mac: [0; KEY_LEN],
            beta: [0; KEY_LEN],
            notes: [0; KEY_LEN],
        };
        reader.fill(&mut keys.mac);
        reader.fill(&mut keys.beta);
        reader.fill(&mut keys.notes);
        keys
    }

    /// Keys of an init packet, from the X25519 shared secret.
    pub fn init(shared: &[u8; 32]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(CTX_INIT_KEYS);
        h.update(shared);
        Self::from_xof(h.finalize_xof())
    }

    /// Keys of session packet `counter`: symmetric only.
    pub fn session(root: &SessionRoot, counter: u64) -> Self {
        let mut h = blake3::Hasher::new_keyed(&root.packet);
        h.update(CTX_PACKET.as_bytes());
        h.update(&counter.to_le_bytes());
        Self::from_xof(h.finalize_xof())
    }

    /// The MAC γ over `prefix ‖ β ‖ notes`.
    pub fn mac(&self, prefix: &[u8], beta: &[u8], notes: &[u8]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(prefix);
        h.update(beta);
        h.update(notes);
        let mut out = [0u8; MAC_LEN];
        h.finalize_xof().fill(&mut out);
        out
    }

    /// Checks γ in constant time.
    pub fn verify(
        &self,
        prefix: &[u8],
        beta: &[u8],
        notes: &[u8],
        mac: &[u8],
    ) -> Result<(), WireError> {
        if bool::from(self.mac(prefix, beta, notes).ct_eq(mac)) {
            Ok(())
        } else {
            Err(WireError::MacMismatch)
        }
    }

    /// ChaCha20 keystream for β, positioned at 0.
    pub fn beta_stream(&self) -> ChaCha20 {
        stream(&self.beta)
    }

    /// ChaCha20 keystream for the notes, positioned at 0.
    pub fn notes_stream(&self) -> ChaCha20 {
        stream(&self.notes)
    }
}

fn stream(key: &[u8; KEY_LEN]) -> ChaCha20 {
    ChaCha20::new(key.into(), &[0u8; 12].into())
}

/// Writes `len` bytes of keystream (from the stream's current position).
pub(crate) fn keystream(cipher: &mut ChaCha20, out: &mut [u8]) {
    out.fill(0);
    cipher.apply_keystream(out);
}

/// A hop's long-term session secret, set up by the init packet.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct SessionRoot {
    packet: [u8; KEY_LEN],
    #[zeroize(skip)] // `aes` zeroizes its round keys on drop (feature "zeroize").
    prp: Aes128,
    #[zeroize(skip)]
    token: Aes128,
}

impl SessionRoot {
    /// Derives the session root from the init shared secret.
    pub fn from_shared(shared: &[u8; 32]) -> Self {
        let mut packet = [0u8; KEY_LEN];
        let mut h = blake3::Hasher::new_derive_key(CTX_SESSION_ROOT);
        h.update(shared);
        h.finalize_xof().fill(&mut packet);
        let mut prp_key = blake3::derive_key(CTX_PRP, &packet);
        let prp = Aes128::new((&prp_key[..16]).into());
        prp_key.zeroize();
        let mut token_key = blake3::derive_key(CTX_TOKEN, &packet);
        let token = Aes128::new((&token_key[..16]).into());
        token_key.zeroize();
        Self { packet, prp, token }
    }

    /// The lookup token of packet `counter`: how the hop finds the session
    /// of a session header. A pseudo-random function of the counter under
    /// a key only this hop and the designer hold, so tokens of different
    /// packets cannot be linked (unlike a fixed session id).
    pub fn token(&self, counter: u64) -> [u8; ID_LEN] {
        let mut block = [0u8; ID_LEN];
        block[..8].copy_from_slice(&counter.to_le_bytes());
        let mut b = block.into();
        self.token.encrypt_block(&mut b);
        b.into()
    }

    /// Encrypts a counter into the 16-byte field a hop sees.
    pub fn seal_counter(&self, counter: u64) -> [u8; CTR_FIELD_LEN] {
        let mut block = [0u8; CTR_FIELD_LEN];
        block[..8].copy_from_slice(&counter.to_le_bytes());
        let mut b = block.into();
        self.prp.encrypt_block(&mut b);
        b.into()
    }

    /// Decrypts a counter field; the upper half must decrypt to zero.
    pub fn open_counter(&self, field: &[u8; CTR_FIELD_LEN]) -> Result<u64, WireError> {
        let mut b = (*field).into();
        self.prp.decrypt_block(&mut b);
        let plain: [u8; CTR_FIELD_LEN] = b.into();
        if plain[8..].iter().any(|&x| x != 0) {
            return Err(WireError::BadCounter);
        }
        let mut ctr = [0u8; 8];
        ctr.copy_from_slice(&plain[..8]);
        Ok(u64::from_le_bytes(ctr))
    }
}

/// Tag that identifies an init packet at a hop (for its replay cache).
pub(crate) fn init_replay_tag(shared: &[u8; 32]) -> crate::replay::InitTag {
    let mut out = [0u8; 16];
    let mut h = blake3::Hasher::new_derive_key(CTX_REPLAY_TAG);
    h.update(shared);
    h.finalize_xof().fill(&mut out);
    crate::replay::InitTag(out)
}

/// Sphinx blinding factor `b = H(α, s)`.
pub(crate) fn blinding(alpha: &[u8; PREFIX_LEN], shared: &[u8; 32]) -> Scalar {
    let mut wide = [0u8; 64];
    let mut h = blake3::Hasher::new_derive_key(CTX_BLIND);
    h.update(alpha);
    h.update(shared);
    h.finalize_xof().fill(&mut wide);
    let b = Scalar::from_bytes_mod_order_wide(&wide);
    wide.zeroize();
    b
}

/// `α' = b·α`: the group element the next hop receives.
pub(crate) fn blind(alpha: &[u8; PREFIX_LEN], b: &Scalar) -> [u8; PREFIX_LEN] {
    (MontgomeryPoint(*alpha) * b).to_bytes()
}

/// A random non-zero scalar (the designer's per-init ephemeral secret).
pub(crate) fn random_scalar<R: rand_core::RngCore + rand_core::CryptoRng>(rng: &mut R) -> Scalar {
    let mut wide = [0u8; 64];
    loop {
        rng.fill_bytes(&mut wide);
        let x = Scalar::from_bytes_mod_order_wide(&wide);
        if x != Scalar::ZERO {
            wide.zeroize();
            return x;
        }
    }
}

/// Rejects the all-zero shared secret of a low-order point.
pub(crate) fn check_contributory(shared: &[u8; 32]) -> Result<(), WireError> {
    if bool::from(shared.ct_eq(&[0u8; 32])) {
        Err(WireError::WeakSharedSecret)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_field_round_trips_and_rejects_garbage() {
        let root = SessionRoot::from_shared(&[1; 32]);
        for c in [0, 1, 77, u64::MAX] {
            assert_eq!(root.open_counter(&root.seal_counter(c)), Ok(c));
        }
        let mut f = root.seal_counter(5);
        f[3] ^= 1;
        assert_eq!(root.open_counter(&f), Err(WireError::BadCounter));
    }

    #[test]
    fn tokens_differ_per_counter_and_per_hop_and_from_the_counter_field() {
        let a = SessionRoot::from_shared(&[1; 32]);
        let b = SessionRoot::from_shared(&[2; 32]);
        assert_ne!(a.token(9), a.token(10));
        assert_ne!(a.token(9), b.token(9));
        assert_ne!(a.token(9), a.seal_counter(9));
        assert_eq!(a.token(9), SessionRoot::from_shared(&[1; 32]).token(9));
    }

    #[test]
    fn counter_fields_differ_between_hops_for_the_same_counter() {
        let a = SessionRoot::from_shared(&[1; 32]);
        let b = SessionRoot::from_shared(&[2; 32]);
        assert_ne!(a.seal_counter(9), b.seal_counter(9));
    }

    #[test]
    fn session_keys_differ_per_counter() {
        let root = SessionRoot::from_shared(&[3; 32]);
        let (k1, k2) = (HopKeys::session(&root, 1), HopKeys::session(&root, 2));
        assert_ne!(k1.mac, k2.mac);
        assert_ne!(k1.beta, k1.notes);
    }

    #[test]
    fn verify_rejects_a_flipped_mac_bit() {
        let k = HopKeys::init(&[4; 32]);
        let mut mac = k.mac(b"p", b"b", b"n");
        assert!(k.verify(b"p", b"b", b"n", &mac).is_ok());
        mac[0] ^= 0x80;
        assert_eq!(
            k.verify(b"p", b"b", b"n", &mac),
            Err(WireError::MacMismatch)
        );
    }

    #[test]
    fn low_order_point_is_rejected() {
        assert_eq!(
            check_contributory(&[0; 32]),
            Err(WireError::WeakSharedSecret)
        );
    }
}
