//! The directory authority as a library: a store, a signing key, a clock
//! and a policy. The HTTP server ([`crate::serve`]) is a thin shell over
//! [`DirectoryState`].

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mixnn_directory::api::{FailureOutcome, Registration};
use mixnn_directory::{
    Clock, Descriptor, DirectoryError, DirectoryKeys, DrawReceipt, NodeEntry, NodeRecord, Result,
    SignedDescriptor, SignedDrawReceipt, SignedDrawRequest, SignedFailureReport, SignedHeartbeat,
    SignedView, SystemClock, View,
};

use crate::config::DirectoryConfig;
use crate::probe::{NoiseProber, Prober};
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
    prober: Arc<dyn Prober>,
    probes: AtomicUsize,
}

/// A probe slot, given back on drop.
struct ProbeSlot<'a>(&'a AtomicUsize);

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
    /// A directory over `store`, signing with `keys`, reading `clock`,
    /// proving nodes with real probes ([`NoiseProber`]).
    pub fn new(
        store: Store,
        keys: DirectoryKeys,
        clock: Arc<dyn Clock>,
        config: DirectoryConfig,
    ) -> Self {
        let prober = Arc::new(NoiseProber::new(config.probe_timeout));
        Self::with_prober(store, keys, clock, config, prober)
    }

    /// The same with another [`Prober`] (tests of the layers above it).
    pub fn with_prober(
        store: Store,
        keys: DirectoryKeys,
        clock: Arc<dyn Clock>,
        config: DirectoryConfig,
        prober: Arc<dyn Prober>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                keys,
                clock,
                config,
                prober,
                probes: AtomicUsize::new(0),
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

    /// Registers or updates a node: checks the descriptor
    /// ([`Store::check_registration`]), probes the node at its address
    /// (unless this very descriptor was proven within
    /// `reprobe_interval`), and lists it only if the probe passes
    /// ([`Store::admit`]). Blocking: a probe takes up to `probe_timeout`,
    /// and the store is not held meanwhile. Refused with
    /// [`DirectoryError::Busy`] when `max_probes` probes are running.
    pub fn register(&self, signed: &SignedDescriptor) -> Result<Registration> {
        let config = &self.inner.config;
        let (d, fresh) = self
            .store()?
            .check_registration(signed, self.now(), config)?;
        if fresh {
            return Ok(Registration::Unchanged);
        }
        {
            let _slot = self.probe_slot()?;
            self.inner
                .prober
                .probe(&d)
                .map_err(|reason| DirectoryError::ProbeFailed {
                    addr: d.addr.to_string(),
                    reason,
                })?;
        }
        let now = self.now();
        self.store()?.admit(signed, now, config)
    }

    fn probe_slot(&self) -> Result<ProbeSlot<'_>> {
        let probes = &self.inner.probes;
        if probes.fetch_add(1, Ordering::SeqCst) >= self.inner.config.max_probes {
            probes.fetch_sub(1, Ordering::SeqCst);
            return Err(DirectoryError::Busy {
                what: "every probe slot is in use",
            });
        }
        Ok(ProbeSlot(probes))
    }

    /// Probes again every node due ([`Store::due_for_probe`]), one after
    /// another, and lists or unlists each by the outcome. Returns how
    /// many passed and failed. Blocking; [`crate::serve`] runs it every
    /// `reprobe_interval / 4` seconds.
    pub fn reprobe(&self) -> Result<(usize, usize)> {
        let config = &self.inner.config;
        let due: Vec<Descriptor> = self.store()?.due_for_probe(self.now(), config)?;
        let (mut passed, mut failed) = (0, 0);
        for d in due {
            let outcome = self.inner.prober.probe(&d);
            if let Err(reason) = &outcome {
                tracing::warn!(addr = %d.addr, "probe failed; node unlisted until one passes: {reason}");
                failed += 1;
            } else {
                passed += 1;
            }
            let now = self.now();
            self.store()?
                .record_probe(&d, outcome.is_ok(), now, config)?;
        }
        Ok((passed, failed))
    }

    /// Records a designer's draw ([`Store::record_draw`]) and signs the
    /// receipt.
    pub fn draw(&self, signed: &SignedDrawRequest, requester: IpAddr) -> Result<SignedDrawReceipt> {
        let now = self.now();
        let request = signed.verify(now, self.inner.config.max_report_age)?;
        let nodes = self
            .store()?
            .record_draw(signed, requester, now, &self.inner.config)?;
        let receipt = DrawReceipt {
            directory: self.public_key(),
            designer: request.designer,
            nodes,
            issued: now,
        };
        SignedDrawReceipt::sign(&self.inner.keys, &receipt)
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

    /// The current view, signed: every listed node ([`Store::live_nodes`]:
    /// live and proven) whose stored descriptor still verifies, with its
    /// reliability and report penalty, valid for `view_ttl` seconds.
    pub fn view(&self) -> Result<SignedView> {
        let now = self.now();
        let rows = self.store()?.live_nodes(now, &self.inner.config)?;
        let nodes = rows
            .into_iter()
            .filter(|(descriptor, _, _)| match descriptor.verify_signature() {
                Ok(_) => true,
                Err(e) => {
                    // Only a tampered database gets here; leave the node out.
                    tracing::warn!(error = %e, "stored descriptor no longer verifies; left out of the view");
                    false
                }
            })
            .map(|(descriptor, h, penalty)| NodeEntry {
                descriptor,
                uptime_fraction: h.uptime_fraction,
                missed_heartbeats: h.missed_heartbeats,
                recent_failures: h.recent_failures,
                report_penalty: penalty,
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
