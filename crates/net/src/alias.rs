//! Log aliases: what logs print instead of addresses, session ids, tags
//! and keys.
//!
//! A log line is written to a file an operator keeps, ships and pastes
//! into bug reports; it must not become a record of who talked to whom.
//! So every process draws a random 32-byte key (from the OS, once, never
//! written anywhere) and logs a value as a short *alias*: the first
//! [`ALIAS_BYTES`] bytes of the keyed BLAKE3 hash of the value, in hex,
//! after a kind (`peer#3f9a1c`, `session#c01d77`). Within one process the
//! same value always has the same alias, so a log can still be followed
//! (which link failed after which message); across processes (two nodes,
//! or one node before and after a restart) the aliases of one value are
//! independent, so logs of colluding or seized machines cannot be joined
//! on them, and an alias cannot be checked against a guessed address
//! without the key.
//!
//! What may be logged in the clear: a process's own configuration, given
//! by its operator (a node's listen address, the directory URL it was told
//! to use, a designer's cascade file).

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;

use rand_core::{OsRng, RngCore};

/// Bytes of hash an alias shows (hex: twice as many characters). Three
/// bytes keep a log's few hundred links and sessions apart (two of 256
/// values collide with probability about 0.4 %) and are far too short to
/// search a guessed value against, even with the key.
pub const ALIAS_BYTES: usize = 3;

/// The BLAKE3 key-derivation context of the per-process key.
const CONTEXT: &str = "mixnn 2024 log alias v1";

/// This process's alias key, drawn on first use.
fn process_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        blake3::derive_key(CONTEXT, &seed)
    })
}

/// An alias: a kind and the keyed hash of a value (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Alias {
    kind: &'static str,
    tag: [u8; ALIAS_BYTES],
}

impl Alias {
    /// The alias of `value` (bytes of a `kind` of thing) under `key`.
    pub fn keyed(key: &[u8; 32], kind: &'static str, value: &[u8]) -> Alias {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(kind.as_bytes());
        h.update(&[0]);
        h.update(value);
        let mut tag = [0u8; ALIAS_BYTES];
        tag.copy_from_slice(&h.finalize().as_bytes()[..ALIAS_BYTES]);
        Alias { kind, tag }
    }

    /// The alias of `value` under this process's key.
    pub fn of(kind: &'static str, value: &[u8]) -> Alias {
        Alias::keyed(process_key(), kind, value)
    }

    /// The alias without its kind: `#3f9a1c`.
    pub fn tag(&self) -> Tag {
        Tag(self.tag)
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind, self.tag())
    }
}

impl fmt::Debug for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An alias's hash part alone, `#` and hex (for messages that already say
/// what the value is: "session #c01d77 …").
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag([u8; ALIAS_BYTES]);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("#")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The alias of another process's address: `peer#…`. An address is one
/// value whatever its port's role, so a node's link from a neighbour and
/// its link to it show different aliases only if their ports differ.
pub fn peer(addr: &SocketAddr) -> Alias {
    Alias::of("peer", addr.to_string().as_bytes())
}

/// The alias of a session id (or a prefix of one): `session#…`.
pub fn session(id: &[u8]) -> Alias {
    Alias::of("session", id)
}

/// The alias of a public key (a link key, an onion key): `key#…`.
pub fn key(bytes: &[u8]) -> Alias {
    Alias::of("key", bytes)
}

/// The alias of any other identifying bytes (a tag, a token): `id#…`.
pub fn id(bytes: &[u8]) -> Alias {
    Alias::of("id", bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn one_value_one_alias_within_a_process() {
        let a: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        assert_eq!(peer(&a), peer(&a));
        assert_ne!(peer(&a), peer(&b));
        assert_eq!(session(&[1; 16]), session(&[1; 16]));
        assert_ne!(session(&[1; 16]).tag(), key(&[1; 16]).tag(), "kinds differ");
        let text = peer(&a).to_string();
        assert!(text.starts_with("peer#"), "{text}");
        assert_eq!(text.len(), "peer#".len() + 2 * ALIAS_BYTES);
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert_eq!(format!("{}", session(&[2; 16]).tag()).len(), 7);
    }

    #[test]
    fn processes_with_other_keys_give_unrelated_aliases() {
        // Two processes: two keys. Over many values the aliases agree no
        // more often than chance (1 in 2^24 each).
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let same = (0u32..2_000)
            .filter(|i| {
                let v = i.to_le_bytes();
                Alias::keyed(&k1, "session", &v) == Alias::keyed(&k2, "session", &v)
            })
            .count();
        assert_eq!(same, 0);
        // And the process key is drawn, not fixed.
        assert_ne!(process_key(), &blake3::derive_key(CONTEXT, &[0; 32]));
        assert_ne!(Alias::of("id", b"x"), Alias::keyed(&[0; 32], "id", b"x"));
    }
}
