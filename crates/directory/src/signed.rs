//! Signing helpers shared by descriptors, heartbeats, failure reports and
//! views, and the hex encodings of keys and signatures in JSON.
//!
//! Every signed object travels as `{"<name>": <JSON object>, "signature":
//! "<hex>"}`, and the signature covers `DOMAIN ‖ the exact bytes of that
//! JSON object`. The object is kept as a [`RawValue`] from the moment it is
//! signed (or received) so nobody re-encodes it before verifying: no
//! canonical form is needed, and floats (prices, uptime fractions) cannot
//! drift by one ulp through a parse/print round trip.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::{DirectoryError, Result};

/// Domain separator for node descriptors.
pub(crate) const DESCRIPTOR_DOMAIN: &[u8] = b"mixnn-descriptor-v1\0";
/// Domain separator for heartbeats.
pub(crate) const HEARTBEAT_DOMAIN: &[u8] = b"mixnn-heartbeat-v1\0";
/// Domain separator for failure reports.
pub(crate) const FAILURE_DOMAIN: &[u8] = b"mixnn-failure-v1\0";
/// Domain separator for a designer's draw requests.
pub(crate) const DRAW_DOMAIN: &[u8] = b"mixnn-draw-v1\0";
/// Domain separator for the directory's draw receipts.
pub(crate) const RECEIPT_DOMAIN: &[u8] = b"mixnn-draw-receipt-v1\0";
/// Domain separator for directory views.
pub(crate) const VIEW_DOMAIN: &[u8] = b"mixnn-view-v1\0";

/// Serializes `value` as compact JSON and signs `domain ‖ json`.
pub(crate) fn sign_json<T: Serialize>(
    key: &SigningKey,
    domain: &[u8],
    value: &T,
) -> Result<(Box<RawValue>, [u8; 64])> {
    let json = serde_json::to_string(value).map_err(|e| DirectoryError::malformed("json", e))?;
    let raw = RawValue::from_string(json).map_err(|e| DirectoryError::malformed("json", e))?;
    let signature = key.sign(&message(domain, &raw));
    Ok((raw, signature.to_bytes()))
}

/// Checks `signature` over `domain ‖ raw` under `public`.
pub(crate) fn verify_json(
    public: &[u8; 32],
    key_what: &'static str,
    what: &'static str,
    domain: &[u8],
    raw: &RawValue,
    signature: &[u8; 64],
) -> Result<()> {
    let key = VerifyingKey::from_bytes(public)
        .map_err(|_| DirectoryError::InvalidKey { what: key_what })?;
    key.verify_strict(&message(domain, raw), &Signature::from_bytes(signature))
        .map_err(|_| DirectoryError::BadSignature { what })
}

/// Parses the signed JSON object (before or after verifying).
pub(crate) fn parse_json<T: DeserializeOwned>(what: &'static str, raw: &RawValue) -> Result<T> {
    serde_json::from_str(raw.get()).map_err(|e| DirectoryError::malformed(what, e))
}

fn message(domain: &[u8], raw: &RawValue) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + raw.get().len());
    m.extend_from_slice(domain);
    m.extend_from_slice(raw.get().as_bytes());
    m
}

/// Parses 64 hex digits as a 32-byte key.
pub fn parse_key_hex(what: &'static str, s: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|e| DirectoryError::malformed(what, e))?;
    Ok(out)
}

/// serde: `[u8; 32]` as 64 hex digits.
pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// serde: `Vec<[u8; 32]>` as a list of 64-hex-digit strings.
pub(crate) mod hex32_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(hex::encode).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        list.iter()
            .map(|s| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
                Ok(out)
            })
            .collect()
    }
}

/// serde: `[u8; 64]` (a signature) as 128 hex digits.
pub(crate) mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 64];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_domain_separated() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let (raw, sig) = sign_json(&key, HEARTBEAT_DOMAIN, &serde_json::json!({"a": 1})).unwrap();
        let public = key.verifying_key().to_bytes();
        verify_json(
            &public,
            "identity",
            "heartbeat",
            HEARTBEAT_DOMAIN,
            &raw,
            &sig,
        )
        .unwrap();
        let err = verify_json(
            &public,
            "identity",
            "descriptor",
            DESCRIPTOR_DOMAIN,
            &raw,
            &sig,
        )
        .unwrap_err();
        assert!(matches!(err, DirectoryError::BadSignature { .. }));
    }

    #[test]
    fn hex_key_round_trips() {
        let k = [0xab; 32];
        assert_eq!(parse_key_hex("key", &hex::encode(k)).unwrap(), k);
        assert!(parse_key_hex("key", "abcd").is_err());
    }
}
