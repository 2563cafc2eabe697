//! Finding Fashion-MNIST, and fetching it without root when it is missing.
//!
//! Search order: `--data DIR`, then `$MIXNN_DATA`, then Debian's
//! `dataset-fashion-mnist` install path, then the per-user cache
//! (`$XDG_CACHE_HOME/mixnn/fashion-mnist`, else
//! `~/.cache/mixnn/fashion-mnist`). If none holds the files (and
//! `--no-fetch` is not given), the Debian package is downloaded with
//! `apt-get download` (no root needed) and unpacked with `dpkg-deb -x` into
//! the cache.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;
use mixnn_model::data::DEBIAN_FASHION_MNIST;

/// The Debian package that ships Fashion-MNIST.
pub const PACKAGE: &str = "dataset-fashion-mnist";
/// The four IDX files a data directory holds (each may end in `.gz`).
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
/// What to do when no data is found.
pub const INSTALL_HINT: &str = "no Fashion-MNIST found; install it with: sudo apt-get update && \
     sudo apt-get install dataset-fashion-mnist (or pass --data DIR)";

/// Where the images come from.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Directory of IDX files [default: $MIXNN_DATA, else
    /// /usr/share/datasets/fashion-mnist, else ~/.cache/mixnn/fashion-mnist,
    /// fetched there if missing]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// Never download the dataset; fail if it is not found.
    #[arg(long)]
    pub no_fetch: bool,
}

/// The places searched, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// `--data`: used as given (an error if it is not a directory).
    pub explicit: Option<PathBuf>,
    /// `$MIXNN_DATA`: used as given (an error if it is not a directory).
    pub env: Option<PathBuf>,
    /// Debian's install path: used if it holds the files.
    pub system: PathBuf,
    /// The per-user cache: used if it holds the files, fetched into if not.
    pub cache: Option<PathBuf>,
}

/// The outcome of the search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Use this directory.
    Dir(PathBuf),
    /// Nothing found; fetch into this (cache) directory.
    Fetch(PathBuf),
    /// Nothing found and no cache directory is known.
    Nothing,
}

impl Candidates {
    /// The candidates for this process: its arguments and environment.
    pub fn from_env(explicit: Option<&Path>) -> Self {
        Candidates {
            explicit: explicit.map(Path::to_path_buf),
            env: std::env::var_os("MIXNN_DATA")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            system: PathBuf::from(DEBIAN_FASHION_MNIST),
            cache: cache_dir(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")),
        }
    }

    /// Walks the search order.
    pub fn locate(&self) -> anyhow::Result<Located> {
        for (what, dir) in [("--data", &self.explicit), ("$MIXNN_DATA", &self.env)] {
            if let Some(dir) = dir {
                if !dir.is_dir() {
                    bail!("{what} {}: no such directory", dir.display());
                }
                return Ok(Located::Dir(dir.clone()));
            }
        }
        if has_dataset(&self.system) {
            return Ok(Located::Dir(self.system.clone()));
        }
        Ok(match &self.cache {
            Some(c) if has_dataset(c) => Located::Dir(c.clone()),
            Some(c) => Located::Fetch(c.clone()),
            None => Located::Nothing,
        })
    }
}

/// `$XDG_CACHE_HOME/mixnn/fashion-mnist` if that variable is an absolute
/// path (as the XDG spec asks), else `$HOME/.cache/mixnn/fashion-mnist`.
pub fn cache_dir(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let base = xdg_cache_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            home.filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("mixnn").join("fashion-mnist"))
}

/// Whether `dir` holds all four IDX files (raw or `.gz`).
pub fn has_dataset(dir: &Path) -> bool {
    FILES
        .iter()
        .all(|f| dir.join(f).is_file() || dir.join(format!("{f}.gz")).is_file())
}

/// The data directory to load, fetching the dataset if needed and allowed.
pub fn data_dir(args: &DataArgs) -> anyhow::Result<PathBuf> {
    match Candidates::from_env(args.data.as_deref()).locate()? {
        Located::Dir(dir) => {
            tracing::debug!(dir = %dir.display(), "data directory");
            Ok(dir)
        }
        Located::Fetch(cache) if !args.no_fetch => match fetch_into(&cache) {
            Ok(()) => Ok(cache),
            Err(e) => bail!("{INSTALL_HINT}; fetching it failed: {e:#}"),
        },
        Located::Fetch(_) | Located::Nothing => bail!("{INSTALL_HINT}"),
    }
}

/// Downloads Debian's `dataset-fashion-mnist` with `apt-get download`,
/// unpacks it with `dpkg-deb -x` and moves its IDX files into `cache`.
/// Works without root; needs Debian's apt lists to be present.
pub fn fetch_into(cache: &Path) -> anyhow::Result<()> {
    let parent = cache
        .parent()
        .with_context(|| format!("cache directory {} has no parent", cache.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    eprintln!(
        "fetching Fashion-MNIST (apt-get download {PACKAGE}, about 31 MB) into {}",
        cache.display()
    );
    // Temporary directories beside the cache, so the final move is a rename
    // on one file system; removed on every exit path.
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let download = work.path().join("download");
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&download)?;
    std::fs::create_dir(&unpacked)?;

    run_tool(
        Command::new("apt-get")
            .args(["download", "-q", PACKAGE])
            .current_dir(&download),
        "apt-get download",
    )?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    run_tool(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "dpkg-deb -x",
    )?;

    let src = unpacked.join(DEBIAN_FASHION_MNIST.trim_start_matches('/'));
    if !has_dataset(&src) {
        bail!("{} does not hold the IDX files", deb.display());
    }
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    for entry in std::fs::read_dir(&src)? {
        let entry = entry?;
        let to = cache.join(entry.file_name());
        std::fs::rename(entry.path(), &to)
            .with_context(|| format!("moving {} to {}", entry.path().display(), to.display()))?;
    }
    eprintln!("Fashion-MNIST saved in {}", cache.display());
    Ok(())
}

/// Runs an external tool; on failure, reports its last stderr line.
fn run_tool(cmd: &mut Command, name: &str) -> anyhow::Result<()> {
    tracing::debug!(?cmd, "running");
    let out = cmd
        .output()
        .with_context(|| format!("{name}: could not start it"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no message");
    bail!("{name}: {} ({last})", out.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (i, f) in FILES.iter().enumerate() {
            let name = if i % 2 == 0 {
                format!("{f}.gz")
            } else {
                f.to_string()
            };
            std::fs::write(dir.join(name), b"x").unwrap();
        }
    }

    fn candidates(root: &Path) -> Candidates {
        Candidates {
            explicit: None,
            env: None,
            system: root.join("system"),
            cache: Some(root.join("cache")),
        }
    }

    #[test]
    fn explicit_beats_env_beats_system_beats_cache() {
        let t = tempfile::tempdir().unwrap();
        let mut c = candidates(t.path());
        assert_eq!(c.locate().unwrap(), Located::Fetch(t.path().join("cache")));
        fill(&t.path().join("cache"));
        assert_eq!(c.locate().unwrap(), Located::Dir(t.path().join("cache")));
        fill(&t.path().join("system"));
        assert_eq!(c.locate().unwrap(), Located::Dir(t.path().join("system")));
        c.env = Some(t.path().to_path_buf());
        assert_eq!(c.locate().unwrap(), Located::Dir(t.path().to_path_buf()));
        c.explicit = Some(t.path().join("cache"));
        assert_eq!(c.locate().unwrap(), Located::Dir(t.path().join("cache")));
    }

    #[test]
    fn missing_explicit_dir_is_an_error_not_a_fallback() {
        let t = tempfile::tempdir().unwrap();
        fill(&t.path().join("system"));
        let mut c = candidates(t.path());
        c.explicit = Some(t.path().join("nope"));
        let err = c.locate().unwrap_err().to_string();
        assert!(err.starts_with("--data "), "{err}");
        assert!(err.ends_with("nope: no such directory"), "{err}");
    }

    #[test]
    fn partial_system_dir_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        fill(&t.path().join("system"));
        std::fs::remove_file(t.path().join("system/t10k-labels-idx1-ubyte")).unwrap();
        let c = Candidates {
            cache: None,
            ..candidates(t.path())
        };
        assert_eq!(c.locate().unwrap(), Located::Nothing);
    }

    #[test]
    fn cache_dir_follows_xdg_then_home() {
        let d = |x: Option<&str>, h: Option<&str>| cache_dir(x.map(Into::into), h.map(Into::into));
        assert_eq!(
            d(Some("/x"), Some("/h")),
            Some(PathBuf::from("/x/mixnn/fashion-mnist"))
        );
        // A relative XDG_CACHE_HOME is invalid per the spec and ignored.
        assert_eq!(
            d(Some("rel"), Some("/h")),
            Some(PathBuf::from("/h/.cache/mixnn/fashion-mnist"))
        );
        assert_eq!(d(None, None), None);
    }
}
