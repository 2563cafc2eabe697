#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Loopback link benchmarks: one-way message transfer, cell ping-pong,
//! handshake, and the raw AEAD cost per cell for both candidate ciphers.
//!
//! Run: `cargo bench -p mixnn-net --bench link`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixnn_net::{Link, LinkConfig, LinkKeypair, LinkListener, NOISE_PROTOCOL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const CELL: usize = 16 * 1024;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config() -> LinkConfig {
    LinkConfig::new(CELL).unwrap()
}

/// A connected (client, server) pair over loopback.
async fn pair() -> (Link, Link) {
    let server_key = LinkKeypair::generate_os();
    let expected = server_key.public();
    let listener = LinkListener::bind("127.0.0.1:0".parse().unwrap(), server_key, config())
        .await
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { listener.accept().await.unwrap().handshake().await });
    let client = Link::connect(addr, &LinkKeypair::generate_os(), Some(expected), config())
        .await
        .unwrap();
    (client, server.await.unwrap().unwrap())
}

/// A connected plain TCP pair over loopback, `TCP_NODELAY` like links.
async fn raw_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

fn links(c: &mut Criterion) {
    let rt = runtime();
    let (client, server) = rt.block_on(pair());
    let (_client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, _server_tx) = server.into_split();

    let mut group = c.benchmark_group("link");
    for cells in [1usize, 4, 13] {
        let msg = vec![0x5a; cells * CELL];
        let mut got = vec![0u8; cells * CELL];
        group.throughput(Throughput::Bytes(msg.len() as u64));
        group.bench_function(format!("one_way_{cells}x16KiB"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (sent, received) =
                        tokio::join!(client_tx.send_cells(&msg), server_rx.recv_cells(&mut got));
                    sent.unwrap();
                    received.unwrap();
                })
            })
        });
    }

    // Baseline: the same bytes over plain loopback TCP, no framing or AEAD.
    let (mut raw_tx, mut raw_rx) = rt.block_on(raw_pair());
    let msg = vec![0x5a; 4 * CELL];
    let mut got = vec![0u8; 4 * CELL];
    group.throughput(Throughput::Bytes(msg.len() as u64));
    group.bench_function("raw_tcp_one_way_4x16KiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (sent, received) =
                    tokio::join!(raw_tx.write_all(&msg), raw_rx.read_exact(&mut got));
                sent.unwrap();
                received.unwrap();
            })
        })
    });

    let (client, server) = rt.block_on(pair());
    let (mut server_rx, mut server_tx) = server.into_split();
    rt.spawn(async move {
        let mut cell = vec![0u8; CELL];
        while server_rx.recv_cell(&mut cell).await.is_ok() {
            if server_tx.send_cells(&cell).await.is_err() {
                break;
            }
        }
    });
    let (mut client_rx, mut client_tx) = client.into_split();
    let ping = vec![0xa5; CELL];
    let mut pong = vec![0u8; CELL];
    group.throughput(Throughput::Bytes(2 * CELL as u64));
    group.bench_function("ping_pong_16KiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                client_tx.send_cells(&ping).await.unwrap();
                client_rx.recv_cell(&mut pong).await.unwrap();
            })
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("connect_and_handshake", |b| {
        b.iter(|| black_box(rt.block_on(pair())))
    });
    group.finish();
}

/// Transport states for `protocol`, as a finished XX handshake leaves them.
fn transport_pair(
    protocol: &str,
) -> (snow::StatelessTransportState, snow::StatelessTransportState) {
    let params: snow::params::NoiseParams = protocol.parse().unwrap();
    let key =
        |p: &snow::params::NoiseParams| snow::Builder::new(p.clone()).generate_keypair().unwrap();
    let (k1, k2) = (key(&params), key(&params));
    let mut i = snow::Builder::new(params.clone())
        .local_private_key(&k1.private)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut r = snow::Builder::new(params)
        .local_private_key(&k2.private)
        .unwrap()
        .build_responder()
        .unwrap();
    let (mut msg, mut payload) = (vec![0u8; 1024], vec![0u8; 1024]);
    for step in 0..3 {
        let (from, to) = if step % 2 == 0 {
            (&mut i, &mut r)
        } else {
            (&mut r, &mut i)
        };
        let n = from.write_message(&[], &mut msg).unwrap();
        to.read_message(&msg[..n], &mut payload).unwrap();
    }
    (
        i.into_stateless_transport_mode().unwrap(),
        r.into_stateless_transport_mode().unwrap(),
    )
}

fn aead(c: &mut Criterion) {
    let mut group = c.benchmark_group("aead_16KiB");
    group.throughput(Throughput::Bytes(CELL as u64));
    let cell = vec![0x33u8; CELL];
    for protocol in [NOISE_PROTOCOL, "Noise_XX_25519_ChaChaPoly_SHA256"] {
        let cipher = protocol.split('_').nth(3).unwrap();
        let (tx, rx) = transport_pair(protocol);
        let mut frame = vec![0u8; CELL + 16];
        let mut out = vec![0u8; CELL];
        let mut nonce = 0u64;
        group.bench_function(format!("encrypt_{cipher}"), |b| {
            b.iter(|| {
                nonce += 1;
                tx.write_message(nonce, black_box(&cell), &mut frame)
                    .unwrap()
            })
        });
        tx.write_message(7, &cell, &mut frame).unwrap();
        group.bench_function(format!("decrypt_{cipher}"), |b| {
            b.iter(|| rx.read_message(7, black_box(&frame), &mut out).unwrap())
        });
    }
    group.bench_function("memcpy_baseline", |b| {
        let mut dst = vec![0u8; CELL];
        b.iter(|| dst.copy_from_slice(black_box(&cell)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = links, aead
}
criterion_main!(benches);
