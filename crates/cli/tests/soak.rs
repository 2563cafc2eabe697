#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Load held (issue #27): many designers train through the same five
//! `mixnn node` processes at once while an abusive client attacks those
//! nodes from outside (answers piled up at a client that never reads,
//! connections that never authenticate, links that never finish a
//! request, an audited session pinning states). Every honest run must end
//! byte-identical to `--local` without a recovery (no honest session
//! shed), and every node's peak resident memory must stay under its
//! `--max-memory-mib`.
//!
//! CI runs 4 cascades; the long soak is
//! `MIXNN_SOAK_RUNS=20 cargo test -p mixnn --test soak -- --ignored --nocapture`.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mixnn_proto::trailer::Pass;
use mixnn_proto::{BackwardNote, ChunkNote, ForwardNote, InitNote, Micro, SessionNote};
use mixnn_wire::{HopAddr, HopTag, Next, Op, PaddingPolicy, ReplyId, CELL_SIZE};

mod common;
mod probe;
use common::*;
use probe::notes::*;
use probe::{Probe, Target};

/// Each node's budget: room for the honest sessions (an audited session
/// of the first stage counts 18 states of 0.8 MB, 14.5 MB, and new
/// sessions take at most ¾ · ¾ · ¾ of the budget) and for the attacker's.
fn budget_mib(runs: usize) -> u64 {
    (48 * runs as u64).max(256)
}

/// Each honest run: the paper model through the five nodes.
fn run_args(epochs: u32) -> Vec<String> {
    [
        "--train-limit",
        "640",
        "--test-limit",
        "256",
        "--epochs",
        &epochs.to_string(),
        // Many designers on two cores: slow, not failed.
        "--timeout",
        "600",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// One message for the hop of a one-hop `session`, delivered to `to`.
fn msg(
    probe: &mut Probe,
    session: &mut mixnn_wire::DesignerSession,
    to: std::net::SocketAddr,
    (op, tag, note): (Op, HopTag, &SessionNote),
    body: &[u8],
    policy: &PaddingPolicy,
) -> Vec<u8> {
    let next = Next::Deliver {
        addr: HopAddr(to),
        reply_id: ReplyId::random(&mut probe.rng),
    };
    probe.session_msg(session, &[(op, tag, next, note.encode())], body, policy)
}

/// The abusive client, until `stop`: against `target`, a round a second of
/// (a) four `classes` sessions (1 MiB bodies) answering 20 one-cell
/// fetches each to a sink that never reads, (b) an audited session sending
/// two forwards and one backward per step for 24 steps, all from one link
/// key (so at most 16 sessions at once: more keys would hold more
/// sessions, a limit `SECURITY.md` states and this test does not
/// measure); meanwhile 300 TCP connections that never authenticate and
/// 100 links that never finish a request are held open. Returns the
/// attacker's messages sent.
fn attack(target: Target, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let sent = Arc::new(AtomicU64::new(0));
    let mut holders = Vec::new();
    // Connections that never authenticate.
    {
        let stop = Arc::clone(&stop);
        holders.push(std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain_mut(|s| {
                    use std::io::Read;
                    let _ = s.set_nonblocking(true);
                    let mut b = [0u8; 1];
                    matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while held.len() < 300 {
                    match TcpStream::connect(target.addr) {
                        Ok(s) => held.push(s),
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    // Links that never finish a request.
    {
        let stop = Arc::clone(&stop);
        holders.push(std::thread::spawn(move || {
            let mut probe = Probe::new(seed ^ 0x11);
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain_mut(|c: &mut probe::Conn| {
                    let mut cell = vec![0u8; CELL_SIZE];
                    probe
                        .rt
                        .block_on(async {
                            tokio::time::timeout(
                                Duration::from_millis(1),
                                c.reader.recv_cell(&mut cell),
                            )
                            .await
                        })
                        .is_err()
                });
                while held.len() < 100 {
                    let key = probe.fresh_key();
                    let Ok(mut c) = probe.connect(&target, &key) else {
                        break;
                    };
                    let mut cell = vec![0u8; CELL_SIZE];
                    cell[0] = 1;
                    cell[1..3].copy_from_slice(&100u16.to_le_bytes());
                    cell[3..7].copy_from_slice(&((99 * CELL_SIZE) as u32).to_le_bytes());
                    if probe.send(&mut c, &cell).is_ok() {
                        held.push(c);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    let mut probe = Probe::new(seed);
    let sink = probe.sink();
    let me = (probe.addr, *probe.key.public().as_bytes());
    let classes = PaddingPolicy::Classes { max_body: 1 << 20 };
    // 262 k parameters: a 2 MiB state, fetched in 1 MiB chunks.
    let big = stage(512, vec![linear(512, 512)]);
    while !stop.load(Ordering::Relaxed) {
        let key = probe.key.clone();
        let Ok(mut conn) = probe.connect(&target, &key) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let mut send = |probe: &mut Probe, cells: &[u8]| {
            if probe.send(&mut conn, cells).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        };
        // (a) answers piling up at a sink.
        let mut sessions = Vec::new();
        for _ in 0..4 {
            let n = InitNote {
                designer_addr: Some(sink.0),
                designer_link: sink.1,
                next_link: sink.1,
                ..init_note(big.clone(), classes, *key.public().as_bytes(), &probe)
            };
            let (cells, session, _) =
                probe.init_to(&target, &n.encode(), &classes.for_init(), sink.0);
            send(&mut probe, &cells);
            sessions.push(session);
        }
        std::thread::sleep(Duration::from_millis(300));
        for k in 0..20u32 {
            for s in &mut sessions {
                let note = SessionNote::Fetch(ChunkNote {
                    step: 0,
                    chunk: k % 2,
                });
                let tag = HopTag::random(&mut probe.rng);
                let cells = msg(
                    &mut probe,
                    s,
                    sink.0,
                    (Op::Fetch, tag, &note),
                    &[],
                    &classes,
                );
                send(&mut probe, &cells);
            }
        }
        // (b) an audited session pinning states.
        let n = InitNote {
            audit_key: Some([7; 32]),
            designer_addr: Some(me.0),
            designer_link: me.1,
            next_link: me.1,
            ..init_note(big.clone(), ONE_CELL, *key.public().as_bytes(), &probe)
        };
        let (cells, mut audited, _) = probe.init(&target, &n.encode(), &ONE_CELL);
        send(&mut probe, &cells);
        std::thread::sleep(Duration::from_millis(300));
        // Trailers as the designer fills them (the probe holds the audit
        // key), so that the node takes every message.
        let body = |step: u64, pass: Pass| audited_body(&[7; 32], rows(1, 512), step, pass);
        for step in 0..24u64 {
            let forward = SessionNote::Forward(ForwardNote {
                step,
                micro: Micro::WHOLE,
                batch_rows: 0,
                labels: Vec::new(),
            });
            let (kept, dangling) = (
                HopTag::random(&mut probe.rng),
                HopTag::random(&mut probe.rng),
            );
            for tag in [kept, dangling] {
                let cells = msg(
                    &mut probe,
                    &mut audited,
                    me.0,
                    (Op::Forward, tag, &forward),
                    &body(step, Pass::Forward),
                    &ONE_CELL,
                );
                send(&mut probe, &cells);
            }
            let backward = SessionNote::Backward(BackwardNote {
                step,
                micro: Micro::WHOLE,
                need_input_grad: true,
            });
            let cells = msg(
                &mut probe,
                &mut audited,
                me.0,
                (Op::Backward, kept, &backward),
                &body(step, Pass::Backward),
                &ONE_CELL,
            );
            send(&mut probe, &cells);
        }
        // The probe's own listener reads what comes back; a round a second.
        let _ = probe.drain(Duration::from_secs(2), Duration::from_millis(300));
        std::thread::sleep(Duration::from_secs(1));
    }
    for h in holders {
        let _ = h.join();
    }
    sent.load(Ordering::Relaxed)
}

/// Seconds of the slowest epoch of a run's metrics.
fn slowest_epoch(run: &Run) -> f64 {
    run.metrics["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["train_s"].as_f64())
        .fold(0.0, f64::max)
}

fn soak(runs: usize, epochs: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let args = run_args(epochs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let local = train(dir, "local", &["--local"], &args);
    let budget_mib = budget_mib(runs);
    let budget = budget_mib.to_string();
    // The attacker's sessions, left idle, go after 30 s. Every honest
    // session reaches node k + 1 over node k's one link key: the per-key
    // session limit (default 16) must admit them all (with 20 runs and the
    // default, node 2 refused the 17th to 21st inits and those designers
    // waited out their init bound).
    let per_key = (runs + 4).max(16).to_string();
    let nodes = Nodes::start_with(
        dir,
        5,
        &[
            "-v",
            "--max-memory-mib",
            &budget,
            "--session-idle",
            "30",
            "--max-sessions-per-key",
            &per_key,
        ],
    );
    let cascade = nodes.cascade_file("cascade.toml");
    let cascade = cascade.to_str().unwrap().to_string();
    // Unloaded: one run alone.
    let alone = train(dir, "alone", &["--cascade", &cascade], &args);
    assert_same_run(&local, &alone);
    let unloaded = slowest_epoch(&alone);

    // Loaded: the abusive client on nodes 1 and 3, then every designer at
    // once.
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = [1usize, 3]
        .iter()
        .map(|&i| {
            let (target, stop) = (Target::of(&nodes.hops[i]), Arc::clone(&stop));
            std::thread::spawn(move || attack(target, stop, 2700 + i as u64))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let designers: Vec<_> = (0..runs)
        .map(|k| {
            train_cmd(dir, &format!("run-{k}"), &["--cascade", &cascade], &args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut slowest = 0.0f64;
    for (k, d) in designers.into_iter().enumerate() {
        let out = d.wait_with_output().unwrap();
        if !out.status.success() {
            // What the nodes said about links and sessions, for the record.
            for i in 0..5 {
                for l in nodes.log(i).lines().filter(|l| {
                    [
                        "dropped",
                        "shed",
                        "closing",
                        "cannot reach",
                        "refused: limit",
                        "did not drain",
                    ]
                    .iter()
                    .any(|w| l.contains(w))
                }) {
                    eprintln!("node {i}: {l}");
                }
            }
        }
        let said = said_ok(&out, &format!("honest run {k}"));
        assert!(
            !said.contains("recovered:"),
            "honest run {k} had to recover: {said}"
        );
        let run = Run::load(dir, &format!("run-{k}"));
        assert_same_run(&local, &run);
        slowest = slowest.max(slowest_epoch(&run));
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let attacked: u64 = attackers.into_iter().map(|a| a.join().unwrap()).sum();
    let peaks: Vec<u64> = nodes
        .children
        .iter()
        .map(|c| peak_rss_bytes(c.id()) >> 20)
        .collect();
    let shed: Vec<usize> = (0..5)
        .map(|i| log_lines(&nodes, i, "session shed"))
        .collect();
    let steps = runs as u64 * u64::from(epochs) * 10;
    eprintln!(
        "soak: {runs} honest runs ({steps} steps) through 5 nodes in {:.1} s, all byte-identical to --local, none recovered; \
         the attacker sent {attacked} messages to nodes 1 and 3; sessions shed per node {shed:?}; \
         node peak RSS (MiB) {peaks:?} under a budget of {budget_mib} MiB; \
         slowest honest epoch {slowest:.2} s loaded vs {unloaded:.2} s alone",
        took.as_secs_f64()
    );
    if std::env::var_os("SOAK_DEBUG").is_some() {
        for i in [1, 3] {
            for l in nodes
                .log(i)
                .lines()
                .filter(|l| l.contains("memory:") || l.contains("shed"))
            {
                eprintln!("node {i}: {l}");
            }
        }
    }
    for (i, p) in peaks.iter().enumerate() {
        assert!(*p <= budget_mib, "node {i} peaked at {p} MiB");
    }
}

/// CI: four cascades at once under attack.
#[test]
fn four_cascades_under_attack_run_as_if_alone() {
    soak(4, 1);
}

/// The long soak: `MIXNN_SOAK_RUNS` (default 20) cascades, two epochs each.
#[test]
#[ignore = "long: MIXNN_SOAK_RUNS=20 cargo test -p mixnn --test soak -- --ignored --nocapture"]
fn many_cascades_under_attack_run_as_if_alone() {
    let runs = std::env::var("MIXNN_SOAK_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    soak(runs, 2);
}
