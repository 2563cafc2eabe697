//! A blocking HTTP client for the MixNN directory, for nodes and
//! designers: the documents come from `mixnn-directory`, so using the
//! client links neither the server nor its database.
//!
//! Plain HTTP: integrity comes from the signatures, not the transport. A
//! view fetched here is still unverified; call [`SignedView::verify`].
//! From async code, call it inside `tokio::task::spawn_blocking`.

use std::time::Duration;

use mixnn_directory::api::{
    ErrorBody, FailureOutcome, FailureResponse, Health, RegisterResponse, Registration,
};
use mixnn_directory::{
    DirectoryError, NodeRecord, Result, SignedDescriptor, SignedDrawReceipt, SignedDrawRequest,
    SignedFailureReport, SignedHeartbeat, SignedView,
};
use serde::de::DeserializeOwned;

/// Timeout for connecting and for a whole request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of one directory.
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    base: String,
    agent: ureq::Agent,
}

impl DirectoryClient {
    /// A client for the directory at `url` (e.g. `http://127.0.0.1:8080`,
    /// with or without a trailing slash).
    pub fn new(url: &str) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(DirectoryError::InvalidField {
                field: "directory url",
                reason: format!("{url:?} does not start with http://"),
            });
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CLIENT_TIMEOUT)
            .timeout(CLIENT_TIMEOUT)
            .build();
        Ok(Self { base, agent })
    }

    /// The directory's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Registers or updates a node (`POST /v1/descriptors`).
    pub fn register(&self, descriptor: &SignedDescriptor) -> Result<Registration> {
        let reply: RegisterResponse = self.post("/v1/descriptors", descriptor)?;
        Ok(reply.status)
    }

    /// Sends a heartbeat (`POST /v1/heartbeats`).
    pub fn heartbeat(&self, heartbeat: &SignedHeartbeat) -> Result<()> {
        let _: serde_json::Value = self.post("/v1/heartbeats", heartbeat)?;
        Ok(())
    }

    /// Reports a failed node (`POST /v1/failures`).
    pub fn report_failure(&self, report: &SignedFailureReport) -> Result<FailureOutcome> {
        let reply: FailureResponse = self.post("/v1/failures", report)?;
        Ok(reply.status)
    }

    /// Tells the directory which nodes this designer drew
    /// (`POST /v1/draws`); the receipt lets it report them later.
    pub fn draw(&self, request: &SignedDrawRequest) -> Result<SignedDrawReceipt> {
        self.post("/v1/draws", request)
    }

    /// Fetches the current signed view (`GET /v1/view`), unverified.
    pub fn view(&self) -> Result<SignedView> {
        self.get("/v1/view")
    }

    /// Fetches one node's record (`GET /v1/nodes/{identity}`).
    pub fn node(&self, identity: &[u8; 32]) -> Result<NodeRecord> {
        self.get(&format!("/v1/nodes/{}", hex::encode(identity)))
    }

    /// Fetches the health summary (`GET /v1/health`).
    pub fn health(&self) -> Result<Health> {
        self.get("/v1/health")
    }

    fn post<B: serde::Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let body =
            serde_json::to_string(body).map_err(|e| DirectoryError::malformed("request", e))?;
        let reply = self
            .agent
            .post(&url)
            .set("content-type", "application/json")
            .send_string(&body);
        read(&url, reply)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        read(&url, self.agent.get(&url).call())
    }
}

fn read<T: DeserializeOwned>(url: &str, reply: Result<ureq::Response, ureq::Error>) -> Result<T> {
    match reply {
        Ok(response) => {
            let text = response
                .into_string()
                .map_err(|e| DirectoryError::Transport {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
            serde_json::from_str(&text)
                .map_err(|e| DirectoryError::malformed("directory response", e))
        }
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| one_line(&text));
            Err(DirectoryError::Refused { status, message })
        }
        Err(e) => Err(DirectoryError::Transport {
            url: url.to_owned(),
            reason: one_line(&e.to_string()),
        }),
    }
}

/// The first line of `s`, at most 200 characters.
fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}
