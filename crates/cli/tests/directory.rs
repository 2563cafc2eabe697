#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The directory authority, process by process: `mixnn directory` and
//! `mixnn node --directory URL` as a user would run them. Nodes register and
//! heartbeat; the view is signed by the key the directory printed; a restart
//! on the same database keeps registrations and history; a directory that
//! is down never stops a node.

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use mixnn_directory::{parse_key_hex, unix_now, VerifiedView};
use mixnn_directory_client::DirectoryClient;

fn mixnn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mixnn"));
    c.env_remove("RUST_LOG").env_remove("MIXNN_DATA");
    c
}

/// A `mixnn` process whose stderr goes to a log file; stopped on drop
/// (also while a test panics).
struct Proc {
    child: Child,
    log: PathBuf,
    ready: String,
}

impl Proc {
    /// Starts `mixnn ARGS`, logging to `log`, and waits up to 30 s for its
    /// first stdout line.
    fn start(args: &[&str], log: PathBuf) -> Proc {
        let mut child = mixnn()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Owned before waiting, so the guard stops it if it never becomes
        // ready.
        let mut proc = Proc {
            child,
            log,
            ready: String::new(),
        };
        let line = common::ready_line(stdout)
            .unwrap_or_else(|| panic!("{args:?} not ready in 30 s: {}", proc.log()));
        assert!(!line.is_empty(), "{args:?} exited: {}", proc.log());
        proc.ready = line.trim().to_owned();
        proc
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then SIGKILL if still running after 5 s; returns how it
    /// ended.
    fn stop(&mut self) -> ExitStatus {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    return self.child.wait().unwrap();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for {}: {e}", self.child.id()),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of `name=` in a ready line.
fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        .to_owned()
}

/// A running directory: its process, URL and public key.
struct Directory {
    proc: Proc,
    url: String,
    key: [u8; 32],
}

fn start_directory(dir: &Path, listen: &str, log: &str) -> Directory {
    let db = dir.join("directory.db");
    let proc = Proc::start(
        &[
            "directory",
            "--listen",
            listen,
            "--db",
            db.to_str().unwrap(),
            "--heartbeat-interval",
            "1",
            // Every test node is on 127.0.0.1 (local testing only).
            "--allow-same-subnet",
            "--allow-local-addresses",
        ],
        dir.join(log),
    );
    let rest = proc
        .ready
        .strip_prefix("mixnn directory ready: ")
        .unwrap_or_else(|| panic!("not a directory ready line: {:?}", proc.ready));
    let url = field(rest, "url");
    let key = parse_key_hex("key", &field(rest, "key")).unwrap();
    Directory { proc, url, key }
}

/// One node as its ready line describes it.
struct Node {
    proc: Proc,
    addr: SocketAddr,
    onion: String,
    link: String,
}

fn start_node(dir: &Path, i: usize, extra: &[&str]) -> Node {
    let state = dir.join(format!("node-{i}"));
    let mut args = vec!["node", "--state", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    let proc = Proc::start(&args, dir.join(format!("node-{i}.log")));
    let rest = proc
        .ready
        .strip_prefix("mixnn node ready: ")
        .unwrap_or_else(|| panic!("not a node ready line: {:?}", proc.ready));
    Node {
        addr: field(rest, "addr").parse().unwrap(),
        onion: field(rest, "onion"),
        link: field(rest, "link"),
        proc,
    }
}

/// A port free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 100 ms until it gives `Some`, for at most `secs`.
fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The verified view once it lists `n` nodes.
fn view_with(client: &DirectoryClient, key: [u8; 32], n: usize) -> VerifiedView {
    wait_for(30, &format!("view with {n} nodes"), || {
        let view = client.view().ok()?.verify(&[key], unix_now()).unwrap();
        (view.nodes.len() == n).then_some(view)
    })
}

/// Asserts a failure with exit code 1 and exactly one stderr line
/// `error: …`; returns that line.
fn one_line_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_owned()
}

#[test]
fn nodes_register_heartbeat_and_survive_a_directory_restart() {
    let t = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut directory = start_directory(t.path(), &listen, "directory-1.log");
    assert_eq!(directory.url, format!("http://{listen}"));
    let url = directory.url.clone();
    let client = DirectoryClient::new(&url).unwrap();

    let common = ["--directory", url.as_str(), "--heartbeat", "1"];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let location = format!("rack-{i}");
        let mut extra = vec!["--location", location.as_str(), "--price", "0.25"];
        // The last node listens on every interface and advertises loopback.
        extra.extend_from_slice(if i == 2 {
            &["--listen", "0.0.0.0:0", "--advertise", "127.0.0.1"]
        } else {
            &["--listen", "127.0.0.1:0"]
        });
        extra.extend_from_slice(&common);
        nodes.push(start_node(t.path(), i, &extra));
    }

    // (a) All three listed, the view signed by the printed key, each
    // descriptor as the node printed it.
    let view = view_with(&client, directory.key, 3);
    assert_eq!(view.directory, directory.key);
    let mut identities = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let published = SocketAddr::from(([127, 0, 0, 1], node.addr.port()));
        let entry = view
            .nodes
            .iter()
            .find(|n| n.descriptor.addr == published)
            .unwrap_or_else(|| panic!("node {i} at {published} not in the view"));
        let d = &entry.descriptor;
        assert_eq!(parse_key_hex("onion", &node.onion).unwrap(), d.onion);
        assert_eq!(parse_key_hex("link", &node.link).unwrap(), d.link);
        assert_eq!(d.capabilities.location, format!("rack-{i}"));
        assert_eq!(d.capabilities.price_per_hour, 0.25);
        assert!(d.capabilities.cores >= 1);
        identities.push(d.identity);
    }
    assert_eq!(nodes[2].addr.ip().to_string(), "0.0.0.0");

    // Heartbeats arrive.
    let before: Vec<_> = identities
        .iter()
        .map(|id| {
            wait_for(30, "first heartbeat", || {
                let record = client.node(id).ok()?;
                (record.history.heartbeats >= 1).then_some(record.history)
            })
        })
        .collect();

    // (b) Stop the directory cleanly; the nodes keep running and warn.
    let status = directory.proc.stop();
    assert!(
        status.success(),
        "directory exit {status:?}: {}",
        directory.proc.log()
    );
    wait_for(30, "a node warning about the directory", || {
        nodes[0]
            .proc
            .log()
            .contains("heartbeat to directory failed")
            .then_some(())
    });
    for (i, node) in nodes.iter_mut().enumerate() {
        assert!(node.proc.running(), "node {i} died: {}", node.proc.log());
    }

    // Back on the same port, database and key: the registrations and their
    // history are still there, and heartbeats keep arriving.
    let mut directory = start_directory(t.path(), &listen, "directory-2.log");
    assert_eq!(directory.url, url);
    let restarted_key = directory.key;
    assert_eq!(restarted_key, view.directory, "key changed across restart");
    for (id, old) in identities.iter().zip(&before) {
        let record = client.node(id).unwrap();
        assert_eq!(record.history.first_seen, old.first_seen);
        assert!(record.history.heartbeats >= old.heartbeats);
        let seen = record.history.heartbeats;
        wait_for(30, "heartbeats after the restart", || {
            (client.node(id).ok()?.history.heartbeats > seen).then_some(())
        });
    }
    let view = view_with(&client, restarted_key, 3);
    let mut listed: Vec<[u8; 32]> = view.nodes.iter().map(|n| n.descriptor.identity).collect();
    listed.sort_unstable();
    identities.sort_unstable();
    assert_eq!(listed, identities);
    let health = client.health().unwrap();
    assert_eq!(health.nodes, 3);

    for (i, node) in nodes.iter_mut().enumerate() {
        assert!(node.proc.running(), "node {i} died: {}", node.proc.log());
        let status = node.proc.stop();
        assert!(
            status.success(),
            "node {i} exit {status:?}: {}",
            node.proc.log()
        );
    }
    assert!(directory.proc.stop().success());
}

#[test]
fn node_serves_while_the_directory_is_unreachable() {
    let t = tempfile::tempdir().unwrap();
    // (d) Nothing listens on port 1.
    let mut node = start_node(
        t.path(),
        0,
        &[
            "--listen",
            "127.0.0.1:0",
            "--directory",
            "http://127.0.0.1:1",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.proc.running(), "node died: {}", node.proc.log());
    std::net::TcpStream::connect(node.addr).unwrap();
    let log = node.proc.log();
    assert!(
        log.contains("WARN") && log.contains("registration with directory failed"),
        "{log}"
    );
    assert!(node.proc.stop().success(), "{}", node.proc.log());
}

#[test]
fn directory_setup_errors_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_str().unwrap();
    let run = |args: &[&str]| mixnn().args(args).output().unwrap();

    // (c) A database that cannot be opened.
    let out = run(&[
        "directory",
        "--listen",
        "127.0.0.1:0",
        "--db",
        "/nonexistent-dir/x.db",
    ]);
    let line = one_line_error(&out);
    assert!(line.contains("/nonexistent-dir/x.db"), "{line}");

    // A key file of the wrong size.
    let key = t.path().join("bad.key");
    std::fs::write(&key, [7u8; 31]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let db = format!("{dir}/d.db");
    let out = run(&[
        "directory",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &db,
        "--key",
        key.to_str().unwrap(),
    ]);
    let line = one_line_error(&out);
    assert!(
        line.contains("bad.key") && line.contains("32 bytes"),
        "{line}"
    );

    // A port in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["directory", "--listen", &addr, "--db", &db]);
    let line = one_line_error(&out);
    assert!(line.contains(&addr), "{line}");
    // The key was made next to the database, readable by its owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(format!("{db}.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A node listening on every interface cannot publish that address.
    let state = format!("{dir}/node");
    let out = run(&[
        "node",
        "--listen",
        "0.0.0.0:0",
        "--state",
        &state,
        "--directory",
        "http://127.0.0.1:1",
    ]);
    let line = one_line_error(&out);
    assert!(line.contains("--advertise"), "{line}");

    // A directory URL that is not http.
    let out = run(&[
        "node",
        "--listen",
        "127.0.0.1:0",
        "--state",
        &state,
        "--directory",
        "ftp://x",
    ]);
    let line = one_line_error(&out);
    assert!(line.contains("--directory"), "{line}");
}
