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

/// Ten nodes in ten /16s: 0–7 reliable, 8 and 9 with a report penalty of
/// two halvings (weight 1/4).
fn nodes() -> Vec<ViewNode> {
    (0..10u8)
        .map(|i| view_node(signed(i, T0), 1.0, if i >= 8 { 2.0 } else { 0.0 }))
        .collect()
}

const STRICT: Diversity = Diversity::Strict;

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
        let s = select(&nodes, 3, 2, STRICT, &mut rng).unwrap();
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
        n.weight = 1.0;
    }
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let mut picks = [0usize; 10];
    for _ in 0..DRAWS {
        for h in select(&nodes, 4, 1, STRICT, &mut rng).unwrap().hops {
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
    let a = select(&nodes, 3, 2, STRICT, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    let b = select(&nodes, 3, 2, STRICT, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    assert_eq!(a, b);
    let err = select(
        &nodes[..4],
        3,
        2,
        STRICT,
        &mut ChaCha20Rng::seed_from_u64(5),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DirectoryError::NotEnoughNodes {
                eligible: 4,
                needed: 5,
                diverse: 4
            }
        ),
        "{err}"
    );
    assert!(select(&nodes, 0, 2, STRICT, &mut ChaCha20Rng::seed_from_u64(5)).is_err());
    // Duplicates count once.
    let doubled: Vec<_> = nodes[..3].iter().chain(&nodes[..3]).cloned().collect();
    assert!(matches!(
        select(&doubled, 3, 1, STRICT, &mut ChaCha20Rng::seed_from_u64(5)),
        Err(DirectoryError::NotEnoughNodes {
            eligible: 3,
            needed: 4,
            diverse: 3
        })
    ));
    // All of them, no dummies.
    let all = select(&nodes, 10, 0, STRICT, &mut ChaCha20Rng::seed_from_u64(5)).unwrap();
    assert!(all.dummy_positions.is_empty());
    assert!(!all.is_dummy(0));
}

/// A signed descriptor of node `i` at `addr`, declaring `family`.
fn at(i: u8, addr: [u8; 4], family: &[u8]) -> SignedDescriptor {
    let key = node_key(i);
    let mut d = descriptor(&key, 7000 + u16::from(i), T0);
    d.addr = (addr, 7000).into();
    d.family = family
        .iter()
        .map(|&j| node_key(j).verifying_key().to_bytes())
        .collect();
    sign_descriptor(&key, &d).unwrap()
}

#[test]
fn no_two_hops_of_one_16_or_one_confirmed_family() {
    // Attack: an operator puts 20 nodes in 10.9.0.0/16 (two per /24, the
    // listing limit), beside 7 honest nodes in 7 other /16s. Nodes 30 and
    // 31 are one family (each lists the other), 32 claims 33 one-sidedly.
    let mut nodes: Vec<ViewNode> = (0..20u8)
        .map(|i| view_node(at(i, [10, 9, i / 2, i % 2 + 1], &[]), 1.0, 0.0))
        .collect();
    nodes.push(view_node(at(30, [20, 1, 0, 1], &[31]), 1.0, 0.0));
    nodes.push(view_node(at(31, [21, 1, 0, 1], &[30]), 1.0, 0.0));
    nodes.push(view_node(at(32, [22, 1, 0, 1], &[33]), 1.0, 0.0));
    for (i, net) in [(33u8, 23u8), (34, 24), (35, 25), (36, 26)] {
        nodes.push(view_node(at(i, [net, 1, 0, 1], &[]), 1.0, 0.0));
    }
    let mut rng = ChaCha20Rng::seed_from_u64(18);
    let mut sybil_hops = 0usize;
    let mut both_30_31 = 0usize;
    let mut with_32_33 = 0usize;
    for _ in 0..2000 {
        let s = select(&nodes, 5, 2, STRICT, &mut rng).unwrap();
        let prefixes: BTreeSet<_> = s
            .hops
            .iter()
            .map(|h| draw_prefix(h.descriptor.addr.ip()))
            .collect();
        assert_eq!(prefixes.len(), 7, "two hops in one /16");
        let ids: Vec<_> = s.hops.iter().map(|h| h.descriptor.identity).collect();
        let has = |i: u8| ids.contains(&node_key(i).verifying_key().to_bytes());
        sybil_hops += (0..20).filter(|&i| has(i)).count();
        both_30_31 += usize::from(has(30) && has(31));
        with_32_33 += usize::from(has(32) && has(33));
    }
    assert_eq!(both_30_31, 0, "one family twice in a cascade");
    assert!(
        sybil_hops <= 2000,
        "more than one hop per cascade in the Sybil /16"
    );
    // A one-sided claim excludes nobody.
    assert!(with_32_33 > 0);

    // Without the rule (local testing), the Sybil /16 fills cascades.
    let mut rng = ChaCha20Rng::seed_from_u64(18);
    let loose = (0..200)
        .map(|_| select(&nodes, 5, 2, Diversity::AllowSameSubnet, &mut rng).unwrap())
        .filter(|s| {
            s.hops
                .iter()
                .filter(|h| draw_prefix(h.descriptor.addr.ip()) == (4, 0x0a09))
                .count()
                >= 4
        })
        .count();
    assert!(loose > 50, "{loose}");
    // Too few distinct /16s for the cascade: a clear error.
    let err = select(&nodes[..20], 3, 0, STRICT, &mut rng).unwrap_err();
    assert!(
        matches!(
            err,
            DirectoryError::NotEnoughNodes {
                eligible: 20,
                needed: 3,
                diverse: 1
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--allow-same-subnet"), "{err}");
}
