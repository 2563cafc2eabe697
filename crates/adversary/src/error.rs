//! The adversary crate's error type.

use std::path::PathBuf;

use mixnn_model::ModelError;
use mixnn_proto::ProtoError;

/// What can go wrong while reading records or mounting an attack.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdversaryError {
    /// A record file cannot be read.
    #[error("record file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record in a file does not decode.
    #[error("record file {}: {source}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        source: ProtoError,
    },
    /// A hop's record lacks something every recording hop writes.
    #[error("hop record {}: {reason}", path.display())]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// Two hops' records do not fit together as the attack needs.
    #[error("records of hops {a} and {b}: {reason}")]
    Mismatch {
        /// One hop (0-based position in the cascade).
        a: usize,
        /// The other.
        b: usize,
        /// What does not fit.
        reason: String,
    },
    /// No stand-in architecture exists for a part the colluders do not
    /// hold (positions unknown).
    #[error("no stand-in for an unknown part from {from} to {to}")]
    NoFiller {
        /// Its input shape.
        from: String,
        /// Its output shape.
        to: String,
    },
    /// The model code refused something (shapes, labels).
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The adversary crate's result.
pub type Result<T> = std::result::Result<T, AdversaryError>;
