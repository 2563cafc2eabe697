#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile load, node side (issue #27): each test attacks a real `mixnn
//! node` process from outside with the probe (`tests/probe`, a protocol
//! client written for the tests: its own links, onions and notes), then
//! asserts what the node spent (its peak resident memory against its
//! configured budget, the bytes it sent) and that it still serves an
//! honest cascade byte-identically to `--local` — during the attack where
//! the attack is one of keeping connections.

use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mixnn_proto::{BackwardNote, ChunkNote, ForwardNote, Micro, SessionNote};
use mixnn_wire::{HopTag, Next, Op, PaddingPolicy, CELL_SIZE};

mod common;
mod probe;
use common::*;
use probe::notes::*;
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

/// Three nodes, each started with `flags` (and `-v`).
fn nodes(dir: &Path, flags: &[&str]) -> Nodes {
    let flags: Vec<&str> = [&["-v"], flags].concat();
    Nodes::start_with(dir, 3, &flags)
}

/// Trains through `nodes` and asserts the run equals the local one.
fn serves_honestly(nodes: &Nodes, name: &str) {
    serves_honestly_within(nodes, name, 10);
}

/// [`serves_honestly`] with `--timeout SECS`: a node still working
/// through an attacker's backlog (each answer computed, then refused or
/// dropped) may take longer than the default to take the honest init on
/// a loaded machine; what is asserted is that it does, and that the run
/// is the local one.
fn serves_honestly_within(nodes: &Nodes, name: &str, secs: u32) {
    let file = nodes.cascade_file(&format!("{name}.toml"));
    let timeout = secs.to_string();
    let run = train(
        &nodes.dir,
        name,
        &["--cascade", file.to_str().unwrap(), "--timeout", &timeout],
        RUN,
    );
    assert_same_run(local(), &run);
}

const MIB: u64 = 1 << 20;

/// A one-hop session of the probe at `target` whose answers go to
/// `designer` (address and link key), set up over `conn` with `note`'s
/// stage, padding and audit key; waits until the node logged it set up
/// (the acknowledgement may go to a sink).
fn session_to(
    probe: &mut Probe,
    nodes: &Nodes,
    (target, conn): (&Target, &mut probe::Conn),
    note: mixnn_proto::InitNote,
    designer: (std::net::SocketAddr, [u8; 32]),
) -> mixnn_wire::DesignerSession {
    let before = log_lines(nodes, 1, "session set up");
    let policy = note.padding;
    let n = mixnn_proto::InitNote {
        designer_addr: Some(designer.0),
        designer_link: designer.1,
        next_link: designer.1,
        prev_link: conn.key,
        ..note
    };
    let (cells, session, _) = probe.init_to(target, &n.encode(), &policy.for_init(), designer.0);
    probe.send(conn, &cells).unwrap();
    wait_log(
        nodes,
        1,
        "session set up",
        before + 1,
        Duration::from_secs(30),
    );
    session
}

/// One message of `session` for its hop: `op` with `note` and tag `tag`,
/// delivered to the session's designer.
fn one_hop(
    probe: &mut Probe,
    session: &mut mixnn_wire::DesignerSession,
    designer: std::net::SocketAddr,
    (op, tag, note): (Op, HopTag, &SessionNote),
    body: &[u8],
    policy: &PaddingPolicy,
) -> Vec<u8> {
    let rid = mixnn_wire::ReplyId::random(&mut probe.rng);
    let next = Next::Deliver {
        addr: mixnn_wire::HopAddr(designer),
        reply_id: rid,
    };
    probe.session_msg(session, &[(op, tag, next, note.encode())], body, policy)
}

/// Reply amplification into queues that never drain: with `classes`
/// padding a one-cell fetch is answered with a 4 MiB chunk, sent to a
/// "designer" that completes its handshake and never reads. Six sessions
/// of 30 fetches each (36 MiB sent by the probe in all) made the node of
/// the code before queue every answer: 960 MiB for one link that never
/// drained. Now a session may make the node send at most 4 × the cells it
/// sent plus 16 × its init, writes that do not drain close their link,
/// and everything queued draws from the node's memory budget, past which
/// the session with the oldest queued data is shed: the node's peak
/// resident memory stays under its `--max-memory-mib`.
#[test]
fn answers_to_a_client_that_never_reads_stay_within_the_memory_budget() {
    const BUDGET_MIB: u64 = 192;
    let t = tempfile::tempdir().unwrap();
    let budget = BUDGET_MIB.to_string();
    let nodes = nodes(
        t.path(),
        &["--max-memory-mib", &budget, "--write-timeout", "4"],
    );
    let pid = nodes.children[1].id();
    let mut probe = Probe::new(21);
    let target = Target::of(&nodes.hops[1]);
    let sink = probe.sink();
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    let policy = PaddingPolicy::Classes { max_body: 4 << 20 };
    // 1 Mi parameters: an 8 MiB state, fetched in 4 MiB chunks.
    let spec = stage(1024, vec![linear(1024, 1024)]);
    let mut sent = 0u64;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        let note = init_note(spec.clone(), policy, [0; 32], &probe);
        sessions.push(session_to(
            &mut probe,
            &nodes,
            (&target, &mut conn),
            note,
            sink,
        ));
        sent += (policy.for_init().cells_for(0).unwrap() * CELL_SIZE) as u64;
    }
    for k in 0..30u32 {
        for session in &mut sessions {
            let note = SessionNote::Fetch(ChunkNote {
                step: 0,
                chunk: k % 2,
            });
            let tag = HopTag::random(&mut probe.rng);
            let cells = one_hop(
                &mut probe,
                session,
                sink.0,
                (Op::Fetch, tag, &note),
                &[],
                &policy,
            );
            sent += cells.len() as u64;
            probe.send(&mut conn, &cells).unwrap();
        }
    }
    // The answers pile up (or are refused) while the node works through
    // the fetches; then the links time out.
    std::thread::sleep(Duration::from_secs(8));
    let peak = peak_rss_bytes(pid);
    eprintln!(
        "probe sent {} MiB; node peak RSS {} MiB, budget {BUDGET_MIB} MiB; {} sessions shed",
        sent / MIB,
        peak / MIB,
        log_lines(&nodes, 1, "session shed")
    );
    for what in [
        "refused",
        "dropped",
        "shed",
        "did not drain",
        "limit reached",
    ] {
        eprintln!("{what}: {}", log_lines(&nodes, 1, what));
    }
    assert!(
        peak <= BUDGET_MIB * MIB,
        "peak RSS {} MiB above the budget of {BUDGET_MIB} MiB",
        peak / MIB
    );
    let t0 = std::time::Instant::now();
    serves_honestly_within(&nodes, "after", 60);
    eprintln!("honest run {:.1} s", t0.elapsed().as_secs_f64());
    if std::env::var_os("LOAD_DEBUG").is_some() {
        eprintln!("{}", nodes.log(1));
    }
    let peak = peak_rss_bytes(pid);
    assert!(peak <= BUDGET_MIB * MIB, "{} MiB", peak / MIB);
}

/// A one-cell request cannot buy a large answer without limit: with
/// `classes` padding and 1 MiB bodies (a 65-cell init), 300 one-cell
/// fetches, read by the probe, were each answered with 64 cells on the
/// code before (19 201 cells for 365 sent). Now the node sends a session
/// at most 4 × the cells it sent plus 16 × its init's.
#[test]
fn a_one_cell_request_cannot_buy_large_answers_without_limit() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let mut probe = Probe::new(22);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    let policy = PaddingPolicy::Classes { max_body: 1 << 20 };
    let spec = stage(1024, vec![linear(1024, 1024)]);
    let me = (probe.addr, *probe.key.public().as_bytes());
    let note = init_note(spec, policy, [0; 32], &probe);
    let mut session = session_to(&mut probe, &nodes, (&target, &mut conn), note, me);
    let init_cells = policy.for_init().cells_for(0).unwrap() as u64;
    let mut sent_cells = init_cells;
    for k in 0..300u32 {
        let note = SessionNote::Fetch(ChunkNote {
            step: 0,
            chunk: k % 8,
        });
        let tag = HopTag::random(&mut probe.rng);
        let cells = one_hop(
            &mut probe,
            &mut session,
            me.0,
            (Op::Fetch, tag, &note),
            &[],
            &policy,
        );
        sent_cells += (cells.len() / CELL_SIZE) as u64;
        probe.send(&mut conn, &cells).unwrap();
    }
    let got = probe.drain(Duration::from_secs(60), Duration::from_secs(3));
    let received_cells =
        probe.received.load(std::sync::atomic::Ordering::Relaxed) / CELL_SIZE as u64;
    eprintln!(
        "sent {sent_cells} cells (init {init_cells}), received {received_cells} cells in {} answers",
        got.len()
    );
    assert!(
        received_cells <= 4 * sent_cells + 16 * init_cells,
        "{received_cells} cells answered for {sent_cells} sent"
    );
    assert!(
        log_lines(&nodes, 1, "at most 4 × what it sent") > 0,
        "{}",
        nodes.log(1)
    );
    serves_honestly(&nodes, "after");
}

/// An audited session pinned up to 64 states while the node's budget
/// counted 17: every forward kept the state it ran on until its backward,
/// and one forward per step that never got its backward kept one state
/// per step. 64 steps of two forwards and one backward each, through
/// `linear(1024, 1024)` (8 MiB a state): the node of the code before grew
/// by about 600 MiB. Now the forwards of past steps are forgotten when the
/// stage moves on (their backward would be refused anyway): the session
/// holds the 2 + 16 states its weight counts.
#[test]
fn an_audited_session_pins_no_more_states_than_its_weight_counts() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let pid = nodes.children[1].id();
    let mut probe = Probe::new(23);
    let target = Target::of(&nodes.hops[1]);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    let spec = stage(1024, vec![linear(1024, 1024)]);
    let me = (probe.addr, *probe.key.public().as_bytes());
    let note = mixnn_proto::InitNote {
        audit_key: Some([7; 32]),
        ..init_note(spec, ONE_CELL, [0; 32], &probe)
    };
    let mut session = session_to(&mut probe, &nodes, (&target, &mut conn), note, me);
    let before = rss_bytes(pid);
    // Trailers as the designer fills them (the probe holds the audit key):
    // the node refuses one whose tail is not its own before any math.
    use mixnn_proto::trailer::Pass;
    let body = |rows_: Vec<u8>, step: u64, pass: Pass| audited_body(&[7; 32], rows_, step, pass);
    let steps = 64u64;
    for step in 0..steps {
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
            let cells = one_hop(
                &mut probe,
                &mut session,
                me.0,
                (Op::Forward, tag, &forward),
                &body(rows(1, 1024), step, Pass::Forward),
                &ONE_CELL,
            );
            probe.send(&mut conn, &cells).unwrap();
        }
        let backward = SessionNote::Backward(BackwardNote {
            step,
            micro: Micro::WHOLE,
            need_input_grad: true,
        });
        let cells = one_hop(
            &mut probe,
            &mut session,
            me.0,
            (Op::Backward, kept, &backward),
            &body(rows(1, 1024), step, Pass::Backward),
            &ONE_CELL,
        );
        probe.send(&mut conn, &cells).unwrap();
    }
    let answers = probe.drain(Duration::from_secs(120), Duration::from_secs(3));
    let peak = peak_rss_bytes(pid);
    let state = 1025 * 1024 * 8;
    eprintln!(
        "RSS before {} MiB, peak {} MiB: grown by {} MiB ({:.1} states of {} MiB)",
        before / MIB,
        peak / MIB,
        peak.saturating_sub(before) / MIB,
        peak.saturating_sub(before) as f64 / state as f64,
        state / MIB
    );
    assert!(
        peak.saturating_sub(before) <= (2 + 16) * state + 48 * MIB,
        "grown by {} MiB",
        peak.saturating_sub(before) / MIB
    );
    // Every forward and backward answered (and the init's acknowledgement).
    assert_eq!(answers.len() as u64, 3 * steps + 1, "{}", nodes.log(1));
    serves_honestly(&nodes, "after");
}

/// Keeps `n` connections open to `addr` until `stop`: each made by
/// `open`, and made again when the node closes it (checked every 50 ms).
fn hold<C: Send + 'static>(
    n: usize,
    stop: Arc<AtomicBool>,
    open: impl Fn() -> Option<C> + Send + 'static,
    alive: impl Fn(&mut C) -> bool + Send + 'static,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut held: Vec<C> = Vec::new();
        let mut opened = 0usize;
        while !stop.load(Ordering::Relaxed) {
            held.retain_mut(|c| alive(c));
            while held.len() < n && !stop.load(Ordering::Relaxed) {
                match open() {
                    Some(c) => {
                        held.push(c);
                        opened += 1;
                    }
                    None => break,
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        opened
    })
}

/// Whether the node still holds a raw TCP connection open.
fn tcp_open(s: &mut TcpStream) -> bool {
    use std::io::Read;
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Connection-level lockout, before authentication: a client that keeps
/// 300 TCP connections open to a node (opening a new one whenever one is
/// closed) and never starts a handshake. On the code before, each held a
/// link slot for the 10 s handshake timeout, so the 256 slots stayed full
/// and the honest run failed ("no link to … within 10 s"). Now
/// connections whose handshake has not finished have a pool of their own,
/// where a new connection takes the place of the oldest: the honest run
/// trains through the node during the attack.
#[test]
fn connections_that_never_authenticate_do_not_lock_honest_peers_out() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let addr = nodes.hops[1].addr;
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = hold(
        300,
        Arc::clone(&stop),
        move || TcpStream::connect(addr).ok(),
        tcp_open,
    );
    std::thread::sleep(Duration::from_secs(2));
    serves_honestly(&nodes, "during");
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().unwrap();
    eprintln!("the attacker opened {opened} connections");
    assert!(opened >= 300);
}

/// Connection-level lockout after authentication: a client that keeps 300
/// Noise links open (a fresh link key each), each sending the first cell
/// of a 100-cell message and nothing more. On the code before, each held
/// a link slot until it had been silent for `--link-idle` (300 s) and the
/// honest run could not get a link. Now a message's cells must all come
/// within 30 s of its first, and a new link takes the slot of the oldest
/// link that has delivered nothing and whose key no session names: the
/// honest run trains through the node during the attack.
#[test]
fn links_that_never_finish_a_request_do_not_lock_honest_peers_out() {
    let t = tempfile::tempdir().unwrap();
    let nodes = nodes(t.path(), &[]);
    let target = Target::of(&nodes.hops[1]);
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = hold(
        300,
        Arc::clone(&stop),
        move || {
            let mut probe = Probe::new(rand_seed());
            let key = probe.fresh_key();
            let mut conn = probe.connect(&target, &key).ok()?;
            // The first cell of a 100-cell message: kind session, 100
            // cells, a body of 99 cells' worth.
            let mut cell = vec![0u8; CELL_SIZE];
            cell[0] = 1;
            cell[1..3].copy_from_slice(&100u16.to_le_bytes());
            cell[3..7].copy_from_slice(&((99 * CELL_SIZE) as u32).to_le_bytes());
            probe.send(&mut conn, &cell).ok()?;
            Some((probe, conn))
        },
        |(probe, conn): &mut (Probe, probe::Conn)| {
            let mut cell = vec![0u8; CELL_SIZE];
            let r = probe.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(1), conn.reader.recv_cell(&mut cell))
                    .await
            });
            // Still open while nothing (not even a close) arrives.
            r.is_err()
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    serves_honestly(&nodes, "during");
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().unwrap();
    eprintln!("the attacker opened {opened} links");
    assert!(opened >= 300);
}

/// A seed for a probe's keys: different in every call.
fn rand_seed() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Cover size steered on a victim link: node 1 sends cover to node 2 and
/// an honest cascade runs over the link 1 → 2 (3-cell messages). A
/// client sets up sessions on node 1 that name node 2 (its public address
/// and link key) as their next hop and sends 800 one-cell loops through
/// them, which node 1 passes on to node 2 (which drops them). On the code
/// before they outnumbered the cascade's messages on that link, and node
/// 1's cover to node 2 was of 1 cell: an observer of the link could drop
/// cover by its size. Now a message counts for a link's cover size only
/// once the link's peer has itself sent a message of that session (node
/// 2 never answers the client's sessions), and the counts decay: once the
/// cascade has used the link, every cover message on it has the
/// cascade's size. (Before that the link has no size of its own and
/// takes the node's most common size over all links, which the client's
/// messages do count in: a link with no real traffic has none to hide.)
#[test]
fn a_client_naming_a_links_peer_does_not_steer_its_cover_size() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = Nodes {
        children: Vec::new(),
        hops: Vec::new(),
        dir: t.path().to_path_buf(),
    };
    nodes.start_one(&["-v"]);
    // Node 1's cover goes to node 2, which is started first so that its
    // address is known.
    nodes.start_one(&["-v"]);
    nodes.start_one(&["-vv"]);
    let victim = nodes.hops[2].clone();
    let restart_flag = format!("{}={}", victim.addr, victim.link);
    // Node 1 again, with cover to node 2.
    nodes.children[1].kill().unwrap();
    nodes.children[1].wait().unwrap();
    let log = std::fs::File::create(nodes.log_path(1)).unwrap();
    let mut child = mixnn()
        .args(["node", "-v", "--listen", "127.0.0.1:0", "--state"])
        .arg(nodes.state(1))
        .args(["--cover-rate", "20", "--cover-peer", &restart_flag])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    nodes.children[1] = child;
    nodes.hops[1] = parse_ready(&ready_line(stdout).unwrap());

    // The attack: sessions on node 1 whose next hop is node 2.
    let mut probe = Probe::new(25);
    let target = Target::of(&nodes.hops[1]);
    let to_victim = Target::of(&victim);
    let key = probe.key.clone();
    let mut conn = probe.connect(&target, &key).unwrap();
    for _ in 0..8 {
        let n = mixnn_proto::InitNote {
            next_addr: Some(victim.addr),
            next_link: to_victim.link,
            ..init_note(stage(4, vec![linear(4, 3)]), ONE_CELL, conn.key, &probe)
        };
        let fake = mixnn_wire::OnionSecret::generate(&mut probe.rng).public();
        let (cells, mut session, _) =
            probe.init_two(&target, &n.encode(), fake, victim.addr, &ONE_CELL);
        probe.send(&mut conn, &cells).unwrap();
        for _ in 0..100 {
            let tag = HopTag::random(&mut probe.rng);
            let (deliver, _) = probe.deliver();
            let note = note_for(Op::Loop).encode();
            let cells = probe.session_msg(
                &mut session,
                &[
                    (
                        Op::Loop,
                        tag,
                        Next::Hop(mixnn_wire::HopAddr(victim.addr)),
                        note.clone(),
                    ),
                    (Op::Loop, tag, deliver, note),
                ],
                &[],
                &ONE_CELL,
            );
            probe.send(&mut conn, &cells).unwrap();
        }
    }
    wait_log(&nodes, 1, "session set up", 8, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let covers = || -> Vec<usize> {
        nodes
            .log(2)
            .lines()
            .filter(|l| l.contains("cover message dropped"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("cells="))
                    .and_then(|c| c.parse().ok())
            })
            .collect()
    };
    // The cascade over the link, then cover for a while: what counts is
    // the cover sent once the cascade has used the link.
    serves_honestly(&nodes, "during");
    let before = covers().len();
    std::thread::sleep(Duration::from_secs(3));
    let covers = covers().split_off(before);
    eprintln!("cover cells node 1 sent node 2: {covers:?}");
    assert!(covers.len() >= 20, "{}", nodes.log(2));
    assert!(
        covers.iter().all(|c| *c > 1),
        "cover of the client's size on the victim link: {covers:?}"
    );
}
