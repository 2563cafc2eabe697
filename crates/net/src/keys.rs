//! A node's long-term keys, kept in its state directory, and link keypairs.
//!
//! The state directory holds three raw 32-byte files (see the crate README):
//!
//! | file           | content                                  |
//! |----------------|------------------------------------------|
//! | `onion.key`    | X25519 onion secret                      |
//! | `link.key`     | X25519 Noise static link secret          |
//! | `identity.key` | Ed25519 secret seed — written last       |
//!
//! `identity.key` is the commit marker: it is written only after the other
//! two, so a directory without it has never given the node an identity and
//! is (re)initialised from scratch. Once it exists, any missing, short,
//! unreadable or group/other-accessible key file is an error naming that
//! file; nothing is silently regenerated, since that would change who the
//! node is.

use std::fmt;
use std::path::Path;

use ed25519_dalek::SigningKey;
use rand_core::{CryptoRngCore, OsRng};
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::error::NetError;
use crate::keyfile::{self, SECRET_KEY_LEN};
use crate::pubkey::{NodePublicKeys, PublicIdentityKey, PublicLinkKey, PublicOnionKey};

/// File name of the Ed25519 identity seed inside the state directory.
pub const IDENTITY_KEY_FILE: &str = "identity.key";
/// File name of the X25519 onion secret inside the state directory.
pub const ONION_KEY_FILE: &str = "onion.key";
/// File name of the Noise static link secret inside the state directory.
pub const LINK_KEY_FILE: &str = "link.key";

/// Draws 32 secret bytes from `rng` into a buffer that is wiped on drop.
fn random_secret(rng: &mut impl CryptoRngCore) -> Zeroizing<[u8; SECRET_KEY_LEN]> {
    let mut bytes = Zeroizing::new([0u8; SECRET_KEY_LEN]);
    rng.fill_bytes(bytes.as_mut_slice());
    bytes
}

/// The X25519 static keypair that authenticates one end of a Noise link.
///
/// Nodes load theirs from disk (inside [`NodeKeys`]); the designer usually
/// makes a fresh one per run with [`LinkKeypair::generate`]. The secret is
/// wiped on drop and never printed.
#[derive(Clone)]
pub struct LinkKeypair {
    secret: Zeroizing<[u8; SECRET_KEY_LEN]>,
    public: PublicLinkKey,
}

impl LinkKeypair {
    /// Makes a new random keypair.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self::from_secret(random_secret(rng))
    }

    /// Makes a new random keypair from the operating system's RNG.
    pub fn generate_os() -> Self {
        Self::generate(&mut OsRng)
    }

    /// Rebuilds a keypair from its 32-byte secret.
    pub fn from_secret_bytes(secret: [u8; SECRET_KEY_LEN]) -> Self {
        Self::from_secret(Zeroizing::new(secret))
    }

    fn from_secret(secret: Zeroizing<[u8; SECRET_KEY_LEN]>) -> Self {
        // Noise's 25519 DH is X25519, so the public key is the X25519 public
        // key of the (clamped) secret: the same value the handshake reveals.
        let public = x25519_dalek::PublicKey::from(&StaticSecret::from(*secret));
        Self {
            secret,
            public: PublicLinkKey::from_bytes(public.to_bytes()),
        }
    }

    /// The public half, which the peer learns in the handshake.
    pub fn public(&self) -> PublicLinkKey {
        self.public
    }

    /// The secret bytes, for the Noise handshake only.
    pub(crate) fn secret_bytes(&self) -> &[u8; SECRET_KEY_LEN] {
        &self.secret
    }
}

impl fmt::Debug for LinkKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkKeypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Whether [`NodeKeys::load_or_create`] made new keys or loaded old ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The directory held no identity: fresh keys were generated and stored.
    New,
    /// Existing keys were loaded.
    Existing,
}

/// A node's long-term secret keys: identity (Ed25519), onion (X25519) and
/// Noise link (X25519). Wiped on drop; `Debug` shows only public keys.
pub struct NodeKeys {
    identity: SigningKey,
    onion: StaticSecret,
    link: LinkKeypair,
}

impl NodeKeys {
    /// Loads the node's keys from `dir`, or creates and stores them (with
    /// the OS RNG) if the directory holds no identity yet.
    pub fn load_or_create(dir: &Path) -> Result<(Self, Created), NetError> {
        Self::load_or_create_with_rng(dir, &mut OsRng)
    }

    /// Like [`NodeKeys::load_or_create`], drawing new keys from `rng`.
    pub fn load_or_create_with_rng(
        dir: &Path,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Self, Created), NetError> {
        let identity_path = dir.join(IDENTITY_KEY_FILE);
        let onion_path = dir.join(ONION_KEY_FILE);
        let link_path = dir.join(LINK_KEY_FILE);

        if keyfile::exists(&identity_path)? {
            for path in [&onion_path, &link_path] {
                if !keyfile::exists(path)? {
                    return Err(NetError::KeyFileMissing { path: path.clone() });
                }
            }
            let identity = keyfile::read_key(&identity_path)?;
            let onion = keyfile::read_key(&onion_path)?;
            let link = keyfile::read_key(&link_path)?;
            let keys = Self::from_secrets(&identity, &onion, link);
            return Ok((keys, Created::Existing));
        }

        keyfile::create_dir(dir)?;
        let identity = random_secret(rng);
        let onion = random_secret(rng);
        let link = random_secret(rng);
        keyfile::write_key(&onion_path, &onion)?;
        keyfile::write_key(&link_path, &link)?;
        // Last: its presence means the set is complete.
        keyfile::write_key(&identity_path, &identity)?;
        Ok((Self::from_secrets(&identity, &onion, link), Created::New))
    }

    /// Makes fresh keys in memory only (in-process tests and simulations).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let identity = random_secret(rng);
        let onion = random_secret(rng);
        Self::from_secrets(&identity, &onion, random_secret(rng))
    }

    fn from_secrets(
        identity: &[u8; SECRET_KEY_LEN],
        onion: &[u8; SECRET_KEY_LEN],
        link: Zeroizing<[u8; SECRET_KEY_LEN]>,
    ) -> Self {
        Self {
            identity: SigningKey::from_bytes(identity),
            onion: StaticSecret::from(*onion),
            link: LinkKeypair::from_secret(link),
        }
    }

    /// The Ed25519 identity signing key.
    pub fn identity(&self) -> &SigningKey {
        &self.identity
    }

    /// The X25519 onion secret (for peeling onion layers).
    pub fn onion(&self) -> &StaticSecret {
        &self.onion
    }

    /// The Noise static link keypair (for [`crate::LinkListener::bind`]).
    pub fn link(&self) -> &LinkKeypair {
        &self.link
    }

    /// The public halves of all three keys.
    pub fn public(&self) -> NodePublicKeys {
        NodePublicKeys {
            identity: PublicIdentityKey::from_bytes(self.identity.verifying_key().to_bytes()),
            onion: PublicOnionKey::from_bytes(
                x25519_dalek::PublicKey::from(&self.onion).to_bytes(),
            ),
            link: self.link.public(),
        }
    }
}

impl fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKeys")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn generate_is_deterministic_under_a_seeded_rng() {
        let a = NodeKeys::generate(&mut ChaCha20Rng::seed_from_u64(7));
        let b = NodeKeys::generate(&mut ChaCha20Rng::seed_from_u64(7));
        let c = NodeKeys::generate(&mut ChaCha20Rng::seed_from_u64(8));
        assert_eq!(a.public(), b.public());
        assert_ne!(a.public(), c.public());
        assert_ne!(a.public().onion.as_bytes(), a.public().link.as_bytes());
    }

    #[test]
    fn debug_never_prints_secrets() {
        let keys = NodeKeys::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let secret_hex = hex::encode(keys.link().secret_bytes());
        let seed_hex = hex::encode(keys.identity().to_bytes());
        let shown = format!("{keys:?} {:?}", keys.link());
        assert!(!shown.contains(&secret_hex));
        assert!(!shown.contains(&seed_hex));
        assert!(shown.contains(&keys.public().link.to_string()));
    }

    #[test]
    fn link_public_key_matches_secret() {
        let pair = LinkKeypair::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let again = LinkKeypair::from_secret_bytes(*pair.secret_bytes());
        assert_eq!(pair.public(), again.public());
    }

    #[test]
    fn missing_onion_key_with_identity_present_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        NodeKeys::load_or_create_with_rng(dir.path(), &mut rng).unwrap();
        std::fs::remove_file(dir.path().join(ONION_KEY_FILE)).unwrap();
        let err = NodeKeys::load_or_create_with_rng(dir.path(), &mut rng).unwrap_err();
        assert!(matches!(err, NetError::KeyFileMissing { .. }));
        assert!(err.to_string().contains(ONION_KEY_FILE));
    }

    #[test]
    fn without_identity_a_partial_set_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LINK_KEY_FILE), b"half-written").unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (keys, created) = NodeKeys::load_or_create_with_rng(dir.path(), &mut rng).unwrap();
        assert_eq!(created, Created::New);
        let (again, created) = NodeKeys::load_or_create_with_rng(dir.path(), &mut rng).unwrap();
        assert_eq!(created, Created::Existing);
        assert_eq!(keys.public(), again.public());
    }
}
