//! MixNN I/O: Noise-authenticated TCP links that carry fixed-size cells, and
//! node key storage. This is the only crate in the workspace that opens
//! sockets; packet formats and onion crypto live elsewhere and work on byte
//! buffers.
//!
//! # Keys on disk
//!
//! A node keeps three raw 32-byte secrets in its state directory (mode
//! `0700`, files `0600`, each written atomically): `identity.key` (Ed25519
//! seed), `onion.key` (X25519) and `link.key` (X25519 Noise static key).
//! [`NodeKeys::load_or_create`] makes them on first start and reloads them
//! afterwards; a damaged or over-permissive file is an error naming it,
//! never a reason to regenerate. [`NodeKeys::public`] gives the
//! [`NodePublicKeys`] a directory publishes (hex in text and serde). The
//! designer, also a link endpoint, uses an ephemeral [`LinkKeypair`].
//!
//! # Handshake
//!
//! Links run [`NOISE_PROTOCOL`] (`Noise_XX_25519_AESGCM_SHA256`): both ends
//! prove their static link key. The prologue binds a protocol label and the
//! cell size, so ends that disagree on either fail the handshake. The
//! initiator ([`Link::connect`]) can pin the responder's key and aborts with
//! [`NetError::UnexpectedPeer`] before sending its own. Listeners hand out
//! [`PendingLink`]s right away; the caller spawns [`PendingLink::handshake`]
//! so one slow client cannot block others. Connect plus handshake is bounded
//! by [`LinkConfig::handshake_timeout`].
//!
//! # Framing
//!
//! Every cell is one Noise transport message:
//!
//! ```text
//! u16 len (big-endian, = cell_size + 16) ‖ AEAD(cell) ‖ 16-byte tag
//! ```
//!
//! so all frames on a link have the same length. Each direction counts its
//! own nonces from 0; they are implicit, so a dropped, replayed, reordered or
//! altered frame fails with [`NetError::Decrypt`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), mixnn_net::NetError> {
//! use mixnn_net::{Link, LinkConfig, LinkKeypair, LinkListener};
//!
//! let config = LinkConfig::new(16 * 1024)?;
//! let server_key = LinkKeypair::generate_os();
//! let expected = server_key.public();
//! let listener = LinkListener::bind("127.0.0.1:0".parse().unwrap(), server_key, config).await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok(pending) = listener.accept().await {
//!         tokio::spawn(async move {
//!             let mut link = pending.handshake().await?;
//!             let mut cell = vec![0u8; link.cell_size()];
//!             link.recv_cell(&mut cell).await?;
//!             Ok::<_, mixnn_net::NetError>(())
//!         });
//!     }
//! });
//! let mut link = Link::connect(addr, &LinkKeypair::generate_os(), Some(expected), config).await?;
//! link.send_cells(&vec![7u8; 16 * 1024]).await?;
//! # Ok(())
//! # }
//! ```

pub mod alias;
mod error;
mod keyfile;
mod keys;
mod link;
mod message;
pub mod pacing;
pub mod probe;
mod pubkey;
mod transport;

pub use error::NetError;
pub use keyfile::SECRET_KEY_LEN;
pub use keys::{Created, LinkKeypair, NodeKeys, IDENTITY_KEY_FILE, LINK_KEY_FILE, ONION_KEY_FILE};
pub use link::{
    Link, LinkConfig, LinkListener, PendingLink, DEFAULT_HANDSHAKE_TIMEOUT, NOISE_PROTOCOL,
};
pub use message::recv_message;
pub use probe::{probe, ProbeResponder, ProbeTarget};
pub use pubkey::{
    NodePublicKeys, PublicIdentityKey, PublicLinkKey, PublicOnionKey, PUBLIC_KEY_LEN,
};
pub use transport::{LinkReader, LinkWriter, LEN_PREFIX, MAX_CELL_SIZE, TAG_LEN};

/// The Ed25519 crate whose types [`NodeKeys::identity`] returns.
pub use ed25519_dalek;
/// The X25519 crate whose types [`NodeKeys::onion`] returns.
pub use x25519_dalek;
