//! What a hop sees: constant sizes, no byte string carried across a hop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::*;
use mixnn_wire::*;

/// 16-byte windows at every 4-byte offset of `bytes`.
fn windows(bytes: &[u8]) -> HashSet<[u8; 16]> {
    (0..bytes.len().saturating_sub(15))
        .step_by(4)
        .map(|i| bytes[i..i + 16].try_into().unwrap())
        .collect()
}

fn assert_unlinked(a: &Onion, b: &Onion, hop: usize) {
    for (x, y, what) in [
        (&a.header.as_bytes()[..], &b.header.as_bytes()[..], "header"),
        (&a.notes.as_bytes()[..], &b.notes.as_bytes()[..], "notes"),
    ] {
        let before = windows(x);
        let shared = (0..y.len() - 15)
            .filter(|&i| before.contains(&y[i..i + 16]))
            .count();
        assert_eq!(shared, 0, "{what}: 16-byte string survives hop {hop}");
    }
}

#[test]
fn nothing_in_header_or_notes_survives_a_hop() {
    let mut rng = rng(1);
    let n = 5;
    let notes = vec![b"n".to_vec(); n];
    let secrets: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(&mut rng)).collect();
    let publics: Vec<OnionPublic> = secrets.iter().map(OnionSecret::public).collect();
    let path: Vec<usize> = (0..n).collect();
    let bl = blocks(Op::Init, &path);
    let (mut onion, mut designer) = wrap_init(&publics, &layers(&bl, &notes), &mut rng).unwrap();
    let mut tables: Vec<SessionTable> = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        let (peeled, session) =
            peel_init(s, &InitReplayCache::default(), &onion.header, &onion.notes).unwrap();
        let mut t = SessionTable::new();
        t.insert(session).unwrap();
        tables.push(t);
        if let Peeled::Forward(f) = peeled {
            assert_unlinked(&onion, &f.onion, i);
            onion = f.onion;
        }
    }
    let bl = blocks(Op::Forward, &path);
    let mut onion = designer
        .wrap(&path, &layers(&bl, &notes), &mut rng)
        .unwrap();
    for (i, t) in tables.iter_mut().enumerate() {
        if let Peeled::Forward(f) = peel_session(t, &onion.header, &onion.notes).unwrap() {
            assert_unlinked(&onion, &f.onion, i);
            onion = f.onion;
        }
    }
}

#[test]
fn every_cell_has_the_same_length_for_every_op_and_hop_position() {
    let mut rng = rng(2);
    let n = 4;
    let path: Vec<usize> = (0..n).collect();
    let no_notes = vec![Vec::new(); n];
    let mut c = init(n, &no_notes, &mut rng);
    let policy = PaddingPolicy::Uniform { max_body: 40_000 };
    let mut lengths = HashSet::new();
    // Init at hop 0 (the init body is empty).
    let bl = blocks(Op::Init, &path);
    let fresh: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(&mut rng)).collect();
    let publics: Vec<OnionPublic> = fresh.iter().map(OnionSecret::public).collect();
    let (init, _) = wrap_init(&publics, &layers(&bl, &no_notes), &mut rng).unwrap();
    lengths.insert(
        encode_cells(CellKind::Init, &init, &[], &policy)
            .unwrap()
            .len(),
    );
    lengths.insert(encode_cover(0, &policy, &mut rng).unwrap().len());
    for (op, body) in [
        (Op::Forward, 32_768),
        (Op::Backward, 20_000),
        (Op::Test, 40_000),
        (Op::Loop, 0),
        (Op::Fetch, 1),
        (Op::Cover, 7),
    ] {
        let route: Vec<usize> = if op == Op::Backward {
            path.iter().rev().copied().collect()
        } else {
            path.clone()
        };
        let bl = blocks(op, &route);
        let onion = c
            .designer
            .wrap(&route, &layers(&bl, &no_notes), &mut rng)
            .unwrap();
        let peeled = run_session(&mut c, &route, onion.clone());
        lengths.insert(
            encode_cells(CellKind::Session, &onion, &vec![0; body], &policy)
                .unwrap()
                .len(),
        );
        for p in peeled {
            if let Peeled::Forward(f) = p {
                assert_eq!(f.onion.header.as_bytes().len(), HEADER_LEN);
                assert_eq!(f.onion.notes.as_bytes().len(), NOTES_LEN);
                let cells =
                    encode_cells(CellKind::Session, &f.onion, &vec![0; body], &policy).unwrap();
                lengths.insert(cells.len());
            }
        }
    }
    assert_eq!(lengths.len(), 1, "{lengths:?}");
    assert_eq!(lengths.into_iter().next().unwrap() % CELL_SIZE, 0);
}

/// Every 8-byte string of `bytes`, at every offset.
fn windows8(bytes: &[u8], into: &mut HashSet<[u8; 8]>) {
    for w in bytes.windows(8) {
        into.insert(w.try_into().unwrap());
    }
}

/// Two hops that are not neighbours, following the protocol and pooling
/// what they see: every header and notes area they receive and send on,
/// forward and backward, over several packets. With a fixed session id in
/// each prefix, hop i wrote hop i+1's id into its forward output and hop
/// i+2 wrote it into its backward output: the colluders found a common
/// 16-byte string in every packet. Lookup tokens differ per packet.
#[test]
fn hops_two_apart_see_no_common_header_bytes_forward_and_backward() {
    let mut rng = rng(3);
    let n = 5;
    let no_notes = vec![Vec::new(); n];
    let mut c = init(n, &no_notes, &mut rng);
    let forward: Vec<usize> = (0..n).collect();
    let backward: Vec<usize> = forward.iter().rev().copied().collect();
    let mut seen: Vec<HashSet<[u8; 8]>> = vec![HashSet::new(); n];
    for _ in 0..4 {
        for route in [&forward, &backward] {
            // Fresh random tags, as the designer draws them.
            let bl: Vec<RoutingBlock> = blocks(Op::Forward, route)
                .into_iter()
                .map(|b| RoutingBlock {
                    tag: HopTag::random(&mut rng),
                    ..b
                })
                .collect();
            let mut onion = c
                .designer
                .wrap(route, &layers(&bl, &no_notes), &mut rng)
                .unwrap();
            for &hop in route.iter() {
                windows8(onion.header.as_bytes(), &mut seen[hop]);
                windows8(onion.notes.as_bytes(), &mut seen[hop]);
                let peeled = peel_session(&mut c.tables[hop], &onion.header, &onion.notes).unwrap();
                windows8(&peeled.tag().0, &mut seen[hop]);
                if let Peeled::Forward(f) = peeled {
                    windows8(f.onion.header.as_bytes(), &mut seen[hop]);
                    windows8(f.onion.notes.as_bytes(), &mut seen[hop]);
                    onion = f.onion;
                }
            }
        }
    }
    for a in 0..n {
        for b in a + 2..n {
            let common = seen[a].intersection(&seen[b]).count();

            assert_eq!(common, 0, "hops {a} and {b} share {common} 8-byte strings");
        }
    }
}
