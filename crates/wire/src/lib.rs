//! MixNN wire format: fixed-size cells, designer-built onion routing headers
//! and the per-hop peel. Pure: byte buffers in and out, no sockets, no async;
//! randomness is injected.
//!
//! # Model
//!
//! The designer builds, for a whole path of up to [`MAX_HOPS`] hops, a
//! Sphinx-style routing [`Header`] and layered [`Notes`] ([`wrap_init`],
//! [`DesignerSession::wrap`]). Each hop peels exactly one onion layer
//! ([`peel_init`], [`peel_session`]) and learns only its [`RoutingBlock`]
//! (op, next hop or "deliver to the designer", per-hop tag) and its note. The
//! header and notes keep their length at every hop, and no byte string in
//! them survives a hop unchanged, so a hop learns neither its position nor
//! the path length. Activations travel in the message *body*, which this
//! crate does not encrypt: the Noise link between neighbouring hops does.
//!
//! ```text
//! message   = header ‖ notes ‖ body
//! header    = prefix (32) ‖ β (MAX_HOPS × BLOCK_LEN) ‖ γ (MAC_LEN)       HEADER_LEN = 4144
//!             prefix: init    → α, blinded X25519 element (Sphinx)
//!                     session → sid (16) ‖ AES_k(counter) (16)
//! notes     = NOTES_LEN (4096) layered bytes, one `len ‖ note` per hop
//!
//! cells (CELL_SIZE = 16384 each, padded per PaddingPolicy)
//! ┌──────┬───────┬──────────┬────────┬───────┬─────────┐┌───────────┐   ┌────────────────┐
//! │ kind │ cells │ body_len │ header │ notes │ body…   ││ body…     │ … │ body… ‖ random │
//! │  1   │ 2 (LE)│  4 (LE)  │  4144  │ 4096  │ 8137    ││ 16384     │   │ 16384          │
//! └──────┴───────┴──────────┴────────┴───────┴─────────┘└───────────┘   └────────────────┘
//! ```
//!
//! # Keys
//!
//! The init onion runs X25519 with each hop's published onion key
//! ([`OnionSecret`], [`OnionPublic`]); each hop derives a session secret from
//! it and keeps a [`HopSession`]. Every later packet (forward, backward,
//! test, loop, …) uses symmetric crypto only: per hop, the designer encrypts
//! a per-hop counter with AES-128 into the prefix, and keys for the MAC
//! (BLAKE3) and the stream cipher (ChaCha20) come from the session secret
//! and that counter. A hop rejects replayed counters ([`ReplayWindow`]) and
//! replayed inits ([`InitReplayCache`], which the caller fills).
//!
//! # Example
//!
//! ```
//! use mixnn_wire::*;
//! use rand_core::OsRng;
//!
//! let secret = OnionSecret::generate(&mut OsRng);
//! let designer = HopAddr("127.0.0.1:9000".parse().unwrap());
//! let block = RoutingBlock {
//!     op: Op::Init,
//!     next: Next::Deliver { addr: designer, reply_id: ReplyId([0; 16]) },
//!     tag: HopTag([1; 16]),
//! };
//! let layers = [HopLayer { block, note: b"stage spec" }];
//! let (onion, _session) = wrap_init(&[secret.public()], &layers, &mut OsRng)?;
//!
//! let seen = InitReplayCache::default();
//! let (peeled, hop_session) = peel_init(&secret, &seen, &onion.header, &onion.notes)?;
//! assert_eq!(peeled.block(), block);
//! assert_eq!(peeled.note(), b"stage spec");
//! # let _ = hop_session;
//! # Ok::<(), WireError>(())
//! ```

mod block;
mod cell;
pub mod constants;
mod crypto;
mod error;
pub mod fuzzing;
mod header;
mod layered;
mod notes;
mod peel;
mod replay;
mod wrap;

pub use block::{
    BlockPlaintext, HopAddr, HopTag, Next, Op, ReplyId, RoutingBlock, SessionId, ADDR_LEN,
};
pub use cell::{
    decode_cells, encode_cells, encode_cover, CellKind, CellReader, Message, PaddingPolicy,
};
pub use constants::{
    BLOCK_LEN, CELL_SIZE, FIRST_CELL_BODY, HEADER_LEN, MAC_LEN, MAX_BODY_LEN, MAX_HOPS, NOTES_LEN,
};
pub use error::WireError;
pub use header::{Header, Notes, Onion};
pub use peel::{
    peel_init, peel_session, Deliver, Forward, HopSession, OnionPublic, OnionSecret, Peeled,
    SessionTable,
};
pub use replay::{InitReplayCache, InitTag, ReplayWindow, DEFAULT_INIT_REPLAY_CAPACITY};
pub use wrap::{wrap_init, DesignerSession, HopLayer};
