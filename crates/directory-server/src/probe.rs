//! Admission by proof: before a node is listed, and again every
//! `reprobe_interval`, the directory reaches it at its address and checks
//! that it holds the descriptor's link and onion keys ([`mixnn_net::probe`]:
//! the first two messages of a link handshake, with an onion-key proof).

use std::time::Duration;

use mixnn_directory::Descriptor;
use mixnn_net::{LinkConfig, ProbeTarget};

/// Something that can prove a node at its address. Blocking.
pub trait Prober: Send + Sync + 'static {
    /// Ok if the node at `d.addr` proved `d.link` and `d.onion` for
    /// `d.identity`; otherwise why not, in one line.
    fn probe(&self, d: &Descriptor) -> Result<(), String>;
}

/// The real prober: a Noise probe over TCP within a time limit.
#[derive(Debug, Clone, Copy)]
pub struct NoiseProber {
    config: LinkConfig,
}

impl NoiseProber {
    /// Probes bounded by `timeout` each (connect included).
    pub fn new(timeout: Duration) -> Self {
        Self {
            config: LinkConfig::mixnn().with_handshake_timeout(timeout),
        }
    }
}

impl Prober for NoiseProber {
    fn probe(&self, d: &Descriptor) -> Result<(), String> {
        let target = ProbeTarget {
            addr: d.addr,
            identity: d.identity,
            link: d.link,
            onion: d.onion,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a probe: {e}"))?;
        rt.block_on(mixnn_net::probe(&target, self.config))
            .map_err(|e| e.to_string())
    }
}
