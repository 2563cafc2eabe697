//! Public keys as 32-byte newtypes with a hex text form.
//!
//! Each key kind is its own type so an onion key cannot be passed where a
//! link key is expected. In text (Display, `FromStr`, serde) every key is 64
//! lowercase hex digits; parsing also accepts uppercase.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{fingerprint, NetError};

/// Length in bytes of every public key in this crate.
pub const PUBLIC_KEY_LEN: usize = 32;

macro_rules! public_key_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; PUBLIC_KEY_LEN]);

        impl $name {
            /// Wraps raw key bytes.
            pub const fn from_bytes(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes.
            pub const fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
                &self.0
            }

            /// A short, log-safe fingerprint: the first 8 bytes in hex.
            pub fn fingerprint(&self) -> String {
                fingerprint(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = NetError;

            fn from_str(s: &str) -> Result<Self, NetError> {
                parse_hex_key(s).map(Self)
            }
        }

        impl From<[u8; PUBLIC_KEY_LEN]> for $name {
            fn from(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
                Self(bytes)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

public_key_newtype!(
    /// A node's long-term Ed25519 identity key (verifying key), used to sign
    /// what the node publishes.
    PublicIdentityKey
);
public_key_newtype!(
    /// A node's X25519 onion key: the designer derives the per-hop onion
    /// layer keys from it.
    PublicOnionKey
);
public_key_newtype!(
    /// An X25519 static key that authenticates one end of a Noise link.
    PublicLinkKey
);

/// Parses exactly 64 hex digits into 32 bytes.
fn parse_hex_key(s: &str) -> Result<[u8; PUBLIC_KEY_LEN], NetError> {
    if s.len() != 2 * PUBLIC_KEY_LEN {
        return Err(NetError::ParsePublicKey {
            reason: "expected 64 hex digits",
        });
    }
    let mut out = [0u8; PUBLIC_KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|_| NetError::ParsePublicKey {
        reason: "not hexadecimal",
    })?;
    Ok(out)
}

/// The public half of a node's keys: what a directory publishes and what the
/// designer needs to build a cascade through the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodePublicKeys {
    /// Ed25519 identity key.
    pub identity: PublicIdentityKey,
    /// X25519 onion key.
    pub onion: PublicOnionKey,
    /// X25519 Noise static link key.
    pub link: PublicLinkKey,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_through_display_and_from_str() {
        let key = PublicLinkKey::from_bytes([0xab; 32]);
        let text = key.to_string();
        assert_eq!(text, "ab".repeat(32));
        assert_eq!(text.parse::<PublicLinkKey>().unwrap(), key);
        assert_eq!(text.to_uppercase().parse::<PublicLinkKey>().unwrap(), key);
        assert_eq!(key.fingerprint(), "ab".repeat(8));
    }

    #[test]
    fn from_str_rejects_wrong_length_and_non_hex() {
        assert!(matches!(
            "abcd".parse::<PublicOnionKey>(),
            Err(NetError::ParsePublicKey { .. })
        ));
        assert!(matches!(
            "zz".repeat(32).parse::<PublicOnionKey>(),
            Err(NetError::ParsePublicKey { .. })
        ));
        // A multi-byte character must not cause a slicing panic.
        let mut tricky = "a".repeat(62);
        tricky.push('é');
        assert!("é".len() == 2 && tricky.len() == 64);
        assert!(tricky.parse::<PublicOnionKey>().is_err());
    }

    #[test]
    fn node_public_keys_serialize_as_hex_strings() {
        let keys = NodePublicKeys {
            identity: PublicIdentityKey::from_bytes([1; 32]),
            onion: PublicOnionKey::from_bytes([2; 32]),
            link: PublicLinkKey::from_bytes([3; 32]),
        };
        let json = serde_json::to_string(&keys).unwrap();
        assert!(json.contains(&"01".repeat(32)));
        assert!(json.contains(&"03".repeat(32)));
        let back: NodePublicKeys = serde_json::from_str(&json).unwrap();
        assert_eq!(back, keys);
        let bad = json.replace(&"02".repeat(32), "02");
        assert!(serde_json::from_str::<NodePublicKeys>(&bad).is_err());
    }
}
