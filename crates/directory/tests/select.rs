//! Selection statistics over many draws with a fixed seed: every node is
//! picked sometimes, none twice in a cascade, unreliable ones less often,
//! dummies everywhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use mixnn_directory::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const DRAWS: usize = 4000;

/// Ten nodes: 0–7 reliable, 8 and 9 with two recent failures (weight 1/4).
fn nodes() -> Vec<ViewNode> {
    (0..10u8)
        .map(|i| {
            let s = signed(i, T0);
            ViewNode {
                descriptor: s.verify_signature().unwrap(),
                signed: s,
                uptime_fraction: 1.0,
                missed_heartbeats: 0,
                recent_failures: if i >= 8 { 2 } else { 0 },
            }
        })
        .collect()
}

fn index_of(nodes: &[ViewNode], hop: &ViewNode) -> usize {
    nodes
        .iter()
        .position(|n| n.descriptor.identity == hop.descriptor.identity)
        .unwrap()
}

#[test]
fn selection_picks_everyone_sometimes_never_twice_and_unreliable_nodes_less() {
    let nodes = nodes();
    let mut rng = ChaCha20Rng::seed_from_u64(2024);
    let mut picks = [0usize; 10];
    let mut dummy_at = [0usize; 5];
    let mut hop0 = [0usize; 10];
    for _ in 0..DRAWS {
        let s = select(&nodes, 3, 2, &mut rng).unwrap();
        assert_eq!(s.hops.len(), 5);
        assert_eq!(s.dummy_positions.len(), 2);
        assert!(s.dummy_positions.windows(2).all(|w| w[0] < w[1]));
        let ids: BTreeSet<_> = s.hops.iter().map(|h| h.descriptor.identity).collect();
        assert_eq!(ids.len(), 5, "a node was picked twice");
        for h in &s.hops {
            picks[index_of(&nodes, h)] += 1;
        }
        hop0[index_of(&nodes, &s.hops[0])] += 1;
        for &p in &s.dummy_positions {
            dummy_at[p] += 1;
        }
        assert_eq!(s.real_hops().count(), 3);
    }
    assert!(picks.iter().all(|&c| c > 0), "{picks:?}");
    let least_reliable = picks[..8].iter().min().unwrap();
    let most_unreliable = picks[8..].iter().max().unwrap();
    // Inclusion probabilities are about 0.56 vs 0.19: require a wide margin.
    assert!(
        *least_reliable as f64 > 1.8 * *most_unreliable as f64,
        "reliable {picks:?}"
    );
    assert!(
        *most_unreliable > DRAWS / 10,
        "unreliable nodes must still be picked: {picks:?}"
    );
    // Each position is a dummy with probability 2/5 (1600 of 4000 expected).
    assert!(
        dummy_at.iter().all(|&c| (1400..1800).contains(&c)),
        "{dummy_at:?}"
    );
    // Hop 0 is uniform among the drawn nodes: reliable nodes are not pushed forward
    // beyond their higher inclusion rate (each reliable ≈ 0.57/5 ≈ 11.4 % of draws).
    assert!(
        hop0[..8].iter().all(|&c| (300..620).contains(&c)),
        "{hop0:?}"
    );
}

#[test]
fn equal_weights_give_a_uniform_selection() {
    let mut nodes = nodes();
    for n in &mut nodes {
        n.recent_failures = 0;
    }
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let mut picks = [0usize; 10];
    for _ in 0..DRAWS {
        for h in select(&nodes, 4, 1, &mut rng).unwrap().hops {
            picks[index_of(&nodes, &h)] += 1;
        }
    }
    // Expected 2000 each; chi-square with 9 degrees of freedom.
    let expected = (DRAWS * 5) as f64 / 10.0;
    let chi2: f64 = picks
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 27.9, "chi2 = {chi2}, picks {picks:?}"); // p = 0.001
}

#[test]
fn selection_is_reproducible_and_checks_its_inputs() {
    let nodes = nodes();
    let a = select(&nodes, 3, 2, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    let b = select(&nodes, 3, 2, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    assert_eq!(a, b);
    let err = select(&nodes[..4], 3, 2, &mut ChaCha20Rng::seed_from_u64(5)).unwrap_err();
    assert!(
        matches!(
            err,
            DirectoryError::NotEnoughNodes {
                eligible: 4,
                needed: 5
            }
        ),
        "{err}"
    );
    assert!(select(&nodes, 0, 2, &mut ChaCha20Rng::seed_from_u64(5)).is_err());
    // Duplicates count once.
    let doubled: Vec<_> = nodes[..3].iter().chain(&nodes[..3]).cloned().collect();
    assert!(matches!(
        select(&doubled, 3, 1, &mut ChaCha20Rng::seed_from_u64(5)),
        Err(DirectoryError::NotEnoughNodes {
            eligible: 3,
            needed: 4
        })
    ));
    // All of them, no dummies.
    let all = select(&nodes, 10, 0, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    assert!(all.dummy_positions.is_empty());
    assert!(!all.is_dummy(0));
}
