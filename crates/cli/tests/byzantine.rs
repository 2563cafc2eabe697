//! Byzantine hops with real processes (`--features adversary`): a `mixnn
//! node --adversary` that adds noise, flips gradients or skips updates from
//! step 6 on is caught by an audit, replaced from the spares, and the run
//! ends byte-identical to the local trainer's.
#![cfg(feature = "adversary")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

/// 1600 images in batches of 16: 100 steps.
const RUN: &[&str] = &[
    "--train-limit",
    "1600",
    "--test-limit",
    "200",
    "--batch",
    "16",
    "--epochs",
    "1",
    "--seed",
    "5",
];
const FROM: u64 = 6;

#[test]
fn a_node_that_flips_gradients_is_caught_replaced_and_the_run_ends_byte_identical() {
    caught_and_replaced("flip-gradient");
}

#[test]
fn a_node_that_adds_noise_is_caught_replaced_and_the_run_ends_byte_identical() {
    caught_and_replaced("noise");
}

#[test]
fn a_node_that_skips_updates_is_caught_replaced_and_the_run_ends_byte_identical() {
    caught_and_replaced("skip-update");
}

/// Hop 1 misbehaves in `mode` from step FROM on; audits at q = 0.05 catch
/// it, it is replaced from the spares, and the run ends as an honest one.
fn caught_and_replaced(mode: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let local = train(dir, "local", &["--local"], RUN);

    // Hops 0, 2, 3, 4 and two spares honest; hop 1 the adversary.
    let mut nodes = Nodes::start(dir, 6);
    nodes.start_one(&["--adversary", &format!("{mode}@{FROM}")]);
    let all = nodes.hops.clone();
    let bad = all[6].clone();
    nodes.hops = vec![
        all[0].clone(),
        bad.clone(),
        all[1].clone(),
        all[2].clone(),
        all[3].clone(),
    ];
    let cascade = nodes.cascade_file("cascade.toml");
    nodes.hops = all[4..6].to_vec();
    let spares = nodes.cascade_file("spares.toml");
    nodes.hops = all;

    let out = train_cmd(
        dir,
        "cascade",
        &["--cascade", cascade.to_str().unwrap()],
        &[
            RUN,
            &[
                "--spares",
                spares.to_str().unwrap(),
                "--checkpoint-every",
                "10",
                "--audit-rate",
                "0.05",
                "--audit-seed",
                "11",
            ],
        ]
        .concat(),
    )
    .output()
    .unwrap();
    let said = said_ok(&out, "the designer");
    assert!(said.contains("recovered: audit failed"), "{said}");
    assert!(said.contains(&bad.addr.to_string()), "{said}");
    assert!(said.contains("1 failed"), "{said}");
    let cascade = Run::load(dir, "cascade");
    assert_same_run(&local, &cascade);
}
