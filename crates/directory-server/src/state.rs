//! The directory authority as a library: a store, a signing key, a clock
//! and a policy. The HTTP server ([`crate::serve`]) is a thin shell over
//! [`DirectoryState`].

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use mixnn_directory::api::{FailureOutcome, Registration};
use mixnn_directory::{
    Clock, DirectoryError, DirectoryKeys, NodeEntry, NodeRecord, Result, SignedDescriptor,
    SignedFailureReport, SignedHeartbeat, SignedView, SystemClock, View,
};

use crate::config::DirectoryConfig;
use crate::store::Store;

/// Shared state of a running directory; cheap to clone.
#[derive(Clone)]
pub struct DirectoryState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Mutex<Store>,
    keys: DirectoryKeys,
    clock: Arc<dyn Clock>,
    config: DirectoryConfig,
}

impl std::fmt::Debug for DirectoryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryState")
            .field("keys", &self.inner.keys)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl DirectoryState {
    /// A directory over `store`, signing with `keys`, reading `clock`.
    pub fn new(
        store: Store,
        keys: DirectoryKeys,
        clock: Arc<dyn Clock>,
        config: DirectoryConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                keys,
                clock,
                config,
            }),
        }
    }

    /// The usual setup: SQLite at `db`, the key at `key_file` (created if
    /// missing), the system clock.
    pub fn open(db: &Path, key_file: &Path, config: DirectoryConfig) -> Result<Self> {
        let store = Store::open(db)?;
        let keys = DirectoryKeys::load_or_create(key_file)?;
        Ok(Self::new(store, keys, Arc::new(SystemClock), config))
    }

    /// The directory's public key (what designers pin).
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.keys.public()
    }

    /// The policy.
    pub fn config(&self) -> &DirectoryConfig {
        &self.inner.config
    }

    /// Now, by the injected clock.
    pub fn now(&self) -> u64 {
        self.inner.clock.now()
    }

    /// Registers or updates a node ([`Store::register`]).
    pub fn register(&self, signed: &SignedDescriptor) -> Result<Registration> {
        let now = self.now();
        self.store()?.register(signed, now, &self.inner.config)
    }

    /// Records a heartbeat ([`Store::heartbeat`]).
    pub fn heartbeat(&self, signed: &SignedHeartbeat) -> Result<()> {
        let now = self.now();
        self.store()?.heartbeat(signed, now, &self.inner.config)
    }

    /// Stores a failure report ([`Store::report_failure`]).
    pub fn report_failure(&self, signed: &SignedFailureReport) -> Result<FailureOutcome> {
        let now = self.now();
        self.store()?
            .report_failure(signed, now, &self.inner.config)
    }

    /// One node's record ([`Store::node`]).
    pub fn node(&self, identity: &[u8; 32]) -> Result<NodeRecord> {
        let now = self.now();
        self.store()?.node(identity, now, &self.inner.config)
    }

    /// Registered nodes, live or not.
    pub fn node_count(&self) -> Result<u64> {
        self.store()?.node_count()
    }

    /// The current view, signed: every live node whose stored descriptor
    /// still verifies, with its reliability, valid for `view_ttl` seconds.
    pub fn view(&self) -> Result<SignedView> {
        let now = self.now();
        let rows = self.store()?.live_nodes(now, &self.inner.config)?;
        let nodes = rows
            .into_iter()
            .filter(|(descriptor, _)| match descriptor.verify_signature() {
                Ok(_) => true,
                Err(e) => {
                    // Only a tampered database gets here; leave the node out.
                    tracing::warn!(error = %e, "stored descriptor no longer verifies; left out of the view");
                    false
                }
            })
            .map(|(descriptor, h)| NodeEntry {
                descriptor,
                uptime_fraction: h.uptime_fraction,
                missed_heartbeats: h.missed_heartbeats,
                recent_failures: h.recent_failures,
            })
            .collect();
        let view = View {
            directory: self.public_key(),
            issued: now,
            valid_until: now.saturating_add(self.inner.config.view_ttl),
            nodes,
        };
        SignedView::sign(&self.inner.keys, &view)
    }

    fn store(&self) -> Result<MutexGuard<'_, Store>> {
        self.inner
            .store
            .lock()
            .map_err(|_| DirectoryError::Database {
                reason: "store lock poisoned by a panic".into(),
            })
    }
}
