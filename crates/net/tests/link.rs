#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Noise links over loopback TCP: handshake, cell round trips, and failures.

use std::net::SocketAddr;
use std::time::Duration;

use mixnn_net::{Link, LinkConfig, LinkKeypair, LinkListener, NetError, PublicLinkKey};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CELL: usize = 1024;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config() -> LinkConfig {
    LinkConfig::new(CELL)
        .unwrap()
        .with_handshake_timeout(Duration::from_secs(5))
}

fn keypair(seed: u64) -> LinkKeypair {
    LinkKeypair::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

/// Starts a listener whose accept loop spawns one handshake per connection
/// and reports each outcome on the returned channel.
async fn serve(
    key: LinkKeypair,
    config: LinkConfig,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<Link, NetError>>) {
    let listener = LinkListener::bind(any_port(), key, config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(pending) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(pending.handshake().await);
            });
        }
    });
    (addr, rx)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_round_trip_both_directions_with_concurrent_halves() {
    let server_key = keypair(1);
    let client_key = keypair(2);
    let (addr, mut accepted) = serve(server_key.clone(), config()).await;
    let client = Link::connect(addr, &client_key, Some(server_key.public()), config())
        .await
        .unwrap();
    let server = accepted.recv().await.unwrap().unwrap();
    assert_eq!(client.remote_key(), server_key.public());
    assert_eq!(server.remote_key(), client_key.public());
    assert_eq!(client.peer_addr(), addr);

    const CELLS: usize = 2000;
    let up = pattern(10, CELLS * CELL);
    let down = pattern(11, CELLS * CELL);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();

    // Messages of varying cell counts, sent while the other side also sends.
    let sender = |mut tx: mixnn_net::LinkWriter, data: Vec<u8>| async move {
        let mut rest = &data[..];
        let mut n = 1;
        while !rest.is_empty() {
            let take = (n * CELL).min(rest.len());
            tx.send_cells(&rest[..take]).await.unwrap();
            rest = &rest[take..];
            n = n % 7 + 1;
        }
        tx.flush().await.unwrap();
        tx
    };
    let receiver = |mut rx: mixnn_net::LinkReader| async move {
        let mut got = vec![0u8; CELLS * CELL];
        for cell in got.chunks_exact_mut(CELL) {
            rx.recv_cell(cell).await.unwrap();
        }
        (rx, got)
    };
    let t1 = tokio::spawn(sender(client_tx, up.clone()));
    let t2 = tokio::spawn(sender(server_tx, down.clone()));
    let t3 = tokio::spawn(receiver(server_rx));
    let t4 = tokio::spawn(receiver(client_rx));
    client_tx = t1.await.unwrap();
    server_tx = t2.await.unwrap();
    let got_up;
    let got_down;
    (server_rx, got_up) = t3.await.unwrap();
    (client_rx, got_down) = t4.await.unwrap();
    assert!(got_up == up, "client-to-server cells differ");
    assert!(got_down == down, "server-to-client cells differ");

    // A multi-cell receive works too; then a clean close is reported.
    client_tx.send_cells(&up[..3 * CELL]).await.unwrap();
    let mut three = vec![0u8; 3 * CELL];
    server_rx.recv_cells(&mut three).await.unwrap();
    assert_eq!(three, up[..3 * CELL]);
    drop(server_tx);
    drop(server_rx);
    let mut cell = vec![0u8; CELL];
    let err = client_rx.recv_cell(&mut cell).await.unwrap_err();
    assert!(matches!(err, NetError::Closed { .. }), "{err:?}");
    let again = client_rx.recv_cell(&mut cell).await.unwrap_err();
    assert!(matches!(again, NetError::Closed { .. }), "{again:?}");
}

#[tokio::test]
async fn shutdown_delivers_pending_cells_then_closed() {
    let server_key = keypair(3);
    let (addr, mut accepted) = serve(server_key, config()).await;
    let mut client = Link::connect(addr, &keypair(4), None, config())
        .await
        .unwrap();
    let (mut server_rx, _server_tx) = accepted.recv().await.unwrap().unwrap().into_split();
    client.send_cells(&[5u8; 2 * CELL]).await.unwrap();
    let (_client_rx, mut client_tx) = client.into_split();
    client_tx.shutdown().await.unwrap();
    let mut cell = vec![0u8; CELL];
    server_rx.recv_cell(&mut cell).await.unwrap();
    server_rx.recv_cell(&mut cell).await.unwrap();
    assert_eq!(cell, vec![5u8; CELL]);
    let err = server_rx.recv_cell(&mut cell).await.unwrap_err();
    assert!(matches!(err, NetError::Closed { .. }), "{err:?}");
}

#[tokio::test]
async fn unexpected_responder_key_is_rejected() {
    let (addr, mut accepted) = serve(keypair(5), config()).await;
    let wrong = keypair(6).public();
    let err = Link::connect(addr, &keypair(7), Some(wrong), config())
        .await
        .unwrap_err();
    match &err {
        NetError::UnexpectedPeer {
            expected, actual, ..
        } => {
            // Log aliases of the two keys, never the keys themselves.
            let alias = |k: &mixnn_net::PublicLinkKey| {
                mixnn_net::alias::key(k.as_bytes()).tag().to_string()
            };
            assert_eq!(*expected, alias(&wrong));
            assert_eq!(*actual, alias(&keypair(5).public()));
            assert!(!err.to_string().contains(&wrong.fingerprint()), "{err}");
            assert!(!err.to_string().contains(&addr.to_string()), "{err}");
        }
        other => panic!("expected UnexpectedPeer, got {other:?}"),
    }
    // The responder never completes: the initiator hung up before msg 3.
    assert!(accepted.recv().await.unwrap().is_err());
}

#[tokio::test]
async fn garbage_client_fails_its_handshake_and_listener_keeps_accepting() {
    let server_key = keypair(8);
    let (addr, mut accepted) = serve(server_key.clone(), config()).await;

    // A peer that speaks random bytes and hangs up.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&pattern(99, 500)).await.unwrap();
    garbage.shutdown().await.unwrap();
    let err = accepted.recv().await.unwrap().unwrap_err();
    assert!(
        matches!(err, NetError::Handshake { .. } | NetError::LinkIo { .. }),
        "{err:?}"
    );

    // A silent peer holds its connection open; others still get through.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let mut good = Link::connect(addr, &keypair(9), Some(server_key.public()), config())
        .await
        .unwrap();
    let mut server = accepted.recv().await.unwrap().unwrap();
    good.send_cells(&[1u8; CELL]).await.unwrap();
    let mut cell = vec![0u8; CELL];
    server.recv_cell(&mut cell).await.unwrap();
    assert_eq!(cell, vec![1u8; CELL]);
}

#[tokio::test]
async fn silent_client_times_out() {
    let short = config().with_handshake_timeout(Duration::from_millis(200));
    let (addr, mut accepted) = serve(keypair(10), short).await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    let err = accepted.recv().await.unwrap().unwrap_err();
    assert!(matches!(err, NetError::HandshakeTimeout { .. }), "{err:?}");
}

#[tokio::test]
async fn cell_size_mismatch_fails_the_handshake() {
    let (addr, mut accepted) = serve(keypair(11), config()).await;
    let other = LinkConfig::new(CELL * 2).unwrap();
    assert!(Link::connect(addr, &keypair(12), None, other)
        .await
        .is_err());
    assert!(accepted.recv().await.unwrap().is_err());
}

#[tokio::test]
async fn wrong_buffer_length_is_a_caller_error() {
    let (addr, _accepted) = serve(keypair(13), config()).await;
    let mut link = Link::connect(addr, &keypair(14), None, config())
        .await
        .unwrap();
    for len in [0, CELL - 1, CELL + 1] {
        let err = link.send_cells(&vec![0u8; len]).await.unwrap_err();
        assert!(matches!(err, NetError::CellBufferLength { .. }), "{err:?}");
    }
    let err = link.recv_cell(&mut [0u8; 10]).await.unwrap_err();
    assert!(matches!(err, NetError::CellBufferLength { .. }), "{err:?}");
    // The link is still usable after a rejected call.
    link.send_cells(&[0u8; CELL]).await.unwrap();
    assert!(LinkConfig::new(0).is_err());
    assert!(LinkConfig::new(mixnn_net::MAX_CELL_SIZE + 1).is_err());
}

/// A one-connection TCP relay that XORs `mask` into the client-to-server
/// byte at `offset` (counting from the start of the connection).
async fn corrupting_relay(target: SocketAddr, offset: usize, mask: u8) -> SocketAddr {
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(target).await.unwrap();
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        });
        let mut seen = 0;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&offset) {
                buf[offset - seen] ^= mask;
            }
            seen += n;
            if server_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    addr
}

/// Client-to-server handshake bytes: msg 1 (2 + 32) and msg 3 (2 + 64).
const CLIENT_HANDSHAKE_BYTES: usize = 34 + 66;

async fn relay_scenario(offset: usize) -> NetError {
    let (addr, mut accepted) = serve(keypair(15), config()).await;
    let relay = corrupting_relay(addr, offset, 0x20).await;
    let mut client = Link::connect(relay, &keypair(16), None, config())
        .await
        .unwrap();
    let mut server = accepted.recv().await.unwrap().unwrap();
    let mut cell = vec![0u8; CELL];
    client.send_cells(&[3u8; 3 * CELL]).await.unwrap();
    server.recv_cell(&mut cell).await.unwrap();
    let err = server.recv_cell(&mut cell).await.unwrap_err();
    // The reader stays broken afterwards instead of resynchronising.
    let again = server.recv_cell(&mut cell).await.unwrap_err();
    assert!(matches!(again, NetError::Broken { .. }), "{again:?}");
    err
}

#[tokio::test]
async fn flipped_ciphertext_byte_is_a_decryption_error() {
    // Second frame, 100 bytes into its ciphertext.
    let offset = CLIENT_HANDSHAKE_BYTES + (2 + CELL + 16) + 2 + 100;
    let err = relay_scenario(offset).await;
    assert!(matches!(err, NetError::Decrypt { nonce: 1, .. }), "{err:?}");
}

#[tokio::test]
async fn flipped_length_prefix_is_a_frame_length_error() {
    let offset = CLIENT_HANDSHAKE_BYTES + (2 + CELL + 16);
    let err = relay_scenario(offset).await;
    assert!(
        matches!(err, NetError::FrameLength { expected, .. } if expected == CELL + 16),
        "{err:?}"
    );
}

#[tokio::test]
async fn public_link_key_parses_from_its_display_form() {
    let key = keypair(17).public();
    assert_eq!(key.to_string().parse::<PublicLinkKey>().unwrap(), key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_ends_a_silent_link_and_lets_a_talking_one_live() {
    let server_key = keypair(41);
    let (addr, mut accepted) = serve(server_key.clone(), config()).await;
    let mut client = Link::connect(addr, &keypair(42), Some(server_key.public()), config())
        .await
        .unwrap();
    let (mut reader, _writer) = accepted.recv().await.unwrap().unwrap().into_split();
    let idle = Duration::from_millis(300);
    reader.set_idle_timeout(Some(idle));
    let mut cell = vec![0u8; CELL];
    // A cell every 100 ms keeps it alive well past the timeout…
    for i in 0..6 {
        client.send_cells(&pattern(i, CELL)).await.unwrap();
        reader.recv_cell(&mut cell).await.unwrap();
        assert_eq!(cell, pattern(i, CELL));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // …silence ends it within the timeout, and the reader stays unusable.
    let started = std::time::Instant::now();
    let err = reader.recv_cell(&mut cell).await.unwrap_err();
    assert!(
        matches!(err, NetError::Idle { after, .. } if after == idle),
        "{err}"
    );
    assert!(started.elapsed() < idle + Duration::from_millis(200));
    client.send_cells(&pattern(9, CELL)).await.unwrap();
    assert!(matches!(
        reader.recv_cell(&mut cell).await,
        Err(NetError::Broken { .. })
    ));
}
