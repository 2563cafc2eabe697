//! `mixnn node`: the node daemon. Keys are made in the state directory on
//! first start and reused afterwards; the node writes its descriptor (the
//! `[[hop]]` entry a designer puts in its cascade file) to
//! `STATE/descriptor.toml` and prints it as one line on stdout. With
//! `--directory URL` it also registers its signed descriptor with that
//! directory authority and heartbeats there until it stops
//! ([`mixnn_node::announce`]); a directory that is down only costs warnings.
//! With `--cover-rate R` and no `--cover-peer`, such a node sends its cover
//! to the other nodes of the directory's view, verified with
//! `--directory-key` and refreshed at every heartbeat.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mixnn_designer::{CascadeFile, HopInfo};
use mixnn_directory::{Capabilities, SystemClock, MAX_LOCATION_LEN};
use mixnn_directory_client::DirectoryClient;
use mixnn_model::arith::ARITH_VERSION;
use mixnn_net::{Created, LinkListener, NodeKeys};
use mixnn_node::announce::{self, AnnounceConfig, Announcement, Announcer, CoverView};
use mixnn_node::{DoorConfig, Limits, NodeConfig};

/// `mixnn node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7000", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// State directory: keys (0600) and the node's descriptor.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Most authenticated inbound links served at once (when all are
    /// taken, a link of a key no session names gives its slot to a new
    /// one: first one that has delivered no accepted message).
    #[arg(long, default_value_t = 256)]
    pub max_links: usize,
    /// Most inbound links with one link key.
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_links_per_key: u64,
    /// Most inbound connections whose handshake has not finished; when
    /// full, a new one takes the place of the oldest.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_handshakes: u64,
    /// Seconds within which every cell of a message must follow its first
    /// cell, or the link is closed.
    #[arg(long, default_value_t = 30, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
    /// Seconds a write to a link may wait to drain before the link is
    /// closed and what it had queued dropped (a peer that does not read).
    #[arg(long, default_value_t = 30, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout: u64,
    /// The node's memory budget, in MiB: sessions, messages being read and
    /// messages queued for links all draw from it; when it is reached the
    /// session holding the oldest queued data is shed. Keep it below the
    /// machine's memory, with room for the process itself.
    #[arg(long, default_value_t = 3072, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(16..))]
    pub max_memory_mib: u64,
    /// Most training steps cached per session (steps in flight).
    #[arg(long, default_value_t = 64)]
    pub max_cached: usize,
    /// Most sessions (cascades) served at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_sessions: usize,
    /// Most sessions set up over links with one key (the previous hop's,
    /// or a designer's).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_sessions_per_key: usize,
    /// Seconds after which a session no message has reached is dropped.
    #[arg(long, default_value_t = 600, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub session_idle: u64,
    /// Seconds after which an inbound link on which nothing arrives (or
    /// whose handshake does not finish) is closed.
    #[arg(long, default_value_t = 300, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub link_idle: u64,
    /// Most parameters of one stage (each costs 8 bytes: value and
    /// momentum).
    #[arg(long, default_value_t = 16 << 20, value_name = "N")]
    pub max_stage_params: u64,
    /// Most parameters of all sessions together (an audited session counts
    /// 18 times: the live stage, a copy of its state and its state before
    /// each of its last 16 steps).
    #[arg(long, default_value_t = 128 << 20, value_name = "N")]
    pub max_node_params: u64,
    /// Most MiB of activations one message may make a stage compute.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub max_forward_mib: u64,
    /// Most MiB one session may hold (forward caches, parked messages,
    /// gradients waiting for their update, the openings of its last 16
    /// steps when audited).
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub max_session_mib: u64,
    /// Most MiB all sessions together may hold.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub max_node_mib: u64,
    /// Seconds an init may have been issued before (or after) this node's
    /// clock; accepted inits are remembered (in the state directory) for as
    /// long, so none is accepted twice.
    #[arg(long, default_value_t = 600, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub init_window: u64,
    /// Most inits remembered within the window; when full, new inits are
    /// refused until old ones leave it.
    #[arg(long, default_value_t = 65_536, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub init_replay_capacity: u64,
    /// Register with the directory authority at this URL
    /// (`http://HOST:PORT`) and heartbeat there.
    #[arg(long, value_name = "URL")]
    pub directory: Option<String>,
    /// Address published in the directory, when designers reach the node
    /// at another address than it listens on (`--listen 0.0.0.0:…`, NAT):
    /// `IP:PORT`, or `IP` for the listening port. Default: the bound address.
    #[arg(long, value_name = "ADDR", value_parser = parse_advertise, requires = "directory")]
    pub advertise: Option<Advertise>,
    /// Location label published in the directory (at most 64 bytes).
    #[arg(long, default_value = "", value_name = "LABEL", value_parser = parse_location,
          requires = "directory")]
    pub location: String,
    /// Asking price per hour published in the directory (≥ 0).
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = parse_price,
          allow_hyphen_values = true,
          requires = "directory")]
    pub price: f64,
    /// Public key of the directory (64 hex digits, as it printed when it
    /// started) its view must be signed by; repeatable. Needed to take
    /// cover peers from the view (`--cover-rate` without `--cover-peer`).
    #[arg(long = "directory-key", value_name = "HEX", value_parser = parse_directory_key,
          requires = "directory")]
    pub directory_keys: Vec<[u8; 32]>,
    /// The identity key (hex) of another node this operator runs
    /// (repeatable): published as the node's family, which designers keep
    /// out of one cascade once each member lists the others.
    #[arg(long = "family", value_name = "HEX", value_parser = parse_directory_key,
          requires = "directory")]
    pub family: Vec<[u8; 32]>,
    /// Seconds between heartbeats to the directory (and between fetches
    /// of its view, for cover peers).
    #[arg(long, default_value_t = 10, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..=3600), requires = "directory")]
    pub heartbeat: u64,
    /// Cover messages per second (Poisson) to random `--cover-peer`s, or,
    /// without any, to random other nodes of the `--directory`'s view;
    /// 0 sends none.
    #[arg(long, default_value_t = 0.0, value_name = "R", value_parser = parse_rate)]
    pub cover_rate: f64,
    /// A node cover messages may go to, as `ADDR=LINKKEY` (hex link key);
    /// repeatable. Given by hand, these win over the directory's view.
    #[arg(long, value_name = "ADDR=LINKKEY", value_parser = parse_cover_peer)]
    pub cover_peer: Vec<CoverPeer>,
    /// Constant-rate links: every outbound link sends exactly R whole
    /// messages per second, the oldest queued message on each tick or a
    /// cover message when none is queued (costs R × message size of
    /// bandwidth per link, and up to one tick of delay per hop); 0 sends
    /// each message as soon as it is ready.
    #[arg(long, default_value_t = 0.0, value_name = "R", value_parser = parse_rate)]
    pub link_rate: f64,
    /// With `--link-rate`: each message leaves at a uniformly random offset
    /// in [0, F/R) after its tick (F from 0, on the tick, to 1, anywhere in
    /// its slot), which hides a busy node's late ticks (see SECURITY.md).
    #[arg(long, default_value_t = 1.0, value_name = "F", value_parser = parse_fraction)]
    pub link_jitter: f64,
    /// Debugging only: record who this node talked to. Writes the address
    /// of every neighbour and designer its sessions name (one a line) to
    /// STATE/learned-peers.txt, kept after the node stops. Off by default,
    /// so that a node's disk holds no list of its peers.
    #[arg(long)]
    pub debug_record_peers: bool,
    /// Misbehave from a step on, for tests of audits: `MODE@STEP`, MODE
    /// one of the modes of `mixnn_node::Adversary` (`noise`,
    /// `flip-gradient`, `skip-update`, `hidden-noise`,
    /// `tamper-between-steps`, `forge-slots`, `false-state`,
    /// `garble-openings`, …).
    #[cfg(feature = "adversary")]
    #[arg(long, hide = true, value_name = "MODE@STEP")]
    pub adversary: Option<mixnn_node::Adversary>,
    /// A curious hop, for collusion tests: appends every byte string the
    /// node receives outside the model's tensors (headers, notes, sender
    /// keys, peeled notes and tags, trailers, relayed bodies) to FILE, as
    /// `len u32 LE ‖ bytes` records, within 50 ms of receiving it.
    #[cfg(feature = "adversary")]
    #[arg(long, hide = true, value_name = "FILE")]
    pub record_received: Option<PathBuf>,
    /// A curious hop, for the adversary simulator (`mixnn adversary`):
    /// appends what it sees of the model to FILE — its stage, every
    /// forward, backward and test it runs (tensors in and out, step,
    /// micro-batch, labels, arrival time) and its stage's final state —
    /// as `len u32 LE ‖ observation` records
    /// (`mixnn_proto::observed`), within 50 ms.
    #[cfg(feature = "adversary")]
    #[arg(long, hide = true, value_name = "FILE")]
    pub record_tensors: Option<PathBuf>,
}

/// Starts appending what a curious hop receives to `path` (see
/// `--record-received`); the record to give the node.
#[cfg(feature = "adversary")]
fn record_to(path: &std::path::Path) -> anyhow::Result<mixnn_node::core::Record> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let record = mixnn_node::core::Record::default();
    let shared = record.clone();
    std::thread::Builder::new()
        .name("record".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(20));
            let taken = match shared.lock() {
                Ok(mut r) => std::mem::take(&mut *r),
                Err(_) => return,
            };
            let mut out = Vec::new();
            for bytes in taken {
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&bytes);
            }
            if file.write_all(&out).and_then(|()| file.flush()).is_err() {
                return;
            }
        })
        .context("starting the record thread")?;
    Ok(record)
}

/// A `--cover-peer`: address and link key.
#[derive(Debug, Clone, Copy)]
pub struct CoverPeer(pub SocketAddr, pub [u8; 32]);

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r >= 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate (messages per second, 0 or more)"
        )),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction from 0 to 1")),
    }
}

fn parse_cover_peer(s: &str) -> Result<CoverPeer, String> {
    let (addr, key) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ADDR=LINKKEY"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("cover peer address {addr:?}: {e}"))?;
    let key = hex::decode(key)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| format!("cover peer link key {key:?}: not 64 hex digits"))?;
    Ok(CoverPeer(addr, key))
}

fn parse_directory_key(s: &str) -> Result<[u8; 32], String> {
    mixnn_directory::parse_key_hex("directory key", s.trim())
        .map_err(|_| format!("{s:?} is not 64 hex digits"))
}

/// Where a node's cover peers come from, given its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoverSource {
    /// No cover (rate 0), or no peers to send it to.
    None,
    /// The `--cover-peer`s given by hand.
    Hand,
    /// The other nodes of the directory's verified view.
    Directory,
}

/// Chooses the cover peers' source; an error (one line) when the view
/// would be needed but cannot be verified.
fn cover_source(args: &NodeArgs) -> anyhow::Result<CoverSource> {
    if args.cover_rate <= 0.0 {
        return Ok(CoverSource::None);
    }
    if !args.cover_peer.is_empty() {
        return Ok(CoverSource::Hand);
    }
    if args.directory.is_none() {
        tracing::warn!(
            "--cover-rate without --cover-peer or --directory: no peers, sending no cover"
        );
        return Ok(CoverSource::None);
    }
    if args.directory_keys.is_empty() {
        anyhow::bail!(
            "--cover-rate without --cover-peer takes cover peers from the directory's view, which needs --directory-key HEX (the key the directory printed when it started) to verify it"
        );
    }
    Ok(CoverSource::Directory)
}

/// The `--advertise` address: a full address, or an IP that keeps the
/// listening port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertise {
    /// `IP:PORT`.
    Addr(SocketAddr),
    /// `IP`: the port is the one the node bound.
    Ip(std::net::IpAddr),
}

impl Advertise {
    /// The address to publish for a node bound to `bound`.
    fn resolve(self, bound: SocketAddr) -> SocketAddr {
        match self {
            Advertise::Addr(addr) => addr,
            Advertise::Ip(ip) => SocketAddr::new(ip, bound.port()),
        }
    }
}

fn parse_advertise(s: &str) -> Result<Advertise, String> {
    if let Ok(addr) = s.parse() {
        return Ok(Advertise::Addr(addr));
    }
    s.parse()
        .map(Advertise::Ip)
        .map_err(|_| format!("{s:?} is neither IP:PORT nor IP"))
}

fn parse_location(s: &str) -> Result<String, String> {
    if s.len() > MAX_LOCATION_LEN {
        return Err(format!("longer than {MAX_LOCATION_LEN} bytes"));
    }
    Ok(s.to_owned())
}

fn parse_price(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!("{s:?} is not a finite number ≥ 0")),
    }
}

/// Prefix of the line a node prints once it listens.
pub const READY_LINE: &str = "mixnn node ready: ";

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(args: &NodeArgs) -> anyhow::Result<()> {
    crate::selftest::check_active().context("refusing to serve")?;
    let directory = args
        .directory
        .as_deref()
        .map(DirectoryClient::new)
        .transpose()
        .context("--directory")?;
    let cover_source = cover_source(args)?;
    let (cover_view, cover_peers) = if cover_source == CoverSource::Directory {
        let (view, peers) = CoverView::new(args.directory_keys.clone());
        (Some(view), Some(peers))
    } else {
        (None, None)
    };
    let (keys, created) = NodeKeys::load_or_create(&args.state)
        .with_context(|| format!("state directory {}", args.state.display()))?;
    match created {
        Created::New => tracing::info!("made new keys in {}", args.state.display()),
        _ => tracing::info!("loaded keys from {}", args.state.display()),
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let config = mixnn_net::LinkConfig::mixnn();
        // Answers the directory's probes (admission by proof).
        let listener = LinkListener::bind(args.listen, keys.link().clone(), config)
            .await?
            .answer_probes(&keys);
        let addr = listener.local_addr()?;
        let announcer = match directory {
            Some(client) => Some(start_announcing(args, &keys, addr, client, cover_view)?),
            None => None,
        };
        let public = keys.public();
        let descriptor = CascadeFile {
            hop: vec![HopInfo {
                addr,
                onion: public.onion.to_string(),
                link: public.link.to_string(),
                arith: ARITH_VERSION,
            }],
        };
        let path = args.state.join("descriptor.toml");
        std::fs::write(&path, descriptor.to_toml())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{READY_LINE}addr={addr} onion={} link={} arith={ARITH_VERSION}",
            public.onion, public.link
        );
        // The node's own address (its operator's configuration) is logged
        // as is; other processes' addresses only as aliases.
        tracing::info!(%addr, "listening");
        if args.debug_record_peers {
            tracing::warn!(
                "--debug-record-peers: recording every peer address in {}",
                args.state.join("learned-peers.txt").display()
            );
        }
        let node_config = NodeConfig {
            limits: limits(args),
            door: door(args),
            link_idle: Duration::from_secs(args.link_idle),
            request_timeout: Duration::from_secs(args.request_timeout),
            write_timeout: Duration::from_secs(args.write_timeout),
            replay_file: Some(args.state.join("init-replay.bin")),
            learned_file: args
                .debug_record_peers
                .then(|| args.state.join("learned-peers.txt")),
            cover_rate: mixnn_net::pacing::Rate::new(args.cover_rate),
            cover_peers: args.cover_peer.iter().map(|p| (p.0, p.1)).collect(),
            cover_view: cover_peers,
            link_rate: mixnn_net::pacing::Rate::new(args.link_rate),
            link_jitter: args.link_jitter,
            #[cfg(feature = "adversary")]
            adversary: args.adversary.clone(),
            #[cfg(feature = "adversary")]
            record: args.record_received.as_deref().map(record_to).transpose()?,
            #[cfg(feature = "adversary")]
            observe: args.record_tensors.as_deref().map(record_to).transpose()?,
            ..NodeConfig::default()
        };
        let served = mixnn_node::run(listener, &keys, node_config, shutdown_signal()).await;
        if let Some(announcer) = announcer {
            if announcer.stop(Duration::from_secs(2)).is_none() {
                tracing::warn!("directory request still in flight at shutdown; not waiting");
            }
        }
        served?;
        anyhow::Ok(())
    })
}

/// The core's limits from the flags.
fn limits(args: &NodeArgs) -> Limits {
    const MIB: u64 = 1 << 20;
    Limits {
        max_cached: args.max_cached,
        max_sessions: args.max_sessions,
        max_sessions_per_key: args.max_sessions_per_key,
        session_idle: Duration::from_secs(args.session_idle),
        max_stage_params: args.max_stage_params,
        max_node_params: args.max_node_params,
        max_forward_bytes: args.max_forward_mib.saturating_mul(MIB),
        max_session_bytes: args.max_session_mib.saturating_mul(MIB),
        max_node_bytes: args.max_node_mib.saturating_mul(MIB),
        init_window: Duration::from_secs(args.init_window),
        init_replay_capacity: usize::try_from(args.init_replay_capacity).unwrap_or(usize::MAX),
        max_memory: args.max_memory_mib.saturating_mul(MIB),
        ..Limits::default()
    }
}

/// The connection slots from the flags.
fn door(args: &NodeArgs) -> DoorConfig {
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    DoorConfig {
        max_handshakes: n(args.max_handshakes),
        max_links: args.max_links,
        max_links_per_key: n(args.max_links_per_key),
        ..DoorConfig::default()
    }
}

/// Registers the node bound to `bound` with the directory behind `client`
/// and heartbeats there on a thread, until the returned [`Announcer`] stops;
/// with `cover`, it also keeps the cover peers from the directory's view.
fn start_announcing(
    args: &NodeArgs,
    keys: &NodeKeys,
    bound: SocketAddr,
    client: DirectoryClient,
    cover: Option<CoverView>,
) -> anyhow::Result<Announcer> {
    let addr = args.advertise.map_or(bound, |a| a.resolve(bound));
    if addr.ip().is_unspecified() || addr.port() == 0 {
        anyhow::bail!(
            "cannot publish {addr} in the directory: give the address designers reach this node at with --advertise"
        );
    }
    let capabilities = Capabilities {
        cores: announce::available_cores(),
        memory_mb: announce::total_memory_mb(),
        price_per_hour: args.price,
        location: args.location.clone(),
    };
    let node = Announcement {
        family: args.family.clone(),
        ..Announcement::new(keys, addr, capabilities)
    };
    node.descriptor(keys.identity(), 0)
        .check_fields()
        .context("node descriptor")?;
    tracing::info!(%addr, directory = client.url(), "announcing to the directory");
    if cover.is_some() {
        tracing::info!("cover peers: the other nodes of the directory's verified view");
    }
    let config = AnnounceConfig {
        heartbeat: Duration::from_secs(args.heartbeat),
        ..AnnounceConfig::default()
    };
    Ok(announce::spawn(
        keys.identity(),
        node,
        client,
        Arc::new(SystemClock),
        config,
        cover,
    )?)
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Parses a node's ready line into its descriptor.
pub fn parse_ready_line(line: &str) -> Option<HopInfo> {
    let rest = line.strip_prefix(READY_LINE)?;
    let mut addr = None;
    let mut onion = None;
    let mut link = None;
    let mut arith = ARITH_VERSION;
    for field in rest.split_whitespace() {
        match field.split_once('=') {
            Some(("addr", v)) => addr = v.parse().ok(),
            Some(("onion", v)) => onion = Some(v.to_string()),
            Some(("link", v)) => link = Some(v.to_string()),
            Some(("arith", v)) => arith = v.parse().ok()?,
            _ => {}
        }
    }
    Some(HopInfo {
        addr: addr?,
        onion: onion?,
        link: link?,
        arith,
    })
}

#[cfg(test)]
mod tests;
