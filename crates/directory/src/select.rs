//! Cascade selection (designer side, pure): n = p + r distinct nodes drawn
//! at random, weighted by reliability, with the r dummy hops at uniformly
//! random positions.
//!
//! **Weight.** A node's weight is
//! `max(MIN_WEIGHT, uptime_fraction · 0.5^recent_failures)`: a node that was
//! always up and never reported is weight 1, each recent failure halves it,
//! and the floor [`MIN_WEIGHT`] keeps every eligible node possible, so no
//! node (a new or an unlucky one) is excluded outright and an adversary
//! cannot push honest nodes out by reporting them.
//!
//! **Draw.** Nodes are drawn one after another without replacement, each
//! with probability proportional to its weight among those left. The drawn
//! nodes are then shuffled uniformly, so that a hop's position says nothing
//! about its node's reliability, and r of the n positions (any of them,
//! first and last included) are chosen uniformly to be dummies. Which
//! positions are dummies is all the designer needs: it gives real stages to
//! the other hops in order and identity stages to the dummies.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::{DirectoryError, Result};
use crate::view::ViewNode;

/// The smallest weight an eligible node can have.
pub const MIN_WEIGHT: f64 = 0.01;

/// The selection weight for a node with this uptime and these recent
/// failures (see the module docs).
pub fn weight(uptime_fraction: f64, recent_failures: u64) -> f64 {
    let up = if uptime_fraction.is_finite() {
        uptime_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    // 0.5^64 is far below the floor already; the cap keeps powi's argument small.
    let halvings = i32::try_from(recent_failures.min(64)).unwrap_or(64);
    (up * 0.5f64.powi(halvings)).max(MIN_WEIGHT)
}

impl ViewNode {
    /// This node's selection weight ([`weight`]).
    pub fn weight(&self) -> f64 {
        weight(self.uptime_fraction, self.recent_failures)
    }
}

/// A chosen cascade: the nodes in hop order and which hops are dummies.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The n nodes, in hop order (hop 0 first).
    pub hops: Vec<ViewNode>,
    /// Hop indices that are dummies, ascending.
    pub dummy_positions: Vec<usize>,
}

impl Selection {
    /// Whether hop `i` is a dummy.
    pub fn is_dummy(&self, i: usize) -> bool {
        self.dummy_positions.binary_search(&i).is_ok()
    }

    /// The real hops as `(hop index, node)`, in order; the k-th of them runs
    /// stage k.
    pub fn real_hops(&self) -> impl Iterator<Item = (usize, &ViewNode)> {
        self.hops
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_dummy(*i))
    }
}

/// Picks `p_real + r_dummies` distinct nodes of `nodes` (see the module
/// docs). Every node in `nodes` is eligible; should the same identity key
/// or address appear twice, only its first entry is. Fails if fewer
/// eligible nodes than needed, or if `p_real` is 0.
pub fn select<R: Rng + ?Sized>(
    nodes: &[ViewNode],
    p_real: usize,
    r_dummies: usize,
    rng: &mut R,
) -> Result<Selection> {
    if p_real == 0 {
        return Err(DirectoryError::InvalidField {
            field: "p_real",
            reason: "a cascade needs at least one real stage".into(),
        });
    }
    let needed = p_real.saturating_add(r_dummies);
    let mut identities = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    let mut pool: Vec<(usize, f64)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| identities.insert(n.descriptor.identity) & addrs.insert(n.descriptor.addr))
        .map(|(i, n)| (i, n.weight()))
        .collect();
    if pool.len() < needed {
        return Err(DirectoryError::NotEnoughNodes {
            eligible: pool.len(),
            needed,
        });
    }
    let mut picked = Vec::with_capacity(needed);
    for _ in 0..needed {
        let total: f64 = pool.iter().map(|(_, w)| w).sum();
        let mut u = rng.gen::<f64>() * total;
        // Rounding can leave u just above the last cumulative sum; the last
        // candidate takes it then.
        let mut chosen = pool.len() - 1;
        for (k, (_, w)) in pool.iter().enumerate() {
            if u < *w {
                chosen = k;
                break;
            }
            u -= w;
        }
        picked.push(pool.swap_remove(chosen).0);
    }
    picked.shuffle(rng);
    let mut dummy_positions = rand::seq::index::sample(rng, needed, r_dummies).into_vec();
    dummy_positions.sort_unstable();
    Ok(Selection {
        hops: picked.into_iter().map(|i| nodes[i].clone()).collect(),
        dummy_positions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_halves_per_failure_and_has_a_floor() {
        assert_eq!(weight(1.0, 0), 1.0);
        assert_eq!(weight(1.0, 1), 0.5);
        assert_eq!(weight(0.5, 2), 0.125);
        assert_eq!(weight(0.0, 0), MIN_WEIGHT);
        assert_eq!(weight(f64::NAN, 0), MIN_WEIGHT);
        assert_eq!(weight(1.0, u64::MAX), MIN_WEIGHT);
        assert_eq!(weight(7.0, 0), 1.0);
    }
}
