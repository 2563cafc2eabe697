#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fetching Fashion-MNIST as on a fresh Debian machine: apt's lists were
//! never fetched, so `mixnn` fetches them into a private apt state of its
//! own, downloads `dataset-fashion-mnist` from there and trains, without
//! root and without touching the system's apt state.
//!
//! The machine's apt lists are left alone: `APT_CONFIG` points the
//! system's `Dir::State::Lists` at an empty directory for the `mixnn`
//! process, which is what `apt-get` sees on a fresh machine. The download
//! test needs deb.debian.org; without it it says why and skips, except in
//! CI (`CI=true`), where it must run.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

mod common;
use common::*;

/// Why the fetch path cannot be exercised here, if it cannot.
fn cannot_fetch_here() -> Option<String> {
    for tool in ["apt-get", "dpkg-deb"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("no {tool} (not a Debian machine)"));
        }
    }
    let system = Path::new(mixnn_model::data::DEBIAN_FASHION_MNIST);
    if system.is_dir() {
        return Some(format!(
            "{} exists (dataset-fashion-mnist is installed), so mixnn finds it and fetches nothing",
            system.display()
        ));
    }
    None
}

/// Skips (returns true) with the reason printed, or fails in CI.
fn skip(why: Option<String>) -> bool {
    match why {
        None => false,
        Some(why) if in_ci() => panic!("CI must run this test, but: {why}"),
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
    }
}

fn deb_debian_org_unreachable() -> Option<String> {
    let addrs = match ("deb.debian.org", 80).to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => return Some(format!("deb.debian.org does not resolve: {e}")),
    };
    for a in &addrs {
        if TcpStream::connect_timeout(a, Duration::from_secs(5)).is_ok() {
            return None;
        }
    }
    Some(format!("cannot connect to deb.debian.org:80 ({addrs:?})"))
}

/// A home, a cache and an apt configuration whose lists directory is empty,
/// as on a machine where `apt-get update` never ran. `extra` is appended to
/// the configuration.
struct Fresh {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Fresh {
    fn new(extra: &str) -> Fresh {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("empty-lists/partial")).unwrap();
        std::fs::create_dir_all(root.join("home")).unwrap();
        std::fs::write(
            root.join("apt.conf"),
            format!(
                "Dir::State::Lists \"{}\";\n{extra}",
                root.join("empty-lists").display()
            ),
        )
        .unwrap();
        Fresh { _tmp: tmp, root }
    }

    fn cache(&self) -> PathBuf {
        self.root.join("cache/mixnn/fashion-mnist")
    }

    /// `mixnn train --local` on a few images, nothing but this fresh
    /// machine's state to find data with.
    fn train(&self) -> Output {
        mixnn()
            .args(["train", "--local"])
            .args([
                "--train-limit",
                "500",
                "--test-limit",
                "200",
                "--epochs",
                "1",
            ])
            .env("HOME", self.root.join("home"))
            .env("XDG_CACHE_HOME", self.root.join("cache"))
            .env("APT_CONFIG", self.root.join("apt.conf"))
            .current_dir(&self.root)
            .output()
            .unwrap()
    }

    /// Whatever is left in the cache's parent besides the dataset.
    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("cache/mixnn"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "fashion-mnist")
                    .collect()
            })
            .unwrap_or_default()
    }

    fn empty_lists_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(self.root.join("empty-lists"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["partial"], "the (fake) system lists were written");
    }
}

/// Name, size and modification time of everything in the system's apt
/// state directories (one level deep).
fn system_apt_state() -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut all = Vec::new();
    for dir in [
        "/var/lib/apt/lists",
        "/var/lib/apt/lists/partial",
        "/var/cache/apt",
        "/var/cache/apt/archives",
        "/var/cache/apt/archives/partial",
    ] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(m) = e.metadata() {
                all.push((e.path(), m.len(), m.modified().ok()));
            }
        }
    }
    all.sort();
    all
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn with_empty_apt_lists_mixnn_fetches_lists_privately_downloads_and_trains() {
    if skip(cannot_fetch_here().or_else(deb_debian_org_unreachable)) {
        return;
    }
    let fresh = Fresh::new("");
    let before = system_apt_state();
    let started = std::time::Instant::now();
    let out = fresh.train();
    let took = started.elapsed();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stderr: {stderr}\nstdout: {stdout}");
    eprintln!("fetch and train took {took:?}; mixnn said:\n{stderr}");

    // It said what it did, with apt's progress and the size.
    assert!(
        stderr.contains(
            "apt-get download (the system's lists): exit status: 100 (E: Unable to locate package"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("private apt state"), "{stderr}");
    assert!(stderr.contains("Get:"), "no apt progress: {stderr}");
    assert!(
        stderr.contains("downloading dataset-fashion-mnist_") && stderr.contains(" MB) from http"),
        "no size: {stderr}"
    );
    assert!(stderr.contains("Fashion-MNIST saved in"), "{stderr}");
    // A random seed's line, then the epochs.
    assert!(stdout.starts_with("seed "), "{stdout}");
    assert!(
        stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("epoch 1  train ")),
        "{stdout}"
    );

    // The real thing, of which the repository's fixture is the start.
    assert_fixture_is_the_start_of(&fresh.cache());
    // Nothing else left behind; neither the (fake) system lists nor the
    // machine's apt state were written.
    assert_eq!(fresh.leftovers(), Vec::<String>::new());
    fresh.empty_lists_untouched();
    assert_eq!(system_apt_state(), before, "the system's apt state changed");

    // Once fetched, it is found in the cache.
    let again = fresh.train();
    let (_, stderr) = text(&again);
    assert!(again.status.success(), "{stderr}");
    assert!(!stderr.contains("fetching"), "fetched twice: {stderr}");
}

#[test]
fn a_fetch_that_cannot_reach_the_archive_is_one_line_naming_the_fix() {
    if skip(cannot_fetch_here()) {
        return;
    }
    // Every download goes through a proxy that refuses connections.
    let fresh = Fresh::new(
        "Acquire::http::Proxy \"http://127.0.0.1:9\";\n\
         Acquire::https::Proxy \"http://127.0.0.1:9\";\n",
    );
    let out = fresh.train();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{stdout}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let line = errors[0];
    assert_eq!(stderr.lines().last(), Some(line), "{stderr}");
    // What failed, why, and the command that would fix it.
    assert!(
        line.contains("apt-get update (private lists) could not fetch the lists"),
        "{line}"
    );
    assert!(line.contains("127.0.0.1:9"), "{line}");
    assert!(
        line.contains(
            "install it with: sudo apt-get update && sudo apt-get install dataset-fashion-mnist"
        ),
        "{line}"
    );
    assert!(line.matches("Connection refused").count() <= 1, "{line}");
    assert!(!fresh.cache().exists());
    assert_eq!(fresh.leftovers(), Vec::<String>::new());
    fresh.empty_lists_untouched();
}
