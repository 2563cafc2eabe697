//! Constant-rate links (`--link-rate R`): each outbound link
//! sends exactly one whole message per tick of period 1/R — the oldest
//! queued message if there is one, else a cover message — so that a link
//! observer sees the same gaps whether the link carries training, tests,
//! loops or nothing at all.
//!
//! A cover message is [`CellKind::Cover`](mixnn_wire::CellKind::Cover)
//! (inside the link encryption, random content; receivers drop it) and has
//! the cell count this link's real messages have most often
//! ([`CellCounts`]). Messages are never split, reordered or dropped: a
//! link whose queue grows past its bound (the traffic wants more than R
//! messages a second) logs an error once and keeps sending them all, in
//! order, at R a second.
//!
//! Nodes pace their links to other nodes (`mixnn node --link-rate R`); the
//! designer paces its links into the cascade
//! (`mixnn train --cascade … --link-rate R`).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use mixnn_wire::{encode_cover, PaddingPolicy, WireError, CELL_SIZE, FIRST_CELL_BODY};
use rand_chacha::ChaCha8Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

/// The cell counts of the messages a node has sent, and the most common
/// one (what its cover messages use).
#[derive(Debug, Default)]
pub struct CellCounts {
    counts: std::sync::Mutex<Vec<u64>>,
    mode: AtomicUsize,
}

impl CellCounts {
    /// Records one sent message of `cells` cells.
    pub fn record(&self, cells: usize) {
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        if counts.len() <= cells {
            counts.resize(cells + 1, 0);
        }
        counts[cells] += 1;
        // Ties go to the larger count of cells.
        let mode = counts
            .iter()
            .enumerate()
            .max_by_key(|(c, n)| (**n, *c))
            .map_or(0, |(c, _)| c);
        self.mode.store(mode, Ordering::Relaxed);
    }

    /// The most common cell count so far; 0 before any message.
    pub fn mode(&self) -> usize {
        self.mode.load(Ordering::Relaxed)
    }
}

/// One cover message of `cells` cells (at least 1): random header, notes,
/// body and padding.
pub fn cover_message<R: RngCore + CryptoRng>(
    cells: usize,
    rng: &mut R,
) -> Result<Vec<u8>, WireError> {
    let policy = PaddingPolicy::Uniform {
        max_body: FIRST_CELL_BODY + cells.saturating_sub(1) * CELL_SIZE,
    };
    encode_cover(0, &policy, rng)
}

/// Messages a paced link holds before it reports that its rate is too
/// low for its traffic (it still sends them all).
pub const DEFAULT_QUEUE_BOUND: usize = 1024;

/// Events per second: positive and finite. Something that may be off (loops,
/// cover, pacing) is an `Option<Rate>`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Rate(f64);

impl Rate {
    /// `per_second` events a second; `None` unless positive and finite.
    pub fn new(per_second: f64) -> Option<Rate> {
        (per_second > 0.0 && per_second.is_finite()).then_some(Rate(per_second))
    }

    /// A rate from a command line where 0 turns the feature off: `Ok(None)`
    /// for 0, `Err` for a negative or non-finite number.
    pub fn or_off(per_second: f64) -> Result<Option<Rate>, String> {
        if per_second == 0.0 {
            return Ok(None);
        }
        Rate::new(per_second).map(Some).ok_or_else(|| {
            format!("{per_second} is not a rate (a number of events per second, 0 or more)")
        })
    }

    /// Events per second.
    pub fn per_second(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The gap to the next event of a Poisson process of `rate` events per
/// second; `None` for a rate of 0 (or not a positive finite number).
pub fn poisson_gap(rate: f64, rng: &mut impl RngCore) -> Option<Duration> {
    if !(rate > 0.0 && rate.is_finite()) {
        return None;
    }
    // u in (0, 1]: 53 random bits, never 0.
    let u = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    Some(Duration::from_secs_f64(-u.ln() / rate))
}

/// The tick period for `rate` messages per second; `None` for 0 (not
/// paced) or a rate that is not a positive finite number.
pub fn period(rate: f64) -> Option<Duration> {
    if !(rate > 0.0 && rate.is_finite()) {
        return None;
    }
    Duration::try_from_secs_f64(1.0 / rate)
        .ok()
        .filter(|p| !p.is_zero())
}

/// How a link is paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkPace {
    /// One message per period.
    pub period: Duration,
    /// Each message leaves at a uniformly random offset in
    /// `[0, jitter × period)` after its tick, in whole milliseconds (0: on
    /// the tick; at most 1, so that a message never leaves in the next
    /// message's slot; no effect below 2 ms).
    pub jitter: f64,
    /// Queued messages past which an error is logged (once).
    pub bound: usize,
}

impl LinkPace {
    /// The pacing of `rate` messages per second with `jitter` (clamped to
    /// `[0, 1]`); `None` for a rate of 0 (not paced).
    pub fn new(rate: f64, jitter: f64) -> Option<LinkPace> {
        Some(LinkPace {
            period: period(rate)?,
            jitter: if jitter.is_finite() {
                jitter.clamp(0.0, 1.0)
            } else {
                0.0
            },
            bound: DEFAULT_QUEUE_BOUND,
        })
    }
}

/// What one tick of a paced link sends.
#[derive(Debug, PartialEq, Eq)]
pub enum Paced<T = Vec<u8>> {
    /// The oldest queued message.
    Real(T),
    /// A cover message (no real message was queued).
    Cover(Vec<u8>),
}

impl<T: AsRef<[u8]>> Paced<T> {
    /// The cells to write.
    pub fn cells(&self) -> &[u8] {
        match self {
            Paced::Real(c) => c.as_ref(),
            Paced::Cover(c) => c,
        }
    }
}

/// What [`PacedQueue::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken<T> {
    /// The oldest queued message.
    Item(T),
    /// Nothing queued now.
    Empty,
    /// Nothing queued, and nothing will be: the link is done.
    Closed,
}

/// Where a paced link takes its messages from, one per tick: a channel,
/// or a queue its owner can also trim (a node sheds a session's queued
/// messages when its memory budget is reached).
pub trait PacedQueue {
    /// A message: whole cells.
    type Item: AsRef<[u8]>;
    /// Takes the oldest queued message.
    fn take(&mut self) -> Taken<Self::Item>;
    /// Messages queued.
    fn len(&self) -> usize;
    /// Whether none is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PacedQueue for mpsc::UnboundedReceiver<Vec<u8>> {
    type Item = Vec<u8>;

    fn take(&mut self) -> Taken<Vec<u8>> {
        match self.try_recv() {
            Ok(cells) => Taken::Item(cells),
            Err(mpsc::error::TryRecvError::Empty) => Taken::Empty,
            Err(mpsc::error::TryRecvError::Disconnected) => Taken::Closed,
        }
    }

    fn len(&self) -> usize {
        mpsc::UnboundedReceiver::len(self)
    }
}

/// The schedule of one paced link: call [`Pacer::next`] and write what it
/// returns, in a loop. Messages stay in their [`PacedQueue`] until their
/// tick.
pub struct Pacer<Q: PacedQueue = mpsc::UnboundedReceiver<Vec<u8>>> {
    addr: SocketAddr,
    interval: Interval,
    jitter: f64,
    rx: Q,
    closed: bool,
    bound: usize,
    overloaded: bool,
    counts: CellCounts,
    /// The next cover message, made before the tick so that a cover and a
    /// real message leave equally soon after it.
    spare: Option<Vec<u8>>,
    rng: ChaCha8Rng,
    covers: u64,
    reals: u64,
}

impl<Q: PacedQueue> Pacer<Q> {
    /// Paces the messages from `rx` (whole messages, in order) on the link
    /// to `addr` as `pace` says; the first tick is now. `seed` seeds the
    /// offsets and the cover content.
    pub fn new(addr: SocketAddr, pace: LinkPace, rx: Q, seed: [u8; 32]) -> Pacer<Q> {
        let mut interval = tokio::time::interval(pace.period);
        // What a late tick does (the runtime was busy, or the previous
        // write blocked on a full socket) decides the gaps the observer
        // sees under load — and load is what training adds:
        // * Burst would send the missed ticks back to back to catch up:
        //   a run of near-zero gaps right after every stall, more of them
        //   the busier the node, i.e. exactly during training.
        // * Delay restarts the period from the late tick: every stall
        //   lengthens the mean gap, so the rate itself drops under load.
        // * Skip keeps the grid start + k/R and drops the slots that have
        //   passed: never two messages for one slot, the long-run rate is
        //   R whatever the load, and a stall shows only as one gap that is
        //   a whole number of periods (then the grid goes on).
        // Skip therefore keeps the gaps most regular. (Tokio still catches
        // up ticks less than 5 ms late one by one — its timer tolerance —
        // so at R above 200/s a stall under 5 ms gives a few short gaps.)
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Pacer {
            addr,
            interval,
            jitter: pace.jitter,
            rx,
            closed: false,
            bound: pace.bound,
            overloaded: false,
            counts: CellCounts::default(),
            spare: None,
            rng: ChaCha8Rng::from_seed(seed),
            covers: 0,
            reals: 0,
        }
    }

    /// Waits for the next tick and returns the message to send on it;
    /// `None` once the sender side has closed and every queued message
    /// has been returned.
    pub async fn next(&mut self) -> Option<Paced<Q::Item>> {
        loop {
            self.make_spare();
            if self.closed {
                return None;
            }
            self.interval.tick().await;
            self.offset().await;
            self.check_bound();
            if let Some(cells) = self.take() {
                self.reals += 1;
                return Some(Paced::Real(cells));
            }
            if self.closed {
                return None;
            }
            if let Some(cells) = self.cover() {
                self.covers += 1;
                return Some(Paced::Cover(cells));
            }
            // No message on this link yet, so no cell count to copy: the
            // tick stays empty (a link opens with a real message, so this
            // does not happen in a node).
        }
    }

    /// Waits the tick's random offset (see [`LinkPace::jitter`]): whole
    /// milliseconds, the timer's resolution, so that rounding never moves
    /// a message into the next slot.
    async fn offset(&mut self) {
        let slots = (self.interval.period().as_secs_f64() * 1e3 * self.jitter) as u64;
        if slots > 1 {
            let ms = self.rng.next_u64() % slots;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Real messages still queued (not yet returned by [`Pacer::next`]).
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Whether the queue has ever been past its bound.
    pub fn overloaded(&self) -> bool {
        self.overloaded
    }

    /// Real and cover messages returned so far.
    pub fn sent(&self) -> (u64, u64) {
        (self.reals, self.covers)
    }

    /// The oldest queued message, recording its cell count; marks the
    /// link done when its queue has closed.
    fn take(&mut self) -> Option<Q::Item> {
        match self.rx.take() {
            Taken::Item(cells) => {
                self.counts.record(cells.as_ref().len() / CELL_SIZE);
                Some(cells)
            }
            Taken::Empty => None,
            Taken::Closed => {
                self.closed = true;
                None
            }
        }
    }

    /// Logs (once) a queue past its bound.
    fn check_bound(&mut self) {
        let queued = self.rx.len();
        if queued > self.bound && !self.overloaded {
            self.overloaded = true;
            tracing::error!(
                "link to {}: {} messages queued, more than {}: the traffic wants more than \
                 the link rate of {:.1} messages/s; every message is still sent, in order, \
                 late (raise --link-rate)",
                crate::alias::peer(&self.addr),
                queued,
                self.bound,
                1.0 / self.interval.period().as_secs_f64(),
            );
        }
    }

    /// Prepares the next cover message if none is ready.
    fn make_spare(&mut self) {
        let cells = self.counts.mode();
        if cells == 0
            || self
                .spare
                .as_ref()
                .is_some_and(|s| s.len() == cells * CELL_SIZE)
        {
            return;
        }
        self.spare = match cover_message(cells, &mut self.rng) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!("link to {}: cover: {e}", crate::alias::peer(&self.addr));
                None
            }
        };
    }

    /// A cover message of this link's usual cell count.
    fn cover(&mut self) -> Option<Vec<u8>> {
        self.make_spare();
        self.spare.take()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    use mixnn_wire::{decode_cells, CellKind, PaddingPolicy, FIRST_CELL_BODY};
    use tokio::time::Instant;

    #[test]
    fn poisson_gaps_have_the_rates_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let n = 20_000;
        let total: f64 = (0..n)
            .map(|_| poisson_gap(5.0, &mut rng).unwrap().as_secs_f64())
            .sum();
        let mean = total / f64::from(n);
        assert!((mean - 0.2).abs() < 0.01, "mean gap {mean}");
        assert!(poisson_gap(0.0, &mut rng).is_none());
        assert!(poisson_gap(f64::NAN, &mut rng).is_none());
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn pace(rate: f64, jitter: f64, bound: usize) -> LinkPace {
        LinkPace {
            bound,
            ..LinkPace::new(rate, jitter).unwrap()
        }
    }

    /// A "real" message of `cells` cells, every byte `b`.
    fn real(cells: usize, b: u8) -> Vec<u8> {
        vec![b; cells * CELL_SIZE]
    }

    fn is_cover(cells: &[u8], n: usize) -> bool {
        let policy = PaddingPolicy::Uniform {
            max_body: FIRST_CELL_BODY + (n - 1) * CELL_SIZE,
        };
        let msg = decode_cells(cells, &policy).unwrap();
        msg.kind == CellKind::Cover && msg.cells == n
    }

    #[test]
    fn periods() {
        assert_eq!(period(100.0), Some(Duration::from_millis(10)));
        assert_eq!(period(0.0), None);
        assert_eq!(period(-1.0), None);
        assert_eq!(period(f64::NAN), None);
        assert_eq!(period(f64::INFINITY), None);
        assert_eq!(LinkPace::new(0.0, 1.0), None);
        assert_eq!(LinkPace::new(10.0, 7.0).unwrap().jitter, 1.0);
        assert_eq!(LinkPace::new(10.0, -1.0).unwrap().jitter, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_jitter_each_message_leaves_inside_its_own_slot() {
        let (tx, rx) = mpsc::unbounded_channel();
        for b in 0..50 {
            tx.send(real(1, b)).unwrap();
        }
        let start = Instant::now();
        let mut pacer = Pacer::new(addr(), pace(100.0, 1.0, DEFAULT_QUEUE_BOUND), rx, [3; 32]);
        let mut offsets = Vec::new();
        for b in 0..60u8 {
            let got = pacer.next().await.unwrap();
            if b < 50 {
                assert_eq!(got, Paced::Real(real(1, b)));
            } else {
                assert!(matches!(got, Paced::Cover(_)));
            }
            let at = (Instant::now() - start).as_micros();
            let slot = 10_000 * u128::from(b);
            assert!(
                (slot..slot + 10_000).contains(&at),
                "message {b} at {at} µs"
            );
            offsets.push(at - slot);
        }
        // The offsets are spread over the slot, not all on the tick.
        let early = offsets.iter().filter(|o| **o < 5_000).count();
        assert!((15..=45).contains(&early), "{offsets:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_message_per_tick_in_order_and_covers_fill_empty_ticks() {
        let (tx, rx) = mpsc::unbounded_channel();
        for b in 0..5 {
            tx.send(real(4, b)).unwrap();
        }
        let start = Instant::now();
        let mut pacer = Pacer::new(addr(), pace(100.0, 0.0, DEFAULT_QUEUE_BOUND), rx, [7; 32]);
        let tick = Duration::from_millis(10);
        // The burst: one message per tick, in order.
        for b in 0..5u8 {
            let got = pacer.next().await.unwrap();
            assert_eq!(got, Paced::Real(real(4, b)));
            assert_eq!(Instant::now() - start, tick * u32::from(b));
        }
        // Empty ticks: covers of the link's cell count, still one a tick.
        for k in 5..8u32 {
            let got = pacer.next().await.unwrap();
            let Paced::Cover(cells) = got else {
                panic!("expected a cover on tick {k}")
            };
            assert!(is_cover(&cells, 4));
            assert_eq!(Instant::now() - start, tick * k);
        }
        // A message queued between ticks leaves on the next tick, not
        // before.
        tokio::time::sleep(Duration::from_millis(3)).await;
        tx.send(real(4, 9)).unwrap();
        assert_eq!(pacer.next().await.unwrap(), Paced::Real(real(4, 9)));
        assert_eq!(Instant::now() - start, tick * 8);
        assert_eq!(pacer.sent(), (6, 3));
        assert!(!pacer.overloaded());
        // Closing: what is queued still leaves, then the pacer ends.
        tx.send(real(4, 10)).unwrap();
        drop(tx);
        assert_eq!(pacer.next().await.unwrap(), Paced::Real(real(4, 10)));
        assert_eq!(pacer.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_is_skipped_not_made_up_in_a_burst() {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(real(1, 1)).unwrap();
        let start = Instant::now();
        let mut pacer = Pacer::new(addr(), pace(100.0, 0.0, 8), rx, [1; 32]);
        assert!(matches!(pacer.next().await, Some(Paced::Real(_))));
        // The writer stalls for 35 ms (3.5 periods).
        tokio::time::sleep(Duration::from_millis(35)).await;
        for b in 0..3 {
            tx.send(real(1, b)).unwrap();
        }
        // The tick due at 10 ms fires late, at once; the next ones are on
        // the grid again (40, 50 ms): no catch-up burst for 20 and 30 ms.
        let mut at = Vec::new();
        for _ in 0..3 {
            assert!(matches!(pacer.next().await, Some(Paced::Real(_))));
            at.push((Instant::now() - start).as_millis());
        }
        assert_eq!(at, [35, 40, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_an_error_is_logged_once_and_nothing_is_dropped() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut pacer = Pacer::new(addr(), pace(1000.0, 0.0, 3), rx, [2; 32]);
        for b in 0..10 {
            tx.send(real(2, b)).unwrap();
        }
        assert_eq!(pacer.queued(), 10);
        for b in 0..10u8 {
            assert_eq!(pacer.next().await.unwrap(), Paced::Real(real(2, b)));
            assert!(pacer.overloaded());
        }
        assert_eq!(pacer.queued(), 0);
        let Some(Paced::Cover(c)) = pacer.next().await else {
            panic!("expected a cover")
        };
        assert!(is_cover(&c, 2));
    }

    #[test]
    fn cover_takes_the_most_common_cell_count() {
        let c = CellCounts::default();
        assert_eq!(c.mode(), 0);
        c.record(4);
        c.record(1);
        c.record(4);
        assert_eq!(c.mode(), 4);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for cells in [1, 4] {
            let m = cover_message(cells, &mut rng).unwrap();
            assert_eq!(m.len(), cells * CELL_SIZE);
            let policy = PaddingPolicy::Uniform {
                max_body: FIRST_CELL_BODY + (cells - 1) * CELL_SIZE,
            };
            let msg = decode_cells(&m, &policy).unwrap();
            assert_eq!(msg.kind, CellKind::Cover);
            assert_eq!(msg.cells, cells);
        }
    }
}
