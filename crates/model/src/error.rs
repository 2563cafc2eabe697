//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while describing, building, feeding or
/// training a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The model description is not valid TOML or misses a field.
    #[error("model description {source_name}: {message}")]
    Spec {
        /// Where the description came from (file path or `<string>`).
        source_name: String,
        /// What is wrong, naming the stage and op where possible.
        message: String,
    },
    /// A stage or op is invalid (unknown op, dimensions that do not chain).
    #[error("stage {stage}, op {op} ({op_name}): {message}")]
    Op {
        /// 1-based stage number.
        stage: usize,
        /// 1-based op number inside the stage.
        op: usize,
        /// The op's name as written.
        op_name: String,
        /// What is wrong.
        message: String,
    },
    /// An activation or gradient does not have the shape the stage expects.
    #[error("shape mismatch in {context}: expected {expected}, got {actual}")]
    Shape {
        /// Which computation noticed.
        context: &'static str,
        /// The expected shape, as text.
        expected: String,
        /// The shape received, as text.
        actual: String,
    },
    /// A tensor byte buffer is malformed (truncated, wrong length, bad rank).
    #[error("malformed tensor bytes: {0}")]
    TensorBytes(String),
    /// A data file is missing, unreadable or malformed.
    #[error("data file {}: {message}", path.display())]
    Data {
        /// The file in question.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Labels given to a loss stage do not fit the batch or the classes.
    #[error("labels: {0}")]
    Labels(String),
    /// A stage was used in a way its kind does not allow.
    #[error("stage misuse: {0}")]
    Misuse(String),
    /// Reading or writing a weights file failed.
    #[error("weights {}: {message}", path.display())]
    Weights {
        /// The file in question.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The kernel path cannot be used (unknown or unsupported
    /// `MIXNN_KERNELS`), or the arithmetic self-test failed.
    #[error("kernels: {0}")]
    Kernels(String),
    /// An I/O error while reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file in question.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
