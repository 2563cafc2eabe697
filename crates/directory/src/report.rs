//! Heartbeats (signed by a node's identity key) and failure reports (signed
//! by a designer's key).

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::descriptor::check_fresh;
use crate::error::{DirectoryError, Result};
use crate::signed::{self, hex32, hex64, FAILURE_DOMAIN, HEARTBEAT_DOMAIN};

/// Longest accepted [`FailureReport::reason`], in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// "This node is alive at `timestamp`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The node's identity key (the signer).
    #[serde(with = "hex32")]
    pub identity: [u8; 32],
    /// When the node sent it (unix seconds).
    pub timestamp: u64,
}

/// A heartbeat with the node's signature (unverified).
///
/// JSON: `{"heartbeat": {"identity": hex, "timestamp": u64}, "signature": hex}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHeartbeat {
    heartbeat: Box<RawValue>,
    #[serde(with = "hex64")]
    signature: [u8; 64],
}

impl SignedHeartbeat {
    /// Verifies the signature under the heartbeat's identity key and that
    /// the timestamp is within `max_age` of `now` (and not in the future).
    pub fn verify(&self, now: u64, max_age: u64) -> Result<Heartbeat> {
        let hb: Heartbeat = signed::parse_json("heartbeat", &self.heartbeat)?;
        signed::verify_json(
            &hb.identity,
            "identity",
            "heartbeat",
            HEARTBEAT_DOMAIN,
            &self.heartbeat,
            &self.signature,
        )?;
        check_fresh("heartbeat", hb.timestamp, now, max_age)?;
        Ok(hb)
    }
}

/// Signs a heartbeat for the node whose identity key is `key` (node side).
pub fn sign_heartbeat(key: &SigningKey, timestamp: u64) -> Result<SignedHeartbeat> {
    let hb = Heartbeat {
        identity: key.verifying_key().to_bytes(),
        timestamp,
    };
    let (heartbeat, signature) = signed::sign_json(key, HEARTBEAT_DOMAIN, &hb)?;
    Ok(SignedHeartbeat {
        heartbeat,
        signature,
    })
}

/// "Node `node` failed at training step `step`", from a designer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureReport {
    /// The designer's Ed25519 key (the signer).
    #[serde(with = "hex32")]
    pub reporter: [u8; 32],
    /// The failed node's identity key.
    #[serde(with = "hex32")]
    pub node: [u8; 32],
    /// The training step at which it failed.
    pub step: u64,
    /// A short description, at most [`MAX_REASON_LEN`] bytes.
    pub reason: String,
    /// When the designer wrote the report (unix seconds).
    pub timestamp: u64,
}

/// A failure report with the designer's signature (unverified).
///
/// JSON: `{"report": {...}, "signature": hex}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedFailureReport {
    report: Box<RawValue>,
    #[serde(with = "hex64")]
    signature: [u8; 64],
}

impl SignedFailureReport {
    /// Verifies the signature under the report's reporter key, the reason's
    /// length, and that the timestamp is within `max_age` of `now`.
    pub fn verify(&self, now: u64, max_age: u64) -> Result<FailureReport> {
        let report: FailureReport = signed::parse_json("failure report", &self.report)?;
        signed::verify_json(
            &report.reporter,
            "reporter",
            "failure report",
            FAILURE_DOMAIN,
            &self.report,
            &self.signature,
        )?;
        check_reason(&report.reason)?;
        check_fresh("failure report", report.timestamp, now, max_age)?;
        Ok(report)
    }

    /// The signature bytes.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }
}

/// Signs a failure report with the designer's key (designer side);
/// `reporter` is set to `key`'s public key.
pub fn sign_failure_report(
    key: &SigningKey,
    node: [u8; 32],
    step: u64,
    reason: &str,
    timestamp: u64,
) -> Result<SignedFailureReport> {
    check_reason(reason)?;
    let report = FailureReport {
        reporter: key.verifying_key().to_bytes(),
        node,
        step,
        reason: reason.to_owned(),
        timestamp,
    };
    let (report, signature) = signed::sign_json(key, FAILURE_DOMAIN, &report)?;
    Ok(SignedFailureReport { report, signature })
}

fn check_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_LEN {
        return Err(DirectoryError::InvalidField {
            field: "reason",
            reason: format!("longer than {MAX_REASON_LEN} bytes"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_round_trips_and_rejects_forgery() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let hb = sign_heartbeat(&key, 100).unwrap();
        let wire = serde_json::to_string(&hb).unwrap();
        let back: SignedHeartbeat = serde_json::from_str(&wire).unwrap();
        assert_eq!(back.verify(100, 30).unwrap().timestamp, 100);
        assert!(matches!(
            back.verify(200, 30),
            Err(DirectoryError::Stale { .. })
        ));

        // Another key signs a heartbeat claiming `key`'s identity.
        let other = SigningKey::from_bytes(&[6; 32]);
        let forged = sign_heartbeat(&other, 100).unwrap();
        let wire = serde_json::to_string(&forged).unwrap().replace(
            &hex::encode(other.verifying_key().to_bytes()),
            &hex::encode(key.verifying_key().to_bytes()),
        );
        let forged: SignedHeartbeat = serde_json::from_str(&wire).unwrap();
        assert!(matches!(
            forged.verify(100, 30),
            Err(DirectoryError::BadSignature { .. })
        ));
    }

    #[test]
    fn failure_report_round_trips_and_rejects_tampering() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let r = sign_failure_report(&key, [9; 32], 42, "timeout", 100).unwrap();
        assert_eq!(r.verify(100, 30).unwrap().step, 42);
        let wire = serde_json::to_string(&r)
            .unwrap()
            .replace("\"step\":42", "\"step\":43");
        let tampered: SignedFailureReport = serde_json::from_str(&wire).unwrap();
        assert!(matches!(
            tampered.verify(100, 30),
            Err(DirectoryError::BadSignature { .. })
        ));
        assert!(sign_failure_report(&key, [9; 32], 1, &"x".repeat(300), 1).is_err());
    }
}
