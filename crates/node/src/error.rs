//! The node crate's error type.

use mixnn_net::NetError;

/// Why a node refused a message or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The onion or cells are malformed, replayed or not for us.
    #[error("onion: {0}")]
    Wire(#[from] mixnn_wire::WireError),
    /// A note or body does not follow the stage protocol.
    #[error("protocol: {0}")]
    Proto(#[from] mixnn_proto::ProtoError),
    /// The stage could not run (bad shapes, bad labels, bad spec).
    #[error("stage: {0}")]
    Model(#[from] mixnn_model::ModelError),
    /// Link or key trouble.
    #[error("{0}")]
    Net(#[from] NetError),
    /// A session message names a session this node does not have.
    #[error("unknown session {0}")]
    UnknownSession(String),
    /// A session message came over a link whose key is not one of the
    /// session's neighbours.
    #[error("session {session}: peer with link key {peer}… is not a neighbour of this hop")]
    UnknownPeer {
        /// Short session id.
        session: String,
        /// Short fingerprint of the peer's link key.
        peer: String,
    },
    /// A message for a step that this stage has already passed.
    #[error("session {session}: {op} for step {step}, but the stage is at step {at}")]
    Stale {
        /// Short session id.
        session: String,
        /// The op.
        op: &'static str,
        /// The step the message is for.
        step: u64,
        /// The stage's step.
        at: u64,
    },
    /// A limit was hit (sessions, parameters, activations, bytes held;
    /// see [`crate::Limits`]).
    #[error("limit reached: {0}")]
    Limit(String),
    /// The stage code panicked on a message; the session it was for is
    /// dropped, the node goes on.
    #[error("session {session}: the stage panicked on this message; the session is dropped")]
    Panicked {
        /// Short session id.
        session: String,
    },
    /// A message the node cannot act on.
    #[error("refused: {0}")]
    Refused(String),
    /// A file of the node's state directory could not be read or written.
    #[error("{}: {source}", path.display())]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}
