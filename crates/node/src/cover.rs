//! Link cover traffic (paper §2.2): a node sends messages of random content
//! to random peers at Poisson times; receivers drop them on arrival.
//!
//! A cover message must look like a data message to a link observer: it is
//! [`CellKind::Cover`](mixnn_wire::CellKind::Cover) (inside the link encryption), of the cell count the
//! node sends most often ([`CellCounts`]). A node sends no cover before it
//! has sent one real message, so that no cover message is of a size no
//! cascade uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use mixnn_net::pacing::{cover_message, CellCounts};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::sync::mpsc;

use crate::core::Outbound;

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

/// A peer cover traffic may go to: its address and link key.
pub type CoverPeer = (SocketAddr, [u8; 32]);

/// Sends cover messages at `rate` per second to peers drawn uniformly from
/// `peers`, until `tx` closes. `seed` seeds the times, the peers and the
/// content.
pub(crate) async fn cover_loop(
    rate: f64,
    peers: Vec<CoverPeer>,
    sizes: Arc<CellCounts>,
    tx: mpsc::UnboundedSender<Outbound>,
    seed: [u8; 32],
) {
    let mut rng = ChaCha8Rng::from_seed(seed);
    if peers.is_empty() {
        return;
    }
    while let Some(gap) = poisson_gap(rate, &mut rng) {
        tokio::time::sleep(gap).await;
        let cells = sizes.mode();
        if cells == 0 {
            continue;
        }
        let (addr, expect) = peers[(rng.next_u64() % peers.len() as u64) as usize];
        let cells = match cover_message(cells, &mut rng) {
            Ok(c) => c,
            Err(e) => return tracing::error!("cover: {e}"),
        };
        if tx
            .send(Outbound {
                addr,
                expect,
                cells,
            })
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

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
}
