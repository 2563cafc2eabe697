//! Capture analysis: how often an adversary holding a fraction f of the
//! listed nodes gets one hop, both ends, two adjacent hops or a majority of
//! a five-hop cascade with two dummies (seven hops), with the old draw (no
//! diversity: `Diversity::AllowSameSubnet`) and the new one
//! (`Diversity::Strict`: one hop per /16). The adversary's nodes are all in
//! one /16, or spread over /16s of their own. Honest nodes: 60, two per
//! /16. All weights equal. Prints the table of SECURITY.md:
//! `cargo test -p mixnn-directory --test capture -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mixnn_directory::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const DRAWS: usize = 4000;
const HONEST: usize = 60;

fn node(i: u16, addr: [u8; 4]) -> ViewNode {
    let key = mixnn_directory::ed25519_dalek::SigningKey::from_bytes(&{
        let mut s = [0u8; 32];
        s[..2].copy_from_slice(&i.to_be_bytes());
        s[2] = 0x77;
        s
    });
    let mut d = descriptor(&key, 7000, T0);
    d.addr = (addr, 7000).into();
    view_node(sign_descriptor(&key, &d).unwrap(), 1.0, 0.0)
}

/// Honest nodes and `bad` adversary nodes (the first `bad` are the
/// adversary's), in one /16 or spread.
fn nodes(bad: usize, one_16: bool) -> Vec<ViewNode> {
    let mut v = Vec::new();
    for i in 0..bad {
        let addr = if one_16 {
            [66, 6, (i / 2) as u8, (i % 2) as u8 + 1]
        } else {
            [100 + (i / 200) as u8, (i % 200) as u8, 0, 1]
        };
        v.push(node(i as u16, addr));
    }
    for j in 0..HONEST {
        v.push(node(
            1000 + j as u16,
            [
                10 + (j / 2 / 200) as u8,
                (j / 2) as u8,
                0,
                (j % 2) as u8 + 1,
            ],
        ));
    }
    v
}

#[derive(Default, Debug, Clone, Copy)]
struct Odds {
    one: f64,
    ends: f64,
    adjacent: f64,
    majority: f64,
}

fn odds(nodes: &[ViewNode], bad: usize, diversity: Diversity, seed: u64) -> Odds {
    let bad_ids: Vec<_> = nodes[..bad].iter().map(|n| n.descriptor.identity).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut o = Odds::default();
    for _ in 0..DRAWS {
        let s = select(nodes, 5, 2, diversity, &mut rng).unwrap();
        let b: Vec<bool> = s
            .hops
            .iter()
            .map(|h| bad_ids.contains(&h.descriptor.identity))
            .collect();
        let count = b.iter().filter(|&&x| x).count();
        o.one += f64::from(u8::from(count >= 1));
        o.ends += f64::from(u8::from(b[0] && b[b.len() - 1]));
        o.adjacent += f64::from(u8::from(b.windows(2).any(|w| w[0] && w[1])));
        o.majority += f64::from(u8::from(count * 2 > b.len()));
    }
    let n = DRAWS as f64;
    Odds {
        one: o.one / n,
        ends: o.ends / n,
        adjacent: o.adjacent / n,
        majority: o.majority / n,
    }
}

#[test]
fn capture_table_old_rules_vs_new() {
    println!("| f | adversary | rules | P(>=1 hop) | P(both ends) | P(2 adjacent) | P(majority) |");
    println!("|---|---|---|---|---|---|---|");
    for (k, f) in [0.1f64, 0.2, 0.33].into_iter().enumerate() {
        let bad = (f / (1.0 - f) * HONEST as f64).round() as usize;
        for one_16 in [true, false] {
            let v = nodes(bad, one_16);
            let old = odds(&v, bad, Diversity::AllowSameSubnet, 7 + k as u64);
            let new = odds(&v, bad, Diversity::Strict, 7 + k as u64);
            for (rules, o) in [("old", old), ("new", new)] {
                println!(
                    "| {f} | {} | {rules} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    if one_16 { "one /16" } else { "spread" },
                    o.one,
                    o.ends,
                    o.adjacent,
                    o.majority
                );
            }
            if one_16 {
                // One /16 gives at most one hop under the new rule.
                assert_eq!((new.ends, new.adjacent, new.majority), (0.0, 0.0, 0.0));
                assert!(old.adjacent > 0.0 && old.ends > 0.0);
            }
        }
    }
}
