//! Test vectors for a 3-hop init, a session forward pass and its cells, with
//! fixed onion keys and a seeded RNG (session prefixes: lookup token ‖
//! counter field, wire v2). Checked both ways: the designer's wrap
//! re-encodes to the recorded bytes, and peeling them decodes to the
//! recorded blocks and notes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mixnn_wire::*;

const SEED: u64 = 0x5eed;
const PUBLICS: [&str; 3] = [
    "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209",
    "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59",
    "5dfedd3b6bd47f6fa28ee15d969d5bb0ea53774d488bdaf9df1c6e0124b3ef22",
];
const INIT_PREFIX: &str = "004f780d017dc46defba311bac02446adc8efceaa618233a114bcfe560871a38";
const INIT_MAC: &str = "339221687a6ebe9372f2608cd02067a1";
const INIT_HEADER_B3: &str = "325b698c8a45cf3aba396c1d160246ab9a730d64f4fdebef6de93a7832f86496";
const INIT_NOTES_B3: &str = "28a5d43880753aa7c827b33cef212517aa93bb7d3c212fe7078c7df55c6f9c60";
const FWD_PREFIX: &str = "30933eb6ecc760b17d3bf2fc4ab6a8d6b9a7551efd0a2085b6c659e4a68fc7f4";
const FWD_MAC: &str = "147a57059a8ea8f95c9586eb8fcc27d4";
const FWD_HEADER_B3: &str = "6b5c6961bd31d30070a45ccd5791dc9af684cd78d0e8e96844c1c096447d741b";
const FWD_NOTES_B3: &str = "b3b28102c9d5376ea4fcd47a6857eaf479ddb390e378bb39dbfb58ac9d616d1f";
const CELLS_LEN: usize = 32768;
const CELLS_HEAD: &str = "0202000a00000030933eb6ecc760b17d3bf2fc4ab6a8d6b9a7551efd0a2085b6c659e4a68fc7f4f524423eb906209dfe";
const CELLS_B3: &str = "c5bd479e0755d07f8f82bb3debc41601f8952624db838bb21abec375cb7d2b57";

fn b3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn secrets() -> Vec<OnionSecret> {
    (1..=3u8)
        .map(|i| OnionSecret::from_bytes([i; 32]))
        .collect()
}

struct Vectors {
    init: Onion,
    forward: Onion,
    cells: Vec<u8>,
}

const PATH: [usize; 3] = [0, 1, 2];

fn init_notes() -> Vec<Vec<u8>> {
    vec![
        b"stage 0".to_vec(),
        b"stage 1".to_vec(),
        b"stage 2".to_vec(),
    ]
}

fn forward_notes() -> Vec<Vec<u8>> {
    vec![Vec::new(), Vec::new(), b"labels".to_vec()]
}

fn policy() -> PaddingPolicy {
    PaddingPolicy::Uniform { max_body: 20_000 }
}

/// The designer's side, from the fixed inputs.
fn encode() -> Vectors {
    let mut rng = rng(SEED);
    let publics: Vec<OnionPublic> = secrets().iter().map(OnionSecret::public).collect();
    let (init, mut d) = wrap_init(
        &publics,
        &layers(&blocks(Op::Init, &PATH), &init_notes()),
        &mut rng,
    )
    .unwrap();
    let fwd_blocks = blocks(Op::Forward, &PATH);
    let forward = d
        .wrap(&PATH, &layers(&fwd_blocks, &forward_notes()), &mut rng)
        .unwrap();
    let cells = encode_cells(CellKind::Session, &forward, b"activation", &policy()).unwrap();
    Vectors {
        init,
        forward,
        cells,
    }
}

#[test]
fn testvec_onion_public_keys() {
    for (s, hex_str) in secrets().iter().zip(PUBLICS) {
        assert_eq!(hex::encode(s.public().0), hex_str);
    }
}

#[test]
fn testvec_wrap_reencodes_to_the_recorded_bytes() {
    let v = encode();
    assert_eq!(hex::encode(v.init.header.prefix()), INIT_PREFIX);
    assert_eq!(hex::encode(v.init.header.mac()), INIT_MAC);
    assert_eq!(b3(v.init.header.as_bytes()), INIT_HEADER_B3);
    assert_eq!(b3(v.init.notes.as_bytes()), INIT_NOTES_B3);
    assert_eq!(hex::encode(v.forward.header.prefix()), FWD_PREFIX);
    assert_eq!(hex::encode(v.forward.header.mac()), FWD_MAC);
    assert_eq!(b3(v.forward.header.as_bytes()), FWD_HEADER_B3);
    assert_eq!(b3(v.forward.notes.as_bytes()), FWD_NOTES_B3);
    assert_eq!(v.cells.len(), CELLS_LEN);
    assert_eq!(hex::encode(&v.cells[..48]), CELLS_HEAD);
    assert_eq!(b3(&v.cells), CELLS_B3);
    // Padding after the 10-byte body is zero (inside the link encryption).
    // Kind (1), cell count (2) and body length (4) come first.
    let used = 7 + HEADER_LEN + NOTES_LEN + b"activation".len();
    assert!(v.cells[used..].iter().all(|&b| b == 0));
    assert_ne!(v.cells[used - 1], 0, "the body's last byte is not padding");
}

#[test]
fn testvec_peel_decodes_the_recorded_bytes() {
    let v = encode();
    // Cells decode to the recorded onion and body.
    let msg = decode_cells(&v.cells, &policy()).unwrap();
    assert_eq!(msg.kind, CellKind::Session);
    assert_eq!(msg.body, b"activation");
    assert_eq!(b3(msg.onion.header.as_bytes()), FWD_HEADER_B3);
    // Init: each hop learns its block and note.
    let init_blocks = blocks(Op::Init, &PATH);
    let mut onion = v.init;
    let mut tables = Vec::new();
    for (i, s) in secrets().iter().enumerate() {
        let (peeled, session) =
            peel_init(s, &InitReplayCache::default(), &onion.header, &onion.notes).unwrap();
        assert_eq!(peeled.block(), init_blocks[i]);
        assert_eq!(peeled.note(), &init_notes()[i][..]);
        let mut t = SessionTable::new();
        t.insert(session).unwrap();
        tables.push(t);
        if let Peeled::Forward(f) = peeled {
            onion = f.onion;
        }
    }
    // Forward: from the decoded cells.
    let fwd_blocks = blocks(Op::Forward, &PATH);
    let mut onion = msg.onion;
    for (i, t) in tables.iter_mut().enumerate() {
        let peeled = peel_session(t, &onion.header, &onion.notes).unwrap();
        assert_eq!(peeled.block(), fwd_blocks[i]);
        assert_eq!(peeled.note(), &forward_notes()[i][..]);
        if let Peeled::Forward(f) = peeled {
            onion = f.onion;
        }
    }
}
