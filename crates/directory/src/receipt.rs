//! Draw receipts: the proof that a designer drew a node, which the
//! directory asks of whoever reports that node as failed.
//!
//! After drawing a cascade, the designer sends a [`DrawRequest`] naming the
//! drawn nodes, signed with its key (`POST /v1/draws`). The directory
//! records, for each listed node, that this designer drew it, and answers
//! with a [`DrawReceipt`] it signs. A failure report about a node is
//! accepted only from a designer that drew it within the directory's
//! receipt window (or from an operator-admitted reporter key), so a key
//! cannot report nodes it never used; the directory also limits how many
//! draws it records per requesting address prefix, so making many keys
//! does not make many reporters.

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::descriptor::check_fresh;
use crate::error::{DirectoryError, Result};
use crate::keys::DirectoryKeys;
use crate::signed::{self, hex32, hex32_vec, hex64, DRAW_DOMAIN, RECEIPT_DOMAIN};

/// Most nodes one draw request may name.
pub const MAX_DRAW_NODES: usize = 32;

/// "I, `designer`, drew these nodes at `timestamp`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrawRequest {
    /// The designer's Ed25519 key (the signer, and the future reporter).
    #[serde(with = "hex32")]
    pub designer: [u8; 32],
    /// The drawn nodes' identity keys (1 to [`MAX_DRAW_NODES`]).
    #[serde(with = "hex32_vec")]
    pub nodes: Vec<[u8; 32]>,
    /// When the designer drew them (unix seconds).
    pub timestamp: u64,
}

/// A draw request with the designer's signature (unverified).
///
/// JSON: `{"request": {...}, "signature": hex}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDrawRequest {
    request: Box<RawValue>,
    #[serde(with = "hex64")]
    signature: [u8; 64],
}

impl SignedDrawRequest {
    /// Verifies the signature under the designer key, the node count and
    /// that the timestamp is within `max_age` of `now`.
    pub fn verify(&self, now: u64, max_age: u64) -> Result<DrawRequest> {
        let request: DrawRequest = signed::parse_json("draw request", &self.request)?;
        signed::verify_json(
            &request.designer,
            "designer",
            "draw request",
            DRAW_DOMAIN,
            &self.request,
            &self.signature,
        )?;
        check_nodes(&request.nodes)?;
        check_fresh("draw request", request.timestamp, now, max_age)?;
        Ok(request)
    }
}

fn check_nodes(nodes: &[[u8; 32]]) -> Result<()> {
    if nodes.is_empty() || nodes.len() > MAX_DRAW_NODES {
        return Err(DirectoryError::InvalidField {
            field: "nodes",
            reason: format!("a draw names 1 to {MAX_DRAW_NODES} nodes"),
        });
    }
    Ok(())
}

/// Signs a draw request with the designer's key (designer side).
pub fn sign_draw_request(
    key: &SigningKey,
    nodes: &[[u8; 32]],
    timestamp: u64,
) -> Result<SignedDrawRequest> {
    check_nodes(nodes)?;
    let request = DrawRequest {
        designer: key.verifying_key().to_bytes(),
        nodes: nodes.to_vec(),
        timestamp,
    };
    let (request, signature) = signed::sign_json(key, DRAW_DOMAIN, &request)?;
    Ok(SignedDrawRequest { request, signature })
}

/// "Directory `directory` recorded that `designer` drew `nodes` at `issued`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrawReceipt {
    /// The signing directory.
    #[serde(with = "hex32")]
    pub directory: [u8; 32],
    /// The designer.
    #[serde(with = "hex32")]
    pub designer: [u8; 32],
    /// The nodes recorded (those of the request that are listed).
    #[serde(with = "hex32_vec")]
    pub nodes: Vec<[u8; 32]>,
    /// When (directory clock).
    pub issued: u64,
}

/// A draw receipt with the directory's signature.
///
/// JSON: `{"receipt": {...}, "signature": hex}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDrawReceipt {
    receipt: Box<RawValue>,
    #[serde(with = "hex64")]
    signature: [u8; 64],
}

impl SignedDrawReceipt {
    /// Signs a receipt (directory side).
    pub fn sign(keys: &DirectoryKeys, receipt: &DrawReceipt) -> Result<Self> {
        let (receipt, signature) = signed::sign_json(keys.signing(), RECEIPT_DOMAIN, receipt)?;
        Ok(Self { receipt, signature })
    }

    /// Verifies the receipt against the pinned directory keys.
    pub fn verify(&self, pinned: &[[u8; 32]]) -> Result<DrawReceipt> {
        let receipt: DrawReceipt = signed::parse_json("draw receipt", &self.receipt)?;
        if !pinned.contains(&receipt.directory) {
            return Err(DirectoryError::UnknownDirectory {
                key: hex::encode(receipt.directory),
            });
        }
        signed::verify_json(
            &receipt.directory,
            "directory",
            "draw receipt",
            RECEIPT_DOMAIN,
            &self.receipt,
            &self.signature,
        )?;
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_receipt_round_trip_and_reject_tampering() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let r = sign_draw_request(&key, &[[1; 32], [2; 32]], 100).unwrap();
        assert_eq!(r.verify(100, 60).unwrap().nodes.len(), 2);
        let wire = serde_json::to_string(&r)
            .unwrap()
            .replace("\"timestamp\":100", "\"timestamp\":101");
        let tampered: SignedDrawRequest = serde_json::from_str(&wire).unwrap();
        assert!(matches!(
            tampered.verify(101, 60),
            Err(DirectoryError::BadSignature { .. })
        ));
        assert!(sign_draw_request(&key, &[], 1).is_err());
        assert!(sign_draw_request(&key, &[[0; 32]; 33], 1).is_err());

        let dir = DirectoryKeys::from_secret([9; 32]);
        let receipt = DrawReceipt {
            directory: dir.public(),
            designer: key.verifying_key().to_bytes(),
            nodes: vec![[1; 32]],
            issued: 100,
        };
        let signed = SignedDrawReceipt::sign(&dir, &receipt).unwrap();
        assert_eq!(signed.verify(&[dir.public()]).unwrap(), receipt);
        assert!(signed.verify(&[[0; 32]]).is_err());
    }
}
