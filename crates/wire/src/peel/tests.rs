use rand_core::SeedableRng;

use super::*;
use crate::wrap::{wrap_init, DesignerSession, HopLayer};

type Rng = rand_chacha::ChaCha20Rng;

fn addr(i: usize) -> HopAddr {
    HopAddr(format!("10.0.0.{i}:{}", 7000 + i).parse().unwrap())
}

fn blocks(op: Op, n: usize) -> Vec<RoutingBlock> {
    (0..n)
        .map(|i| RoutingBlock {
            op,
            next: if i + 1 < n {
                Next::Hop(addr(i + 1))
            } else {
                Next::Deliver {
                    addr: addr(99),
                    reply_id: ReplyId([0xaa; ID_LEN]),
                }
            },
            tag: HopTag([i as u8; ID_LEN]),
        })
        .collect()
}

struct Cascade {
    secrets: Vec<OnionSecret>,
    tables: Vec<SessionTable>,
    designer: DesignerSession,
}

fn setup(n: usize, rng: &mut Rng) -> Cascade {
    let secrets: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(rng)).collect();
    let publics: Vec<OnionPublic> = secrets.iter().map(OnionSecret::public).collect();
    let bl = blocks(Op::Init, n);
    let layers: Vec<HopLayer<'_>> = bl
        .iter()
        .map(|&block| HopLayer {
            block,
            note: b"spec",
        })
        .collect();
    let (mut onion, designer) = wrap_init(&publics, &layers, rng).unwrap();
    let mut tables = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let seen = InitReplayCache::default();
        let (peeled, session) = peel_init(secret, &seen, &onion.header, &onion.notes).unwrap();
        assert_eq!(peeled.block(), bl[i]);
        assert_eq!(peeled.note(), b"spec");
        assert_eq!(Some(session.id()), designer.session_id(i));
        let mut table = SessionTable::new();
        table.insert(session).unwrap();
        tables.push(table);
        if let Peeled::Forward(f) = peeled {
            onion = f.onion;
        }
    }
    Cascade {
        secrets,
        tables,
        designer,
    }
}

#[test]
fn session_peel_follows_the_forward_path() {
    let mut rng = Rng::seed_from_u64(1);
    let mut c = setup(3, &mut rng);
    let bl = blocks(Op::Forward, 3);
    let layers: Vec<HopLayer<'_>> = bl
        .iter()
        .map(|&block| HopLayer { block, note: &[] })
        .collect();
    let mut onion = c.designer.wrap(&[0, 1, 2], &layers, &mut rng).unwrap();
    for i in 0..3 {
        match peel_session(&mut c.tables[i], &onion.header, &onion.notes).unwrap() {
            Peeled::Forward(f) => {
                assert_eq!(f.next, addr(i + 1));
                onion = f.onion;
            }
            Peeled::Deliver(d) => {
                assert_eq!(i, 2);
                assert_eq!(d.reply_id, ReplyId([0xaa; ID_LEN]));
            }
        }
    }
}

#[test]
fn peel_rejects_replayed_session_packet() {
    let mut rng = Rng::seed_from_u64(2);
    let mut c = setup(1, &mut rng);
    let bl = blocks(Op::Backward, 1);
    let layers = [HopLayer {
        block: bl[0],
        note: &[],
    }];
    let onion = c.designer.wrap(&[0], &layers, &mut rng).unwrap();
    peel_session(&mut c.tables[0], &onion.header, &onion.notes).unwrap();
    assert_eq!(
        peel_session(&mut c.tables[0], &onion.header, &onion.notes),
        Err(WireError::Replay)
    );
}

#[test]
fn peel_rejects_replayed_init() {
    let mut rng = Rng::seed_from_u64(3);
    let secret = OnionSecret::generate(&mut rng);
    let bl = blocks(Op::Init, 1);
    let layers = [HopLayer {
        block: bl[0],
        note: &[],
    }];
    let (onion, _) = wrap_init(&[secret.public()], &layers, &mut rng).unwrap();
    let mut seen = InitReplayCache::default();
    let (_, session) = peel_init(&secret, &seen, &onion.header, &onion.notes).unwrap();
    // Peeling alone records nothing: the caller does, last.
    assert!(seen.is_empty());
    peel_init(&secret, &seen, &onion.header, &onion.notes).unwrap();
    seen.insert(session.init_tag(), 0).unwrap();
    assert_eq!(
        peel_init(&secret, &seen, &onion.header, &onion.notes).unwrap_err(),
        WireError::Replay
    );
}

#[test]
fn peel_rejects_tampered_header() {
    let mut rng = Rng::seed_from_u64(4);
    let c = setup(2, &mut rng);
    let bl = blocks(Op::Init, 2);
    let layers: Vec<HopLayer<'_>> = bl
        .iter()
        .map(|&block| HopLayer { block, note: &[] })
        .collect();
    let publics: Vec<OnionPublic> = c.secrets.iter().map(OnionSecret::public).collect();
    let (onion, _) = wrap_init(&publics, &layers, &mut rng).unwrap();
    for byte in [0, 31, 40, HEADER_LEN_FOR_TEST - 1] {
        let mut raw = onion.header.as_bytes().to_vec();
        raw[byte] ^= 0x80;
        let header = Header::from_bytes(&raw).unwrap();
        let r = peel_init(
            &c.secrets[0],
            &InitReplayCache::default(),
            &header,
            &onion.notes,
        );
        assert!(r.is_err(), "flip at byte {byte} accepted");
    }
}

const HEADER_LEN_FOR_TEST: usize = crate::constants::HEADER_LEN;

#[test]
fn session_table_refuses_duplicate_ids() {
    let mut t = SessionTable::new();
    let id = SessionId([1; ID_LEN]);
    t.insert(HopSession::from_shared(id, &[1; 32])).unwrap();
    assert_eq!(
        t.insert(HopSession::from_shared(id, &[2; 32])),
        Err(WireError::DuplicateSession)
    );
}

#[test]
fn wrong_session_key_is_rejected() {
    let mut rng = Rng::seed_from_u64(5);
    let mut c = setup(1, &mut rng);
    let id = c.designer.session_id(0).unwrap();
    let bl = blocks(Op::Forward, 1);
    let onion = c
        .designer
        .wrap(
            &[0],
            &[HopLayer {
                block: bl[0],
                note: &[],
            }],
            &mut rng,
        )
        .unwrap();
    let mut impostor = HopSession::from_shared(id, &[9; 32]);
    assert!(impostor.peel(&onion.header, &onion.notes).is_err());
    assert!(c.tables[0].peel(&onion.header, &onion.notes).is_ok());
}
