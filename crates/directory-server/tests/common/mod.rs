//! Helpers shared by the integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use mixnn_directory::ed25519_dalek::SigningKey;
use mixnn_directory::*;
use mixnn_directory_server::*;

/// Start of the test clock.
pub const T0: u64 = 1_700_000_000;

/// The identity key of test node `i`.
pub fn node_key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i.wrapping_add(100); 32])
}

/// A valid descriptor for node `i` at 127.0.0.1:`port`, published at `published`.
pub fn descriptor(key: &SigningKey, port: u16, published: u64) -> Descriptor {
    let identity = key.verifying_key().to_bytes();
    let (mut onion, mut link) = (identity, identity);
    onion[0] ^= 0x11;
    link[0] ^= 0x22;
    Descriptor {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
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

/// A prober that passes every node: for tests of the store and views,
/// the layers above the probe (admission itself is tested with real
/// listeners and [`NoiseProber`], see `admission.rs`).
pub struct AdmitAll;

impl Prober for AdmitAll {
    fn probe(&self, _: &Descriptor) -> Result<(), String> {
        Ok(())
    }
}

/// Test directories list every node on 127.0.0.1 (no per-prefix limit).
pub fn loopback_config() -> DirectoryConfig {
    DirectoryConfig {
        allow_same_subnet: true,
        addresses: Addresses::Local,
        ..DirectoryConfig::default()
    }
}

/// A directory over an in-memory store with a manual clock at `T0` whose
/// probes always pass (see [`AdmitAll`]).
pub fn directory() -> (DirectoryState, ManualClock) {
    directory_with(loopback_config())
}

/// The same with `config`.
pub fn directory_with(config: DirectoryConfig) -> (DirectoryState, ManualClock) {
    let clock = ManualClock::new(T0);
    let state = DirectoryState::with_prober(
        Store::open_in_memory().unwrap(),
        DirectoryKeys::from_secret([0xd1; 32]),
        Arc::new(clock.clone()),
        config,
        Arc::new(AdmitAll),
    );
    (state, clock)
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
