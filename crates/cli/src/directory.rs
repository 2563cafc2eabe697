//! `mixnn directory`: the directory authority. Nodes register their signed
//! descriptors and heartbeat here; designers fetch the signed view. State
//! lives in one SQLite file, the signing key in a second file (0600); a
//! restart on the same files keeps every registration and all history.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mixnn_directory::{parse_key_hex, DirectoryKeys, SystemClock};
use mixnn_directory_server::{Addresses, DirectoryConfig, DirectoryState, Store};
use mixnn_net::PublicIdentityKey;

/// `mixnn directory`.
#[derive(Debug, Args)]
pub struct DirectoryArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, value_name = "FILE")]
    pub db: PathBuf,
    /// The directory's Ed25519 signing key (32 bytes, 0600; created if
    /// missing). Default: the database path with `.key` appended.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Seconds between the heartbeats nodes are expected to send; a node is
    /// listed while it was heard from within three intervals.
    #[arg(long, default_value_t = 10, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval: u64,
    /// Seconds a served view stays valid.
    #[arg(long, default_value_t = 600, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub view_ttl: u64,
    /// Listed nodes per IPv4 /24 or IPv6 /29.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub max_per_prefix: usize,
    /// LOCAL TESTING ONLY: no per-prefix limit, so many nodes on one
    /// address (127.0.0.1) can be listed. On a real network this lets one
    /// party with one address block fill the directory.
    #[arg(long)]
    pub allow_same_subnet: bool,
    /// LOCAL USE ONLY: list (and so probe) nodes at loopback, private and
    /// link-local addresses. Without it such descriptors are refused
    /// without a probe, so that nobody can make the directory connect
    /// into its own network.
    #[arg(long)]
    pub allow_local_addresses: bool,
    /// Failure reports accepted per hour from one IPv4 /24 or IPv6 /29.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub max_reports_per_prefix: u64,
    /// Seconds between probes of a listed node (it is unlisted when one
    /// fails, listed again when one passes).
    #[arg(long, default_value_t = 300, value_name = "S",
          value_parser = clap::value_parser!(u64).range(4..))]
    pub reprobe_interval: u64,
    /// Seconds after which a node not heard from is forgotten (its address
    /// and prefix slot are free again).
    #[arg(long, default_value_t = 3600, value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub expiry: u64,
    /// An operator-admitted reporter key (hex; repeatable): it may report
    /// any listed node without a draw receipt.
    #[arg(long = "admit-reporter", value_name = "HEX", value_parser = parse_reporter)]
    pub admitted_reporters: Vec<[u8; 32]>,
}

fn parse_reporter(s: &str) -> Result<[u8; 32], String> {
    parse_key_hex("reporter key", s.trim()).map_err(|e| e.to_string())
}

/// Prefix of the line the directory prints once it listens.
pub const DIRECTORY_READY_LINE: &str = "mixnn directory ready: ";

/// What a directory's ready line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryReady {
    /// Base URL of the directory (`http://ADDR`).
    pub url: String,
    /// The directory's public key, which designers pin.
    pub key: [u8; 32],
}

/// The key file used when `--key` is not given: `DB.key`.
fn default_key_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// Runs the directory until SIGINT or SIGTERM, then finishes the requests
/// in flight and returns.
pub fn run(args: &DirectoryArgs) -> anyhow::Result<()> {
    let key_path = args
        .key
        .clone()
        .unwrap_or_else(|| default_key_path(&args.db));
    let store = Store::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?;
    let keys = DirectoryKeys::load_or_create(&key_path)?;
    let config = DirectoryConfig {
        heartbeat_interval: args.heartbeat_interval,
        live_window: args.heartbeat_interval.saturating_mul(3),
        view_ttl: args.view_ttl,
        max_per_prefix: args.max_per_prefix,
        allow_same_subnet: args.allow_same_subnet,
        addresses: if args.allow_local_addresses {
            Addresses::Local
        } else {
            Addresses::Public
        },
        max_reports_per_prefix: args.max_reports_per_prefix,
        reprobe_interval: args.reprobe_interval,
        proof_ttl: args.reprobe_interval.saturating_mul(3),
        expiry: args.expiry,
        admitted_reporters: args.admitted_reporters.clone(),
        ..DirectoryConfig::default()
    };
    if args.allow_same_subnet {
        tracing::warn!("--allow-same-subnet: no per-prefix limit (local testing only)");
    }
    if args.allow_local_addresses {
        tracing::warn!("--allow-local-addresses: nodes at loopback and private addresses are probed and listed (local use only)");
    }
    let state = DirectoryState::new(store, keys, Arc::new(SystemClock), config);
    tracing::info!(
        db = %args.db.display(),
        nodes = state.node_count().unwrap_or(0),
        "opened directory"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!(
            "{DIRECTORY_READY_LINE}url=http://{addr} key={}",
            PublicIdentityKey::from_bytes(state.public_key())
        );
        mixnn_directory_server::serve(listener, state, crate::node::shutdown_signal()).await?;
        tracing::info!("directory stopped");
        anyhow::Ok(())
    })
}

/// Parses a directory's ready line (`mixnn directory ready: url=… key=…`).
pub fn parse_directory_ready_line(line: &str) -> Option<DirectoryReady> {
    let rest = line.trim().strip_prefix(DIRECTORY_READY_LINE)?;
    let mut url = None;
    let mut key = None;
    for field in rest.split_whitespace() {
        match field.split_once('=') {
            Some(("url", v)) if v.starts_with("http://") => url = Some(v.to_owned()),
            Some(("key", v)) => key = parse_key_hex("directory key", v).ok(),
            _ => {}
        }
    }
    Some(DirectoryReady {
        url: url?,
        key: key?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let key = [0xab; 32];
        let line = format!(
            "{DIRECTORY_READY_LINE}url=http://127.0.0.1:9000 key={}\n",
            PublicIdentityKey::from_bytes(key)
        );
        assert_eq!(
            parse_directory_ready_line(&line),
            Some(DirectoryReady {
                url: "http://127.0.0.1:9000".into(),
                key
            })
        );
        assert_eq!(parse_directory_ready_line("mixnn node ready: addr=1"), None);
        assert_eq!(
            parse_directory_ready_line(&format!("{DIRECTORY_READY_LINE}url=http://x key=zz")),
            None
        );
    }

    #[test]
    fn key_defaults_next_to_the_database() {
        assert_eq!(
            default_key_path(Path::new("/var/lib/mixnn/dir.db")),
            PathBuf::from("/var/lib/mixnn/dir.db.key")
        );
    }
}
