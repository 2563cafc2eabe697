//! The documents of the directory's HTTP API that are not signed: what
//! the server answers, as both the server and the client read them. The
//! routes are in `docs/directory-api.md`.

use serde::{Deserialize, Serialize};

use crate::signed::hex32;

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// A node not seen before.
    New,
    /// A newer descriptor replaced the registered one.
    Updated,
    /// The very same descriptor was sent again.
    Unchanged,
}

/// What a failure report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureOutcome {
    /// Stored and counted.
    Recorded,
    /// This reporter already reported this node at this step.
    Duplicate,
}

/// Answer to `POST /v1/descriptors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// What the registration did.
    pub status: Registration,
    /// The node's identity key.
    #[serde(with = "hex32")]
    pub identity: [u8; 32],
}

/// Answer to `POST /v1/failures`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureResponse {
    /// Whether the report was new.
    pub status: FailureOutcome,
}

/// Answer to `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"`.
    pub status: String,
    /// The directory's public key.
    #[serde(with = "hex32")]
    pub directory: [u8; 32],
    /// Registered nodes, live or not.
    pub nodes: u64,
    /// The directory's clock.
    pub now: u64,
}

/// The error body of every failed request: `{"error": "one line"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}
