//! The one error type of this crate.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in `mixnn-net`.
///
/// Variants carry context (a file path, a socket address, a key) but never
/// secret material, and their messages show other processes' addresses and
/// keys only as log aliases ([`crate::alias`]): these errors end up in logs.
/// The listening address (`Bind`) is the process's own and shown as is. Errors that concern a single
/// link (handshake, framing, decryption) leave the listener usable: log them
/// and keep accepting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The key directory could not be created or read.
    #[error("key directory {path}: {source}")]
    KeyDir {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A key file exists but could not be read.
    #[error("cannot read key file {path}: {source}")]
    KeyFileRead {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A key file could not be written (or its temporary file renamed).
    #[error("cannot write key file {path}: {source}")]
    KeyFileWrite {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A key file has the wrong size: it is corrupt or not a key file.
    #[error(
        "key file {path} is {actual} bytes, expected {expected}; refusing to use or replace it"
    )]
    KeyFileLength {
        /// The key file.
        path: PathBuf,
        /// The size a key file must have.
        expected: usize,
        /// The size found on disk.
        actual: u64,
    },
    /// A key file is readable or writable by group or others.
    #[error("key file {path} has mode {mode:o}; it must not be accessible to group or others (chmod 600)")]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// The permission bits found (e.g. `0o644`).
        mode: u32,
    },
    /// Some key files exist in the state directory but this one is missing.
    ///
    /// Regenerating only the missing key would silently change part of the
    /// node's identity, so this is an error.
    #[error("key file {path} is missing while other key files exist in its directory; restore it, or remove all key files to create a new node identity")]
    KeyFileMissing {
        /// The missing key file.
        path: PathBuf,
    },
    /// A public key in text form is not 64 hex digits.
    #[error("invalid public key: {reason}")]
    ParsePublicKey {
        /// Why it did not parse (does not echo the input).
        reason: &'static str,
    },
    /// A cell size outside `1..=MAX_CELL_SIZE` was configured.
    #[error("cell size {cell_size} is not in 1..={max}")]
    InvalidCellSize {
        /// The requested cell size.
        cell_size: usize,
        /// The largest allowed cell size.
        max: usize,
    },
    /// A buffer handed to `send_cells`/`recv_cell(s)` is not a whole number
    /// of cells (a caller bug, not a peer's fault).
    #[error("buffer of {len} bytes is not a non-zero multiple of the cell size {cell_size}")]
    CellBufferLength {
        /// The buffer length given.
        len: usize,
        /// The link's cell size.
        cell_size: usize,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Accepting a TCP connection failed.
    #[error("accept failed: {source}")]
    Accept {
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Opening a TCP connection failed.
    #[error("cannot connect to {}: {source}", crate::alias::peer(.addr))]
    Connect {
        /// The address we tried to reach.
        addr: SocketAddr,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Connecting and completing the handshake took too long.
    #[error("link setup with {} timed out", crate::alias::peer(.peer))]
    HandshakeTimeout {
        /// The peer.
        peer: SocketAddr,
    },
    /// The Noise handshake failed: bad message, wrong cell size or protocol
    /// (both go into the prologue), or a peer that is not speaking Noise.
    #[error("handshake with {} failed: {reason}", crate::alias::peer(.peer))]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The handshake completed, but the peer's static link key is not the
    /// one we expected.
    #[error("peer {} has link key {actual}, expected {expected}", crate::alias::peer(.peer))]
    UnexpectedPeer {
        /// The peer.
        peer: SocketAddr,
        /// Log alias ([`crate::alias`]) of the expected key.
        expected: String,
        /// Log alias of the key the peer proved it holds.
        actual: String,
    },
    /// The connection was a directory's probe, answered with a proof
    /// ([`mod@crate::probe`]); not a fault, and not a link.
    #[error("{peer} probed this node (answered)")]
    Probed {
        /// The prober.
        peer: SocketAddr,
    },
    /// A probe of a node failed: no answer, the wrong link key, or a wrong
    /// onion-key proof.
    #[error("probe of {peer} failed: {reason}")]
    ProbeFailed {
        /// The probed address.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
    /// I/O on an open link failed (including EOF in the middle of a frame).
    #[error("link with {}: {source}", crate::alias::peer(.peer))]
    LinkIo {
        /// The peer.
        peer: SocketAddr,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The peer closed the link cleanly, at a frame boundary.
    #[error("link with {} closed", crate::alias::peer(.peer))]
    Closed {
        /// The peer.
        peer: SocketAddr,
    },
    /// Nothing (not even a whole cell) arrived within the reader's idle
    /// timeout ([`crate::LinkReader::set_idle_timeout`]).
    #[error("link with {} idle for {after:?}", crate::alias::peer(.peer))]
    Idle {
        /// The peer.
        peer: SocketAddr,
        /// The idle timeout.
        after: std::time::Duration,
    },
    /// A transport frame had a length other than the one fixed for the link.
    #[error("link with {}: frame of {actual} bytes, expected {expected}", crate::alias::peer(.peer))]
    FrameLength {
        /// The peer.
        peer: SocketAddr,
        /// The fixed frame length (cell size + AEAD tag).
        expected: usize,
        /// The length announced on the wire.
        actual: usize,
    },
    /// A transport frame failed authentication (tampered, replayed,
    /// reordered, or not from the peer).
    #[error("link with {}: frame {nonce} failed to decrypt", crate::alias::peer(.peer))]
    Decrypt {
        /// The peer.
        peer: SocketAddr,
        /// The nonce the frame was expected to use.
        nonce: u64,
    },
    /// A link direction is no longer usable: an earlier error on it may have
    /// left the stream mid-frame, or its nonces are exhausted.
    #[error("link with {} is broken by an earlier error", crate::alias::peer(.peer))]
    Broken {
        /// The peer.
        peer: SocketAddr,
    },
    /// The cells of a message do not form a valid MixNN message.
    #[error("malformed message from {}: {source}", crate::alias::peer(.peer))]
    Message {
        /// The peer.
        peer: SocketAddr,
        /// What the wire format says is wrong.
        source: mixnn_wire::WireError,
    },
}

/// A short, log-safe fingerprint of a public key: its first 8 bytes in hex.
pub(crate) fn fingerprint(bytes: &[u8; 32]) -> String {
    hex::encode(&bytes[..8])
}
