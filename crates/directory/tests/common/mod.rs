//! Helpers shared by the integration tests: test nodes' keys and
//! descriptors (the server's tests have the same, with a directory).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;

use mixnn_directory::ed25519_dalek::SigningKey;
use mixnn_directory::*;

/// Start of the test clock.
pub const T0: u64 = 1_700_000_000;

/// The identity key of test node `i`.
pub fn node_key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i.wrapping_add(100); 32])
}

/// A valid descriptor for a node at 10.`port % 250`.0.1:`port` (one /16
/// per port modulo 250), published at `published`, with onion and link
/// keys of its own.
pub fn descriptor(key: &SigningKey, port: u16, published: u64) -> Descriptor {
    let identity = key.verifying_key().to_bytes();
    let (mut onion, mut link) = (identity, identity);
    onion[0] ^= 0x11;
    link[0] ^= 0x22;
    Descriptor {
        addr: SocketAddr::from(([10, (port % 250) as u8, 0, 1], port)),
        identity,
        onion,
        link,
        version: PROTOCOL_VERSION,
        arith: 1,
        capabilities: Capabilities {
            cores: 8,
            memory_mb: 16_384,
            price_per_hour: 0.35,
            location: "test-rack".into(),
        },
        published,
        family: Vec::new(),
    }
}

/// Node `i`'s signed descriptor at port 7000 + i.
pub fn signed(i: u8, published: u64) -> SignedDescriptor {
    let key = node_key(i);
    sign_descriptor(&key, &descriptor(&key, 7000 + u16::from(i), published)).unwrap()
}

/// A verified view node with these figures.
pub fn view_node(s: SignedDescriptor, uptime: f64, penalty: f64) -> ViewNode {
    ViewNode {
        descriptor: s.verify_signature().unwrap(),
        signed: s,
        uptime_fraction: uptime,
        missed_heartbeats: 0,
        recent_failures: 0,
        report_penalty: penalty,
        weight: weight(uptime, penalty),
    }
}

/// Replaces `from` by `to` once in the JSON of `value` and parses it back.
pub fn tamper<T: serde::Serialize + serde::de::DeserializeOwned>(
    value: &T,
    from: &str,
    to: &str,
) -> T {
    let json = serde_json::to_string(value).unwrap();
    assert!(json.contains(from), "{from} not in {json}");
    serde_json::from_str(&json.replacen(from, to, 1)).unwrap()
}
