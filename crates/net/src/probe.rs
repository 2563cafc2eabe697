//! Reachability probes: how a directory checks, before it lists a node,
//! that whoever listens at the node's address holds the node's link key
//! and onion key.
//!
//! A probe is the first two messages of the ordinary link handshake
//! ([`crate::NOISE_PROTOCOL`], XX), so it reaches the node exactly where
//! designers and neighbours do, through the same listener:
//!
//! ```text
//! directory                                              node
//!   -> e,  payload: "mixnn-probe/1" ‖ E (X25519, 32) ‖ nonce (32)
//!   <- e, ee, s, es,  payload: proof (32)
//!   (closes: no third message, the directory never becomes a link)
//! ```
//!
//! * **Link key.** The node's static key travels in message 2 and its
//!   payload is encrypted under a key that mixes `es`, so reading message 2
//!   at all proves the node holds the secret of the link key it sent; the
//!   prober also compares that key with the descriptor's.
//! * **Onion key.** `proof = BLAKE3-keyed(K, nonce ‖ identity ‖ link ‖
//!   onion)` with `K = BLAKE3-derive-key("mixnn probe onion v1",
//!   X25519(onion secret, E))`. Only the onion key's holder can compute
//!   `K`; the fresh `E` and nonce make every proof single-use, and the
//!   identity key inside binds the proof to one node, so a relay that
//!   forwards a probe to somebody else's node cannot pass the proof off as
//!   its own descriptor's.
//!
//! A listener answers probes only after [`crate::LinkListener::answer_probes`];
//! [`crate::PendingLink::handshake`] then ends with [`NetError::Probed`]
//! (log it at debug level: it is not a fault). A node that does not answer
//! probes sends an empty payload and fails [`probe`].

use std::net::SocketAddr;

use rand_core::{OsRng, RngCore};
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};

use crate::error::NetError;
use crate::keys::NodeKeys;

/// First bytes of a probe's message-1 payload.
pub(crate) const PROBE_LABEL: &[u8] = b"mixnn-probe/1";

/// Length of a probe's message-1 payload.
pub(crate) const PROBE_LEN: usize = PROBE_LABEL.len() + 32 + 32;

const PROOF_CONTEXT: &str = "mixnn probe onion v1";

/// What a probe expects of the node: the keys of its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The node's address.
    pub addr: SocketAddr,
    /// Its Ed25519 identity key.
    pub identity: [u8; 32],
    /// Its Noise static link key.
    pub link: [u8; 32],
    /// Its X25519 onion key.
    pub onion: [u8; 32],
}

/// The secret a listener needs to answer probes: the node's onion secret,
/// and its public identity key (bound into every proof).
#[derive(Clone)]
pub struct ProbeResponder {
    identity: [u8; 32],
    onion: StaticSecret,
}

impl std::fmt::Debug for ProbeResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeResponder")
            .field("identity", &crate::error::fingerprint(&self.identity))
            .finish_non_exhaustive()
    }
}

impl ProbeResponder {
    /// A responder for the node whose keys are `keys`.
    pub fn new(keys: &NodeKeys) -> Self {
        Self {
            identity: keys.identity().verifying_key().to_bytes(),
            onion: keys.onion().clone(),
        }
    }

    /// The proof for a probe payload, if `payload` is one; `link` is the
    /// listener's own public link key.
    pub(crate) fn answer(&self, payload: &[u8], link: &[u8; 32]) -> Option<[u8; 32]> {
        let challenge = payload.strip_prefix(PROBE_LABEL)?;
        let (e, nonce) = challenge.split_at_checked(32)?;
        let e: [u8; 32] = e.try_into().ok()?;
        let nonce: [u8; 32] = nonce.try_into().ok()?;
        let shared = self.onion.diffie_hellman(&PublicKey::from(e));
        if !shared.was_contributory() {
            return None;
        }
        let onion = PublicKey::from(&self.onion).to_bytes();
        Some(proof(
            shared.as_bytes(),
            &nonce,
            &self.identity,
            link,
            &onion,
        ))
    }
}

/// The proof a node holding the onion secret computes (see the module docs).
fn proof(
    shared: &[u8; 32],
    nonce: &[u8; 32],
    identity: &[u8; 32],
    link: &[u8; 32],
    onion: &[u8; 32],
) -> [u8; 32] {
    let key = blake3::derive_key(PROOF_CONTEXT, shared);
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(nonce);
    h.update(identity);
    h.update(link);
    h.update(onion);
    *h.finalize().as_bytes()
}

/// A fresh challenge: the payload to send and what the right proof is.
pub(crate) struct Challenge {
    pub(crate) payload: [u8; PROBE_LEN],
    expected: [u8; 32],
}

impl Challenge {
    pub(crate) fn new(target: &ProbeTarget) -> Result<Self, NetError> {
        let e = EphemeralSecret::random_from_rng(OsRng);
        let e_public = PublicKey::from(&e);
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let shared = e.diffie_hellman(&PublicKey::from(target.onion));
        if !shared.was_contributory() {
            return Err(NetError::ProbeFailed {
                peer: target.addr,
                reason: "the onion key is a low-order point".into(),
            });
        }
        let expected = proof(
            shared.as_bytes(),
            &nonce,
            &target.identity,
            &target.link,
            &target.onion,
        );
        let mut payload = [0u8; PROBE_LEN];
        payload[..PROBE_LABEL.len()].copy_from_slice(PROBE_LABEL);
        payload[PROBE_LABEL.len()..PROBE_LABEL.len() + 32].copy_from_slice(e_public.as_bytes());
        payload[PROBE_LABEL.len() + 32..].copy_from_slice(&nonce);
        Ok(Self { payload, expected })
    }

    /// Checks the node's answer (constant time).
    pub(crate) fn check(&self, peer: SocketAddr, answer: &[u8]) -> Result<(), NetError> {
        let fail = |reason: &str| NetError::ProbeFailed {
            peer,
            reason: reason.into(),
        };
        if answer.is_empty() {
            return Err(fail(
                "the node does not answer probes (no proof in its handshake)",
            ));
        }
        let answer: [u8; 32] = answer
            .try_into()
            .map_err(|_| fail("the proof has the wrong length"))?;
        if blake3::Hash::from(answer) == blake3::Hash::from(self.expected) {
            Ok(())
        } else {
            Err(fail("wrong onion-key proof: the node does not hold the descriptor's onion key (or signs with another identity)"))
        }
    }
}

/// Probes the node at `target.addr`: it must prove `target.link` in the
/// handshake and `target.onion` with the proof (module docs), within
/// `config`'s handshake timeout. Uses a fresh link key of its own, which
/// is never revealed (the third handshake message is not sent).
pub async fn probe(target: &ProbeTarget, config: crate::LinkConfig) -> Result<(), NetError> {
    crate::link::probe(target, config).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn only_the_onion_holder_answers_correctly() {
        let keys = NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1));
        let public = keys.public();
        let target = ProbeTarget {
            addr: "127.0.0.1:1".parse().unwrap(),
            identity: *public.identity.as_bytes(),
            link: *public.link.as_bytes(),
            onion: *public.onion.as_bytes(),
        };
        let link = *public.link.as_bytes();
        let c = Challenge::new(&target).unwrap();
        let good = ProbeResponder::new(&keys)
            .answer(&c.payload, &link)
            .unwrap();
        c.check(target.addr, &good).unwrap();

        let other = NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(2));
        let bad = ProbeResponder::new(&other)
            .answer(&c.payload, &link)
            .unwrap();
        assert!(c.check(target.addr, &bad).is_err());
        // A second challenge needs a second proof.
        let c2 = Challenge::new(&target).unwrap();
        assert!(c2.check(target.addr, &good).is_err());
        assert!(c.check(target.addr, &[]).is_err());
        assert!(ProbeResponder::new(&keys).answer(b"hello", &link).is_none());
    }
}
