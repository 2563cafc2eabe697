//! Designer-side verification of signed views: expiry, pinning, tampering,
//! and k-of-N quorums.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use mixnn_directory::*;
use mixnn_directory_server::*;

fn directory_with_key(secret: u8, clock: &ManualClock) -> DirectoryState {
    DirectoryState::with_prober(
        Store::open_in_memory().unwrap(),
        DirectoryKeys::from_secret([secret; 32]),
        Arc::new(clock.clone()),
        loopback_config(),
        Arc::new(AdmitAll),
    )
}

#[test]
fn view_verifies_under_the_pinned_key_and_lists_live_nodes() {
    let (dir, clock) = directory();
    for i in 0..4 {
        dir.register(&signed(i, T0)).unwrap();
    }
    let signed_view = dir.view().unwrap();
    // Through JSON and back, as a designer receives it.
    let wire: SignedView =
        serde_json::from_str(&serde_json::to_string(&signed_view).unwrap()).unwrap();
    let view = wire
        .verify(&[[0; 32], dir.public_key()], clock.now())
        .unwrap();
    assert_eq!(view.directory, dir.public_key());
    assert_eq!(view.valid_until, T0 + dir.config().view_ttl);
    assert_eq!(view.nodes.len(), 4);
    assert!(view
        .nodes
        .iter()
        .all(|n| n.uptime_fraction == 1.0 && n.recent_failures == 0));
    assert_eq!(
        view.nodes[0].signed.verify_signature().unwrap(),
        view.nodes[0].descriptor
    );

    // A node that stops heartbeating leaves the view after the live window.
    clock.advance(dir.config().live_window - 5);
    dir.heartbeat(&sign_heartbeat(&node_key(0), clock.now()).unwrap())
        .unwrap();
    clock.advance(10);
    let view = dir
        .view()
        .unwrap()
        .verify(&[dir.public_key()], clock.now())
        .unwrap();
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(
        view.nodes[0].descriptor.identity,
        node_key(0).verifying_key().to_bytes()
    );
}

#[test]
fn expired_view_is_refused() {
    let (dir, clock) = directory();
    dir.register(&signed(1, T0)).unwrap();
    let view = dir.view().unwrap();
    let ttl = dir.config().view_ttl;
    view.verify(&[dir.public_key()], T0 + ttl).unwrap();
    let err = view.verify(&[dir.public_key()], T0 + ttl + 1).unwrap_err();
    assert!(matches!(err, DirectoryError::ViewExpired { .. }), "{err}");
    let _ = clock;
}

#[test]
fn view_from_the_future_is_refused() {
    let (dir, _clock) = directory();
    let err = dir
        .view()
        .unwrap()
        .verify(&[dir.public_key()], T0 - CLOCK_SKEW_SECS - 1)
        .unwrap_err();
    assert!(
        matches!(err, DirectoryError::FromFuture { what: "view", .. }),
        "{err}"
    );
}

#[test]
fn view_signed_by_an_unknown_key_is_refused() {
    let (dir, _clock) = directory();
    dir.register(&signed(1, T0)).unwrap();
    let err = dir.view().unwrap().verify(&[[7; 32]], T0).unwrap_err();
    assert!(
        matches!(err, DirectoryError::UnknownDirectory { .. }),
        "{err}"
    );

    // A rogue directory that claims the pinned key in its view.
    let clock = ManualClock::new(T0);
    let rogue = directory_with_key(0x99, &clock);
    rogue.register(&signed(1, T0)).unwrap();
    let forged = tamper(
        &rogue.view().unwrap(),
        &hex::encode(rogue.public_key()),
        &hex::encode(dir.public_key()),
    );
    let err = forged.verify(&[dir.public_key()], T0).unwrap_err();
    assert!(
        matches!(err, DirectoryError::BadSignature { what: "view" }),
        "{err}"
    );
}

#[test]
fn tampered_view_is_refused() {
    let (dir, _clock) = directory();
    dir.register(&signed(1, T0)).unwrap();
    let view = dir.view().unwrap();
    for (from, to) in [
        ("127.0.0.1:7001", "10.0.0.1:7001"),
        ("\"recent_failures\":0", "\"recent_failures\":9"),
        (
            &format!("\"valid_until\":{}", T0 + 600),
            &format!("\"valid_until\":{}", T0 + 6000),
        ),
    ] {
        let err = tamper(&view, from, to)
            .verify(&[dir.public_key()], T0)
            .unwrap_err();
        assert!(
            matches!(err, DirectoryError::BadSignature { what: "view" }),
            "{from}: {err}"
        );
    }
}

#[test]
fn view_with_a_forged_descriptor_is_refused_even_if_the_directory_signed_it() {
    let (dir, _clock) = directory();
    let good = signed(1, T0);
    let bad = tamper(&good, "127.0.0.1:7001", "127.0.0.1:7002");
    let view = View {
        directory: dir.public_key(),
        issued: T0,
        valid_until: T0 + 10,
        nodes: vec![NodeEntry {
            descriptor: bad,
            uptime_fraction: 1.0,
            missed_heartbeats: 0,
            recent_failures: 0,
            report_penalty: 0.0,
        }],
    };
    let keys = DirectoryKeys::from_secret([0xd1; 32]);
    let err = SignedView::sign(&keys, &view)
        .unwrap()
        .verify(&[keys.public()], T0)
        .unwrap_err();
    assert!(
        matches!(err, DirectoryError::BadSignature { what: "descriptor" }),
        "{err}"
    );

    let view = View {
        nodes: vec![
            NodeEntry {
                descriptor: good.clone(),
                uptime_fraction: 1.0,
                missed_heartbeats: 0,
                recent_failures: 0,
                report_penalty: 0.0,
            },
            NodeEntry {
                descriptor: good,
                uptime_fraction: 1.0,
                missed_heartbeats: 0,
                recent_failures: 0,
                report_penalty: 0.0,
            },
        ],
        ..view
    };
    let err = SignedView::sign(&keys, &view)
        .unwrap()
        .verify(&[keys.public()], T0)
        .unwrap_err();
    assert!(
        matches!(
            err,
            DirectoryError::DuplicateInView {
                what: "identity",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn quorum_needs_k_distinct_pinned_directories_with_the_same_nodes() {
    let clock = ManualClock::new(T0);
    let dirs: Vec<_> = (1..=4).map(|s| directory_with_key(s, &clock)).collect();
    let pinned: Vec<_> = dirs[..3].iter().map(DirectoryState::public_key).collect();
    for d in &dirs {
        for i in 0..3 {
            d.register(&signed(i, T0)).unwrap();
        }
    }
    // Directory 2 also knows a fourth node: its list differs.
    dirs[2].register(&signed(3, T0)).unwrap();
    let views: Vec<_> = dirs.iter().map(|d| d.view().unwrap()).collect();

    let v = verify_quorum(&views, &pinned, 2, T0).unwrap();
    assert_eq!(v.nodes.len(), 3);
    assert_eq!(v.directory, pinned[0]);
    // Entry by entry: node 3 is listed by one directory only.
    let v = verify_quorum(&views, &pinned, 3, T0).unwrap();
    assert_eq!(v.nodes.len(), 3);
    let err = verify_quorum(&views, &pinned, 4, T0).unwrap_err();
    assert!(
        matches!(
            err,
            DirectoryError::QuorumNotMet {
                agreeing: 3,
                required: 4
            }
        ),
        "{err}"
    );
    // The same directory twice counts once; the unpinned fourth not at all.
    let err = verify_quorum(
        &[views[0].clone(), views[0].clone(), views[3].clone()],
        &pinned,
        2,
        T0,
    )
    .unwrap_err();
    assert!(
        matches!(err, DirectoryError::QuorumNotMet { agreeing: 1, .. }),
        "{err}"
    );
    // Expired views do not count.
    assert!(verify_quorum(&views, &pinned, 2, T0 + 601).is_err());
    assert!(verify_quorum(&views, &pinned, 0, T0).is_err());
    // All four pinned: the three-node list has three signers.
    let all: Vec<_> = dirs.iter().map(DirectoryState::public_key).collect();
    assert_eq!(verify_quorum(&views, &all, 3, T0).unwrap().nodes.len(), 3);
}

/// Attack: one of three directories lies. It lists three Sybils of its
/// own at weight 1, gives the honest nodes uptime 0 (the floor weight), and
/// keeps node 0's old descriptor (an old onion key it might hold). Before:
/// with `--quorum 2` only (identity, address) had to agree and keys and
/// figures came from the first directory in the list, the liar.
#[test]
fn a_lying_directory_under_2_of_3_changes_neither_entries_nor_weights() {
    let clock = ManualClock::new(T0);
    let honest: Vec<_> = (1..=2).map(|s| directory_with_key(s, &clock)).collect();
    let liar_keys = DirectoryKeys::from_secret([3; 32]);
    // Node 0 re-keyed: its new descriptor has another onion key.
    let key0 = node_key(0);
    let mut new0 = descriptor(&key0, 7000, T0);
    new0.onion[1] ^= 0xff;
    let new0 = sign_descriptor(&key0, &new0).unwrap();
    for d in &honest {
        d.register(&new0).unwrap();
        for i in 1..4 {
            d.register(&signed(i, T0)).unwrap();
        }
    }
    let entry = |s: SignedDescriptor, up: f64| NodeEntry {
        descriptor: s,
        uptime_fraction: up,
        missed_heartbeats: 0,
        recent_failures: 0,
        report_penalty: 0.0,
    };
    let mut lies = vec![entry(signed(0, T0), 0.0)];
    lies.extend((1..4).map(|i| entry(signed(i, T0), 0.0)));
    lies.extend((50..53).map(|i| entry(signed(i, T0), 1.0)));
    let liar = SignedView::sign(
        &liar_keys,
        &View {
            directory: liar_keys.public(),
            issued: T0,
            valid_until: T0 + 600,
            nodes: lies,
        },
    )
    .unwrap();
    let pinned = vec![
        liar_keys.public(),
        honest[0].public_key(),
        honest[1].public_key(),
    ];
    // The liar first, as the old code trusted it.
    let views = vec![liar, honest[0].view().unwrap(), honest[1].view().unwrap()];
    let v = verify_quorum(&views, &pinned, 2, T0).unwrap();
    assert_eq!(v.nodes.len(), 4, "Sybils listed by the liar alone are out");
    for n in &v.nodes {
        assert_eq!(n.weight(), 1.0, "the median weight is the honest one");
    }
    let n0 = v
        .nodes
        .iter()
        .find(|n| n.descriptor.identity == key0.verifying_key().to_bytes())
        .unwrap();
    assert_eq!(n0.signed, new0, "the entry two directories agree on");
    // Even with k = 1, the honest majority's entries and weights win for
    // the nodes all three list.
    let v1 = verify_quorum(&views, &pinned, 1, T0).unwrap();
    let n0 = v1
        .nodes
        .iter()
        .find(|n| n.descriptor.identity == key0.verifying_key().to_bytes())
        .unwrap();
    assert_eq!(n0.signed, new0);
}
