//! MixNN directory documents: signed node descriptors, heartbeats and
//! failure reports, reliability history, the signed view of the live nodes,
//! and random cascade selection with dummy hops (paper §2.2). Pure: no
//! sockets, no database, no runtime; time comes from a [`Clock`].
//!
//! The directory is three crates, so that a node or a designer links
//! neither a web server nor a database:
//!
//! | crate | job |
//! |---|---|
//! | `mixnn-directory` (this one) | the documents, their signatures, selection, the API's answer types |
//! | `mixnn-directory-client` | blocking HTTP client (ureq), for nodes and designers |
//! | `mixnn-directory-server` | the authority: SQLite store, state, HTTP server (axum) |
//!
//! # Model
//!
//! * A **node** publishes a [`Descriptor`] (address, identity, onion and
//!   link keys, protocol version, capabilities, publication time), signed
//!   by its Ed25519 identity key ([`sign_descriptor`]), and then sends a
//!   signed [`Heartbeat`] every `DirectoryConfig::heartbeat_interval`
//!   seconds ([`sign_heartbeat`]).
//! * The **directory** (`DirectoryState` over a SQLite `Store`, in
//!   `mixnn-directory-server`) verifies
//!   everything it receives, refuses an address already held by another
//!   identity key, keeps each node's history (uptime, missed heartbeats,
//!   failures designers reported with [`sign_failure_report`]), and serves a
//!   [`SignedView`] of the live nodes, signed by its own key
//!   ([`DirectoryKeys`]) and valid for `DirectoryConfig::view_ttl`.
//!   `serve` puts it on HTTP; the routes are in `docs/directory-api.md`,
//!   the answers' types in [`api`].
//! * A **designer** pins the directory keys it trusts, verifies the view
//!   ([`SignedView::verify`], or [`verify_quorum`] for k of N directories)
//!   and draws a cascade with [`select`]: p real and r dummy hops, distinct
//!   nodes weighted by reliability, dummies at random positions.
//!
//! Signed objects are never re-encoded before verification: each keeps the
//! exact JSON bytes that were signed (see `signed.rs`). Time comes from a
//! [`Clock`] and randomness from the caller's RNG, so everything is
//! testable and reproducible.
//!
//! # Example
//!
//! ```
//! use mixnn_directory::*;
//! use mixnn_directory::ed25519_dalek::SigningKey;
//! use rand::SeedableRng;
//!
//! # fn main() -> Result<(), DirectoryError> {
//! let now = 1_000;
//! let directory = DirectoryKeys::from_secret([1; 32]);
//! let mut nodes = Vec::new();
//! for i in 0..5u8 {
//!     let key = SigningKey::from_bytes(&[i + 10; 32]);
//!     let descriptor = Descriptor {
//!         // Five /16s: a draw never puts two hops in one.
//!         addr: ([10, i, 0, 1], 7000).into(),
//!         identity: key.verifying_key().to_bytes(),
//!         onion: [i; 32],
//!         link: [i + 50; 32],
//!         version: PROTOCOL_VERSION,
//!         arith: 1,
//!         capabilities: Capabilities {
//!             cores: 2, memory_mb: 4096, price_per_hour: 0.0, location: "lab".into(),
//!         },
//!         published: now,
//!         family: vec![],
//!     };
//!     nodes.push(NodeEntry {
//!         descriptor: sign_descriptor(&key, &descriptor)?,
//!         uptime_fraction: 1.0,
//!         missed_heartbeats: 0,
//!         recent_failures: 0,
//!         report_penalty: 0.0,
//!     });
//! }
//! let view = View { directory: directory.public(), issued: now, valid_until: now + 600, nodes };
//! let view = SignedView::sign(&directory, &view)?.verify(&[directory.public()], now)?;
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
//! let cascade = select(&view.nodes, 3, 2, Diversity::Strict, &mut rng)?;
//! assert_eq!(cascade.hops.len(), 5);
//! assert_eq!(cascade.dummy_positions.len(), 2);
//! # Ok(())
//! # }
//! ```

pub mod api;
mod clock;
mod descriptor;
mod diversity;
mod error;
mod history;
mod keys;
mod receipt;
mod report;
mod select;
mod signed;
mod view;

pub use clock::{unix_now, Clock, ManualClock, SystemClock};
pub use descriptor::{
    sign_descriptor, Capabilities, Descriptor, SignedDescriptor, CLOCK_SKEW_SECS, MAX_FAMILY,
    MAX_LOCATION_LEN, PROTOCOL_VERSION,
};
pub use diversity::{draw_prefix, listing_prefix, non_public, same_family, Diversity};
pub use error::{DirectoryError, Result};
pub use history::{Counters, FailureRecord, History, NodeRecord};
pub use keys::DirectoryKeys;
pub use receipt::{
    sign_draw_request, DrawReceipt, DrawRequest, SignedDrawReceipt, SignedDrawRequest,
    MAX_DRAW_NODES,
};
pub use report::{
    sign_failure_report, sign_heartbeat, FailureReport, Heartbeat, SignedFailureReport,
    SignedHeartbeat, MAX_REASON_LEN,
};
pub use select::{
    select, weight, Selection, MAX_PENALTY, MIN_WEIGHT, PREFIX_CAP, REPORTED_PER_PREFIX,
    REPORTER_CAP,
};
pub use signed::parse_key_hex;
pub use view::{verify_quorum, NodeEntry, SignedView, VerifiedView, View, ViewNode};

/// Re-exported so callers sign with the same Ed25519 implementation.
pub use ed25519_dalek;
