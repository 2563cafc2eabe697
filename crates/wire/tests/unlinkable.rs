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
        let (peeled, session) = peel_init(
            s,
            &mut InitReplayCache::default(),
            &onion.header,
            &onion.notes,
        )
        .unwrap();
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
