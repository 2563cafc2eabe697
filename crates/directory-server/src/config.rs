//! The directory's policy: intervals, ages, windows, admission, limits,
//! reporters and HTTP limits.

use std::time::Duration;

/// The directory's policy. All durations without a type are in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryConfig {
    /// Expected time between a node's heartbeats (default 10).
    pub heartbeat_interval: u64,
    /// How long a served view is valid (default 600).
    pub view_ttl: u64,
    /// Oldest accepted descriptor `published` at registration (default 600).
    pub max_descriptor_age: u64,
    /// Oldest accepted heartbeat timestamp (default 60).
    pub max_heartbeat_age: u64,
    /// Oldest accepted failure report or draw request timestamp (default 3600).
    pub max_report_age: u64,
    /// A node is listed in the view if it registered or heartbeat within
    /// this window (default 30, three intervals).
    pub live_window: u64,
    /// Failure reports count for this long (default 86 400).
    pub failure_window: u64,
    /// A report's effect halves every this many seconds (default 21 600).
    pub report_half_life: u64,
    /// Operator-admitted reporter keys: they may report any listed node.
    /// Every other key may only report nodes it drew (a draw receipt)
    /// within `draw_window`.
    pub admitted_reporters: Vec<[u8; 32]>,
    /// How long a draw receipt lets its designer report the drawn nodes
    /// (default 86 400).
    pub draw_window: u64,
    /// Draw requests recorded per hour from one IPv4 /24 or IPv6 /29
    /// (default 60).
    pub max_draws_per_prefix: u64,
    /// Failure reports accepted per hour from one IPv4 /24 or IPv6 /29
    /// (default 20).
    pub max_reports_per_prefix: u64,
    /// Listed nodes per IPv4 /24 or IPv6 /29 (default 2).
    pub max_per_prefix: usize,
    /// Local testing only (`--allow-same-subnet`): no per-prefix limit.
    pub allow_same_subnet: bool,
    /// Which addresses the directory probes (and so lists).
    pub addresses: Addresses,
    /// A listed node is probed again when its proof is this old (default 300).
    pub reprobe_interval: u64,
    /// A node is listed only while its last successful probe is younger
    /// than this (default 900).
    pub proof_ttl: u64,
    /// A node not heard from (registration or heartbeat) for this long is
    /// forgotten, and its address and prefix slot are free (default 3600).
    pub expiry: u64,
    /// Limit for one probe, connect included.
    pub probe_timeout: Duration,
    /// Registration probes running at once; a registration that finds them
    /// all busy is refused with 503 (default 16).
    pub max_probes: usize,
    /// Registration probes running at once for requests from one IPv4 /24
    /// or IPv6 /29 (default 2), so one source cannot hold every slot.
    pub max_probes_per_prefix: usize,
    /// Probes a heartbeat may start at once when its node's proof is due
    /// (default 8; apart from the registration slots).
    pub heartbeat_probes: usize,
    /// HTTP limits.
    pub http: HttpLimits,
}

/// Which node addresses a directory probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addresses {
    /// Public addresses only: a descriptor naming a loopback, private,
    /// link-local or otherwise non-public address is refused without a
    /// probe ([`mixnn_directory::non_public`]), so that nobody can use the
    /// directory to scan its own network.
    #[default]
    Public,
    /// Any address (`--allow-local-addresses`: a directory for nodes on
    /// one machine or one private network, tests and demos).
    Local,
}

/// Limits of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A connection must deliver a whole request head within this, also
    /// while it waits idle between requests (default 10 s).
    pub header_timeout: Duration,
    /// A request (body and handler, a probe included) must finish within
    /// this, or it is answered 408 (default 20 s).
    pub request_timeout: Duration,
    /// Connections served at once (default 256). When all are taken, a new
    /// connection takes the place of the oldest one that has not sent a
    /// whole request yet (then of the oldest idle one); when none is
    /// either, it is closed.
    pub max_connections: usize,
    /// Connections from one IPv4 /24 or IPv6 /29 (default 32): a new one
    /// past it takes the place of that source's oldest waiting one.
    pub max_connections_per_prefix: usize,
    /// At shutdown, requests in flight get this long; idle connections are
    /// closed at once (default 5 s).
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(20),
            max_connections: 256,
            max_connections_per_prefix: 32,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: 10,
            view_ttl: 600,
            max_descriptor_age: 600,
            max_heartbeat_age: 60,
            max_report_age: 3600,
            live_window: 30,
            failure_window: 86_400,
            report_half_life: 21_600,
            admitted_reporters: Vec::new(),
            draw_window: 86_400,
            max_draws_per_prefix: 60,
            max_reports_per_prefix: 20,
            max_per_prefix: 2,
            allow_same_subnet: false,
            addresses: Addresses::Public,
            reprobe_interval: 300,
            proof_ttl: 900,
            expiry: 3600,
            probe_timeout: Duration::from_secs(5),
            max_probes: 16,
            max_probes_per_prefix: 2,
            heartbeat_probes: 8,
            http: HttpLimits::default(),
        }
    }
}
