//! The directory's rules at the library level: what it registers, what it
//! refuses, and what survives a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use mixnn_directory::api::*;
use mixnn_directory::ed25519_dalek::SigningKey;
use mixnn_directory::*;
use mixnn_directory_server::*;

#[test]
fn register_accepts_a_valid_descriptor_and_refuses_the_same_again_unless_identical() {
    let (dir, _clock) = directory();
    let d = signed(1, T0);
    assert_eq!(dir.register(&d).unwrap(), Registration::New);
    assert_eq!(dir.register(&d).unwrap(), Registration::Unchanged);
    assert_eq!(
        dir.register(&signed(1, T0 + 1)).unwrap(),
        Registration::Updated
    );
    let err = dir.register(&signed(1, T0)).unwrap_err();
    assert!(matches!(err, DirectoryError::NotNewer { .. }), "{err}");
    assert_eq!(err.http_status(), 409);
}

#[test]
fn forged_descriptor_is_refused() {
    let (dir, _clock) = directory();
    let victim = node_key(1);
    let attacker = node_key(2);
    // The attacker signs a descriptor that claims the victim's identity.
    let d = descriptor(&victim, 7001, T0);
    let mut forged_claim = descriptor(&attacker, 7001, T0);
    let forged = sign_descriptor(&attacker, &forged_claim).unwrap();
    let forged = tamper(
        &forged,
        &hex::encode(attacker.verifying_key().to_bytes()),
        &hex::encode(d.identity),
    );
    let err = dir.register(&forged).unwrap_err();
    assert!(
        matches!(err, DirectoryError::BadSignature { what: "descriptor" }),
        "{err}"
    );
    assert_eq!(err.http_status(), 401);
    // And a signature of zeros on the attacker's own descriptor.
    forged_claim.published += 1;
    let own = sign_descriptor(&attacker, &forged_claim).unwrap();
    let zeros = format!(
        r#"{{"descriptor":{},"signature":"{}"}}"#,
        own.descriptor_json(),
        "00".repeat(64)
    );
    let zeros: SignedDescriptor = serde_json::from_str(&zeros).unwrap();
    assert!(matches!(
        dir.register(&zeros),
        Err(DirectoryError::BadSignature { .. })
    ));
    assert_eq!(dir.node_count().unwrap(), 0);
}

#[test]
fn tampered_descriptor_is_refused() {
    let (dir, _clock) = directory();
    let d = tamper(&signed(1, T0), "127.0.0.1:7001", "127.0.0.1:7999");
    let err = dir.register(&d).unwrap_err();
    assert!(matches!(err, DirectoryError::BadSignature { .. }), "{err}");
}

#[test]
fn stale_and_future_descriptors_are_refused() {
    let (dir, _clock) = directory();
    let max_age = dir.config().max_descriptor_age;
    let err = dir.register(&signed(1, T0 - max_age - 1)).unwrap_err();
    assert!(matches!(err, DirectoryError::Stale { .. }), "{err}");
    assert_eq!(err.http_status(), 422);
    let err = dir
        .register(&signed(1, T0 + CLOCK_SKEW_SECS + 1))
        .unwrap_err();
    assert!(matches!(err, DirectoryError::FromFuture { .. }), "{err}");
}

#[test]
fn a_node_proven_at_an_address_takes_it_from_its_earlier_holder() {
    // The probe (here: passing) just reached the newcomer at the address,
    // so the earlier holder is not there any more.
    let (dir, clock) = directory();
    dir.register(&signed(1, T0)).unwrap();
    let other = node_key(2);
    let newcomer = sign_descriptor(&other, &descriptor(&other, 7001, T0)).unwrap();
    assert_eq!(dir.register(&newcomer).unwrap(), Registration::New);
    assert!(matches!(
        dir.node(&node_key(1).verifying_key().to_bytes()),
        Err(DirectoryError::UnknownNode { .. })
    ));
    let view = dir
        .view()
        .unwrap()
        .verify(&[dir.public_key()], clock.now())
        .unwrap();
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(
        view.nodes[0].descriptor.identity,
        other.verifying_key().to_bytes()
    );
}

#[test]
fn heartbeats_update_history_and_replays_and_strangers_are_refused() {
    let (dir, clock) = directory();
    let key = node_key(1);
    dir.register(&signed(1, T0)).unwrap();
    for _ in 0..6 {
        clock.advance(10);
        dir.heartbeat(&sign_heartbeat(&key, clock.now()).unwrap())
            .unwrap();
    }
    let h = dir.node(&key.verifying_key().to_bytes()).unwrap().history;
    assert_eq!(h.heartbeats, 6);
    assert_eq!(h.uptime_secs, 60);
    assert_eq!(h.missed_heartbeats, 0);
    assert_eq!(h.uptime_fraction, 1.0);
    assert_eq!(h.last_heartbeat, Some(T0 + 60));

    let err = dir
        .heartbeat(&sign_heartbeat(&key, clock.now()).unwrap())
        .unwrap_err();
    assert!(matches!(err, DirectoryError::Replayed { .. }), "{err}");

    // Silent for 100 s: ten heartbeats missed, uptime fraction drops.
    clock.advance(100);
    let h = dir.node(&key.verifying_key().to_bytes()).unwrap().history;
    assert_eq!(h.missed_heartbeats, 10);
    assert!(
        (h.uptime_fraction - 60.0 / 160.0).abs() < 1e-9,
        "{}",
        h.uptime_fraction
    );
    // The gap after the silence is not counted as uptime.
    dir.heartbeat(&sign_heartbeat(&key, clock.now()).unwrap())
        .unwrap();
    assert_eq!(
        dir.node(&key.verifying_key().to_bytes())
            .unwrap()
            .history
            .uptime_secs,
        60
    );

    let stranger = SigningKey::from_bytes(&[0x77; 32]);
    let err = dir
        .heartbeat(&sign_heartbeat(&stranger, clock.now()).unwrap())
        .unwrap_err();
    assert!(matches!(err, DirectoryError::UnknownNode { .. }), "{err}");
    let err = dir
        .heartbeat(&sign_heartbeat(&key, clock.now() - 61).unwrap())
        .unwrap_err();
    assert!(matches!(err, DirectoryError::Stale { .. }), "{err}");
}

#[test]
fn failure_reports_are_stored_once_and_counted() {
    let (dir, clock) = directory();
    let node = node_key(1).verifying_key().to_bytes();
    dir.register(&signed(1, T0)).unwrap();
    let designer = SigningKey::from_bytes(&[0x55; 32]);
    let report = sign_failure_report(&designer, node, 12, "no answer", clock.now()).unwrap();
    // Not drawn yet: refused.
    let err = dir.report_failure(&report).unwrap_err();
    assert!(matches!(err, DirectoryError::NotDrawn { .. }), "{err}");
    assert_eq!(err.http_status(), 403);
    let receipt = dir
        .draw(
            &sign_draw_request(&designer, &[node, [9; 32]], clock.now()).unwrap(),
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap()
        .verify(&[dir.public_key()])
        .unwrap();
    // Only the listed node is recorded.
    assert_eq!(receipt.nodes, vec![node]);
    assert_eq!(
        dir.report_failure(&report).unwrap(),
        FailureOutcome::Recorded
    );
    assert_eq!(
        dir.report_failure(&report).unwrap(),
        FailureOutcome::Duplicate
    );
    let record = dir.node(&node).unwrap();
    assert_eq!(record.history.failures, 1);
    assert_eq!(record.history.recent_failures, 1);
    assert_eq!(record.recent_reports[0].reason, "no answer");
    assert_eq!(
        record.recent_reports[0].reporter,
        designer.verifying_key().to_bytes()
    );

    let unknown = sign_failure_report(&designer, [9; 32], 1, "x", clock.now()).unwrap();
    assert!(matches!(
        dir.report_failure(&unknown),
        Err(DirectoryError::UnknownNode { .. })
    ));
    let tampered = tamper(&report, "no answer", "on fire");
    assert!(matches!(
        dir.report_failure(&tampered),
        Err(DirectoryError::BadSignature { .. })
    ));

    // A report stops being recent after the failure window.
    clock.advance(dir.config().failure_window + 1);
    let h = dir.node(&node).unwrap().history;
    assert_eq!((h.failures, h.recent_failures), (1, 0));
}

#[test]
fn admitted_reporters_need_no_draw_and_others_do() {
    let designer = SigningKey::from_bytes(&[0x55; 32]);
    let (dir, _clock) = directory_with(DirectoryConfig {
        admitted_reporters: vec![designer.verifying_key().to_bytes()],
        ..loopback_config()
    });
    let node = node_key(1).verifying_key().to_bytes();
    dir.register(&signed(1, T0)).unwrap();
    let other = SigningKey::from_bytes(&[0x56; 32]);
    let err = dir
        .report_failure(&sign_failure_report(&other, node, 1, "x", T0).unwrap())
        .unwrap_err();
    assert!(matches!(err, DirectoryError::NotDrawn { .. }), "{err}");
    dir.report_failure(&sign_failure_report(&designer, node, 1, "x", T0).unwrap())
        .unwrap();
}

/// Attack: one reporter key files many failure reports about an honest
/// node (each at its own step, so none is a duplicate). Before: 10
/// reports dropped it to the floor weight 0.01. Now its weight stays at
/// least half (REPORTER_CAP = 1 halving), and the effect decays.
#[test]
fn one_reporter_cannot_push_a_node_below_half_its_weight() {
    let (dir, clock) = directory();
    let node = node_key(1).verifying_key().to_bytes();
    dir.register(&signed(1, T0)).unwrap();
    dir.register(&signed(2, T0)).unwrap();
    let attacker = SigningKey::from_bytes(&[0x66; 32]);
    dir.draw(
        &sign_draw_request(&attacker, &[node], T0).unwrap(),
        "10.0.0.1".parse().unwrap(),
    )
    .unwrap();
    for step in 0..1000 {
        let r = sign_failure_report(&attacker, node, step, "x", T0).unwrap();
        assert_eq!(dir.report_failure(&r).unwrap(), FailureOutcome::Recorded);
    }
    let weight_of = |dir: &DirectoryState, now| {
        let v = dir
            .view()
            .unwrap()
            .verify(&[dir.public_key()], now)
            .unwrap();
        v.nodes
            .iter()
            .find(|n| n.descriptor.identity == node)
            .unwrap()
            .weight()
    };
    let w = weight_of(&dir, T0);
    eprintln!("weight after 1000 reports by one key: {w}");
    assert!(w >= 0.5, "one reporter pushed the weight to {w}");
    assert!(w < 1.0);
    // The effect decays: one half-life later it is half as large (the
    // node heartbeats and is probed again meanwhile, so it stays listed).
    let half_life = dir.config().report_half_life;
    let mut t = T0;
    while t < T0 + half_life {
        t += 10;
        clock.set(t);
        dir.heartbeat(&sign_heartbeat(&node_key(1), t).unwrap())
            .unwrap();
        if (t - T0).is_multiple_of(300) {
            dir.reprobe().unwrap();
        }
    }
    let later = weight_of(&dir, clock.now());
    eprintln!("one half-life later: {later}");
    assert!((later - 0.5f64.powf(0.5)).abs() < 1e-3, "{later}");
}

#[test]
fn restart_keeps_registrations_and_history() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("directory.db");
    let key_file = tmp.path().join("directory.key");
    let clock = ManualClock::new(T0);
    let open = || {
        DirectoryState::with_prober(
            Store::open(&db).unwrap(),
            DirectoryKeys::load_or_create(&key_file).unwrap(),
            Arc::new(clock.clone()),
            loopback_config(),
            Arc::new(AdmitAll),
        )
    };
    let node = node_key(1);
    let designer = SigningKey::from_bytes(&[0x55; 32]);
    let public = {
        let dir = open();
        dir.register(&signed(1, T0)).unwrap();
        dir.register(&signed(2, T0)).unwrap();
        clock.advance(10);
        dir.heartbeat(&sign_heartbeat(&node, clock.now()).unwrap())
            .unwrap();
        dir.draw(
            &sign_draw_request(&designer, &[node.verifying_key().to_bytes()], clock.now()).unwrap(),
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap();
        let r = sign_failure_report(
            &designer,
            node.verifying_key().to_bytes(),
            3,
            "crash",
            clock.now(),
        );
        dir.report_failure(&r.unwrap()).unwrap();
        dir.public_key()
    };
    let dir = open();
    assert_eq!(dir.public_key(), public);
    assert_eq!(dir.node_count().unwrap(), 2);
    let record = dir.node(&node.verifying_key().to_bytes()).unwrap();
    assert_eq!(record.descriptor, signed(1, T0));
    assert_eq!(record.history.first_seen, T0);
    assert_eq!(record.history.heartbeats, 1);
    assert_eq!(record.history.uptime_secs, 10);
    assert_eq!(record.history.failures, 1);
    assert_eq!(record.recent_reports.len(), 1);
    // Rules still hold after the restart: a replayed heartbeat.
    let replay = sign_heartbeat(&node, clock.now()).unwrap();
    assert!(matches!(
        dir.heartbeat(&replay),
        Err(DirectoryError::Replayed { .. })
    ));
    let view = dir.view().unwrap().verify(&[public], clock.now()).unwrap();
    assert_eq!(view.nodes.len(), 2);
}
