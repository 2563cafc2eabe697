//! In-process cascades for tests: nodes on their own threads on
//! 127.0.0.1 with real links and real onions, driven by a real designer,
//! and a small synthetic data set.
//!
//! This test-only crate sits above both role crates: the designer does not
//! depend on the node (not even for its tests), so the tests that need
//! both in one process live here (`tests/in_process.rs`, `tests/loops.rs`,
//! `tests/byzantine.rs`). The process-level tests, which start `mixnn node`
//! processes, live with the binary (`crates/cli/tests`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod collusion;

use std::net::SocketAddr;

use mixnn_designer::HopInfo;
use mixnn_model::data::Dataset;
use mixnn_model::init::rng;
use mixnn_net::{LinkListener, NodeKeys};
use mixnn_node::{NodeConfig, NodeError};
use rand_core::{RngCore, SeedableRng};

/// The paper's five stages, narrower (quick in debug builds).
pub const NARROW: &str = r#"
name = "narrow-paper-mlp"
input = 784

[[stage]]
ops = [
  { op = "normalize", mean = 0.5, std = 0.5 },
  { op = "linear", in = 784, out = 16 },
  { op = "relu" },
]

[[stage]]
ops = [{ op = "linear", in = 16, out = 16 }, { op = "relu" }]

[[stage]]
ops = [{ op = "linear", in = 16, out = 10 }]

[[stage]]
ops = [{ op = "log_softmax" }]

[[stage]]
ops = [{ op = "nll_loss" }]
"#;

/// The paper's model description (`models/paper-mlp.toml`).
pub const PAPER: &str = include_str!("../../../models/paper-mlp.toml");

/// A data set of `n` 28×28 images whose pixels give their label away.
pub fn dataset(n: usize, seed: u64) -> Dataset {
    let mut r = rng(seed);
    let labels: Vec<u8> = (0..n).map(|_| (r.next_u32() % 10) as u8).collect();
    let pixels = labels
        .iter()
        .flat_map(|l| (0..784).map(move |i| if i % 10 == *l as usize { 180u8 } else { 30 }))
        .map(|p| p.wrapping_add((r.next_u32() % 60) as u8))
        .collect();
    Dataset {
        pixels,
        labels,
        rows: 28,
        cols: 28,
        channels: 1,
    }
}

/// A node on its own thread that stops when this is dropped.
pub struct RunningNode {
    /// Its address and keys.
    pub info: HopInfo,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a node with `config` on its own thread, until the handle is
/// dropped.
pub fn start_stoppable_node(seed: u64, config: NodeConfig) -> RunningNode {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let info = start_node_until(seed, config, async move {
        let _ = stopped.await;
    });
    RunningNode {
        info,
        stop: Some(stop),
    }
}

/// Starts a node with `config` on its own thread; returns its address and
/// keys.
pub fn start_node_with(seed: u64, config: NodeConfig) -> HopInfo {
    start_node_until(seed, config, std::future::pending())
}

fn start_node_until(
    seed: u64,
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> HopInfo {
    let keys = NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
    let public = keys.public();
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = LinkListener::bind(
                "127.0.0.1:0".parse().unwrap(),
                keys.link().clone(),
                mixnn_net::LinkConfig::mixnn(),
            )
            .await
            .unwrap()
            .answer_probes(&keys);
            tx.send(listener.local_addr().unwrap()).unwrap();
            let r: Result<(), NodeError> = mixnn_node::run(listener, &keys, config, shutdown).await;
            r.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    HopInfo {
        addr,
        onion: public.onion.to_string(),
        link: public.link.to_string(),
        arith: mixnn_model::arith::ARITH_VERSION,
    }
}

/// Starts a node with the default configuration.
pub fn start_node(seed: u64) -> HopInfo {
    start_node_with(seed, NodeConfig::default())
}
