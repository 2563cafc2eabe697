#![allow(clippy::unwrap_used, clippy::expect_used)]
//! README.md's commands, as a newcomer runs them: the two at the top are
//! the ones `.ci/run` and the README promise, and the block of "Running a
//! node and a cascade" (five `mixnn node` processes, their descriptors
//! joined into a cascade file, a run through them and one in one process)
//! runs as written, under `bash -e`, from a directory that holds what a
//! clone holds (`fixtures/`), with this build's `mixnn` on `PATH`.

use std::path::Path;
use std::process::Command;

const README: &str = include_str!("../../../README.md");

/// The fenced code blocks of `text` (their bodies), in order.
fn blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("```") {
            match current.take() {
                Some(body) => out.push(body),
                None => current = Some(String::new()),
            }
        } else if let Some(body) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[test]
fn the_readme_opens_with_the_two_commands() {
    let first = &blocks(README)[0];
    let commands: Vec<&str> = first
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    assert_eq!(
        commands,
        [
            "cargo run --release -p mixnn -- demo",
            "cargo test --workspace"
        ],
        "README's first block"
    );
    // `.ci/run` runs the README's test command.
    let ci = include_str!("../../../.ci/run");
    assert!(ci.contains("cargo test --workspace"), ".ci/run");
}

#[test]
fn the_readme_cascade_block_runs_as_written() {
    let block = blocks(README)
        .into_iter()
        .find(|b| b.contains("mixnn node --listen 127.0.0.1:0"))
        .expect("README has the five-node block");
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    std::os::unix::fs::symlink(
        fixtures.canonicalize().unwrap(),
        tmp.path().join("fixtures"),
    )
    .unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_mixnn")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new("bash")
        .args(["-e", "-c", &block])
        .env("PATH", path)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs: String = (1..=5)
        .map(|i| std::fs::read_to_string(tmp.path().join(format!("nodes/{i}.log"))))
        .filter_map(Result::ok)
        .collect();
    assert!(
        out.status.success(),
        "the block failed ({}):\n{stdout}\n{}\nnode logs:\n{logs}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("byte-identical"), "{stdout}");
    let cascade = std::fs::read_to_string(tmp.path().join("cascade.toml")).unwrap();
    assert_eq!(cascade.matches("[[hop]]").count(), 5, "{cascade}");
    let local = std::fs::read(tmp.path().join("local.safetensors")).unwrap();
    let remote = std::fs::read(tmp.path().join("cascade.safetensors")).unwrap();
    assert!(local.len() > 100_000, "the MLP's weights");
    assert_eq!(local, remote, "weights of the cascade and of one process");
    // The block's trap stopped every node it started: no process is left
    // in its directory.
    let dir = tmp.path().canonicalize().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = processes_in(&dir);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left running in the block's directory: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Pids of the processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}
