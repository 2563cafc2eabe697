//! Property tests: wrap then peel along any path of 1–32 hops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mixnn_wire::*;
use proptest::prelude::*;

/// Notes for `n` hops whose framed total fits in NOTES_LEN.
fn notes_strategy(n: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    let per_hop = (NOTES_LEN / n).saturating_sub(2).min(300);
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=per_hop), n)
}

fn block_strategy() -> impl Strategy<Value = (HopTag, [u8; 16], u16, bool)> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(t, ip, port, v6)| (HopTag(t), ip, port, v6))
}

fn random_blocks(op: Op, raw: &[(HopTag, [u8; 16], u16, bool)]) -> Vec<RoutingBlock> {
    let n = raw.len();
    raw.iter()
        .enumerate()
        .map(|(k, &(tag, ip, port, v6))| {
            let a = if v6 {
                HopAddr(std::net::SocketAddr::new(
                    std::net::Ipv6Addr::from(ip).into(),
                    port,
                ))
            } else {
                HopAddr(std::net::SocketAddr::new(
                    std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into(),
                    port,
                ))
            };
            RoutingBlock {
                op,
                next: if k + 1 < n {
                    Next::Hop(a)
                } else {
                    Next::Deliver {
                        addr: a,
                        reply_id: ReplyId(ip),
                    }
                },
                tag,
            }
        })
        .collect()
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop::sample::select(vec![
        Op::Forward,
        Op::Backward,
        Op::Test,
        Op::Loop,
        Op::Fetch,
        Op::Cover,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Init: every hop gets exactly its block and note, the last delivers.
    #[test]
    fn init_wrap_then_peel_gives_every_hop_its_block(
        (n, notes, raw, seed) in (1usize..=MAX_HOPS).prop_flat_map(|n| (
            Just(n),
            notes_strategy(n),
            prop::collection::vec(block_strategy(), n),
            any::<u64>(),
        ))
    ) {
        let mut rng = rng(seed);
        let secrets: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(&mut rng)).collect();
        let publics: Vec<OnionPublic> = secrets.iter().map(OnionSecret::public).collect();
        let bl = random_blocks(Op::Init, &raw);
        let (mut onion, designer) = wrap_init(&publics, &layers(&bl, &notes), &mut rng).unwrap();
        prop_assert_eq!(designer.hops(), n);
        for i in 0..n {
            let (peeled, session) = peel_init(
                &secrets[i], &InitReplayCache::default(), &onion.header, &onion.notes,
            ).unwrap();
            prop_assert_eq!(peeled.block(), bl[i]);
            prop_assert_eq!(peeled.note(), &notes[i][..]);
            prop_assert_eq!(Some(session.id()), designer.session_id(i));
            match peeled {
                Peeled::Forward(f) => { prop_assert!(i + 1 < n); onion = f.onion; }
                Peeled::Deliver(_) => prop_assert_eq!(i, n - 1),
            }
        }
    }

    /// Session: any path over the cascade's hops (repeats allowed), any op;
    /// every hop gets its block and note and the body rides along intact.
    #[test]
    fn session_wrap_then_peel_delivers_blocks_and_body(
        (n, path, notes, raw, op, body, seed) in (1usize..=6).prop_flat_map(|n| {
            prop::collection::vec(0..n, 1..=MAX_HOPS).prop_flat_map(move |path| {
                let len = path.len();
                (
                    Just(n),
                    Just(path),
                    notes_strategy(len),
                    prop::collection::vec(block_strategy(), len),
                    op_strategy(),
                    prop::collection::vec(any::<u8>(), 0..40_000),
                    any::<u64>(),
                )
            })
        })
    ) {
        let mut rng = rng(seed);
        let init_notes = vec![Vec::new(); n];
        let mut c = init(n, &init_notes, &mut rng);
        let bl = random_blocks(op, &raw);
        let policy = PaddingPolicy::Uniform { max_body: 40_000 };
        for round in 0..2 {
            let mut onion = c.designer.wrap(&path, &layers(&bl, &notes), &mut rng).unwrap();
            let mut cells = encode_cells(CellKind::Session, &onion, &body, &policy).unwrap();
            for (k, &node) in path.iter().enumerate() {
                let msg = decode_cells(&cells, &policy).unwrap();
                prop_assert_eq!(&msg.body, &body);
                prop_assert_eq!(&msg.onion, &onion);
                let peeled = peel_session(&mut c.tables[node], &msg.onion.header, &msg.onion.notes).unwrap();
                prop_assert_eq!(peeled.block(), bl[k], "round {} hop {}", round, k);
                prop_assert_eq!(peeled.note(), &notes[k][..]);
                if let Peeled::Forward(f) = peeled {
                    onion = f.onion;
                    let next = encode_cells(CellKind::Session, &onion, &body, &policy).unwrap();
                    prop_assert_eq!(next.len(), cells.len());
                    cells = next;
                }
            }
        }
    }

    /// Fuzz bodies never panic on arbitrary bytes (run even without nightly).
    #[test]
    fn fuzz_bodies_accept_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..20_000)) {
        mixnn_wire::fuzzing::block_decode(&data);
        mixnn_wire::fuzzing::cell_reader(&data);
        mixnn_wire::fuzzing::peel_init_bytes(&data);
        mixnn_wire::fuzzing::peel_session_bytes(&data);
    }
}
