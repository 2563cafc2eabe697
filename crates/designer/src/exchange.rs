//! Messages out, replies in: the [`Router`] builds each message, the
//! [`Driver`] sends it and waits, [`Pending`] says what a reply answers,
//! and while waiting the [`LoopSchedule`] decides when loops go out and
//! when a lost loop fails the run. Receiving never sends on its own: the
//! wait loop asks the schedule at each wake-up and sends what it says.
//!
//! On top of that, the transfers ([`Exchange::download`],
//! [`Exchange::upload`], both through [`crate::plan::transfer`]) and the
//! probe of a failed cascade ([`Exchange::probe`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mixnn_proto::reply::Sealed as SealedKind;
use mixnn_proto::ParamChunk;
use mixnn_wire::{HopTag, PaddingPolicy, ReplyId};

use crate::cascade::HopInfo;
use crate::driver::Driver;
use crate::error::{BadReply, DesignerError};
use crate::misbehaviour::{Culprit, Misbehaviour, MisbehaviourKind};
use crate::plan::loops::{LoopLost, LoopSchedule, LoopStats};
use crate::plan::pending::{Await, Expected, Pending};
use crate::plan::recovery::{DetectionBound, Probe, ProbeVerdict};
use crate::plan::route::{Route, Router};
use crate::plan::transfer::{self, Download};

/// What a download fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// A stage's state, at `step`.
    State {
        /// The designer's step.
        step: u64,
    },
    /// The opening of a past step.
    Opening {
        /// The audited step.
        step: u64,
    },
    /// The opening of a test batch.
    TestOpening {
        /// The step the test ran at.
        step: u64,
        /// The test batch.
        batch: u32,
    },
}

impl Fetch {
    fn route(self, hop: usize, chunk: u32) -> Route {
        match self {
            Fetch::State { step } => Route::fetch(hop, step, chunk),
            Fetch::Opening { step } => Route::audit(hop, step, chunk),
            Fetch::TestOpening { step, batch } => Route::audit_test(hop, step, batch, chunk),
        }
    }

    fn awaits(self, hop: usize, chunk: u32) -> Await {
        match self {
            Fetch::State { .. } => Await::Chunk { hop, chunk },
            Fetch::Opening { .. } | Fetch::TestOpening { .. } => Await::Opening { hop, chunk },
        }
    }

    /// Whether `a` is an answer to a transfer of this kind.
    pub fn answered_by(self, a: Await) -> bool {
        matches!(
            (self, a),
            (Fetch::State { .. }, Await::Chunk { .. })
                | (
                    Fetch::Opening { .. } | Fetch::TestOpening { .. },
                    Await::Opening { .. }
                )
        )
    }

    fn expected(self) -> Expected {
        match self {
            Fetch::State { .. } => Expected::State,
            Fetch::Opening { .. } | Fetch::TestOpening { .. } => Expected::Opening,
        }
    }

    /// How its answers are sealed: the kind and the step they are bound to.
    fn sealed(self) -> (SealedKind, u64) {
        match self {
            Fetch::State { step } => (SealedKind::Fetch, step),
            Fetch::Opening { step } => (SealedKind::Audit, step),
            Fetch::TestOpening { step, batch } => (SealedKind::AuditTest { batch }, step),
        }
    }

    fn words(self) -> &'static str {
        match self {
            Fetch::State { .. } => "state",
            Fetch::Opening { .. } => "opening",
            Fetch::TestOpening { .. } => "test opening",
        }
    }
}

/// A download under way ([`Exchange::start_transfer`]): one
/// [`Download`] per hop, the bytes of those complete.
#[derive(Debug)]
pub struct Transfer {
    what: Fetch,
    hops: Vec<usize>,
    downloads: Vec<Download>,
    done: Vec<Option<Vec<u8>>>,
}

impl Transfer {
    /// What it fetches.
    pub fn what(&self) -> Fetch {
        self.what
    }

    /// The hops it fetches from.
    pub fn hops(&self) -> &[usize] {
        &self.hops
    }

    /// Every hop's bytes are in.
    pub fn complete(&self) -> bool {
        self.done.iter().all(Option::is_some)
    }

    /// The bytes of each hop, in the order of [`Transfer::hops`] (those
    /// complete).
    pub fn into_bytes(self) -> Vec<Vec<u8>> {
        self.done.into_iter().flatten().collect()
    }
}

/// The designer's messaging: router, driver, replies awaited, loops.
pub struct Exchange {
    driver: Driver,
    router: Router,
    pending: Pending,
    /// Relay layers to take off answers, by reply id.
    unmask: HashMap<ReplyId, Vec<(usize, HopTag)>>,
    loops: LoopSchedule,
    bound: DetectionBound,
    /// The last init loop came back: every hop has the session. Until it
    /// does, the hops after one that failed during set-up have none, so
    /// no loop from the last hop can come back.
    set_up: bool,
}

impl Exchange {
    /// Messaging over `driver` with `router`'s onions.
    pub fn new(driver: Driver, router: Router, loops: LoopSchedule, bound: DetectionBound) -> Self {
        Exchange {
            driver,
            router,
            pending: Pending::default(),
            unmask: HashMap::new(),
            loops,
            bound,
            set_up: false,
        }
    }

    /// The router (tags, keys, padding).
    pub fn router(&mut self) -> &mut Router {
        &mut self.router
    }

    /// The driver (addresses, keys).
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// The padding policy in force.
    pub fn policy(&self) -> PaddingPolicy {
        self.router.policy()
    }

    /// Loops sent, returned and lost so far.
    pub fn loop_stats(&self) -> LoopStats {
        self.loops.stats()
    }

    /// The detection bound T in force.
    pub fn bound(&self) -> Duration {
        self.bound.bound()
    }

    /// New links to `hops` (after a replacement, or at the start): replies
    /// of the old session are forgotten, loops pause until the next init.
    pub fn connect(&mut self, hops: &[HopInfo]) -> Result<(), DesignerError> {
        self.pending.clear();
        self.unmask.clear();
        self.loops.pause();
        self.router.set_hops(hops.iter().map(|h| h.addr).collect());
        self.driver.connect(hops)
    }

    /// Sends `route` with `body`; its reply answers `what`.
    pub fn send(&mut self, route: &Route, body: &[u8], what: Await) -> Result<(), DesignerError> {
        let sealed = self.router.seal(route, body)?;
        self.pending.expect(sealed.reply, what);
        if !sealed.unmask.is_empty() {
            self.unmask.insert(sealed.reply, sealed.unmask);
        }
        self.driver.send(sealed.entry, &sealed.cells)
    }

    /// Sends the init loop (sealed by `seal`) and waits for it to come
    /// back; loops run only once every hop has the session.
    pub fn init(
        &mut self,
        seal: impl FnOnce(&mut Router) -> Result<crate::plan::route::Sealed, DesignerError>,
        step: u64,
    ) -> Result<(), DesignerError> {
        self.loops.pause();
        self.set_up = false;
        let sealed = seal(&mut self.router)?;
        self.pending.expect(sealed.reply, Await::Init);
        self.driver.send(sealed.entry, &sealed.cells)?;
        self.wait(Expected::Init, step)?;
        self.set_up = true;
        self.loops.resume();
        Ok(())
    }

    /// Waits up to `timeout` for the next reply awaited; `None` when the
    /// time is up. Sends the loops due meanwhile; a lost loop fails.
    pub fn recv(
        &mut self,
        timeout: Duration,
        step: u64,
    ) -> Result<Option<(Await, Vec<u8>)>, DesignerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let bound = self.bound.bound();
            let wake = self
                .loops
                .wake(Instant::now(), bound)
                .map_or(deadline, |w| deadline.min(w));
            match self.driver.recv(wake)? {
                Some((rid, body)) => {
                    if self.loops.back(&rid) {
                        continue;
                    }
                    let layers = self.unmask.remove(&rid);
                    match self.pending.take(&rid) {
                        Some(kind) => {
                            let mut body = body;
                            if let Some(layers) = layers {
                                self.router.unmask(&layers, &mut body)?;
                            }
                            return Ok(Some((kind, body)));
                        }
                        // Late answers of an abandoned session (after a
                        // recovery) or of a probe that already timed out.
                        None => tracing::debug!("reply with an unknown id dropped"),
                    }
                }
                None if wake < deadline => self.tick(step)?,
                None => return Ok(None),
            }
        }
    }

    /// Sends the loops due now; fails if one is overdue.
    fn tick(&mut self, step: u64) -> Result<(), DesignerError> {
        let bound = self.bound.bound();
        let due =
            self.loops
                .poll(Instant::now(), bound)
                .map_err(|LoopLost| DesignerError::Timeout {
                    what: "a loop through the whole cascade",
                    step,
                    secs: bound.as_secs_f64(),
                })?;
        for _ in 0..due {
            let sealed = self
                .router
                .seal(&Route::whole_loop(self.router.hops(), step), &[])?;
            self.loops.sent(sealed.reply, Instant::now());
            self.driver.send(sealed.entry, &sealed.cells)?;
        }
        Ok(())
    }

    /// Waits for the next reply, which must answer `expected`. Every wait
    /// but the init loop's gets the detection bound T; the init loop (the
    /// links between the nodes come up as it passes) gets its own,
    /// scaled by the hops and the slowest link set-up measured
    /// ([`DetectionBound::init_bound`]).
    pub fn wait(
        &mut self,
        expected: Expected,
        step: u64,
    ) -> Result<(Await, Vec<u8>), DesignerError> {
        let timeout = match expected {
            Expected::Init => self
                .bound
                .init_bound(self.router.hops(), self.driver.slowest_connect()),
            _ => self.bound.bound(),
        };
        let started = Instant::now();
        match self.recv(timeout, step)? {
            Some((got, body)) => {
                if expected != Expected::Init {
                    self.bound.observe(started.elapsed());
                }
                if !expected.matches(got) {
                    return Err(DesignerError::UnexpectedReply { expected, got });
                }
                Ok((got, body))
            }
            None => Err(DesignerError::Timeout {
                what: expected.what(),
                step,
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Keeps only loops going for `duration` (no other traffic); fails as
    /// soon as a loop is not back within the detection bound.
    pub fn run_loops(&mut self, duration: Duration, step: u64) -> Result<LoopStats, DesignerError> {
        let end = Instant::now() + duration;
        loop {
            self.tick(step)?;
            let now = Instant::now();
            if now >= end {
                return Ok(self.loops.stats());
            }
            // recv wakes for loop times itself.
            if let Some((kind, _)) = self.recv(end - now, step)? {
                tracing::debug!("a late {kind} while only loops run");
            }
        }
    }

    /// Bytes of payload per transfer chunk.
    pub fn room(&self) -> usize {
        transfer::room(&self.router.policy())
    }

    /// The body of a fetch or audit request: empty under `uniform`
    /// padding (every message is as large as its answer anyway); under
    /// `classes`, a chunk's worth of zeros, so that the request is of the
    /// size class of the answer it asks for (a node answers a session with
    /// at most a few times what the session sent it; the hop ignores it).
    fn request_body(&self) -> Vec<u8> {
        match self.router.policy() {
            PaddingPolicy::Uniform { .. } => Vec::new(),
            PaddingPolicy::Classes { .. } => vec![0; self.room()],
        }
    }

    /// Downloads `what` from each of `hops` at once, in chunks, each at
    /// most the bytes `max_total` gives it; the bytes of each, in the
    /// order of `hops`.
    pub fn download(
        &mut self,
        hops: &[usize],
        max_total: &[usize],
        what: Fetch,
        step: u64,
    ) -> Result<Vec<Vec<u8>>, DesignerError> {
        let mut t = self.start_transfer(hops, max_total, what)?;
        while !t.complete() {
            let got = self
                .wait(what.expected(), step)
                .and_then(|(got, body)| self.on_transfer_reply(&mut t, got, &body));
            if let Err(e) = got {
                // The other hops' answers still on their way would be
                // taken for answers to the next transfer.
                self.forget(|a| what.answered_by(a));
                return Err(e);
            }
        }
        Ok(t.into_bytes())
    }

    /// Starts downloading `what` from each of `hops` (at most `max_total`
    /// bytes each) without waiting: feed its replies to
    /// [`Exchange::on_transfer_reply`] as they come, between others.
    pub fn start_transfer(
        &mut self,
        hops: &[usize],
        max_total: &[usize],
        what: Fetch,
    ) -> Result<Transfer, DesignerError> {
        let room = self.room();
        let t = Transfer {
            what,
            hops: hops.to_vec(),
            downloads: hops
                .iter()
                .zip(max_total)
                .map(|(&j, &max)| Download::new(j, room, max))
                .collect(),
            done: vec![None; hops.len()],
        };
        let body = self.request_body();
        for &j in hops {
            self.send(&what.route(j, 0), &body, what.awaits(j, 0))?;
        }
        Ok(t)
    }

    /// A reply (`got`, `body`) to transfer `t`: opens and records the
    /// chunk, and asks for the chunks it announces.
    pub fn on_transfer_reply(
        &mut self,
        t: &mut Transfer,
        got: Await,
        body: &[u8],
    ) -> Result<(), DesignerError> {
        let what = t.what;
        let (Await::Chunk { hop, chunk } | Await::Opening { hop, chunk }) = got else {
            return Err(DesignerError::UnexpectedReply {
                expected: what.expected(),
                got,
            });
        };
        if what.awaits(hop, chunk) != got {
            return Err(DesignerError::UnexpectedReply {
                expected: what.expected(),
                got,
            });
        }
        let at = t
            .hops
            .iter()
            .position(|j| *j == hop)
            .ok_or(BadReply::Chunk { hop, chunk })?;
        let (kind, at_step) = what.sealed();
        let found = |culprit, reason: String| {
            DesignerError::Misbehaved(Misbehaviour::new(
                culprit,
                at_step,
                MisbehaviourKind::Malformed,
                reason,
            ))
        };
        // A body that does not open may have been changed by a hop that
        // relayed it (the first hop relays none: it is its own); one that
        // opens is the hop's own.
        let words = what.words();
        let body = self
            .router
            .open_body(hop, kind, at_step, chunk, body)
            .map_err(|_| {
                found(
                    if hop == 0 {
                        Culprit::Hop(0)
                    } else {
                        Culprit::Route { hop }
                    },
                    format!("chunk {chunk} of hop {hop}'s {words} does not open (changed by it or on its way)"),
                )
            })?;
        let piece = ParamChunk::decode(&body).map_err(|e| {
            found(
                Culprit::Hop(hop),
                format!("chunk {chunk} of its {words}: {e}"),
            )
        })?;
        let complete = t.downloads[at]
            .on_chunk(chunk, piece)
            .map_err(|e| found(Culprit::Hop(hop), format!("its {words}: {e}")))?;
        let requests = t.downloads[at].take_requests();
        if !requests.is_empty() {
            let body = self.request_body();
            for k in requests {
                self.send(&what.route(hop, k), &body, what.awaits(hop, k))?;
            }
        }
        if let Some(bytes) = complete {
            t.done[at] = Some(bytes);
        }
        Ok(())
    }

    /// Forgets every reply awaited that `abandoned` names (a transfer
    /// given up): they are dropped when they come.
    pub fn forget(&mut self, abandoned: impl Fn(Await) -> bool) {
        for rid in self.pending.forget(abandoned) {
            self.unmask.remove(&rid);
        }
    }

    /// Loads `bytes` into each `(hop, bytes)`, in chunks, at `step`;
    /// returns once every chunk is acknowledged.
    pub fn upload(&mut self, loads: &[(usize, Vec<u8>)], step: u64) -> Result<(), DesignerError> {
        let room = self.room();
        let mut expected = 0usize;
        for (j, bytes) in loads {
            for (k, chunk) in transfer::upload(bytes, room).into_iter().enumerate() {
                let k = k as u32;
                let what = Await::Loaded { hop: *j, chunk: k };
                let sealed =
                    self.router
                        .seal_body(*j, SealedKind::Load, step, k, &chunk.encode())?;
                self.send(&Route::load(*j, step, k), &sealed, what)?;
                expected += 1;
            }
        }
        for _ in 0..expected {
            self.wait(Expected::Load, step)?;
        }
        Ok(())
    }

    /// Ends the session on all `n` hops at `step`: a close through every
    /// hop (each drops its session and frees what it held), acknowledged
    /// by the last. Loops stop first.
    pub fn close(&mut self, n: usize, step: u64) -> Result<(), DesignerError> {
        self.loops.pause();
        self.send(&Route::close(n, step), &[], Await::Closed)?;
        self.wait(Expected::Close, step).map(|_| ())
    }

    /// Which of the cascade's `n` hops failed ([`Probe`]): loops from the
    /// first hop through the first 1, 2, … n hops and from the last hop
    /// through the last 1, 2, … n; waits for them within the bound.
    /// Replies awaited are forgotten and loops pause (a new session
    /// follows).
    pub fn probe(&mut self, n: usize, step: u64) -> ProbeVerdict {
        self.pending.clear();
        self.unmask.clear();
        self.loops.pause();
        let mut probe = Probe::new(n);
        // Before the session is set up, loops from the last hop cannot
        // tell anything: the first hop that the loops from the first one
        // do not pass is the failed one.
        let from_last = self.set_up && n > 1;
        if !from_last {
            for j in 0..n {
                probe.back_from_last(j);
            }
        }
        for j in 0..n {
            if self
                .send(&Route::probe(j, step), &[], Await::Probe(j))
                .is_err()
            {
                return ProbeVerdict::Dead(0);
            }
            if from_last
                && self
                    .send(
                        &Route::probe_from_last(j, n, step),
                        &[],
                        Await::ProbeFromLast(j),
                    )
                    .is_err()
            {
                return ProbeVerdict::Dead(n - 1);
            }
        }
        let deadline = Instant::now() + self.bound.bound();
        while !probe.all_back() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left, step) {
                Ok(Some((Await::Probe(j), _))) => {
                    probe.back(j);
                }
                Ok(Some((Await::ProbeFromLast(j), _))) => probe.back_from_last(j),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if from_last {
            probe.verdict()
        } else {
            probe.verdict_from_first()
        }
    }
}
