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
//! let directory = DirectoryState::new(
//!     Store::open_in_memory()?,
//!     DirectoryKeys::from_secret([1; 32]),
//!     Arc::new(clock.clone()),
//!     DirectoryConfig::default(),
//! );
//! for i in 0..5u8 {
//!     let key = SigningKey::from_bytes(&[i + 10; 32]);
//!     let descriptor = Descriptor {
//!         addr: ([127, 0, 0, 1], 7000 + u16::from(i)).into(),
//!         identity: key.verifying_key().to_bytes(),
//!         onion: [0; 32],
//!         link: [0; 32],
//!         version: PROTOCOL_VERSION,
//!         arith: 1,
//!         capabilities: Capabilities {
//!             cores: 2, memory_mb: 4096, price_per_hour: 0.0, location: "lab".into(),
//!         },
//!         published: clock.now(),
//!     };
//!     directory.register(&sign_descriptor(&key, &descriptor)?)?;
//! }
//! let view = directory.view()?.verify(&[directory.public_key()], clock.now())?;
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
//! let cascade = select(&view.nodes, 3, 2, &mut rng)?;
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

pub use config::{DirectoryConfig, HttpLimits};
pub use probe::{NoiseProber, Prober};
pub use server::{router, serve, MAX_BODY};
pub use state::DirectoryState;
pub use store::Store;
