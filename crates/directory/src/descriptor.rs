//! Node descriptors: what a node publishes about itself, signed by its
//! Ed25519 identity key.
//!
//! A [`SignedDescriptor`] is what travels and what is stored; it is
//! *unverified*: the only way to read its [`Descriptor`] is
//! [`SignedDescriptor::verify`] (registration: signature, version, fields
//! and age) or [`SignedDescriptor::verify_signature`] (inside a view:
//! signature, version and fields).

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{DirectoryError, Result};
use crate::signed::{self, hex32, hex32_vec, hex64, DESCRIPTOR_DOMAIN};

/// The protocol version this directory and its nodes speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// How far ahead of the verifier's clock a timestamp may be (seconds).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Most entries in [`Descriptor::family`].
pub const MAX_FAMILY: usize = 16;

/// Longest accepted [`Capabilities::location`], in bytes.
pub const MAX_LOCATION_LEN: usize = 64;

/// What a node offers; informative, signed with the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// CPU cores.
    pub cores: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Asking price per hour (any unit the deployment agrees on); finite, ≥ 0.
    pub price_per_hour: f64,
    /// A free-form location label, at most [`MAX_LOCATION_LEN`] bytes.
    pub location: String,
}

/// A node's public description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    /// Where the node listens for links.
    pub addr: SocketAddr,
    /// Ed25519 identity key (signs this descriptor and the heartbeats).
    #[serde(with = "hex32")]
    pub identity: [u8; 32],
    /// X25519 onion key (peels onion layers).
    #[serde(with = "hex32")]
    pub onion: [u8; 32],
    /// Noise static key of the node's links.
    #[serde(with = "hex32")]
    pub link: [u8; 32],
    /// Protocol version; must be [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The arithmetic the node computes (`docs/arithmetic.md`,
    /// `mixnn_model::arith::ARITH_VERSION`). Any value is listed; a
    /// designer draws only nodes that compute its own.
    pub arith: u32,
    /// What the node offers.
    pub capabilities: Capabilities,
    /// When the node signed this descriptor (unix seconds).
    pub published: u64,
    /// The identity keys of the other nodes its operator runs (Tor's
    /// MyFamily), at most [`MAX_FAMILY`]. Two nodes are one family only if
    /// each lists the other in its own signed descriptor
    /// ([`crate::same_family`]); a designer never draws two of one family
    /// into one cascade. Absent in JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "hex32_vec")]
    pub family: Vec<[u8; 32]>,
}

impl Descriptor {
    /// Checks the fields a signature cannot vouch for: version, price,
    /// location, family.
    pub fn check_fields(&self) -> Result<()> {
        if self.version != PROTOCOL_VERSION {
            return Err(DirectoryError::WrongVersion {
                got: self.version,
                expected: PROTOCOL_VERSION,
            });
        }
        let price = self.capabilities.price_per_hour;
        if !price.is_finite() || price < 0.0 {
            return Err(DirectoryError::InvalidField {
                field: "price_per_hour",
                reason: format!("{price} is not a finite non-negative number"),
            });
        }
        if self.family.len() > MAX_FAMILY {
            return Err(DirectoryError::InvalidField {
                field: "family",
                reason: format!("more than {MAX_FAMILY} members"),
            });
        }
        let mut members = std::collections::BTreeSet::new();
        for member in &self.family {
            if *member == self.identity || !members.insert(*member) {
                return Err(DirectoryError::InvalidField {
                    field: "family",
                    reason: "lists the node itself or a member twice".into(),
                });
            }
        }
        if self.capabilities.location.len() > MAX_LOCATION_LEN {
            return Err(DirectoryError::InvalidField {
                field: "location",
                reason: format!("longer than {MAX_LOCATION_LEN} bytes"),
            });
        }
        Ok(())
    }
}

/// A descriptor with its identity key's signature, as sent and stored.
///
/// JSON: `{"descriptor": {...}, "signature": "<128 hex digits>"}`; the
/// signature covers `b"mixnn-descriptor-v1\0" ‖` the exact bytes of the
/// `descriptor` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDescriptor {
    descriptor: Box<RawValue>,
    #[serde(with = "hex64")]
    signature: [u8; 64],
}

impl PartialEq for SignedDescriptor {
    fn eq(&self, other: &Self) -> bool {
        self.descriptor.get() == other.descriptor.get() && self.signature == other.signature
    }
}

impl Eq for SignedDescriptor {}

impl SignedDescriptor {
    /// Verifies a descriptor being registered at time `now`: the signature
    /// under the descriptor's own identity key, the protocol version and
    /// fields, and that `published` is neither more than
    /// [`CLOCK_SKEW_SECS`] in the future nor more than `max_age` seconds old.
    pub fn verify(&self, now: u64, max_age: u64) -> Result<Descriptor> {
        let descriptor = self.verify_signature()?;
        check_fresh("descriptor", descriptor.published, now, max_age)?;
        Ok(descriptor)
    }

    /// Verifies the signature, version and fields but not the age (for
    /// descriptors inside a directory view, which carries its own expiry).
    pub fn verify_signature(&self) -> Result<Descriptor> {
        let descriptor: Descriptor = signed::parse_json("descriptor", &self.descriptor)?;
        signed::verify_json(
            &descriptor.identity,
            "identity",
            "descriptor",
            DESCRIPTOR_DOMAIN,
            &self.descriptor,
            &self.signature,
        )?;
        descriptor.check_fields()?;
        Ok(descriptor)
    }

    /// The exact JSON bytes that were signed (without the domain prefix).
    pub fn descriptor_json(&self) -> &str {
        self.descriptor.get()
    }

    /// The signature bytes.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// Reassembles a stored descriptor (JSON object and signature);
    /// nothing is verified.
    pub fn from_parts(descriptor_json: &str, signature: [u8; 64]) -> Result<Self> {
        let descriptor = RawValue::from_string(descriptor_json.to_owned())
            .map_err(|e| DirectoryError::malformed("descriptor", e))?;
        Ok(Self {
            descriptor,
            signature,
        })
    }
}

/// Signs `descriptor` with the node's identity key (node side).
///
/// Fails if `descriptor.identity` is not `key`'s public key or a field is
/// invalid ([`Descriptor::check_fields`]).
pub fn sign_descriptor(key: &SigningKey, descriptor: &Descriptor) -> Result<SignedDescriptor> {
    if descriptor.identity != key.verifying_key().to_bytes() {
        return Err(DirectoryError::InvalidField {
            field: "identity",
            reason: "not the public key of the signing key".into(),
        });
    }
    descriptor.check_fields()?;
    let (descriptor, signature) = signed::sign_json(key, DESCRIPTOR_DOMAIN, descriptor)?;
    Ok(SignedDescriptor {
        descriptor,
        signature,
    })
}

/// Rejects a timestamp more than [`CLOCK_SKEW_SECS`] ahead of `now` or more
/// than `max_age` behind it.
pub(crate) fn check_fresh(what: &'static str, stamped: u64, now: u64, max_age: u64) -> Result<()> {
    if stamped > now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(DirectoryError::FromFuture { what, stamped, now });
    }
    if now.saturating_sub(stamped) > max_age {
        return Err(DirectoryError::Stale {
            what,
            stamped,
            now,
            max_age,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(key: &SigningKey, port: u16, published: u64) -> Descriptor {
        Descriptor {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            identity: key.verifying_key().to_bytes(),
            onion: [1; 32],
            link: [2; 32],
            version: PROTOCOL_VERSION,
            arith: 1,
            capabilities: Capabilities {
                cores: 4,
                memory_mb: 8192,
                price_per_hour: 0.1 + 0.2,
                location: "eu-west \"lab\"".into(),
            },
            published,
            family: Vec::new(),
        }
    }

    #[test]
    fn sign_then_verify_round_trips_through_json() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let d = sample(&key, 9000, 1000);
        let signed = sign_descriptor(&key, &d).unwrap();
        let wire = serde_json::to_string(&signed).unwrap();
        let back: SignedDescriptor = serde_json::from_str(&wire).unwrap();
        assert_eq!(back.verify(1000, 600).unwrap(), d);
    }

    #[test]
    fn verify_rejects_tampered_addr() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let signed = sign_descriptor(&key, &sample(&key, 9000, 1000)).unwrap();
        let wire = serde_json::to_string(&signed)
            .unwrap()
            .replace(":9000\"", ":9001\"");
        let back: SignedDescriptor = serde_json::from_str(&wire).unwrap();
        let err = back.verify(1000, 600).unwrap_err();
        assert!(
            matches!(err, DirectoryError::BadSignature { what: "descriptor" }),
            "{err}"
        );
    }

    #[test]
    fn verify_rejects_stale_future_and_wrong_version() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let signed = sign_descriptor(&key, &sample(&key, 9000, 1000)).unwrap();
        assert!(matches!(
            signed.verify(1601, 600),
            Err(DirectoryError::Stale { .. })
        ));
        assert!(matches!(
            signed.verify(900, 600),
            Err(DirectoryError::FromFuture { .. })
        ));
        signed.verify(1000 - CLOCK_SKEW_SECS, 600).unwrap();

        let mut d = sample(&key, 9000, 1000);
        d.version = 2;
        // Sign by hand: sign_descriptor refuses wrong versions.
        let (descriptor, signature) = signed::sign_json(&key, DESCRIPTOR_DOMAIN, &d).unwrap();
        let signed = SignedDescriptor {
            descriptor,
            signature,
        };
        assert!(matches!(
            signed.verify(1000, 600),
            Err(DirectoryError::WrongVersion {
                got: 2,
                expected: 1
            })
        ));
    }

    #[test]
    fn sign_refuses_foreign_identity_and_bad_price() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        assert!(sign_descriptor(&other, &sample(&key, 1, 1)).is_err());
        let mut d = sample(&key, 1, 1);
        d.capabilities.price_per_hour = f64::NAN;
        assert!(matches!(
            sign_descriptor(&key, &d),
            Err(DirectoryError::InvalidField {
                field: "price_per_hour",
                ..
            })
        ));
    }
}
