//! Directory probes against a real listener on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_net::{probe, Link, LinkConfig, LinkListener, NetError, NodeKeys, ProbeTarget};
use rand_chacha::rand_core::SeedableRng;

fn keys(seed: u64) -> NodeKeys {
    NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
}

fn target(keys: &NodeKeys, addr: std::net::SocketAddr) -> ProbeTarget {
    let p = keys.public();
    ProbeTarget {
        addr,
        identity: *p.identity.as_bytes(),
        link: *p.link.as_bytes(),
        onion: *p.onion.as_bytes(),
    }
}

/// A listener of `node` that answers probes (or not), and keeps accepting
/// links; returns its address.
async fn listen(node: &NodeKeys, answer: bool) -> std::net::SocketAddr {
    let config = LinkConfig::new(1024).unwrap();
    let mut listener =
        LinkListener::bind("127.0.0.1:0".parse().unwrap(), node.link().clone(), config)
            .await
            .unwrap();
    if answer {
        listener = listener.answer_probes(node);
    }
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok(pending) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut link) = pending.handshake().await {
                    let mut cell = vec![0u8; 1024];
                    let _ = link.recv_cell(&mut cell).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn probe_passes_only_with_both_keys() {
    let config = LinkConfig::new(1024).unwrap();
    let node = keys(1);
    let addr = listen(&node, true).await;
    probe(&target(&node, addr), config).await.unwrap();

    // The descriptor names another link key: the handshake shows the real one.
    let other = keys(2);
    let mut t = target(&node, addr);
    t.link = *other.public().link.as_bytes();
    let err = probe(&t, config).await.unwrap_err();
    assert!(matches!(err, NetError::UnexpectedPeer { .. }), "{err}");

    // Another onion key (the prober cannot tell which: the proof is wrong).
    let mut t = target(&node, addr);
    t.onion = *other.public().onion.as_bytes();
    let err = probe(&t, config).await.unwrap_err();
    assert!(err.to_string().contains("onion-key proof"), "{err}");

    // Another identity with the node's own keys (a relay or a copy).
    let mut t = target(&node, addr);
    t.identity = *other.public().identity.as_bytes();
    assert!(probe(&t, config).await.is_err());

    // Ordinary links to the same listener still work.
    let mut link = Link::connect(addr, other.link(), Some(node.public().link), config)
        .await
        .unwrap();
    link.send_cells(&[7u8; 1024]).await.unwrap();
}

#[tokio::test]
async fn probe_fails_on_a_listener_that_does_not_answer_or_nothing_listening() {
    let config = LinkConfig::new(1024).unwrap();
    let node = keys(3);
    let addr = listen(&node, false).await;
    let err = probe(&target(&node, addr), config).await.unwrap_err();
    assert!(err.to_string().contains("does not answer probes"), "{err}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let err = probe(&target(&node, dead), config).await.unwrap_err();
    assert!(matches!(err, NetError::Connect { .. }), "{err}");
}
