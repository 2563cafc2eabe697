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
fn address_reuse_by_another_key_is_refused() {
    let (dir, _clock) = directory();
    dir.register(&signed(1, T0)).unwrap();
    let other = node_key(2);
    let squatter = sign_descriptor(&other, &descriptor(&other, 7001, T0)).unwrap();
    let err = dir.register(&squatter).unwrap_err();
    assert!(matches!(err, DirectoryError::AddressTaken { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "address 127.0.0.1:7001 is registered under another identity key"
    );
    // The owner may move, and then the old address is free.
    let owner = node_key(1);
    dir.register(&sign_descriptor(&owner, &descriptor(&owner, 7100, T0 + 1)).unwrap())
        .unwrap();
    assert_eq!(dir.register(&squatter).unwrap(), Registration::New);
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
fn only_accepted_reporters_may_report_when_configured() {
    let designer = SigningKey::from_bytes(&[0x55; 32]);
    let clock = ManualClock::new(T0);
    let dir = DirectoryState::new(
        Store::open_in_memory().unwrap(),
        DirectoryKeys::from_secret([1; 32]),
        Arc::new(clock.clone()),
        DirectoryConfig {
            accepted_reporters: Some(vec![designer.verifying_key().to_bytes()]),
            ..DirectoryConfig::default()
        },
    );
    let node = node_key(1).verifying_key().to_bytes();
    dir.register(&signed(1, T0)).unwrap();
    let other = SigningKey::from_bytes(&[0x56; 32]);
    let err = dir
        .report_failure(&sign_failure_report(&other, node, 1, "x", T0).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, DirectoryError::UnknownReporter { .. }),
        "{err}"
    );
    assert_eq!(err.http_status(), 403);
    dir.report_failure(&sign_failure_report(&designer, node, 1, "x", T0).unwrap())
        .unwrap();
}

#[test]
fn restart_keeps_registrations_and_history() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("directory.db");
    let key_file = tmp.path().join("directory.key");
    let clock = ManualClock::new(T0);
    let open = || {
        DirectoryState::new(
            Store::open(&db).unwrap(),
            DirectoryKeys::load_or_create(&key_file).unwrap(),
            Arc::new(clock.clone()),
            DirectoryConfig::default(),
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
    // Rules still hold after the restart: a replayed heartbeat, a squatter.
    let replay = sign_heartbeat(&node, clock.now()).unwrap();
    assert!(matches!(
        dir.heartbeat(&replay),
        Err(DirectoryError::Replayed { .. })
    ));
    let other = node_key(3);
    let squat = sign_descriptor(&other, &descriptor(&other, 7001, T0)).unwrap();
    assert!(matches!(
        dir.register(&squat),
        Err(DirectoryError::AddressTaken { .. })
    ));
    let view = dir.view().unwrap().verify(&[public], clock.now()).unwrap();
    assert_eq!(view.nodes.len(), 2);
}
