//! Criterion benches: designer wrap (init and session) for 5 and 32 hops,
//! hop peel, and a hop's per-batch cost on a 32 KB activation (session peel
//! plus ChaCha20-Poly1305 decrypt and re-encrypt, which the Noise link does).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use mixnn_wire::*;
use rand_core::SeedableRng;

type Rng = rand_chacha::ChaCha20Rng;

fn addr(i: usize) -> HopAddr {
    HopAddr(std::net::SocketAddr::from(([10, 0, 0, i as u8], 7000)))
}

fn blocks(op: Op, n: usize) -> Vec<RoutingBlock> {
    (0..n)
        .map(|k| RoutingBlock {
            op,
            next: if k + 1 < n {
                Next::Hop(addr(k + 1))
            } else {
                Next::Deliver {
                    addr: addr(200),
                    reply_id: ReplyId([1; 16]),
                }
            },
            tag: HopTag([k as u8; 16]),
        })
        .collect()
}

fn layers(blocks: &[RoutingBlock]) -> Vec<HopLayer<'_>> {
    blocks
        .iter()
        .map(|&block| HopLayer { block, note: &[] })
        .collect()
}

struct Setup {
    secrets: Vec<OnionSecret>,
    designer: DesignerSession,
    sessions: Vec<HopSession>,
}

fn setup(n: usize, rng: &mut Rng) -> Setup {
    let secrets: Vec<OnionSecret> = (0..n).map(|_| OnionSecret::generate(rng)).collect();
    let publics: Vec<OnionPublic> = secrets.iter().map(OnionSecret::public).collect();
    let bl = blocks(Op::Init, n);
    let (mut onion, designer) = wrap_init(&publics, &layers(&bl), rng).unwrap();
    let mut sessions = Vec::new();
    for s in &secrets {
        let (peeled, session) =
            peel_init(s, &InitReplayCache::default(), &onion.header, &onion.notes).unwrap();
        sessions.push(session);
        if let Peeled::Forward(f) = peeled {
            onion = f.onion;
        }
    }
    Setup {
        secrets,
        designer,
        sessions,
    }
}

fn wrap(c: &mut Criterion) {
    let mut rng = Rng::seed_from_u64(1);
    for n in [5, 32] {
        let mut s = setup(n, &mut rng);
        let publics: Vec<OnionPublic> = s.secrets.iter().map(OnionSecret::public).collect();
        let init = blocks(Op::Init, n);
        let init_layers = layers(&init);
        c.bench_function(&format!("wrap_init/{n}_hops"), |b| {
            b.iter(|| wrap_init(black_box(&publics), &init_layers, &mut rng).unwrap())
        });
        let fwd = blocks(Op::Forward, n);
        let fwd_layers = layers(&fwd);
        let path: Vec<usize> = (0..n).collect();
        c.bench_function(&format!("wrap_session/{n}_hops"), |b| {
            b.iter(|| {
                s.designer
                    .wrap(black_box(&path), &fwd_layers, &mut rng)
                    .unwrap()
            })
        });
    }
}

fn peel(c: &mut Criterion) {
    let mut rng = Rng::seed_from_u64(2);
    let mut s = setup(32, &mut rng);
    let bl = blocks(Op::Forward, 32);
    let path: Vec<usize> = (0..32).collect();
    let init = blocks(Op::Init, 1);
    let publics = [s.secrets[0].public()];
    c.bench_function("peel_init/hop", |b| {
        b.iter_batched(
            || wrap_init(&publics, &layers(&init), &mut rng).unwrap().0,
            |o| {
                peel_init(
                    &s.secrets[0],
                    &InitReplayCache::default(),
                    &o.header,
                    &o.notes,
                )
                .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("peel_session/hop", |b| {
        b.iter_batched(
            || s.designer.wrap(&path, &layers(&bl), &mut rng).unwrap(),
            |o| s.sessions[0].peel(&o.header, &o.notes).unwrap(),
            BatchSize::SmallInput,
        )
    });

    // The per-batch bar: peel one session layer and seal the hop's 32 KB
    // output for the next link with ChaCha20-Poly1305 (what Noise does).
    let aead = ChaCha20Poly1305::new(&[8u8; 32].into());
    let nonce = [0u8; 12].into();
    let activation = vec![0x5au8; 32 * 1024];
    c.bench_function("hop_per_batch_32KB/peel+seal", |b| {
        b.iter_batched(
            || {
                let o = s.designer.wrap(&path, &layers(&bl), &mut rng).unwrap();
                (o, activation.clone())
            },
            |(o, mut body)| {
                let peeled = s.sessions[0].peel(&o.header, &o.notes).unwrap();
                let tag = aead
                    .encrypt_in_place_detached(&nonce, b"", &mut body)
                    .unwrap();
                (peeled, body, tag)
            },
            BatchSize::SmallInput,
        )
    });

    // The whole link path at one hop: open the incoming cells (32 KB body
    // padded to 3 cells), decode, peel, re-encode with fresh padding, seal.
    let policy = PaddingPolicy::Uniform {
        max_body: activation.len(),
    };
    c.bench_function("hop_per_batch_32KB/open+decode+peel+encode+seal", |b| {
        b.iter_batched(
            || {
                let o = s.designer.wrap(&path, &layers(&bl), &mut rng).unwrap();
                let mut cells = encode_cells(CellKind::Session, &o, &activation, &policy).unwrap();
                let tag = aead
                    .encrypt_in_place_detached(&nonce, b"", &mut cells)
                    .unwrap();
                (cells, tag)
            },
            |(mut cells, tag)| {
                aead.decrypt_in_place_detached(&nonce, b"", &mut cells, &tag)
                    .unwrap();
                let msg = decode_cells(&cells, &policy).unwrap();
                let Peeled::Forward(f) = s.sessions[0]
                    .peel(&msg.onion.header, &msg.onion.notes)
                    .unwrap()
                else {
                    unreachable!()
                };
                let mut out =
                    encode_cells(CellKind::Session, &f.onion, &msg.body, &policy).unwrap();
                let tag = aead
                    .encrypt_in_place_detached(&nonce, b"", &mut out)
                    .unwrap();
                (out, tag)
            },
            BatchSize::SmallInput,
        )
    });
    let mut buf = vec![0u8; 3 * CELL_SIZE];
    c.bench_function("aead_seal_only/48KB_cells", |b| {
        b.iter(|| {
            aead.encrypt_in_place_detached(&nonce, b"", &mut buf)
                .unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .sample_size(30);
    targets = wrap, peel
}
criterion_main!(benches);
