//! The directory authority as a library: a store, a signing key, a clock
//! and a policy. The HTTP server ([`crate::serve`]) is a thin shell over
//! [`DirectoryState`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mixnn_directory::api::{FailureOutcome, Registration};
use mixnn_directory::{
    listing_prefix, Clock, Descriptor, DirectoryError, DirectoryKeys, DrawReceipt, NodeEntry,
    NodeRecord, Result, SignedDescriptor, SignedDrawReceipt, SignedDrawRequest,
    SignedFailureReport, SignedHeartbeat, SignedView, SystemClock, View,
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
    /// Registration probes running, in all and per source prefix.
    probes: AtomicUsize,
    per_prefix: Mutex<HashMap<String, usize>>,
    /// Probes started by heartbeats, running.
    heartbeat_probes: AtomicUsize,
    /// When a heartbeat last started a probe of each node (directory
    /// clock): at most one per quarter reprobe interval.
    heartbeat_probed: Mutex<HashMap<[u8; 32], u64>>,
}

/// A probe slot, given back on drop.
struct ProbeSlot<'a> {
    count: &'a AtomicUsize,
    prefix: Option<(&'a Mutex<HashMap<String, usize>>, String)>,
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        if let Some((map, prefix)) = &self.prefix {
            let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(prefix) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(prefix);
                }
            }
        }
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
                per_prefix: Mutex::new(HashMap::new()),
                heartbeat_probes: AtomicUsize::new(0),
                heartbeat_probed: Mutex::new(HashMap::new()),
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
        self.register_from(signed, None)
    }

    /// [`DirectoryState::register`] for a request from `source`: one IPv4
    /// /24 or IPv6 /29 runs at most `max_probes_per_prefix` registration
    /// probes at once. A probe that fails is answered without its reason
    /// (which is logged): the directory tells nobody whether a port is
    /// open.
    pub fn register_from(
        &self,
        signed: &SignedDescriptor,
        source: Option<IpAddr>,
    ) -> Result<Registration> {
        let config = &self.inner.config;
        let (d, fresh) = self
            .store()?
            .check_registration(signed, self.now(), config)?;
        if fresh {
            return Ok(Registration::Unchanged);
        }
        {
            let _slot = self.probe_slot(source)?;
            self.inner.prober.probe(&d).map_err(|reason| {
                tracing::debug!(addr = %d.addr, "registration probe failed: {reason}");
                DirectoryError::ProbeFailed {
                    addr: d.addr.to_string(),
                    reason: "it did not prove the descriptor's link and onion keys there".into(),
                }
            })?;
        }
        let now = self.now();
        self.store()?.admit(signed, now, config)
    }

    fn probe_slot(&self, source: Option<IpAddr>) -> Result<ProbeSlot<'_>> {
        let inner = &self.inner;
        let prefix = match source {
            Some(ip) => {
                let prefix = listing_prefix(ip);
                let mut m = inner.per_prefix.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.entry(prefix.clone()).or_default();
                if *n >= inner.config.max_probes_per_prefix.max(1) {
                    return Err(DirectoryError::RateLimited {
                        what: "registrations in progress",
                        prefix,
                    });
                }
                *n += 1;
                Some((&inner.per_prefix, prefix))
            }
            None => None,
        };
        // From here the slot gives back what it took when dropped.
        let slot = ProbeSlot {
            count: &inner.probes,
            prefix,
        };
        if inner.probes.fetch_add(1, Ordering::SeqCst) >= inner.config.max_probes {
            return Err(DirectoryError::Busy {
                what: "every probe slot is in use",
            });
        }
        Ok(slot)
    }

    /// Probes again every node due ([`Store::due_for_probe`]), the oldest
    /// proofs first, up to `max_probes` at once, and lists or unlists each
    /// by the outcome; starts no probe later than a quarter of the reprobe
    /// interval after the round began (the rest wait for the next round).
    /// Returns how many passed and failed. Blocking; [`crate::serve`] runs
    /// it every `reprobe_interval / 4` seconds.
    ///
    /// Before, the round probed one node after another: nodes that
    /// heartbeat but drop packets (each probe waiting `probe_timeout`)
    /// stretched it past the proof lifetime, and honest nodes probed after
    /// them dropped out of the view.
    pub fn reprobe(&self) -> Result<(usize, usize)> {
        let config = &self.inner.config;
        let due: Vec<Descriptor> = self.store()?.due_for_probe(self.now(), config)?;
        let round =
            Duration::from_secs((config.reprobe_interval / 4).max(1)).max(config.probe_timeout);
        let deadline = Instant::now() + round;
        let next = AtomicUsize::new(0);
        let passed = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let workers = config.max_probes.clamp(1, due.len().max(1));
        let errors: Mutex<Option<DirectoryError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(d) = due.get(i) else { return };
                    if Instant::now() >= deadline {
                        return;
                    }
                    let ok = self.probe_now(d);
                    if ok {
                        passed.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Err(e) = self.record(d, ok) {
                        *errors.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                });
            }
        });
        if let Some(e) = errors.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok((passed.into_inner(), failed.into_inner()))
    }

    /// Probes `d` now; whether it passed (a failure is logged).
    fn probe_now(&self, d: &Descriptor) -> bool {
        match self.inner.prober.probe(d) {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(addr = %d.addr, "probe failed; node unlisted until one passes: {reason}");
                false
            }
        }
    }

    fn record(&self, d: &Descriptor, passed: bool) -> Result<()> {
        let now = self.now();
        self.store()?
            .record_probe(d, passed, now, &self.inner.config)
    }

    /// The node `identity` heartbeat: if its proof is due (older than the
    /// reprobe interval, or failed) and no heartbeat started a probe of it
    /// within a quarter of that interval, its descriptor, to probe with
    /// [`DirectoryState::refresh_proof`]. So an honest node that heartbeats
    /// keeps its proof fresh whatever the reprobe round does.
    pub fn proof_due(&self, identity: &[u8; 32]) -> Result<Option<Descriptor>> {
        let config = &self.inner.config;
        let now = self.now();
        let due = match self.store()?.proven_at(identity)? {
            None => return Ok(None),
            Some(None) => true,
            Some(Some(at)) => at.saturating_add(config.reprobe_interval) <= now,
        };
        if !due {
            return Ok(None);
        }
        {
            let mut last = self
                .inner
                .heartbeat_probed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let gap = (config.reprobe_interval / 4).max(1);
            if last
                .get(identity)
                .is_some_and(|t| t.saturating_add(gap) > now)
            {
                return Ok(None);
            }
            // Bounded: entries older than the gap are useless.
            if last.len() > 100_000 {
                last.retain(|_, t| t.saturating_add(gap) > now);
            }
            last.insert(*identity, now);
        }
        self.store()?.descriptor(identity)
    }

    /// Probes `d` (a heartbeat found its proof due) within the heartbeat
    /// probe slots and records the outcome; `false` (nothing done) when
    /// the slots are all busy.
    pub fn refresh_proof(&self, d: &Descriptor) -> Result<bool> {
        let slots = &self.inner.heartbeat_probes;
        if slots.fetch_add(1, Ordering::SeqCst) >= self.inner.config.heartbeat_probes {
            slots.fetch_sub(1, Ordering::SeqCst);
            return Ok(false);
        }
        let _slot = ProbeSlot {
            count: slots,
            prefix: None,
        };
        let ok = self.probe_now(d);
        self.record(d, ok)?;
        Ok(true)
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

    /// Records a heartbeat ([`Store::heartbeat`]); the node's identity.
    pub fn heartbeat(&self, signed: &SignedHeartbeat) -> Result<[u8; 32]> {
        let now = self.now();
        let hb = signed.verify(now, self.inner.config.max_heartbeat_age)?;
        self.store()?.heartbeat(signed, now, &self.inner.config)?;
        Ok(hb.identity)
    }

    /// Stores a failure report ([`Store::report_failure`]) from inside the
    /// directory's process (no source address).
    pub fn report_failure(&self, signed: &SignedFailureReport) -> Result<FailureOutcome> {
        self.report_failure_from(signed, None)
    }

    /// Stores a failure report that came from `source` ([`Store::report_failure`]:
    /// rate-limited and capped per source prefix).
    pub fn report_failure_from(
        &self,
        signed: &SignedFailureReport,
        source: Option<IpAddr>,
    ) -> Result<FailureOutcome> {
        let now = self.now();
        self.store()?
            .report_failure(signed, source, now, &self.inner.config)
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
        // One entry per address and key: a designer refuses a view that
        // lists one twice (admission refuses the second identity; this
        // also keeps entries stored before that out).
        let mut seen = HashSet::new();
        let nodes = rows
            .into_iter()
            .filter(|(descriptor, _, _)| match descriptor.verify_signature() {
                Ok(d) => {
                    let keys = [
                        (0u8, d.addr.to_string().into_bytes()),
                        (1, d.link.to_vec()),
                        (2, d.onion.to_vec()),
                    ];
                    let fresh = keys.iter().all(|k| !seen.contains(k));
                    if fresh {
                        seen.extend(keys);
                    } else {
                        tracing::warn!("a node shares its address or a key with another; left out of the view");
                    }
                    fresh
                }
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
