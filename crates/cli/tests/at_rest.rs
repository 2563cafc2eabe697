#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Nothing identifying at rest or in logs by default (issue #17, item 6;
//! SECURITY.md "At rest and in logs"): five `mixnn node` processes, all at
//! `-vv` (debug), one sending cover to the others, and a `mixnn train
//! --cascade` at `-vv` through them. Then
//! * no node's log holds another process's address (any `127.0.0.1:PORT`
//!   but its own), nor a run of 8 or more hex digits with a letter in it
//!   (session ids, tags and keys in hex: the old logs printed
//!   `session=` and the first 4 bytes of the id, and link keys whole);
//!   every `session=` field is an alias (`#` and 6 hex digits);
//! * only the node started with `--debug-record-peers` has a
//!   `learned-peers.txt`, and it lists its two neighbours.

use std::collections::BTreeSet;
use std::net::SocketAddr;

mod common;
use common::*;

/// Every `127.0.0.1:PORT` in `text`.
fn loopback_addrs(text: &str) -> BTreeSet<SocketAddr> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("127.0.0.1:") {
        let port: String = text[at + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(p) = port.parse::<u16>() {
            found.insert(SocketAddr::from(([127, 0, 0, 1], p)));
        }
    }
    found
}

/// Runs of 8 or more hex digits that hold a letter (a-f, either case):
/// how ids, tags and keys look in hex; plain decimal numbers are left out.
fn hex_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            cur.push(c);
            continue;
        }
        if cur.len() >= 8 && cur.chars().any(|c| c.is_ascii_alphabetic()) {
            runs.push(cur.clone());
        }
        cur.clear();
    }
    runs
}

#[test]
fn logs_and_state_dirs_name_no_peer() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = Nodes::start(t.path(), 0);
    for i in 0..4 {
        let extra: &[&str] = if i == 2 {
            &["-vv", "--debug-record-peers"]
        } else {
            &["-vv"]
        };
        nodes.start_one(extra);
    }
    // The last hop sends cover to every other node, so cover links (and
    // the debug lines of dropped cover) are in the logs too.
    let mut extra: Vec<String> = vec!["-vv".into(), "--cover-rate".into(), "20".into()];
    for h in &nodes.hops {
        extra.push("--cover-peer".into());
        extra.push(format!("{}={}", h.addr, h.link));
    }
    nodes.start_one(&extra.iter().map(String::as_str).collect::<Vec<_>>());
    let file = nodes.cascade_file("cascade.toml");
    let out = train_cmd(
        t.path(),
        "cascade",
        &["--cascade", file.to_str().unwrap()],
        &[
            "-vv",
            "--train-limit",
            "1000",
            "--test-limit",
            "500",
            "--epochs",
            "1",
            "--audit-rate",
            "0.2",
        ],
    )
    .output()
    .unwrap();
    let designer = said_ok(&out, "the cascade run");
    // Let the cover run on a while after the run.
    std::thread::sleep(std::time::Duration::from_millis(500));
    nodes.stop();

    let addrs: Vec<SocketAddr> = nodes.hops.iter().map(|h| h.addr).collect();
    let mut debug_lines = 0;
    for (i, own) in addrs.iter().enumerate() {
        let log = nodes.log(i);
        debug_lines += log.lines().filter(|l| l.contains("DEBUG")).count();
        // The only address a node may log is its own (where it listens).
        let named = loopback_addrs(&log);
        let others: Vec<_> = named.iter().filter(|a| *a != own).collect();
        assert!(others.is_empty(), "node {i} logged {others:?}:\n{log}");
        let runs = hex_runs(&log);
        assert!(runs.is_empty(), "node {i} logged hex {runs:?}:\n{log}");
        for (at, _) in log.match_indices("session=") {
            let v: String = log[at + 8..].chars().take(8).collect();
            let ok = v.starts_with('#')
                && v[1..7].chars().all(|c| c.is_ascii_hexdigit())
                && !v[7..].starts_with(|c: char| c.is_ascii_hexdigit());
            assert!(ok, "node {i}: session field {v:?} is not an alias:\n{log}");
        }
        // At rest: only the node asked to records its peers.
        let learned = nodes.state(i).join("learned-peers.txt");
        if i != 2 {
            assert!(!learned.exists(), "node {i} wrote {}", learned.display());
            continue;
        }
        let text = std::fs::read_to_string(&learned).unwrap();
        let listed: BTreeSet<SocketAddr> = text.lines().map(|l| l.parse().unwrap()).collect();
        assert!(
            listed.contains(&addrs[1]) && listed.contains(&addrs[3]),
            "node 2 recorded {listed:?}; its neighbours are {} and {}",
            addrs[1],
            addrs[3]
        );
        for a in [addrs[0], addrs[4]] {
            assert!(!listed.contains(&a), "node 2 recorded {a}, not a neighbour");
        }
    }
    // The test looked at real debug logs (sessions set up, cover dropped).
    assert!(debug_lines > 0, "no debug lines in the node logs");
    assert!(
        (0..5).any(|i| nodes.log(i).contains("session=#")),
        "no session lines"
    );
    assert!(
        (0..4).any(|i| nodes.log(i).contains("cover message dropped")),
        "no cover lines"
    );
    // The designer logs its own hops' addresses only where it names a
    // hop of its own cascade file; nothing else.
    for a in loopback_addrs(&designer) {
        assert!(addrs.contains(&a), "designer logged {a}:\n{designer}");
    }
}
