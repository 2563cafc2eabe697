//! The link observer (issue #6): real `mixnn node` processes with cover
//! traffic, a designer with loops, and TCP relays of this test's own in
//! front of hop 1 and hop 2 that record every byte (with its time) crossing
//! the links between hop 1 and hop 2 (forward: hop 1 → hop 2; backward:
//! hop 2 → hop 1) and between the designer and hop 1.
//!
//! The designer runs in this process (the library `mixnn train --cascade`
//! uses) so that the phases — loops only, training, test — have exact
//! time windows; the observer itself labels nothing.
//!
//! Asserted: every frame on every recorded link has the same length and
//! every message the same number of cells, in every phase and direction;
//! no address of a non-adjacent node and no run of the first batch's pixel
//! bytes appears in the recorded bytes; each node learned only its
//! neighbours. Measured and printed: two-sample Kolmogorov–Smirnov
//! statistics of the message inter-arrival times per phase and direction.
//! Timing is not hidden: the test asserts that training is told apart
//! from loop-and-cover-only traffic (see SECURITY.md, "Timing").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mixnn, parse_ready, Hop, DATA};
use mixnn_designer::{CascadeOptions, CascadeRunner, HopInfo};
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::Sgd;
use mixnn_model::trainer::{batches, StepRunner, TrainConfig};

const PAPER: &str = include_str!("../../../models/paper-mlp.toml");
/// A Noise transport frame: a 16 KiB cell and its 16-byte tag.
const FRAME: usize = 16_384 + 16;

/// Bytes one direction of one relayed connection carried, per `read`.
#[derive(Default, Clone)]
struct Stream {
    chunks: Vec<(Instant, Vec<u8>)>,
}

/// One relayed TCP connection: `up` from the connecting side.
#[derive(Default, Clone)]
struct Conn {
    up: Stream,
    down: Stream,
}

/// A recording TCP relay on 127.0.0.1 in front of `target`.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, conn: Arc<Mutex<Conn>>, up: bool) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut c = conn.lock().unwrap();
            let s = if up { &mut c.up } else { &mut c.down };
            s.chunks.push((Instant::now(), buf[..n].to_vec()));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Relay {
    /// A copy of what every connection carried so far.
    fn snapshot(&self) -> Vec<Conn> {
        let conns = self.conns.lock().unwrap();
        conns.iter().map(|c| c.lock().unwrap().clone()).collect()
    }

    fn start(target: Arc<Mutex<Option<SocketAddr>>>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>> = Arc::default();
        let all = Arc::clone(&conns);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Some(to) = *target.lock().unwrap() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                let conn = Arc::new(Mutex::new(Conn::default()));
                all.lock().unwrap().push(Arc::clone(&conn));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let k = Arc::clone(&conn);
                std::thread::spawn(move || pump(client, server, k, true));
                std::thread::spawn(move || pump(s2, c2, conn, false));
            }
        });
        Relay { addr, conns }
    }
}

/// A node process; killed on drop.
struct Node {
    child: Child,
    hop: Hop,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(dir: &Path, i: usize, listen: &str, extra: &[String]) -> Node {
    let log = std::fs::File::create(dir.join(format!("node-{i}.log"))).unwrap();
    let mut child = mixnn()
        .args(["node", "--listen", listen, "--state"])
        .arg(dir.join(format!("node-{i}")))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.is_empty(), "node {i} exited");
    Node {
        hop: parse_ready(&line),
        child,
    }
}

fn cover_args(rate: f64, peers: &[(SocketAddr, &str)]) -> Vec<String> {
    let mut args = vec!["--cover-rate".to_string(), rate.to_string()];
    for (addr, key) in peers {
        args.push("--cover-peer".into());
        args.push(format!("{addr}={key}"));
    }
    args
}

/// Whole frames of a recorded stream: (length, arrival time of its last
/// byte). A frame still on its way when the snapshot was taken is left out.
fn frames(s: &Stream) -> Vec<(usize, Instant)> {
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    for (t, bytes) in &s.chunks {
        buf.extend_from_slice(bytes);
        while buf.len() >= pos + 2 {
            let len = usize::from(u16::from_be_bytes([buf[pos], buf[pos + 1]]));
            if buf.len() < pos + 2 + len {
                break;
            }
            out.push((len, *t));
            pos += 2 + len;
        }
    }
    out
}

fn all_bytes(s: &Stream) -> Vec<u8> {
    s.chunks
        .iter()
        .flat_map(|(_, b)| b.iter().copied())
        .collect()
}

/// Messages of a link's transport frames (after the Noise handshake's two
/// frames from the initiator): the time of each message's first frame.
/// Only a message still on its way after `end` may be incomplete.
fn messages(s: &Stream, cells: usize, end: Instant) -> Vec<Instant> {
    let f = frames(s);
    let transport = &f[2.min(f.len())..];
    for (len, _) in transport {
        assert_eq!(*len, FRAME, "a frame of another length");
    }
    let whole = transport.len() / cells * cells;
    if let Some((_, t)) = transport.get(whole) {
        assert!(
            *t > end,
            "frames that are not whole messages of {cells} cells"
        );
    }
    transport[..whole].chunks(cells).map(|m| m[0].1).collect()
}

/// Gaps (s) between consecutive messages inside `[from, to)`.
fn gaps(times: &[Instant], from: Instant, to: Instant) -> Vec<f64> {
    let inside: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= from && *t < to)
        .collect();
    inside
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect()
}

/// Two-sample Kolmogorov–Smirnov statistic D and its asymptotic p-value.
fn ks(a: &[f64], b: &[f64]) -> (f64, f64) {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    let en = (n * m / (n + m)).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    let p: f64 = (1..=100)
        .map(|k| {
            let k = f64::from(k);
            2.0 * (-1f64).powf(k - 1.0) * (-2.0 * k * k * lambda * lambda).exp()
        })
        .sum();
    (d, p.clamp(0.0, 1.0))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[test]
fn a_link_observer_sees_equal_frames_and_no_addresses_or_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (loop_rate, cover_rate) = (10.0, 10.0);

    // Hop 1 once to make its keys; relays R1 (→ hop 1) and R2 (→ hop 2).
    let first = start_node(dir, 0, "127.0.0.1:0", &[]);
    let (addr1, key1) = (first.hop.addr, first.hop.link.clone());
    drop(first);
    let target1 = Arc::new(Mutex::new(None));
    let target2 = Arc::new(Mutex::new(None));
    let r1 = Relay::start(Arc::clone(&target1));
    let r2 = Relay::start(Arc::clone(&target2));
    // Hops 3..5 first (cover among themselves), then hop 2 (cover to hop
    // 1 through R1), then hop 1 again (cover to hop 2 through R2).
    let mut rest: Vec<Node> = Vec::new();
    for i in 2..5 {
        let peers: Vec<(SocketAddr, &str)> = rest
            .iter()
            .map(|n| (n.hop.addr, n.hop.link.as_str()))
            .collect();
        rest.push(start_node(
            dir,
            i,
            "127.0.0.1:0",
            &cover_args(cover_rate, &peers),
        ));
    }
    let second = start_node(
        dir,
        1,
        "127.0.0.1:0",
        &cover_args(cover_rate, &[(r1.addr, &key1)]),
    );
    *target2.lock().unwrap() = Some(second.hop.addr);
    let first = start_node(
        dir,
        0,
        &addr1.to_string(),
        &cover_args(cover_rate, &[(r2.addr, &second.hop.link)]),
    );
    *target1.lock().unwrap() = Some(first.hop.addr);

    // The cascade as the designer sees it: hop 1 at R1, hop 2 at R2.
    let mut hops = vec![
        HopInfo {
            addr: r1.addr,
            onion: first.hop.onion.clone(),
            link: first.hop.link.clone(),
        },
        HopInfo {
            addr: r2.addr,
            onion: second.hop.onion.clone(),
            link: second.hop.link.clone(),
        },
    ];
    hops.extend(rest.iter().map(|n| HopInfo {
        addr: n.hop.addr,
        onion: n.hop.onion.clone(),
        link: n.hop.link.clone(),
    }));
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let split = mixnn_model::data::load_dir(Path::new(DATA)).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: 64,
        sgd: Sgd::default(),
        seed: 3,
        micro_batches: 1,
    };
    let order: Vec<u32> = (0..3840).collect();
    let train = batches(&split.train, &order, cfg.batch);
    let test_order: Vec<u32> = (0..640).collect();
    let test = batches(&split.test, &test_order, cfg.batch);
    let opts = CascadeOptions {
        loop_rate,
        timeout: Duration::from_secs(20),
        ..CascadeOptions::default()
    };
    let mut runner = CascadeRunner::connect(&model, hops, &cfg, opts).unwrap();
    let cells = runner.policy().cells_for(0).unwrap();
    let designer = runner.listen_addr();

    // Phases, each in its own time window.
    let t0 = Instant::now();
    runner.run_loops(Duration::from_secs(6)).unwrap();
    let t1 = Instant::now();
    runner.train_batches(&train, &mut |_| {}).unwrap();
    let t2 = Instant::now();
    runner.predict_batches(&test, &mut || {}).unwrap();
    let t3 = Instant::now();
    let stats = runner.loop_stats();
    drop(runner);
    // Let cover messages in flight land.
    std::thread::sleep(Duration::from_millis(300));

    // What the relays saw. R1: the designer's link (first connection) and
    // hop 2's backward link; R2: hop 1's forward link (first, at init) and
    // hop 3's backward link to hop 2.
    let r1c = r1.snapshot();
    let r2c = r2.snapshot();
    assert_eq!(r1c.len(), 2, "links through R1");
    assert_eq!(r2c.len(), 2, "links through R2");
    let (designer_link, backward, forward) = (&r1c[0], &r1c[1], &r2c[0]);

    // (a) One frame length, whole messages of one cell count.
    let fwd = messages(&forward.up, cells, t3);
    let bwd = messages(&backward.up, cells, t3);
    let dsg = messages(&designer_link.up, cells, t3);
    for s in [&forward.down, &backward.down, &designer_link.down] {
        // Only the responder's handshake message goes back.
        assert_eq!(frames(s).len(), 1);
    }

    // (b) Inter-arrival times per phase and direction.
    let windows = [("loops", t0, t1), ("train", t1, t2), ("test", t2, t3)];
    let mut table = String::new();
    let mut samples = Vec::new();
    for (dir_name, times) in [("h1→h2", &fwd), ("h2→h1", &bwd), ("d→h1", &dsg)] {
        for (phase, from, to) in windows {
            let g = gaps(times, from, to);
            table.push_str(&format!(
                "{dir_name} {phase}: {} messages/s, median gap {:.4} s (n={})\n",
                (g.len() + 1) as f64 / (to - from).as_secs_f64(),
                median(&g),
                g.len()
            ));
            samples.push((format!("{dir_name} {phase}"), g));
        }
    }
    let mut ks_lines = String::new();
    let get = |name: &str| samples.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let pairs = [
        ("h1→h2 train", "h2→h1 train"),
        ("h1→h2 train", "h1→h2 test"),
        ("h1→h2 train", "h1→h2 loops"),
        ("h2→h1 train", "h2→h1 loops"),
        ("h1→h2 loops", "h2→h1 loops"),
    ];
    let mut results = Vec::new();
    for (a, b) in pairs {
        let (d, p) = ks(&get(a), &get(b));
        ks_lines.push_str(&format!("KS {a} vs {b}: D = {d:.3}, p = {p:.3e}\n"));
        results.push(((a, b), d, p));
    }
    eprintln!(
        "cells per message {cells}; loops {stats:?}\n{table}{ks_lines}phases: loops {:.2} s, train {:.2} s, test {:.2} s",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64()
    );
    assert!(stats.sent > 0 && stats.lost == 0, "{stats:?}");
    // Loops and cover reached the observed link while nothing else ran.
    assert!(get("h1→h2 loops").len() >= 10, "{table}");
    assert!(get("h2→h1 loops").len() >= 10, "{table}");
    // Timing still tells training from loops and cover alone at these
    // rates (1% level, on either direction of the link): the observer
    // learns when a cascade trains.
    let p = results[2].2.min(results[3].2);
    assert!(p < 0.01, "training no longer stands out: {ks_lines}");

    // (c) No address of a non-adjacent node, no run of pixel bytes.
    let streams: Vec<Vec<u8>> = [&forward.up, &backward.up, &designer_link.up]
        .into_iter()
        .map(all_bytes)
        .collect();
    let mut far: Vec<SocketAddr> = rest.iter().map(|n| n.hop.addr).collect();
    far.push(designer);
    for a in &far {
        let SocketAddr::V4(v4) = a else {
            unreachable!()
        };
        let text = a.to_string();
        let mut raw = v4.ip().octets().to_vec();
        raw.extend_from_slice(&v4.port().to_be_bytes());
        let mut raw_le = v4.ip().octets().to_vec();
        raw_le.extend_from_slice(&v4.port().to_le_bytes());
        for (k, s) in streams.iter().enumerate() {
            // The designer's own link may carry its address only encrypted,
            // like everything else: check it too.
            assert!(!contains(s, text.as_bytes()), "{text} in stream {k}");
            assert!(!contains(s, &raw), "{a} (raw) in stream {k}");
            assert!(!contains(s, &raw_le), "{a} (raw LE) in stream {k}");
        }
    }
    let pixels = &train[0].pixels;
    let runs: HashSet<&[u8]> = pixels
        .windows(32)
        .filter(|w| w.iter().collect::<HashSet<_>>().len() >= 8)
        .collect();
    assert!(runs.len() > 1000, "too few varied pixel runs to search");
    for (k, s) in streams.iter().enumerate() {
        assert!(
            !s.windows(32).any(|w| runs.contains(w)),
            "a 32-byte run of the first batch's pixels in stream {k}"
        );
    }

    // (d) Each node learned only its neighbours (as the cascade names
    // them) and, at the ends, the designer.
    let named: Vec<SocketAddr> = [r1.addr, r2.addr]
        .into_iter()
        .chain(rest.iter().map(|n| n.hop.addr))
        .collect();
    for i in 0..5 {
        let learned =
            std::fs::read_to_string(dir.join(format!("node-{i}/learned-peers.txt"))).unwrap();
        let mut allowed: Vec<SocketAddr> = Vec::new();
        if i > 0 {
            allowed.push(named[i - 1]);
        }
        if i < 4 {
            allowed.push(named[i + 1]);
        }
        if i == 0 || i == 4 {
            allowed.push(designer);
        }
        for line in learned.lines() {
            let a: SocketAddr = line.parse().unwrap();
            assert!(
                allowed.contains(&a),
                "node {i} learned {a}; allowed {allowed:?}"
            );
        }
    }
    drop((first, second, rest));
}
