#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The abuse suite, node side (issue #16): one test per way a hostile
//! client that knows a node's public keys could disable it. Each test
//! attacks a real `mixnn node` process with the probe (`tests/probe`), a
//! second protocol client written for these tests, then asserts that the
//! node still serves an honest cascade byte-identically to `--local`.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::stage::Sgd;
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_proto::{InitNote, StepNote};
use mixnn_wire::{HopTag, OnionSecret, Op, PaddingPolicy, FIRST_CELL_BODY};

mod common;
mod probe;
use common::*;
use probe::{Probe, Target};

/// The honest run: the paper model with its first and last stage kept by
/// the designer, so three remote hops.
const RUN: &[&str] = &[
    "--train-limit",
    "640",
    "--test-limit",
    "200",
    "--epochs",
    "1",
    "--keep",
    "first,last",
];

/// The local run every cascade run here must equal, made once.
fn local() -> &'static Run {
    static LOCAL: OnceLock<(tempfile::TempDir, Run)> = OnceLock::new();
    &LOCAL
        .get_or_init(|| {
            let t = tempfile::tempdir().unwrap();
            let run = train(t.path(), "local", &["--local"], RUN);
            (t, run)
        })
        .1
}

/// Three nodes, each started with `flags`.
fn nodes(dir: &Path, flags: &[&str]) -> Nodes {
    let mut nodes = Nodes {
        children: Vec::new(),
        hops: Vec::new(),
        dir: dir.to_path_buf(),
    };
    for _ in 0..3 {
        nodes.start_one(flags);
    }
    nodes
}

/// Trains through `nodes` and asserts the run equals the local one.
fn serves_honestly(nodes: &Nodes, name: &str) {
    let file = nodes.cascade_file(&format!("{name}.toml"));
    let run = train(
        &nodes.dir,
        name,
        &["--cascade", file.to_str().unwrap()],
        RUN,
    );
    assert_same_run(local(), &run);
}

fn linear(input: usize, output: usize) -> OpSpec {
    OpSpec::Linear { input, output }
}

fn stage(input: usize, ops: Vec<OpSpec>) -> StageSpec {
    StageSpec { input, ops }
}

/// An init note for a one-hop session of the probe: the probe's link
/// `prev` sends it forward traffic, and it delivers to the probe.
fn note(stage: StageSpec, policy: PaddingPolicy, prev: [u8; 32], probe: &Probe) -> Vec<u8> {
    let me = *probe.key.public().as_bytes();
    InitNote {
        stage,
        sgd: Sgd::default(),
        seed: 1,
        start_step: 0,
        max_body: match policy {
            PaddingPolicy::Uniform { max_body } => max_body as u32,
            PaddingPolicy::Classes => 0,
        },
        prev_link: prev,
        next_link: me,
        designer_link: me,
        audit_key: None,
    }
    .encode()
}

const ONE_CELL: PaddingPolicy = PaddingPolicy::Uniform {
    max_body: FIRST_CELL_BODY,
};

fn rows(rows: usize, cols: usize) -> Vec<u8> {
    TensorBytes::encode_f32(&[rows, cols], &vec![0.5; rows * cols])
}

/// Lines of node `i`'s log containing `what`.
fn log_lines(nodes: &Nodes, i: usize, what: &str) -> usize {
    nodes.log(i).lines().filter(|l| l.contains(what)).count()
}

/// Waits until node `i`'s log has `n` lines containing `what`.
fn wait_log(nodes: &Nodes, i: usize, what: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while log_lines(nodes, i, what) < n {
        assert!(
            Instant::now() < deadline,
            "node {i} logged {} of {n} lines with {what:?}: {}",
            log_lines(nodes, i, what),
            nodes.log(i)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory of process `pid`, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    kib * 1024
}

const NO_ANSWER: Duration = Duration::from_secs(2);
const ANSWER: Duration = Duration::from_secs(20);

/// Attack 1: one init naming linear(2^20, 2^20) (4 TiB of parameters).
#[test]
fn an_enormous_stage_is_refused_at_init() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(1);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    let huge = stage(1 << 20, vec![linear(1 << 20, 1 << 20)]);
    let (cells, _, rid) = probe.init(&target, &note(huge, ONE_CELL, conn.key, &probe), &ONE_CELL);
    probe.send(&mut conn, &cells).unwrap();
    assert!(
        probe.wait(rid, NO_ANSWER).is_none(),
        "the node set up a stage of 2^40 parameters"
    );
    assert!(nodes.running(1), "the node died: {}", nodes.log(1));
    serves_honestly(&nodes, "after");
}

/// Attack 2: a forward of one row, then a backward of two rows under the
/// same tag (a matmul used to panic with the core's mutex held).
#[test]
fn a_backward_that_does_not_fit_its_forward_fails_alone() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(2);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    let spec = stage(4, vec![linear(4, 3)]);
    let (cells, mut session, rid) =
        probe.init(&target, &note(spec, ONE_CELL, conn.key, &probe), &ONE_CELL);
    probe.send(&mut conn, &cells).unwrap();
    assert!(probe.wait(rid, ANSWER).is_some(), "{}", nodes.log(1));

    let mut pass = |probe: &mut Probe, op: Op, tag: HopTag, body: &[u8]| {
        let (next, rid) = probe.deliver();
        let note = StepNote {
            need_input_grad: true,
            ..StepNote::at(0)
        };
        let cells = probe.session_msg(
            &mut session,
            &[(op, tag, next, note.encode())],
            body,
            &ONE_CELL,
        );
        probe.send(&mut conn, &cells).unwrap();
        rid
    };
    let tag = HopTag::random(&mut probe.rng);
    let rid = pass(&mut probe, Op::Forward, tag, &rows(1, 4));
    assert!(probe.wait(rid, ANSWER).is_some(), "{}", nodes.log(1));
    let rid = pass(&mut probe, Op::Backward, tag, &rows(2, 3));
    assert!(
        probe.wait(rid, NO_ANSWER).is_none(),
        "a [2, 3] gradient for a [1, 4] forward was taken"
    );
    // The session itself still works: a forward and a backward that fit.
    let tag = HopTag::random(&mut probe.rng);
    let rid = pass(&mut probe, Op::Forward, tag, &rows(1, 4));
    assert!(probe.wait(rid, ANSWER).is_some(), "{}", nodes.log(1));
    let rid = pass(&mut probe, Op::Backward, tag, &rows(1, 3));
    assert!(probe.wait(rid, ANSWER).is_some(), "{}", nodes.log(1));
    serves_honestly(&nodes, "after");
}

/// Attack 3: 65 one-cell inits fill the session table for good.
#[test]
fn sessions_are_capped_per_link_key() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(3);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    let spec = stage(4, vec![linear(4, 3)]);
    let mut rids = Vec::new();
    for _ in 0..65 {
        let (cells, _, rid) = probe.init(
            &target,
            &note(spec.clone(), ONE_CELL, conn.key, &probe),
            &ONE_CELL,
        );
        probe.send(&mut conn, &cells).unwrap();
        rids.push(rid.0);
    }
    let acks = probe
        .drain(ANSWER, NO_ANSWER)
        .iter()
        .filter(|d| rids.contains(&d.rid))
        .count();
    assert!(acks <= 16, "one link key set up {acks} sessions");
    serves_honestly(&nodes, "after");
}

/// Attack 4: 256 idle links fill the link table for good.
#[test]
fn idle_links_time_out() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let probe = Probe::new(4);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut links = Vec::new();
    for _ in 0..256 {
        links.push(probe.connect(&target, &key).unwrap());
    }
    // The table is full: one more link is not served.
    let refused = probe.connect(&target, &key).map(|mut c| {
        let mut cell = vec![0u8; mixnn_wire::CELL_SIZE];
        probe.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), c.reader.recv_cell(&mut cell)).await
        })
    });
    eprintln!("257th link: {:?}", refused.as_ref().map(|r| r.is_ok()));
    // Within the idle timeout (and a second), the node closes every one.
    std::thread::sleep(Duration::from_secs(12));
    let mut cell = vec![0u8; mixnn_wire::CELL_SIZE];
    let mut open = 0;
    for c in &mut links {
        let timed_out = probe.rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(50), c.reader.recv_cell(&mut cell))
                .await
                .is_err()
        });
        open += usize::from(timed_out);
    }
    assert_eq!(open, 0, "{open} idle links still open");
    serves_honestly(&nodes, "after");
}

/// Attack 5: 8 one-cell forwards grow a node by hundreds of MiB (caches
/// counted, not sized, and kept when their reply is refused).
#[test]
fn caches_are_bounded_in_bytes() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(5);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    // 11 rows of width 1 in, 11 × 2^20 floats (44 MiB) out and cached.
    let spec = stage(1, vec![linear(1, 1 << 20), OpSpec::Relu]);
    let (cells, mut session, rid) =
        probe.init(&target, &note(spec, ONE_CELL, conn.key, &probe), &ONE_CELL);
    probe.send(&mut conn, &cells).unwrap();
    assert!(probe.wait(rid, ANSWER).is_some(), "{}", nodes.log(1));
    let pid = nodes.children[1].id();
    let before = rss_bytes(pid);
    let refused = log_lines(&nodes, 1, "refused");
    for _ in 0..8 {
        let (next, _) = probe.deliver();
        let tag = HopTag::random(&mut probe.rng);
        let cells = probe.session_msg(
            &mut session,
            &[(Op::Forward, tag, next, StepNote::at(0).encode())],
            &rows(11, 1),
            &ONE_CELL,
        );
        probe.send(&mut conn, &cells).unwrap();
    }
    wait_log(&nodes, 1, "refused", refused + 8, Duration::from_secs(60));
    let grown = rss_bytes(pid).saturating_sub(before);
    eprintln!("RSS {} MiB -> grown by {} MiB", before >> 20, grown >> 20);
    assert!(
        grown < 64 << 20,
        "8 one-cell forwards grew the node by {} MiB",
        grown >> 20
    );
    serves_honestly(&nodes, "after");
}

/// Attack 6: with size classes, a one-cell request makes the node send a
/// reply of tens of MiB.
#[test]
fn replies_are_no_larger_than_the_session_was_set_up_for() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(6);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    // 8.4 M parameters: a 33.6 MB state.
    let spec = stage(2048, vec![linear(2048, 4096)]);
    let policy = PaddingPolicy::Classes;
    let (cells, mut session, rid) =
        probe.init(&target, &note(spec, policy, conn.key, &probe), &policy);
    assert_eq!(cells.len(), mixnn_wire::CELL_SIZE);
    probe.send(&mut conn, &cells).unwrap();
    let ack = probe.wait(rid, ANSWER);
    let (next, rid) = probe.deliver();
    let tag = HopTag::random(&mut probe.rng);
    let cells = probe.session_msg(
        &mut session,
        &[(Op::Fetch, tag, next, StepNote::at(0).encode())],
        &[],
        &policy,
    );
    assert_eq!(cells.len(), mixnn_wire::CELL_SIZE);
    probe.send(&mut conn, &cells).unwrap();
    if let Some(d) = probe.wait(rid, ANSWER) {
        eprintln!("fetch reply: {} cells", d.cells);
        assert!(
            d.cells <= 1,
            "a one-cell fetch (init acknowledged: {}) got a reply of {} cells ({} MiB)",
            ack.is_some(),
            d.cells,
            (d.cells * mixnn_wire::CELL_SIZE) >> 20
        );
    }
    serves_honestly(&nodes, "after");
}

/// Attack 7: an init recorded before a node restart sets up the same
/// session again after it.
#[test]
fn an_init_is_not_accepted_twice_across_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(7);
    let key = probe.key.clone();
    let target = Target::of(&nodes.hops[1]);
    let mut conn = probe.connect(&target, &key).unwrap();
    let spec = stage(4, vec![linear(4, 3)]);
    let (cells, _, rid) = probe.init(&target, &note(spec, ONE_CELL, conn.key, &probe), &ONE_CELL);
    probe.send(&mut conn, &cells).unwrap();
    assert!(probe.wait(rid, ANSWER).is_some(), "{}", nodes.log(1));
    probe.send(&mut conn, &cells).unwrap();
    assert!(
        probe.wait(rid, NO_ANSWER).is_none(),
        "replay accepted before the restart"
    );

    restart(&mut nodes, 1, &[]);
    let target = Target::of(&nodes.hops[1]);
    let mut conn = probe.connect(&target, &key).unwrap();
    probe.send(&mut conn, &cells).unwrap();
    assert!(
        probe.wait(rid, NO_ANSWER).is_none(),
        "the restarted node set up the recorded init's session again"
    );
    serves_honestly(&nodes, "after");
}

/// Stops node `i` (SIGTERM) and starts it again on the same state dir.
fn restart(nodes: &mut Nodes, i: usize, flags: &[&str]) {
    let pid = nodes.children[i].id();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    nodes.children[i].wait().unwrap();
    let log = std::fs::File::create(nodes.dir.join(format!("node-{i}-restarted.log"))).unwrap();
    let mut child = mixnn()
        .args(["node", "--listen", "127.0.0.1:0", "--state"])
        .arg(nodes.state(i))
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    nodes.children[i] = child;
    let line = ready_line(stdout).expect("restarted node not ready");
    nodes.hops[i] = parse_ready(&line);
}

/// Attack 9: a session makes the node connect to any address it names.
#[test]
fn a_session_sends_only_where_its_init_said() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(9);
    let key = probe.key.clone();
    let target = Target::of(&nodes.hops[1]);
    let mut conn = probe.connect(&target, &key).unwrap();
    let victim = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    victim.set_nonblocking(true).unwrap();
    let victim_addr = victim.local_addr().unwrap();

    // A two-hop session: the node, then a made-up hop at the probe.
    let fake = OnionSecret::generate(&mut probe.rng).public();
    let spec = stage(4, vec![linear(4, 3)]);
    let (cells, mut session, _) = probe.init_two(
        &target,
        &note(spec, ONE_CELL, conn.key, &probe),
        fake,
        probe.addr,
        &ONE_CELL,
    );
    probe.send(&mut conn, &cells).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A loop whose routing block names the victim as the next hop, and a
    // test whose delivery names the victim as the designer.
    let (deliver, _) = probe.deliver();
    let hop = mixnn_wire::Next::Hop(mixnn_wire::HopAddr(victim_addr));
    let note = StepNote::at(0).encode();
    let tag = HopTag::random(&mut probe.rng);
    let cells = probe.session_msg(
        &mut session,
        &[
            (Op::Loop, tag, hop, note.clone()),
            (Op::Loop, tag, deliver, note.clone()),
        ],
        &[],
        &ONE_CELL,
    );
    probe.send(&mut conn, &cells).unwrap();
    let to_victim = mixnn_wire::Next::Deliver {
        addr: mixnn_wire::HopAddr(victim_addr),
        reply_id: mixnn_wire::ReplyId([7; 16]),
    };
    let cells = probe.session_msg(
        &mut session,
        &[(Op::Loop, tag, to_victim, note)],
        &[],
        &ONE_CELL,
    );
    probe.send(&mut conn, &cells).unwrap();
    std::thread::sleep(NO_ANSWER);
    let connected = victim.accept().is_ok();
    assert!(
        !connected,
        "the node connected to an address its session's init did not name"
    );
    serves_honestly(&nodes, "after");
}
