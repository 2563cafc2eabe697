//! Every tampered, truncated, replayed or mis-keyed input is rejected with a
//! typed error, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mixnn_wire::*;

fn flip(bytes: &[u8], bit: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[bit / 8] ^= 1 << (bit % 8);
    out
}

/// A one-hop session onion and the cascade that can peel it.
fn one_session_packet(seed: u64) -> (Cascade, Onion) {
    let mut rng = rng(seed);
    let mut c = init(2, &[vec![1], vec![2]], &mut rng);
    let bl = blocks(Op::Forward, &[0, 1]);
    let notes = [b"labels".to_vec(), Vec::new()];
    let onion = c
        .designer
        .wrap(&[0, 1], &layers(&bl, &notes), &mut rng)
        .unwrap();
    (c, onion)
}

#[test]
fn session_peel_rejects_every_single_bit_flip_in_header_and_notes() {
    let (mut c, onion) = one_session_packet(1);
    let header = onion.header.as_bytes();
    let notes = onion.notes.as_bytes();
    // Every bit of the header, then every bit of the notes.
    for bit in 0..HEADER_LEN * 8 {
        let h = Header::from_bytes(&flip(header, bit)).unwrap();
        let err = peel_session(&mut c.tables[0], &h, &onion.notes).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::MacMismatch
                    | WireError::BadCounter
                    | WireError::UnknownSession
                    | WireError::Replay
                    | WireError::Stale { .. }
            ),
            "header bit {bit}: {err:?}"
        );
    }
    for bit in 0..NOTES_LEN * 8 {
        let n = Notes::from_bytes(&flip(notes, bit)).unwrap();
        assert_eq!(
            peel_session(&mut c.tables[0], &onion.header, &n).unwrap_err(),
            WireError::MacMismatch,
            "notes bit {bit}"
        );
    }
    // The untouched packet still goes through: rejections left no state.
    peel_session(&mut c.tables[0], &onion.header, &onion.notes).unwrap();
}

#[test]
fn init_peel_rejects_bit_flips_including_the_ignored_x25519_high_bit() {
    let mut rng = rng(2);
    let secret = OnionSecret::generate(&mut rng);
    let bl = blocks(Op::Init, &[0]);
    let notes = [b"stage".to_vec()];
    let (onion, _) = wrap_init(&[secret.public()], &layers(&bl, &notes), &mut rng).unwrap();
    let header = onion.header.as_bytes();
    let mut bits: Vec<usize> = (0..32 * 8).collect(); // every bit of α
    bits.extend((0..HEADER_LEN).step_by(7).map(|i| i * 8 + i % 8));
    for bit in bits {
        let h = Header::from_bytes(&flip(header, bit)).unwrap();
        let r = peel_init(&secret, &InitReplayCache::default(), &h, &onion.notes);
        assert!(
            matches!(r, Err(WireError::MacMismatch | WireError::WeakSharedSecret)),
            "bit {bit}: {r:?}"
        );
    }
    for i in (0..NOTES_LEN).step_by(5) {
        let n = Notes::from_bytes(&flip(onion.notes.as_bytes(), i * 8)).unwrap();
        let r = peel_init(&secret, &InitReplayCache::default(), &onion.header, &n);
        assert_eq!(r.unwrap_err(), WireError::MacMismatch);
    }
}

#[test]
fn peel_rejects_wrong_keys() {
    let (mut c, onion) = one_session_packet(3);
    // Hop 1's session cannot read hop 0's layer (unknown session id).
    assert_eq!(
        peel_session(&mut c.tables[1], &onion.header, &onion.notes).unwrap_err(),
        WireError::UnknownSession
    );
    // An init for node 0 does not open with node 1's onion key.
    let mut rng = rng(4);
    let bl = blocks(Op::Init, &[0]);
    let (init, _) = wrap_init(&[c.secrets[0].public()], &layers(&bl, &[vec![]]), &mut rng).unwrap();
    let r = peel_init(
        &c.secrets[1],
        &InitReplayCache::default(),
        &init.header,
        &init.notes,
    );
    assert_eq!(r.unwrap_err(), WireError::MacMismatch);
}

#[test]
fn peel_rejects_session_replay_and_init_replay() {
    let (mut c, onion) = one_session_packet(5);
    peel_session(&mut c.tables[0], &onion.header, &onion.notes).unwrap();
    assert_eq!(
        peel_session(&mut c.tables[0], &onion.header, &onion.notes).unwrap_err(),
        WireError::Replay
    );
    let mut rng = rng(6);
    let bl = blocks(Op::Init, &[0]);
    let (init, _) = wrap_init(&[c.secrets[0].public()], &layers(&bl, &[vec![]]), &mut rng).unwrap();
    let mut seen = InitReplayCache::default();
    let (_, session) = peel_init(&c.secrets[0], &seen, &init.header, &init.notes).unwrap();
    seen.insert(session.init_tag(), 0).unwrap();
    assert_eq!(
        peel_init(&c.secrets[0], &seen, &init.header, &init.notes).unwrap_err(),
        WireError::Replay
    );
}

#[test]
fn truncated_inputs_are_rejected_with_length_errors() {
    let (_, onion) = one_session_packet(7);
    for len in [0, 1, HEADER_LEN - 1] {
        assert!(matches!(
            Header::from_bytes(&onion.header.as_bytes()[..len]),
            Err(WireError::Length { .. })
        ));
    }
    assert!(matches!(
        Notes::from_bytes(&onion.notes.as_bytes()[..NOTES_LEN - 1]),
        Err(WireError::Length { .. })
    ));
    let policy = PaddingPolicy::Uniform { max_body: 50_000 };
    let cells = encode_cells(CellKind::Session, &onion, &[3; 30_000], &policy).unwrap();
    for cut in [1, CELL_SIZE, cells.len() - CELL_SIZE, cells.len() - 1] {
        assert!(
            decode_cells(&cells[..cut], &policy).is_err(),
            "cut at {cut}"
        );
    }
}

#[test]
fn wrap_rejects_malformed_paths() {
    let (mut c, _) = one_session_packet(9);
    let mut rng = rng(10);
    let bl = blocks(Op::Forward, &[0, 1]);
    let none: Vec<HopLayer<'_>> = Vec::new();
    assert!(matches!(
        c.designer.wrap(&[], &none, &mut rng),
        Err(WireError::PathLength { .. })
    ));
    let two = [Vec::new(), Vec::new()];
    assert!(matches!(
        c.designer.wrap(&[0, 5], &layers(&bl, &two), &mut rng),
        Err(WireError::UnknownHop { index: 5, .. })
    ));
    let reversed: Vec<RoutingBlock> = bl.iter().rev().copied().collect();
    assert!(matches!(
        c.designer.wrap(&[0, 1], &layers(&reversed, &two), &mut rng),
        Err(WireError::BadPath { index: 0, .. })
    ));
    let init_ops = blocks(Op::Init, &[0, 1]);
    assert!(matches!(
        c.designer.wrap(&[0, 1], &layers(&init_ops, &two), &mut rng),
        Err(WireError::OpMismatch { .. })
    ));
    let big = [vec![0; 3000], vec![0; 3000]];
    assert!(matches!(
        c.designer.wrap(&[0, 1], &layers(&bl, &big), &mut rng),
        Err(WireError::NotesTooLong { .. })
    ));
    let path: Vec<usize> = vec![0; MAX_HOPS + 1];
    let long = blocks(Op::Forward, &path);
    let long_notes = vec![Vec::new(); MAX_HOPS + 1];
    assert!(matches!(
        c.designer
            .wrap(&path, &layers(&long, &long_notes), &mut rng),
        Err(WireError::PathLength { .. })
    ));
}

#[test]
fn init_rejects_low_order_onion_keys() {
    let mut rng = rng(11);
    let bl = blocks(Op::Init, &[0]);
    let r = wrap_init(&[OnionPublic([0; 32])], &layers(&bl, &[vec![]]), &mut rng);
    assert_eq!(r.unwrap_err(), WireError::WeakSharedSecret);
    let secret = OnionSecret::generate(&mut rng);
    let mut h = vec![0u8; HEADER_LEN];
    h[0] = 1; // u = 1 has order 4: clamped DH gives zero
    let header = Header::from_bytes(&h).unwrap();
    let notes = Notes::from_bytes(&[0; NOTES_LEN]).unwrap();
    let r = peel_init(&secret, &InitReplayCache::default(), &header, &notes);
    assert_eq!(r.unwrap_err(), WireError::WeakSharedSecret);
}
