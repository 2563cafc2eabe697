//! Shared helpers for the integration tests (a cascade of in-memory hops).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, missing_docs)]

use mixnn_wire::*;
use rand_core::SeedableRng;

pub type Rng = rand_chacha::ChaCha20Rng;

pub fn rng(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

pub fn addr(i: usize) -> HopAddr {
    if i.is_multiple_of(2) {
        HopAddr(
            format!("10.0.{}.{}:{}", i / 250, i % 250, 7000 + i)
                .parse()
                .unwrap(),
        )
    } else {
        HopAddr(format!("[2001:db8::{i:x}]:{}", 9000 + i).parse().unwrap())
    }
}

pub fn designer_addr() -> HopAddr {
    HopAddr("192.0.2.1:4000".parse().unwrap())
}

/// Blocks for visiting `path` (node indices): forward to the next node's
/// address, and deliver to the designer at the end.
pub fn blocks(op: Op, path: &[usize]) -> Vec<RoutingBlock> {
    (0..path.len())
        .map(|k| RoutingBlock {
            op,
            next: match path.get(k + 1) {
                Some(&j) => Next::Hop(addr(j)),
                None => Next::Deliver {
                    addr: designer_addr(),
                    reply_id: ReplyId([0xee; 16]),
                },
            },
            tag: HopTag([k as u8 ^ 0x5a; 16]),
        })
        .collect()
}

pub fn layers<'a>(blocks: &[RoutingBlock], notes: &'a [Vec<u8>]) -> Vec<HopLayer<'a>> {
    blocks
        .iter()
        .zip(notes)
        .map(|(&block, note)| HopLayer { block, note })
        .collect()
}

/// A cascade of `n` nodes after a successful init.
pub struct Cascade {
    pub secrets: Vec<OnionSecret>,
    pub tables: Vec<SessionTable>,
    pub designer: DesignerSession,
}

/// Runs init through `n` nodes; checks each hop gets its block and note.
pub fn init(n: usize, notes: &[Vec<u8>], rng: &mut Rng) -> Cascade {
    let secrets: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(rng)).collect();
    let publics: Vec<OnionPublic> = secrets.iter().map(OnionSecret::public).collect();
    let path: Vec<usize> = (0..n).collect();
    let bl = blocks(Op::Init, &path);
    let (mut onion, designer) = wrap_init(&publics, &layers(&bl, notes), rng).unwrap();
    let mut tables = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let seen = InitReplayCache::default();
        let (peeled, session) = peel_init(secret, &seen, &onion.header, &onion.notes).unwrap();
        assert_eq!(peeled.block(), bl[i], "init block at hop {i}");
        assert_eq!(peeled.note(), &notes[i][..], "init note at hop {i}");
        let mut table = SessionTable::new();
        table.insert(session).unwrap();
        tables.push(table);
        match peeled {
            Peeled::Forward(f) => onion = f.onion,
            Peeled::Deliver(_) => assert_eq!(i, n - 1),
        }
    }
    Cascade {
        secrets,
        tables,
        designer,
    }
}

/// Sends a session onion along `path`; returns every hop's view.
pub fn run_session(c: &mut Cascade, path: &[usize], onion: Onion) -> Vec<Peeled> {
    let mut onion = onion;
    let mut seen = Vec::new();
    for (k, &node) in path.iter().enumerate() {
        let peeled = peel_session(&mut c.tables[node], &onion.header, &onion.notes).unwrap();
        if let Peeled::Forward(f) = &peeled {
            onion = f.onion.clone();
        } else {
            assert_eq!(k, path.len() - 1);
        }
        seen.push(peeled);
    }
    seen
}
