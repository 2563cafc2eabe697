//! MixNN directory authority: the SQLite [`Store`] (nodes, heartbeat
//! history, failure reports), the [`DirectoryState`] that signs views of
//! the live nodes, and the HTTP/JSON server ([`serve`], axum). The signed
//! documents it stores and serves live in `mixnn-directory`; nodes and
//! designers talk to it with `mixnn-directory-client`, which links neither
//! axum nor SQLite.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use mixnn_directory::*;
//! use mixnn_directory::ed25519_dalek::SigningKey;
//! use mixnn_directory_server::{DirectoryConfig, DirectoryState, Store};
//! use rand::SeedableRng;
//!
//! # fn main() -> Result<(), DirectoryError> {
//! let clock = ManualClock::new(1_000);
//! let config = DirectoryConfig::default();
//! // `DirectoryState::register` lists a node only after probing it at its
//! // address (see `tests/admission.rs`); here the store admits five nodes
//! // as if their probes had passed.
//! let mut store = Store::open_in_memory()?;
//! for i in 0..5u8 {
//!     let key = SigningKey::from_bytes(&[i + 10; 32]);
//!     let descriptor = Descriptor {
//!         addr: ([20 + i, 1, 0, 1], 7000).into(),
//!         identity: key.verifying_key().to_bytes(),
//!         onion: [i; 32],
//!         link: [i + 50; 32],
//!         version: PROTOCOL_VERSION,
//!         arith: 1,
//!         capabilities: Capabilities {
//!             cores: 2, memory_mb: 4096, price_per_hour: 0.0, location: "lab".into(),
//!         },
//!         published: clock.now(),
//!         family: vec![],
//!     };
//!     store.admit(&sign_descriptor(&key, &descriptor)?, clock.now(), &config)?;
//! }
//! let directory = DirectoryState::new(
//!     store,
//!     DirectoryKeys::from_secret([1; 32]),
//!     Arc::new(clock.clone()),
//!     config,
//! );
//! let view = directory.view()?.verify(&[directory.public_key()], clock.now())?;
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
//! let cascade = select(&view.nodes, 3, 2, Diversity::Strict, &mut rng)?;
//! assert_eq!(cascade.hops.len(), 5);
//! assert_eq!(cascade.dummy_positions.len(), 2);
//! # Ok(())
//! # }
//! ```

mod config;
mod probe;
mod server;
mod state;
mod store;

pub use config::{Addresses, DirectoryConfig, HttpLimits};
pub use probe::{NoiseProber, Prober};
pub use server::{router, serve, MAX_BODY};
pub use state::DirectoryState;
pub use store::Store;
