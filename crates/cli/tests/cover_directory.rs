#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Cover peers from the directory, process by process: `mixnn node
//! --directory URL --directory-key HEX --cover-rate R` with no
//! `--cover-peer` sends its cover to the other nodes of the directory's
//! signed view, and they drop it (SECURITY.md, "Timing and cover traffic").

use std::process::Stdio;

use mixnn_directory::{parse_key_hex, unix_now};
use mixnn_directory_client::DirectoryClient;

mod common;
use common::*;

/// One stage does everything, so a cascade of one node (the cover node)
/// can train: the other nodes see no session traffic at all.
const ONE_STAGE: &str = r#"
name = "one-stage"
input = 784

[[stage]]
ops = [
  { op = "linear", in = 784, out = 10 },
  { op = "log_softmax" },
  { op = "nll_loss" },
]
"#;

/// The senders of the cover messages node `i` dropped, as its debug log
/// says (`from=key#…`: the log alias of the sender's link key, not the
/// key), one entry per message.
fn cover_senders(nodes: &Nodes, i: usize) -> Vec<String> {
    nodes
        .log(i)
        .lines()
        .filter(|l| l.contains("cover message dropped"))
        .map(|l| {
            let from = l.split_whitespace().find_map(|f| f.strip_prefix("from="));
            from.unwrap_or_else(|| panic!("no sender in {l:?}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn a_node_sends_cover_to_the_other_nodes_of_the_view() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let directory = Directory::start(dir);
    let announce = ["--directory", &directory.url, "--heartbeat", "1", "-vv"];
    // Nodes 0 and 1 only listen; node 2 sends cover and names no peer.
    let mut nodes = Nodes::start(dir, 0);
    nodes.start_one(&announce);
    nodes.start_one(&announce);
    let mut cover_args = announce.to_vec();
    cover_args.extend(["--directory-key", &directory.key, "--cover-rate", "20"]);
    nodes.start_one(&cover_args);
    let client = DirectoryClient::new(&directory.url).unwrap();
    let key = parse_key_hex("key", &directory.key).unwrap();
    let listed = || {
        client
            .view()
            .ok()
            .and_then(|v| v.verify(&[key], unix_now()).ok())
            .map_or(0, |v| v.nodes.len())
    };
    wait_until(15, || "3 nodes in the view".into(), || listed() == 3);

    // A node sends no cover before its first real message (so no cover is
    // of a size no cascade uses): a short run through node 2 alone.
    std::fs::write(dir.join("one-stage.toml"), ONE_STAGE).unwrap();
    let hop = &nodes.hops[2];
    let cascade = dir.join("cascade.toml");
    std::fs::write(
        &cascade,
        format!(
            "[[hop]]\naddr = \"{}\"\nonion = \"{}\"\nlink = \"{}\"\n",
            hop.addr, hop.onion, hop.link
        ),
    )
    .unwrap();
    let out = train_cmd(
        dir,
        "run",
        &["--cascade", cascade.to_str().unwrap()],
        &[
            "--model",
            "one-stage.toml",
            "--epochs",
            "1",
            "--train-limit",
            "256",
            "--test-limit",
            "64",
        ],
    )
    .output()
    .unwrap();
    said_ok(&out, "train through the cover node");

    // At 20/s over two peers, each gets about 10 a second.
    for i in [0, 1] {
        wait_until(
            10,
            || format!("cover from node 2 at node {i}: {}", nodes.log(i)),
            || cover_senders(&nodes, i).len() >= 3,
        );
    }
    // Never to itself, and nobody else sends cover: one sender at each
    // receiver, shown by its alias only (never the link key).
    assert!(cover_senders(&nodes, 2).is_empty(), "{}", nodes.log(2));
    for i in [0, 1] {
        let senders: std::collections::BTreeSet<String> =
            cover_senders(&nodes, i).into_iter().collect();
        assert_eq!(senders.len(), 1, "{}", nodes.log(i));
        assert!(senders.iter().all(|s| s.starts_with("key#")), "{senders:?}");
        assert!(
            !nodes.log(i).contains(&nodes.hops[2].link),
            "{}",
            nodes.log(i)
        );
    }
    assert!(
        nodes
            .log(2)
            .contains("cover peers from the directory's view: 2 nodes"),
        "{}",
        nodes.log(2)
    );
    nodes.stop();
}

#[test]
fn cover_from_the_view_needs_the_directory_key() {
    let t = tempfile::tempdir().unwrap();
    let out = mixnn()
        .args(["node", "--listen", "127.0.0.1:0", "--state"])
        .arg(t.path().join("node"))
        .args(["--directory", "http://127.0.0.1:1", "--cover-rate", "5"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("--directory-key HEX"),
        "{err}"
    );
}
