//! The run seed: the designer's secret from which every random choice of a
//! run is derived.
//!
//! A [`RunSeed`] is 32 bytes. Each stage's initialisation seed, the batch
//! order and the designer's other draws are BLAKE3 keyed hashes of it
//! (key = the seed, input = a purpose string and an index), so a hop that
//! holds its own stage seed learns neither the run seed, nor another
//! stage's seed, nor the batch order, nor which stage index it holds: the
//! derivation cannot be inverted or linked without the key. That holds for
//! a seed with 256 bits of entropy — the default, [`RunSeed::random`]. A
//! seed made from a small number ([`RunSeed::from_number`], `--seed 1`)
//! reproduces experiments, but a hop can try every small number against
//! its stage's initial weights; such a run's seeds are secret only from
//! hops that do not guess.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The designer's 32-byte secret seed of a run.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunSeed([u8; 32]);

/// What a derived seed is for (the purpose strings of the derivation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Parameter initialisation of stage `i` (0-based model order).
    Stage(u64),
    /// The batch order of epoch `e`.
    Order(u64),
    /// The designer's draw of a cascade from a directory.
    Selection,
    /// The initialisation of the `i`-th dummy hop (it has no parameters;
    /// its seed only looks like the others).
    Dummy(u64),
    /// The training images' augmentation (crops, flips) of epoch `e`.
    Augment(u64),
}

impl RunSeed {
    /// The seed of these bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        RunSeed(bytes)
    }

    /// A fresh seed from the operating system's generator.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        RunSeed(b)
    }

    /// The seed `--seed n` names: BLAKE3 of the number under a fixed
    /// context, so `--seed 1` is the same run everywhere.
    pub fn from_number(n: u64) -> Self {
        RunSeed(blake3::derive_key(
            "mixnn run seed from a number v1",
            &n.to_le_bytes(),
        ))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A 64-bit seed for `purpose`: the first 8 bytes of
    /// `BLAKE3-keyed(seed, "mixnn/<purpose>" ‖ index_le)`.
    pub fn derive(&self, purpose: Purpose) -> u64 {
        let (label, index): (&[u8], u64) = match purpose {
            Purpose::Stage(i) => (b"mixnn/stage", i),
            Purpose::Order(e) => (b"mixnn/order", e),
            Purpose::Selection => (b"mixnn/selection", 0),
            Purpose::Dummy(i) => (b"mixnn/dummy", i),
            Purpose::Augment(e) => (b"mixnn/augment", e),
        };
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(&index.to_le_bytes());
        let out = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

impl fmt::Display for RunSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RunSeed {
    /// Never prints the secret (logs and panics show a placeholder).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunSeed(..)")
    }
}

/// Why a `--seed` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed {0:?} is neither a number below 2^64 nor 64 hex digits")]
pub struct BadSeed(pub String);

impl FromStr for RunSeed {
    type Err = BadSeed;

    /// A decimal number ([`RunSeed::from_number`]) or 64 hex digits (the
    /// seed itself, as [`RunSeed`]'s `Display` prints it).
    fn from_str(s: &str) -> Result<Self, BadSeed> {
        let t = s.trim();
        if t.len() == 64 {
            let mut b = [0u8; 32];
            if hex::decode_to_slice(t, &mut b).is_ok() {
                return Ok(RunSeed(b));
            }
        }
        t.parse::<u64>()
            .map(RunSeed::from_number)
            .map_err(|_| BadSeed(s.to_string()))
    }
}

impl Serialize for RunSeed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RunSeed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 64 {
            return Err(serde::de::Error::custom("a run seed is 64 hex digits"));
        }
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_hex_name_seeds_and_display_round_trips() {
        let one: RunSeed = "1".parse().unwrap();
        assert_eq!(one, RunSeed::from_number(1));
        assert_ne!(one, RunSeed::from_number(2));
        let again: RunSeed = one.to_string().parse().unwrap();
        assert_eq!(again, one);
        assert!("0x12".parse::<RunSeed>().is_err());
        assert!("ab".repeat(31).parse::<RunSeed>().is_err());
        let json = serde_json::to_string(&one).unwrap();
        assert_eq!(serde_json::from_str::<RunSeed>(&json).unwrap(), one);
        assert_eq!(format!("{one:?}"), "RunSeed(..)");
    }

    #[test]
    fn derived_seeds_differ_by_purpose_index_and_seed() {
        let s = RunSeed::from_number(1);
        let mut all = std::collections::HashSet::new();
        for i in 0..64 {
            assert!(all.insert(s.derive(Purpose::Stage(i))));
            assert!(all.insert(s.derive(Purpose::Order(i))));
            assert!(all.insert(s.derive(Purpose::Dummy(i))));
        }
        assert!(all.insert(s.derive(Purpose::Selection)));
        assert_ne!(
            s.derive(Purpose::Stage(0)),
            RunSeed::from_number(2).derive(Purpose::Stage(0))
        );
    }

    /// The derived seeds carry no visible structure: over 2,000 random run
    /// seeds, each bit of the stage-0 and stage-1 seeds is set about half the
    /// time, and the two agree in about half their bits (an affine or
    /// invertible mixer of the index would show here).
    #[test]
    fn stage_seeds_of_one_run_look_independent() {
        let runs = 2000;
        let (mut ones0, mut agree) = ([0u32; 64], 0u64);
        for _ in 0..runs {
            let s = RunSeed::random();
            let (a, b) = (s.derive(Purpose::Stage(0)), s.derive(Purpose::Stage(1)));
            for (bit, n) in ones0.iter_mut().enumerate() {
                *n += ((a >> bit) & 1) as u32;
            }
            agree += u64::from((!(a ^ b)).count_ones());
        }
        // 5 sigma of a binomial(2000, 1/2) is about 112.
        for n in ones0 {
            assert!((888..=1112).contains(&n), "{n}");
        }
        let mean = agree as f64 / runs as f64;
        assert!((31.0..33.0).contains(&mean), "{mean}");
    }
}
