//! `mixnn node`: the node daemon. Keys are made in the state directory on
//! first start and reused afterwards; the node writes its descriptor (the
//! `[[hop]]` entry a designer puts in its cascade file) to
//! `STATE/descriptor.toml` and prints it as one line on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mixnn_designer::{CascadeFile, HopInfo};
use mixnn_net::{Created, LinkListener, NodeKeys};
use mixnn_node::{Limits, NodeConfig};

/// `mixnn node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7000", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// State directory: keys (0600) and the node's descriptor.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Most inbound links served at once.
    #[arg(long, default_value_t = 256)]
    pub max_links: usize,
    /// Most training steps cached per session (steps in flight).
    #[arg(long, default_value_t = 64)]
    pub max_cached: usize,
}

/// Prefix of the line a node prints once it listens.
pub const READY_LINE: &str = "mixnn node ready: ";

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(args: &NodeArgs) -> anyhow::Result<()> {
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
        let config = mixnn_node::link_config()?;
        let listener = LinkListener::bind(args.listen, keys.link().clone(), config).await?;
        let addr = listener.local_addr()?;
        let public = keys.public();
        let descriptor = CascadeFile {
            hop: vec![HopInfo {
                addr,
                onion: public.onion.to_string(),
                link: public.link.to_string(),
            }],
        };
        let path = args.state.join("descriptor.toml");
        std::fs::write(&path, descriptor.to_toml())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{READY_LINE}addr={addr} onion={} link={}",
            public.onion, public.link
        );
        tracing::info!(%addr, "listening");
        let node_config = NodeConfig {
            limits: Limits {
                max_cached: args.max_cached,
                ..Limits::default()
            },
            max_links: args.max_links,
            learned_file: Some(args.state.join("learned-peers.txt")),
        };
        mixnn_node::run(listener, &keys, node_config, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
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
    for field in rest.split_whitespace() {
        match field.split_once('=') {
            Some(("addr", v)) => addr = v.parse().ok(),
            Some(("onion", v)) => onion = Some(v.to_string()),
            Some(("link", v)) => link = Some(v.to_string()),
            _ => {}
        }
    }
    Some(HopInfo {
        addr: addr?,
        onion: onion?,
        link: link?,
    })
}
