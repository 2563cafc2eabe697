//! [`CascadeRunner`]: the designer side of a training run over a cascade.
//!
//! Per step the designer builds two onions: a forward onion for the remote
//! hops in order (the last delivers the loss to the designer) and a
//! backward onion in reverse order (the first remote hop tells the designer
//! the step is done). It sends the backward onion to the last hop right
//! away, so the loss stage starts backward as soon as its forward is done,
//! and keeps up to `window` steps in flight: hops act on a step only after
//! applying the one before, so pipelining changes timing, never results.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mixnn_model::spec::{ModelSpec, StageSpec};
use mixnn_model::stage::{Stage, StageCache};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{
    argmax_slice, micro_ranges, stage_seed, Batch, EpochMetrics, StepRunner, TrainConfig,
};
use mixnn_model::weights::StageParams;
use mixnn_net::pacing::LinkPace;
use mixnn_net::{recv_message, Link, LinkConfig, LinkKeypair, LinkListener, PublicLinkKey};
use mixnn_proto::{InitNote, StepNote};
use mixnn_wire::{
    encode_cells, wrap_init, CellKind, DesignerSession, HopAddr, HopLayer, HopTag, Next,
    OnionPublic, Op, PaddingPolicy, ReplyId, RoutingBlock, CELL_SIZE,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use crate::cascade::HopInfo;
use crate::error::DesignerError;

mod audit;
mod loops;
mod out;
mod recovery;
pub use audit::{AuditFailure, AuditStats};
pub use loops::LoopStats;
pub use recovery::{Replacements, Spares};

/// How the designer runs a cascade.
#[derive(Debug, Clone)]
pub struct CascadeOptions {
    /// Run the first stage in the designer process (paper §5.2).
    pub keep_first: bool,
    /// Run the last stage in the designer process (paper §5.1).
    pub keep_last: bool,
    /// Training steps in flight at once.
    pub window: usize,
    /// Time bound T on any answer from the cascade.
    pub timeout: Duration,
    /// Pad every message to the cascade's largest (true, the paper's
    /// rule) or to power-of-two size classes (false).
    pub uniform_padding: bool,
    /// Address the designer listens on for deliveries.
    pub listen: SocketAddr,
    /// Positions (in the cascade's hop list) of dummy hops: they run an
    /// identity stage, see and send the same cells as real hops, and
    /// change nothing in the result (paper §2.2).
    pub dummies: Vec<usize>,
    /// Loops per second (Poisson) the designer sends through the whole
    /// cascade and back while it runs; 0 sends none. A loop not back within
    /// the detection bound fails the run (see `runner/loops.rs`).
    pub loop_rate: f64,
    /// Probability that the designer audits a given hop (with parameters)
    /// for a given step; 0 turns commitments and audits off (see
    /// `runner/audit.rs`). Needs one micro-batch per step.
    pub audit_rate: f64,
    /// Seed of the audit draws, for tests; `None` (the default) draws it
    /// from the OS, so that no node can predict which steps are audited.
    pub audit_seed: Option<u64>,
    /// Constant-rate links: messages per second on each of the designer's
    /// links into the cascade (to the first and the last hop), one whole
    /// message per tick, cover on empty ticks
    /// ([`mixnn_net::pacing`]); 0 sends each message at once.
    pub link_rate: f64,
    /// Random offset of each paced message within its slot, as a fraction
    /// of the period ([`mixnn_net::pacing::LinkPace::jitter`]).
    pub link_jitter: f64,
}

impl Default for CascadeOptions {
    fn default() -> Self {
        CascadeOptions {
            keep_first: false,
            keep_last: false,
            window: 4,
            timeout: Duration::from_secs(10),
            uniform_padding: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dummies: Vec::new(),
            loop_rate: 0.0,
            audit_rate: 0.0,
            audit_seed: None,
            link_rate: 0.0,
            link_jitter: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Await {
    Init,
    /// The loss (or, with a kept last stage, the output) of micro-batch
    /// `.1` of step `.0`.
    Output(u64, u16),
    /// The end of backward of micro-batch `.1` of step `.0`.
    Done(u64, u16),
    /// The output of micro-batch `.1` of test batch `.0`.
    Test(usize, u16),
    /// Chunk `.1` of the state of remote hop `.0`.
    Chunk(usize, u32),
    /// Remote hop `.0` loaded chunk `.1` of a state.
    Loaded(usize, u32),
    /// A loop through the hops up to `.0` came back.
    Probe(usize),
    /// Chunk `.1` of an audit opening from remote hop `.0`.
    Opening(usize, u32),
}

/// Progress of one training step in flight.
struct StepProgress {
    /// Loss of each micro-batch, once known.
    losses: Vec<Option<f32>>,
    /// Micro-batches whose backward has come back.
    done: usize,
}

/// Drives a cascade of remote stages (and optionally kept local ones).
pub struct CascadeRunner {
    rt: Runtime,
    key: LinkKeypair,
    link_config: LinkConfig,
    allowed: Arc<Mutex<Vec<[u8; 32]>>>,
    hops: Vec<HopInfo>,
    me: HopAddr,
    /// The session's hop keys (set by the init loop).
    session: Option<DesignerSession>,
    first_link: out::OutLink,
    last_link: out::OutLink,
    replies: mpsc::UnboundedReceiver<([u8; 16], Vec<u8>)>,
    pending: HashMap<[u8; 16], Await>,
    policy: PaddingPolicy,
    rng: ChaCha8Rng,
    step: u64,
    local_first: Option<Stage>,
    local_last: Option<Stage>,
    /// What each hop runs: the model stage's index and description, or
    /// no index for a dummy hop (an identity stage).
    remote: Vec<(Option<usize>, StageSpec)>,
    /// The hop that runs the loss stage, if remote.
    loss_hop: Option<usize>,
    input_features: usize,
    tags: HashMap<(u64, u16), Vec<HopTag>>,
    micro_batches: usize,
    cfg: TrainConfig,
    opts: CascadeOptions,
    recovery: recovery::State,
    loops: loops::Loops,
    audit: audit::Audits,
}

/// Inserts identity stages at the hop positions `dummies` among the
/// `real` remote stages.
fn with_dummies(
    real: Vec<(Option<usize>, StageSpec)>,
    dummies: &[usize],
) -> Result<Vec<(Option<usize>, StageSpec)>, DesignerError> {
    let n = real.len() + dummies.len();
    let mut sorted = dummies.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != dummies.len() || sorted.last().is_some_and(|d| *d >= n) {
        return Err(DesignerError::Config {
            message: format!("dummy positions {dummies:?} for a cascade of {n} hops"),
        });
    }
    let mut real = real.into_iter().peekable();
    let mut out: Vec<(Option<usize>, StageSpec)> = Vec::with_capacity(n);
    for k in 0..n {
        if sorted.contains(&k) {
            let width = match out.last() {
                Some((_, prev)) => prev.output(),
                None => real.peek().map_or(1, |(_, s)| s.input),
            };
            out.push((
                None,
                StageSpec {
                    input: width,
                    ops: vec![mixnn_model::spec::OpSpec::Identity],
                },
            ));
        } else if let Some(r) = real.next() {
            out.push(r);
        }
    }
    Ok(out)
}

fn link_err(addr: SocketAddr) -> impl Fn(mixnn_net::NetError) -> DesignerError {
    move |source| DesignerError::Link { addr, source }
}

impl CascadeRunner {
    /// Connects to the hops, initialises their stages and returns a runner.
    /// `hops` must have one entry per remote stage of `model`.
    pub fn connect(
        model: &ModelSpec,
        hops: Vec<HopInfo>,
        cfg: &TrainConfig,
        opts: CascadeOptions,
    ) -> Result<Self, DesignerError> {
        let n = model.stages.len();
        let lo = usize::from(opts.keep_first);
        let hi = n - usize::from(opts.keep_last);
        if lo >= hi {
            return Err(DesignerError::Config {
                message: "no stage left to run remotely".into(),
            });
        }
        let real: Vec<(Option<usize>, StageSpec)> = model
            .stages
            .iter()
            .cloned()
            .enumerate()
            .take(hi)
            .skip(lo)
            .map(|(i, s)| (Some(i), s))
            .collect();
        if hops.len() != real.len() + opts.dummies.len() {
            return Err(DesignerError::Config {
                message: format!(
                    "{} remote stages and {} dummies but the cascade lists {} hops",
                    real.len(),
                    opts.dummies.len(),
                    hops.len()
                ),
            });
        }
        let remote = with_dummies(real, &opts.dummies)?;
        if let Some(c) = model.classes() {
            if c > usize::from(u16::MAX) {
                return Err(DesignerError::Config {
                    message: format!("{c} classes do not fit the label encoding"),
                });
            }
        }
        // Paced links need their ticks on time while this thread builds
        // onions: one worker thread runs the runtime's tasks then.
        let pace = LinkPace::new(opts.link_rate, opts.link_jitter);
        let rt = if pace.is_some() {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .map_err(|e| DesignerError::Config {
            message: format!("cannot start the runtime: {e}"),
        })?;
        let mut rng = ChaCha8Rng::from_seed({
            let mut s = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut s);
            s
        });
        let key = LinkKeypair::generate(&mut rng);
        let loop_seed = rng.next_u64();
        let audit_seed = opts.audit_seed.unwrap_or_else(|| rng.next_u64());
        let audits = audit::Audits::new(model, opts.audit_rate, cfg.micro_batches, audit_seed)?;
        let link_config = mixnn_node::link_config().map_err(|e| DesignerError::Config {
            message: e.to_string(),
        })?;

        // Largest body of the cascade: inputs, activations, gradients of
        // one micro-batch (batches, test ones too, travel in micro-batches).
        let micro_batches = cfg.micro_batches.clamp(1, usize::from(u16::MAX));
        let b = cfg.batch.div_ceil(micro_batches).max(1);
        let tensor = |features: usize| 2 + 8 + b * features * 4;
        let first_remote = &remote[0].1;
        let mut max_body = if opts.keep_first {
            tensor(first_remote.input)
        } else {
            2 + 8 + b * first_remote.input
        };
        for (k, (_, s)) in remote.iter().enumerate() {
            max_body = max_body.max(tensor(s.output()));
            if k > 0 {
                max_body = max_body.max(tensor(s.input));
            }
        }
        // Forward and backward bodies carry the commitment trailer.
        if audits.on() {
            max_body += mixnn_proto::audit::TRAILER_LEN;
        }
        let policy = if opts.uniform_padding {
            PaddingPolicy::Uniform { max_body }
        } else {
            PaddingPolicy::Classes { max_body }
        };

        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (listener, me) = rt.block_on(async {
            let l = LinkListener::bind(opts.listen, key.clone(), link_config)
                .await
                .map_err(DesignerError::Listen)?;
            let addr = l.local_addr().map_err(DesignerError::Listen)?;
            Ok::<_, DesignerError>((l, addr))
        })?;
        let allowed = Arc::new(Mutex::new(Vec::new()));
        rt.spawn(accept_loop(listener, reply_tx, allowed.clone()));

        let local_first = opts
            .keep_first
            .then(|| Stage::new(&model.stages[0], stage_seed(cfg.seed, 0), cfg.sgd));
        let local_last = opts
            .keep_last
            .then(|| Stage::new(&model.stages[n - 1], stage_seed(cfg.seed, n - 1), cfg.sgd));
        let (first_link, last_link) =
            Self::open_links(&rt, &key, link_config, &allowed, &hops, pace, &mut rng)?;
        let mut runner = CascadeRunner {
            rt,
            key,
            link_config,
            allowed,
            me: HopAddr(me),
            session: None,
            first_link,
            last_link,
            replies,
            pending: HashMap::new(),
            policy,
            rng,
            step: 0,
            local_first,
            local_last,
            loss_hop: remote.iter().position(|(_, s)| s.is_loss()),
            remote,
            input_features: model.input,
            tags: HashMap::new(),
            micro_batches,
            cfg: *cfg,
            recovery: recovery::State::new(model),
            loops: loops::Loops::new(opts.loop_rate, loop_seed),
            audit: audits,
            hops,
            opts,
        };
        runner.init()?;
        tracing::info!(hops = runner.hops.len(), "cascade initialised");
        Ok(runner)
    }

    /// Opens links to the first and last hops of `hops` (paced as `pace`
    /// says), allowing all of them to connect back.
    fn open_links(
        rt: &Runtime,
        key: &LinkKeypair,
        config: LinkConfig,
        allowed: &Mutex<Vec<[u8; 32]>>,
        hops: &[HopInfo],
        pace: Option<LinkPace>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(out::OutLink, out::OutLink), DesignerError> {
        let keys: Vec<[u8; 32]> = hops
            .iter()
            .map(HopInfo::link_key)
            .collect::<Result<_, _>>()?;
        if let Ok(mut a) = allowed.lock() {
            for k in &keys {
                if !a.contains(k) {
                    a.push(*k);
                }
            }
        }
        let (first, last) = (&hops[0], &hops[hops.len() - 1]);
        let (first_link, last_link) = rt.block_on(async {
            let connect = |h: &HopInfo| {
                let addr = h.addr;
                let expect = h.link_key().map(PublicLinkKey::from_bytes);
                async move {
                    Link::connect(addr, key, Some(expect?), config)
                        .await
                        .map_err(link_err(addr))
                }
            };
            let a = tokio::time::timeout(Duration::from_secs(10), connect(first))
                .await
                .map_err(|_| {
                    DesignerError::Reply(format!("no link to {} in 10 s", first.addr))
                })??;
            let z = tokio::time::timeout(Duration::from_secs(10), connect(last))
                .await
                .map_err(|_| DesignerError::Reply(format!("no link to {} in 10 s", last.addr)))??;
            Ok::<_, DesignerError>((a.into_split().1, z.into_split().1))
        })?;
        let mut seed = || {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            s
        };
        Ok((
            out::OutLink::new(rt, first.addr, first_link, pace, seed()),
            out::OutLink::new(rt, last.addr, last_link, pace, seed()),
        ))
    }

    /// Sends the init loop through every hop (each builds its stage from
    /// its note) and waits for it to come back.
    fn init(&mut self) -> Result<(), DesignerError> {
        let my_link = *self.key.public().as_bytes();
        let publics: Vec<OnionPublic> = self
            .hops
            .iter()
            .map(|h| h.onion_key().map(OnionPublic))
            .collect::<Result<_, _>>()?;
        let links: Vec<[u8; 32]> = self
            .hops
            .iter()
            .map(HopInfo::link_key)
            .collect::<Result<_, _>>()?;
        // The nodes refuse inits issued far from their clock.
        let issued_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Fresh commitment keys for every session.
        self.audit.new_session(self.hops.len(), &mut self.rng);
        let notes: Vec<Vec<u8>> = self
            .remote
            .iter()
            .enumerate()
            .map(|(k, (i, spec))| {
                InitNote {
                    stage: spec.clone(),
                    sgd: self.cfg.sgd,
                    seed: i.map_or(0, |i| stage_seed(self.cfg.seed, i)),
                    start_step: self.step,
                    padding: self.policy,
                    issued_at,
                    prev_link: if k == 0 { my_link } else { links[k - 1] },
                    next_link: links.get(k + 1).copied().unwrap_or(my_link),
                    designer_link: my_link,
                    // Where the hop may send: its neighbours and, for
                    // deliveries, the designer.
                    prev_addr: k.checked_sub(1).map(|j| self.hops[j].addr),
                    next_addr: self.hops.get(k + 1).map(|h| h.addr),
                    designer_addr: Some(self.me.0),
                    audit_key: self.audit.key(k),
                }
                .encode()
            })
            .collect();
        let rid = ReplyId::random(&mut self.rng);
        let blocks: Vec<RoutingBlock> = (0..self.hops.len())
            .map(|k| RoutingBlock {
                op: Op::Init,
                next: match self.hops.get(k + 1) {
                    Some(h) => Next::Hop(HopAddr(h.addr)),
                    None => Next::Deliver {
                        addr: self.me,
                        reply_id: rid,
                    },
                },
                tag: HopTag::random(&mut self.rng),
            })
            .collect();
        let layers: Vec<HopLayer<'_>> = blocks
            .iter()
            .zip(&notes)
            .map(|(block, note)| HopLayer {
                block: *block,
                note,
            })
            .collect();
        let (onion, session) = wrap_init(&publics, &layers, &mut self.rng)?;
        let cells = encode_cells(CellKind::Init, &onion, &[], &self.policy.for_init())?;
        self.session = Some(session);
        self.pending.insert(rid.0, Await::Init);
        // No loops until every hop has the session.
        self.loops.pause();
        self.send_first(&cells)?;
        let (kind, _) = self.wait(Await::Init, self.step)?;
        self.loops.resume();
        debug_assert_eq!(kind, Await::Init);
        Ok(())
    }

    /// The address the designer listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.me.0
    }

    /// The padding policy in force.
    pub fn policy(&self) -> PaddingPolicy {
        self.policy
    }

    fn send_first(&mut self, cells: &[u8]) -> Result<(), DesignerError> {
        self.first_link.send(&self.rt, cells)
    }

    fn send_last(&mut self, cells: &[u8]) -> Result<(), DesignerError> {
        self.last_link.send(&self.rt, cells)
    }

    /// Waits up to `timeout` for the next reply this runner expects;
    /// `None` when the time is up.
    fn recv(&mut self, timeout: Duration) -> Result<Option<(Await, Vec<u8>)>, DesignerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Wake for due loops (and overdue ones) while waiting.
            let wake = self.loop_wake().map_or(deadline, |w| {
                deadline.min(tokio::time::Instant::from_std(w))
            });
            let got = self
                .rt
                .block_on(async { tokio::time::timeout_at(wake, self.replies.recv()).await });
            let (rid, body) = match got {
                Ok(Some(r)) => r,
                Ok(None) => return Err(DesignerError::Reply("its links closed".into())),
                Err(_) if wake < deadline => {
                    self.loop_tick()?;
                    continue;
                }
                Err(_) => return Ok(None),
            };
            if self.loops.back(&rid) {
                continue;
            }
            match self.pending.remove(&rid) {
                Some(kind) => return Ok(Some((kind, body))),
                // Late answers of an abandoned session (after a recovery)
                // or of a probe that already timed out.
                None => tracing::debug!("reply with an unknown id dropped"),
            }
        }
    }

    /// Waits for the next reply; returns what it answers and its body.
    /// Every answer but the init loop's (which waits for links between
    /// the nodes to come up) gets the detection bound T (see
    /// [`recovery`]).
    fn wait(&mut self, what: Await, step: u64) -> Result<(Await, Vec<u8>), DesignerError> {
        let timeout = match what {
            Await::Init => self.opts.timeout,
            _ => self.detection_bound(),
        };
        let started = std::time::Instant::now();
        match self.recv(timeout)? {
            Some(r) => {
                if what != Await::Init {
                    self.recovery.observe(started.elapsed());
                }
                Ok(r)
            }
            None => Err(DesignerError::Timeout {
                what: match what {
                    Await::Init => "the init loop",
                    Await::Output(..) => "the loss",
                    Await::Done(..) => "the end of backward",
                    Await::Test(..) => "a test output",
                    Await::Chunk(..) => "the parameters",
                    Await::Loaded(..) => "a state load",
                    Await::Probe(..) => "a probe",
                    Await::Opening(..) => "an audit opening",
                },
                step,
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    fn block(
        &mut self,
        op: Op,
        k: usize,
        last: usize,
        reply: ReplyId,
        reverse: bool,
    ) -> RoutingBlock {
        let next = if k == last {
            Next::Deliver {
                addr: self.me,
                reply_id: reply,
            }
        } else if reverse {
            Next::Hop(HopAddr(self.hops[self.hops.len() - 2 - k].addr))
        } else {
            Next::Hop(HopAddr(self.hops[k + 1].addr))
        };
        RoutingBlock {
            op,
            next,
            tag: HopTag::random(&mut self.rng),
        }
    }

    /// Wraps one session onion for `path` (blocks and notes per visited
    /// hop) and encodes it with `body` into cells.
    fn seal<N: AsRef<[u8]>>(
        &mut self,
        path: &[usize],
        blocks: &[RoutingBlock],
        notes: &[N],
        body: &[u8],
    ) -> Result<Vec<u8>, DesignerError> {
        let layers: Vec<HopLayer<'_>> = blocks
            .iter()
            .zip(notes)
            .map(|(b, note)| HopLayer {
                block: *b,
                note: note.as_ref(),
            })
            .collect();
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| DesignerError::Reply("no session set up".into()))?;
        let onion = session.wrap(path, &layers, &mut self.rng)?;
        Ok(encode_cells(CellKind::Session, &onion, body, &self.policy)?)
    }

    /// Sends the forward (and, without a kept last stage, the backward)
    /// onions of every micro-batch of `step`; returns the kept first
    /// stage's caches, one per micro-batch.
    fn send_step(&mut self, batch: &Batch, step: u64) -> Result<Vec<StageCache>, DesignerError> {
        let micros = batch.micro_batches(self.micro_batches);
        let count = micros.len() as u16;
        let mut caches = Vec::new();
        for (m, micro) in micros.iter().enumerate() {
            let m = m as u16;
            let x = TensorBytes::encode_pixels(&[micro.rows, self.input_features], &micro.pixels);
            let body = match &self.local_first {
                Some(first) => {
                    let (y, c) = first.forward_bytes(&x, None)?;
                    caches.push(c);
                    y
                }
                None => x,
            };
            self.send_forward(step, m, count, batch.rows, &micro.labels, &body)?;
            if self.local_last.is_none() {
                self.send_backward(step, m, count, &[])?;
            }
        }
        Ok(caches)
    }

    fn send_forward(
        &mut self,
        step: u64,
        micro: u16,
        micros: u16,
        batch_rows: usize,
        labels: &[u32],
        body: &[u8],
    ) -> Result<(), DesignerError> {
        let n = self.hops.len();
        let out_id = ReplyId::random(&mut self.rng);
        let tags: Vec<HopTag> = (0..n).map(|_| HopTag::random(&mut self.rng)).collect();
        let mut fwd_blocks = Vec::with_capacity(n);
        for (k, tag) in tags.iter().enumerate() {
            let mut b = self.block(Op::Forward, k, n - 1, out_id, false);
            b.tag = *tag;
            fwd_blocks.push(b);
        }
        let note = StepNote {
            micro,
            micros,
            batch_rows: batch_rows as u32,
            ..StepNote::at(step)
        };
        let plain = note.encode();
        let with_labels = StepNote {
            labels: labels.to_vec(),
            ..note
        }
        .encode();
        let fwd_notes: Vec<&[u8]> = (0..n)
            .map(|k| {
                if Some(k) == self.loss_hop {
                    with_labels.as_slice()
                } else {
                    plain.as_slice()
                }
            })
            .collect();
        let path: Vec<usize> = (0..n).collect();
        let body = self.audit.pad(body, &mut self.rng);
        let cells = self.seal(&path, &fwd_blocks, &fwd_notes, &body)?;
        self.pending.insert(out_id.0, Await::Output(step, micro));
        self.send_first(&cells)?;
        // Tags are per hop and shared by a micro-batch's forward and
        // backward.
        self.tags.insert((step, micro), tags);
        Ok(())
    }

    fn send_backward(
        &mut self,
        step: u64,
        micro: u16,
        micros: u16,
        grad: &[u8],
    ) -> Result<(), DesignerError> {
        let n = self.hops.len();
        let tags = self
            .tags
            .remove(&(step, micro))
            .ok_or_else(|| DesignerError::Reply(format!("no tags for step {step}.{micro}")))?;
        let done_id = ReplyId::random(&mut self.rng);
        let mut blocks = Vec::with_capacity(n);
        let mut notes = Vec::with_capacity(n);
        for k in 0..n {
            // k-th hop visited in reverse order is hop n-1-k.
            let mut b = self.block(Op::Backward, k, n - 1, done_id, true);
            b.tag = tags[n - 1 - k];
            blocks.push(b);
            notes.push(
                StepNote {
                    need_input_grad: k < n - 1 || self.local_first.is_some(),
                    micro,
                    micros,
                    ..StepNote::at(step)
                }
                .encode(),
            );
        }
        let path: Vec<usize> = (0..n).rev().collect();
        let grad = self.audit.pad(grad, &mut self.rng);
        let cells = self.seal(&path, &blocks, &notes, &grad)?;
        self.pending.insert(done_id.0, Await::Done(step, micro));
        self.send_last(&cells)
    }
}

impl CascadeRunner {
    fn output_to_classes(&self, body: &[u8]) -> Result<Vec<u32>, DesignerError> {
        let mut out = TensorBytes::decode(body)?;
        if let Some(last) = &self.local_last {
            let y = last.forward_eval(out.into_matrix()?)?;
            out = TensorBytes {
                shape: y.dims().to_vec(),
                values: y.into_vec(),
            };
        }
        match out.shape.as_slice() {
            [rows, cols] => Ok(argmax_slice(&out.values, *rows, *cols)),
            other => Err(DesignerError::Reply(format!(
                "test output of shape {other:?}"
            ))),
        }
    }
}

impl CascadeRunner {
    /// Trains `batches` from where `losses` (the losses of the batches
    /// done, from step `base` on) leaves off, taking checkpoints on the way
    /// and one at the end.
    fn train_from(
        &mut self,
        batches: &[Batch],
        base: u64,
        losses: &mut Vec<f32>,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<(), DesignerError> {
        let len = batches.len();
        let window = if self.local_first.is_some() {
            1
        } else {
            self.opts.window.max(1)
        };
        let start = losses.len();
        debug_assert_eq!(self.step, base + start as u64);
        if self.recovery.wants_checkpoint(self.step) {
            self.checkpoint(losses)?;
        }
        let micro_rows: Vec<Vec<std::ops::Range<usize>>> = batches
            .iter()
            .map(|b| micro_ranges(b.rows, self.micro_batches))
            .collect();
        let mut progress: Vec<StepProgress> = micro_rows
            .iter()
            .map(|r| StepProgress {
                losses: vec![None; r.len()],
                done: 0,
            })
            .collect();
        let mut first_caches: HashMap<(u64, u16), StageCache> = HashMap::new();
        let (mut next, mut completed) = (start, start);
        while completed < len {
            // Checkpoints are taken between steps: none in flight.
            if completed == next && completed > start {
                let step = base + completed as u64;
                if self.audit.queued() {
                    self.step = step;
                    self.run_audits(batches, base)?;
                }
                if self.recovery.wants_checkpoint(step) {
                    self.step = step;
                    self.checkpoint(losses)?;
                }
            }
            while next < len && next - completed < window {
                let step = base + next as u64;
                if next > completed
                    && (self.recovery.wants_checkpoint(step) || self.audit.due(step, window))
                {
                    break;
                }
                for (m, c) in self
                    .send_step(&batches[next], step)?
                    .into_iter()
                    .enumerate()
                {
                    first_caches.insert((step, m as u16), c);
                }
                next += 1;
            }
            let waiting = base + completed as u64;
            let (kind, body) = self.wait(Await::Output(waiting, 0), waiting)?;
            let body = self.audit.take(kind, body, self.hops.len())?;
            let (s, m) = match kind {
                Await::Output(s, m) | Await::Done(s, m) => (s, m),
                other => return Err(DesignerError::Reply(format!("an unexpected {other:?}"))),
            };
            let i = s
                .checked_sub(base)
                .map(|i| i as usize)
                .filter(|i| *i < len)
                .ok_or_else(|| DesignerError::Reply(format!("a reply for step {s}")))?;
            let micros = micro_rows[i].len();
            match kind {
                Await::Output(..) => {
                    let loss = match self.local_last.as_mut() {
                        Some(last) => {
                            let micro = batches[i].slice(micro_rows[i][usize::from(m)].clone());
                            let (l, c) = last.forward_micro_bytes(
                                &body,
                                Some(&micro.labels),
                                batches[i].rows,
                            )?;
                            let g = last
                                .backward_micro_bytes(c, None, true, u32::from(m))?
                                .unwrap_or_default();
                            if last.pending_micros() == micros {
                                last.apply();
                            }
                            self.send_backward(s, m, micros as u16, &g)?;
                            TensorBytes::decode(&l)?.values.first().copied()
                        }
                        None => TensorBytes::decode(&body)?.values.first().copied(),
                    };
                    let slot = progress[i]
                        .losses
                        .get_mut(usize::from(m))
                        .ok_or_else(|| DesignerError::Reply(format!("micro-batch {m}")))?;
                    *slot = Some(loss.ok_or_else(|| DesignerError::Reply("an empty loss".into()))?);
                }
                _ => {
                    if let Some(first) = self.local_first.as_mut() {
                        let c = first_caches.remove(&(s, m)).ok_or_else(|| {
                            DesignerError::Reply(format!("done for unknown step {s}.{m}"))
                        })?;
                        first.backward_micro_bytes(c, Some(&body), false, u32::from(m))?;
                        if first.pending_micros() == micros {
                            first.apply();
                        }
                    }
                    progress[i].done += 1;
                }
            }
            while completed < len {
                let p = &progress[completed];
                if p.done < p.losses.len() || p.losses.iter().any(Option::is_none) {
                    break;
                }
                // The batch's loss: micro-batch losses added in order, as
                // the local trainer does.
                let mut loss = 0.0f32;
                for (m, l) in p.losses.iter().flatten().enumerate() {
                    loss = if m == 0 { *l } else { loss + *l };
                }
                losses.push(loss);
                self.audit.step_done(base + completed as u64, &self.remote);
                on_step(completed, loss);
                completed += 1;
            }
        }
        self.step = base + len as u64;
        if self.audit.queued() {
            self.run_audits(batches, base)?;
        }
        if self.recovery.enabled() {
            self.checkpoint(losses)?;
        }
        Ok(())
    }

    fn predict_once(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<u32>, DesignerError> {
        let n = self.hops.len();
        let window = self.opts.window.max(1) * 4;
        let mut outputs: Vec<Vec<Option<Vec<u32>>>> = batches
            .iter()
            .map(|b| vec![None; micro_ranges(b.rows, self.micro_batches).len()])
            .collect();
        let (mut next, mut received) = (0usize, 0usize);
        while received < batches.len() {
            while next < batches.len() && next - received < window {
                for (m, micro) in batches[next]
                    .micro_batches(self.micro_batches)
                    .iter()
                    .enumerate()
                {
                    let x = TensorBytes::encode_pixels(
                        &[micro.rows, self.input_features],
                        &micro.pixels,
                    );
                    let body = match &self.local_first {
                        Some(first) => first.eval_bytes(&x)?,
                        None => x,
                    };
                    let rid = ReplyId::random(&mut self.rng);
                    let blocks: Vec<RoutingBlock> = (0..n)
                        .map(|k| self.block(Op::Test, k, n - 1, rid, false))
                        .collect();
                    let notes = vec![StepNote::at(self.step).encode(); n];
                    let path: Vec<usize> = (0..n).collect();
                    let cells = self.seal(&path, &blocks, &notes, &body)?;
                    self.pending.insert(rid.0, Await::Test(next, m as u16));
                    self.send_first(&cells)?;
                }
                next += 1;
            }
            let (kind, body) = self.wait(Await::Test(received, 0), self.step)?;
            let Await::Test(i, m) = kind else {
                return Err(DesignerError::Reply(format!("an unexpected {kind:?}")));
            };
            let slot = outputs
                .get_mut(i)
                .and_then(|o| o.get_mut(usize::from(m)))
                .ok_or_else(|| DesignerError::Reply(format!("test output {i}.{m}")))?;
            *slot = Some(self.output_to_classes(&body)?);
            while received < batches.len() && outputs[received].iter().all(Option::is_some) {
                on_batch(received);
                received += 1;
            }
        }
        Ok(outputs.into_iter().flatten().flatten().flatten().collect())
    }
}

impl StepRunner for CascadeRunner {
    type Error = DesignerError;

    fn begin_epoch(&mut self, epoch: u32, done: &[EpochMetrics], losses_so_far: &[f32]) {
        self.audit.check_epochs(done);
        self.recovery
            .begin_epoch(epoch, done, losses_so_far, self.step);
    }

    fn train_batches(
        &mut self,
        batches: &[Batch],
        on_step: &mut dyn FnMut(f32),
    ) -> Result<Vec<f32>, DesignerError> {
        let base = self.step;
        let mut losses = Vec::with_capacity(batches.len());
        // After a recovery, steps since the checkpoint run again; the
        // progress callback hears of each step once.
        let mut reported = 0usize;
        loop {
            let mut tick = |i: usize, l: f32| {
                if i >= reported {
                    on_step(l);
                    reported = i + 1;
                }
            };
            match self.train_from(batches, base, &mut losses, &mut tick) {
                Ok(()) => return Ok(losses),
                Err(e) => {
                    let step = match e {
                        DesignerError::Audit { .. } => self.recover_audit(e, batches, base)?,
                        e => self.recover(e)?,
                    };
                    let back = step.checked_sub(base).ok_or_else(|| {
                        DesignerError::Reply(format!(
                            "a checkpoint at step {step}, before this epoch's step {base}"
                        ))
                    })?;
                    losses.truncate(back as usize);
                }
            }
        }
    }

    fn predict_batches(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(),
    ) -> Result<Vec<u32>, DesignerError> {
        let mut reported = 0usize;
        loop {
            let mut tick = |i: usize| {
                if i >= reported {
                    on_batch();
                    reported = i + 1;
                }
            };
            match self.predict_once(batches, &mut tick) {
                Ok(out) => return Ok(out),
                Err(e) => {
                    let at = self.step;
                    if self.recover(e)? != at {
                        return Err(DesignerError::Reply(format!(
                            "no checkpoint at step {at} to test from"
                        )));
                    }
                }
            }
        }
    }

    fn params(&mut self) -> Result<Vec<StageParams>, DesignerError> {
        let states = loop {
            match self.fetch_states() {
                Ok(s) => break s,
                Err(e) => {
                    let at = self.step;
                    if self.recover(e)? != at {
                        return Err(DesignerError::Reply(format!(
                            "no checkpoint at step {at} to fetch from"
                        )));
                    }
                }
            }
        };
        let mut out = Vec::new();
        if let Some(first) = &self.local_first {
            out.push(first.params());
        }
        for (s, (i, _)) in states.into_iter().zip(&self.remote) {
            if i.is_some() {
                out.push(recovery::params_only(s.tensors));
            }
        }
        if let Some(last) = &self.local_last {
            out.push(last.params());
        }
        Ok(out)
    }
}

async fn accept_loop(
    listener: LinkListener,
    tx: mpsc::UnboundedSender<([u8; 16], Vec<u8>)>,
    allowed: Arc<Mutex<Vec<[u8; 32]>>>,
) {
    loop {
        let pending = match listener.accept().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("designer accept: {e}");
                return;
            }
        };
        let tx = tx.clone();
        let allowed = allowed.clone();
        tokio::spawn(async move {
            let peer = pending.peer_addr();
            let link = match pending.handshake().await {
                Ok(l) => l,
                Err(e) => return tracing::warn!("link from {peer}: {e}"),
            };
            let known = allowed
                .lock()
                .map(|a| a.contains(link.remote_key().as_bytes()))
                .unwrap_or(false);
            if !known {
                return tracing::warn!("link from {peer} refused: not a hop of this cascade");
            }
            let (mut reader, _w) = link.into_split();
            let mut cell = vec![0u8; CELL_SIZE];
            loop {
                match recv_message(&mut reader, &mut cell).await {
                    Ok(msg) => {
                        let mut rid = [0u8; 16];
                        rid.copy_from_slice(&msg.onion.header.prefix()[..16]);
                        if tx.send((rid, msg.body)).is_err() {
                            return;
                        }
                    }
                    Err(mixnn_net::NetError::Closed { .. }) => return,
                    Err(e) => return tracing::warn!("link from {peer}: {e}"),
                }
            }
        });
    }
}
