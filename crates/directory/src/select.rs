//! Cascade selection (designer side, pure): n = p + r distinct nodes drawn
//! at random, weighted by reliability, with the r dummy hops at uniformly
//! random positions, and no two hops that one party plausibly runs.
//!
//! **Weight.** A node's weight is
//! `max(MIN_WEIGHT, uptime_fraction · 0.5^penalty)`, where `penalty` is the
//! directory's capped, decaying sum of failure reports about the node
//! (`docs/directory-api.md`; at most [`MAX_PENALTY`], at most
//! [`REPORTER_CAP`] from any one reporter and [`PREFIX_CAP`] from any one
//! source /24, which penalises at most [`REPORTED_PER_PREFIX`] nodes). A node that was always up and
//! never reported is weight 1. The floor [`MIN_WEIGHT`] keeps every
//! eligible node possible, and the caps keep reports from pushing an
//! honest node down: one reporter can at most halve a node's weight, all
//! of them together at most divide it by 2^[`MAX_PENALTY`].
//!
//! **Draw.** Nodes are drawn one after another without replacement, each
//! with probability proportional to its weight among those left. After
//! each pick, every node that [`Diversity::conflict`]s with it leaves the
//! pool: its confirmed family, and (unless
//! [`Diversity::AllowSameSubnet`]) every node in its IPv4 /16 or IPv6 /32.
//! The drawn nodes are then shuffled uniformly, so that a hop's position
//! says nothing about its node's reliability, and r of the n positions
//! (any of them, first and last included) are chosen uniformly to be
//! dummies. Which positions are dummies is all the designer needs: it
//! gives real stages to the other hops in order and identity stages to the
//! dummies.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::diversity::Diversity;
use crate::error::{DirectoryError, Result};
use crate::view::ViewNode;

/// The smallest weight an eligible node can have.
pub const MIN_WEIGHT: f64 = 0.01;

/// The largest report penalty a weight counts (halvings): reports can
/// divide a node's weight by at most 2^MAX_PENALTY = 8.
pub const MAX_PENALTY: f64 = 3.0;

/// The largest penalty one reporter's reports about one node add up to
/// (halvings): one reporter can at most halve a node's weight.
pub const REPORTER_CAP: f64 = 1.0;

/// The largest penalty the reports from one source prefix (an IPv4 /24 or
/// IPv6 /29, whatever keys sent them) add up to about one node: reporters
/// of one network can at most halve a node's weight.
pub const PREFIX_CAP: f64 = 1.0;

/// How many nodes the reports from one source prefix penalise at a time
/// (those it reported most recently): with [`PREFIX_CAP`], the reports
/// from one /24 take at most `REPORTED_PER_PREFIX / 2` nodes' worth of
/// weight off the view.
pub const REPORTED_PER_PREFIX: usize = 4;

/// The selection weight for a node with this uptime and this report
/// penalty (see the module docs); `penalty` is clamped to
/// `0..=MAX_PENALTY` (NaN counts as 0).
pub fn weight(uptime_fraction: f64, penalty: f64) -> f64 {
    let up = if uptime_fraction.is_finite() {
        uptime_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let penalty = if penalty.is_nan() {
        0.0
    } else {
        penalty.clamp(0.0, MAX_PENALTY)
    };
    (up * 0.5f64.powf(penalty)).max(MIN_WEIGHT)
}

impl ViewNode {
    /// This node's selection weight: [`weight`] of its figures, or under
    /// k-of-N the median of the agreeing directories' ([`crate::verify_quorum`]).
    pub fn weight(&self) -> f64 {
        if self.weight.is_finite() {
            self.weight.clamp(MIN_WEIGHT, 1.0)
        } else {
            MIN_WEIGHT
        }
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

/// Picks `p_real + r_dummies` distinct nodes of `nodes` under the
/// `diversity` rule (see the module docs). Every node in `nodes` is
/// eligible; should the same identity key or address appear twice, only
/// its first entry is. Fails if the pool runs dry before enough nodes are
/// drawn (too few nodes, or too few distinct prefixes and families), or if
/// `p_real` is 0.
pub fn select<R: Rng + ?Sized>(
    nodes: &[ViewNode],
    p_real: usize,
    r_dummies: usize,
    diversity: Diversity,
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
    let eligible = pool.len();
    let mut picked = Vec::with_capacity(needed);
    while picked.len() < needed {
        if pool.is_empty() {
            return Err(DirectoryError::NotEnoughNodes {
                eligible,
                needed,
                diverse: picked.len(),
            });
        }
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
        let i = pool.swap_remove(chosen).0;
        let d = &nodes[i].descriptor;
        pool.retain(|(j, _)| !diversity.conflict(d, &nodes[*j].descriptor));
        picked.push(i);
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
    fn weight_halves_per_penalty_and_is_bounded() {
        assert_eq!(weight(1.0, 0.0), 1.0);
        assert_eq!(weight(1.0, 1.0), 0.5);
        assert_eq!(weight(0.5, 2.0), 0.125);
        assert_eq!(weight(0.0, 0.0), MIN_WEIGHT);
        assert_eq!(weight(f64::NAN, 0.0), MIN_WEIGHT);
        // However many reports: at most 2^MAX_PENALTY.
        assert_eq!(weight(1.0, 1e9), 0.125);
        assert_eq!(weight(1.0, f64::INFINITY), 0.125);
        assert_eq!(weight(1.0, f64::NAN), 1.0);
        assert_eq!(weight(7.0, -3.0), 1.0);
    }
}
