//! The designer crate's error type.

use std::net::SocketAddr;

/// Why a cascade run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DesignerError {
    /// The cascade description or options are wrong.
    #[error("cascade config: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A link to a hop could not be opened or broke.
    #[error("link to hop {addr}: {source}")]
    Link {
        /// The hop.
        addr: SocketAddr,
        /// The link error.
        source: mixnn_net::NetError,
    },
    /// The designer's own listener failed.
    #[error("designer listener: {0}")]
    Listen(mixnn_net::NetError),
    /// The cascade did not answer in time: a node crashed, hangs or drops
    /// packets.
    #[error("no answer from the cascade within {secs:.1} s while waiting for {what} of step {step}: a node is down or dropping packets")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The step.
        step: u64,
        /// The bound.
        secs: f64,
    },
    /// Building an onion failed.
    #[error("onion: {0}")]
    Wire(#[from] mixnn_wire::WireError),
    /// A reply does not parse.
    #[error("reply: {0}")]
    Proto(#[from] mixnn_proto::ProtoError),
    /// Local compute (kept stages, argmax) failed.
    #[error("{0}")]
    Model(#[from] mixnn_model::ModelError),
    /// A reply made no sense.
    #[error("cascade answered with {0}")]
    Reply(String),
    /// A checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A directory could not be reached or its view does not check out.
    #[error("directory: {0}")]
    Directory(String),
    /// Recovery from a failed hop did not succeed.
    #[error("recovery: {0}")]
    Recovery(String),
    /// A hop failed or refused an audit of a step it ran.
    #[error("audit failed at hop {hop} ({addr}) for step {step}: {reason}")]
    Audit {
        /// The hop's position in the cascade.
        hop: usize,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The audited step.
        step: u64,
        /// What did not check out.
        reason: String,
        /// Another hop that may be the culprit (the other side of a
        /// boundary whose two openings disagree): replaced as well.
        also: Option<usize>,
    },
}
