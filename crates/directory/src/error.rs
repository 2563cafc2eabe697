//! The one error type of the directory crate.

use std::path::PathBuf;

/// Everything that can go wrong in the directory: verification, storage,
/// selection, the server and the client. The pure documents of this crate
/// raise the verification and selection variants; the server
/// (`mixnn-directory-server`) and the client (`mixnn-directory-client`)
/// return the same type, so that one error names one HTTP status on both
/// ends.
///
/// Each variant maps to one HTTP status ([`DirectoryError::http_status`]);
/// the server sends `{"error": "<Display of the variant>"}`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// A request body or a stored record could not be parsed.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being parsed (e.g. "descriptor", "identity key").
        what: &'static str,
        /// Why parsing failed.
        reason: String,
    },
    /// A field has a value the directory does not accept.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A public key is not a valid Ed25519 point.
    #[error("invalid {what} key")]
    InvalidKey {
        /// Which key ("identity", "reporter", "directory").
        what: &'static str,
    },
    /// A signature does not verify under the key it claims.
    #[error("bad signature on {what}")]
    BadSignature {
        /// What was signed ("descriptor", "heartbeat", "failure report", "view").
        what: &'static str,
    },
    /// A signed object is stamped later than the directory's clock allows.
    #[error("{what} is from the future: stamped {stamped}, now {now}")]
    FromFuture {
        /// What was stamped.
        what: &'static str,
        /// Its timestamp (unix seconds).
        stamped: u64,
        /// The verifier's clock (unix seconds).
        now: u64,
    },
    /// A signed object is older than the accepted age.
    #[error("stale {what}: stamped {stamped}, now {now}, max age {max_age} s")]
    Stale {
        /// What was stamped.
        what: &'static str,
        /// Its timestamp (unix seconds).
        stamped: u64,
        /// The verifier's clock (unix seconds).
        now: u64,
        /// The accepted age in seconds.
        max_age: u64,
    },
    /// A descriptor speaks another protocol version.
    #[error("unsupported protocol version {got} (this directory speaks {expected})")]
    WrongVersion {
        /// The descriptor's version.
        got: u32,
        /// [`crate::PROTOCOL_VERSION`].
        expected: u32,
    },
    /// The address is registered under another identity key.
    #[error("address {addr} is registered under another identity key")]
    AddressTaken {
        /// The contested address.
        addr: String,
    },
    /// A link or onion key is registered under another identity key: one
    /// node's keys are listed once.
    #[error("the {what} key is registered under another identity key")]
    KeyTaken {
        /// "link" or "onion".
        what: &'static str,
    },
    /// A descriptor names an address the directory does not probe.
    #[error("{addr} is a {kind} address: this directory lists nodes at public addresses only")]
    NotPublic {
        /// The descriptor's address.
        addr: String,
        /// What kind of address it is.
        kind: &'static str,
    },
    /// A re-registration is not newer than the stored descriptor.
    #[error("descriptor published {published} is not newer than the registered one ({current})")]
    NotNewer {
        /// The offered descriptor's `published`.
        published: u64,
        /// The registered descriptor's `published`.
        current: u64,
    },
    /// A heartbeat is not newer than the last accepted one (a replay).
    #[error("heartbeat stamped {stamped} is not newer than the last one ({last})")]
    Replayed {
        /// The heartbeat's timestamp.
        stamped: u64,
        /// The last accepted heartbeat's timestamp.
        last: u64,
    },
    /// No node with this identity key is registered.
    #[error("unknown node {identity}")]
    UnknownNode {
        /// The identity key, hex.
        identity: String,
    },
    /// A failure report comes from a designer key the directory does not accept.
    #[error("reporter {reporter} is not an accepted designer key")]
    UnknownReporter {
        /// The reporter's key, hex.
        reporter: String,
    },
    /// The directory could not prove the node at its address: unreachable,
    /// another link key, or a wrong onion-key proof.
    #[error("node at {addr} not admitted: {reason}")]
    ProbeFailed {
        /// The descriptor's address.
        addr: String,
        /// What the probe found.
        reason: String,
    },
    /// The address prefix already has as many listed nodes as allowed.
    #[error("{prefix} already has {limit} listed nodes (the per-prefix limit)")]
    PrefixFull {
        /// The IPv4 /24 or IPv6 /29.
        prefix: String,
        /// The limit.
        limit: usize,
    },
    /// A failure report from a key that neither drew the node recently nor
    /// is admitted by the operator.
    #[error(
        "reporter {reporter} has no recent draw of node {node} and is not an admitted reporter"
    )]
    NotDrawn {
        /// The reporter's key, hex.
        reporter: String,
        /// The node's identity key, hex.
        node: String,
    },
    /// Too many requests of one kind from one address prefix.
    #[error("too many {what} from {prefix}; try again later")]
    RateLimited {
        /// What was limited.
        what: &'static str,
        /// The requester's IPv4 /24 or IPv6 /29.
        prefix: String,
    },
    /// Every probe slot is busy.
    #[error("directory busy: {what}; try again later")]
    Busy {
        /// What is busy.
        what: &'static str,
    },
    /// A view is signed by a key that is not pinned.
    #[error("view signed by unpinned directory key {key}")]
    UnknownDirectory {
        /// The signer's key, hex.
        key: String,
    },
    /// A view's `valid_until` has passed.
    #[error("view expired at {valid_until}, now {now}")]
    ViewExpired {
        /// The view's `valid_until`.
        valid_until: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// A view lists the same identity key or address twice.
    #[error("view lists {what} {value} twice")]
    DuplicateInView {
        /// "identity" or "address".
        what: &'static str,
        /// The duplicated value.
        value: String,
    },
    /// Fewer than k pinned directories signed the same node list.
    #[error("quorum not met: {agreeing} of the required {required} directories agree")]
    QuorumNotMet {
        /// The largest number of distinct pinned directories that agree.
        agreeing: usize,
        /// The k asked for.
        required: usize,
    },
    /// Selection needs more eligible nodes than the view has, or more
    /// distinct prefixes and families.
    #[error("need {needed} distinct eligible nodes of distinct /16s and families; the view has {eligible} eligible nodes and {diverse} could be drawn together (local testing on one subnet: --allow-same-subnet)")]
    NotEnoughNodes {
        /// Eligible nodes in the view.
        eligible: usize,
        /// n = p + r.
        needed: usize,
        /// How many were drawn before the pool ran dry.
        diverse: usize,
    },
    /// The SQLite store failed.
    #[error("database: {reason}")]
    Database {
        /// The SQLite error, as text.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file exists but is unusable.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP server failed.
    #[error("server: {reason}")]
    Server {
        /// The I/O error, as text.
        reason: String,
    },
    /// The directory answered a client request with an error status.
    #[error("directory refused ({status}): {message}")]
    Refused {
        /// HTTP status code.
        status: u16,
        /// The `error` field of the body, or the body itself.
        message: String,
    },
    /// The client could not reach the directory.
    #[error("cannot reach directory at {url}: {reason}")]
    Transport {
        /// The URL asked.
        url: String,
        /// The transport error, as text.
        reason: String,
    },
}

impl DirectoryError {
    /// The HTTP status the server answers with for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Malformed { .. } | Self::InvalidKey { .. } => 400,
            Self::BadSignature { .. } => 401,
            Self::UnknownReporter { .. }
            | Self::UnknownDirectory { .. }
            | Self::NotDrawn { .. } => 403,
            Self::RateLimited { .. } => 429,
            Self::Busy { .. } => 503,
            Self::UnknownNode { .. } => 404,
            Self::AddressTaken { .. }
            | Self::KeyTaken { .. }
            | Self::NotNewer { .. }
            | Self::Replayed { .. }
            | Self::PrefixFull { .. } => 409,
            Self::InvalidField { .. }
            | Self::FromFuture { .. }
            | Self::Stale { .. }
            | Self::WrongVersion { .. }
            | Self::ViewExpired { .. }
            | Self::ProbeFailed { .. }
            | Self::NotPublic { .. }
            | Self::DuplicateInView { .. }
            | Self::QuorumNotMet { .. }
            | Self::NotEnoughNodes { .. } => 422,
            Self::Refused { status, .. } => *status,
            Self::Database { .. }
            | Self::Io { .. }
            | Self::KeyFile { .. }
            | Self::Server { .. }
            | Self::Transport { .. } => 500,
        }
    }

    /// A [`DirectoryError::Malformed`] for `what`, with `reason` as text.
    pub fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Result with [`DirectoryError`].
pub type Result<T, E = DirectoryError> = std::result::Result<T, E>;
