//! Finding Fashion-MNIST, and fetching it without root when it is missing.
//!
//! Search order: `--data DIR`, then `$MIXNN_DATA`, then Debian's
//! `dataset-fashion-mnist` install path, then the per-user cache
//! (`$XDG_CACHE_HOME/mixnn/fashion-mnist`, else
//! `~/.cache/mixnn/fashion-mnist`). If none holds the files (and
//! `--no-fetch` is not given), the Debian package is downloaded with
//! `apt-get download` (no root needed) and unpacked with `dpkg-deb -x` into
//! the cache. When the system's apt lists lack the package (a fresh machine
//! where `apt-get update` never ran), the lists are first fetched into a
//! private apt state beside the cache; the system's apt state is never
//! written.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
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
            Err(e) => Err(e.context(format!("{INSTALL_HINT}; fetching it failed"))),
        },
        Located::Fetch(_) | Located::Nothing => bail!("{INSTALL_HINT}"),
    }
}

/// Downloads Debian's `dataset-fashion-mnist` with `apt-get download`,
/// unpacks it with `dpkg-deb -x` and moves its IDX files into `cache`.
///
/// Needs no root. If the system's apt lists do not carry the package (on a
/// fresh machine `apt-get update` never ran), the lists are fetched into a
/// private apt state beside the cache ([`PrivateApt`]) and the package is
/// downloaded from there; the system's apt state is never written.
pub fn fetch_into(cache: &Path) -> anyhow::Result<()> {
    let parent = cache
        .parent()
        .with_context(|| format!("cache directory {} has no parent", cache.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    eprintln!(
        "fetching Fashion-MNIST (Debian's {PACKAGE}) into {}",
        cache.display()
    );
    // Temporary directories beside the cache, so the final move is a rename
    // on one file system; removed on every exit path, the private apt state
    // with them.
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let download = work.path().join("download");
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&download)?;
    std::fs::create_dir(&unpacked)?;

    let deb = match Apt::System.download(&download) {
        Ok(deb) => deb,
        // No apt at all (not Debian): nothing else to try.
        Err(e) if not_found(&e) => {
            return Err(e.context("fetching needs Debian's apt-get and dpkg-deb"))
        }
        Err(system) => {
            let private = PrivateApt::create(&work.path().join("apt"))?;
            eprintln!(
                "{system:#}; fetching Debian's package lists into a private apt state in {} \
                 (sources from the system's configuration; the system's apt state is not \
                 touched)",
                work.path().join("apt").display()
            );
            let apt = Apt::Private(&private);
            let trouble = apt.update()?;
            apt.download(&download).map_err(|e| match trouble {
                Some(why) => {
                    anyhow!("apt-get update (private lists) could not fetch the lists: {why}")
                }
                None => e,
            })?
        }
    };
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

/// An apt state of our own: lists, caches, `dpkg` status and logs in one
/// directory, described by one configuration file that `apt-get -c` reads
/// after the system's, so every path it sets wins. Sources, keyrings,
/// proxies and the rest still come from the system's configuration. The
/// hooks the system configures for `apt-get update` (Debian images ship
/// some that refresh system caches as root) are cleared.
#[derive(Debug)]
pub struct PrivateApt {
    config: PathBuf,
}

impl PrivateApt {
    /// Lays out an empty apt state in `dir` (created) and writes its
    /// configuration file.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let quoted = |p: &Path| -> anyhow::Result<String> {
            let s = p
                .to_str()
                .filter(|s| !s.contains(['"', '\n', '\r', ';']))
                .with_context(|| format!("apt cannot be pointed at {}", p.display()))?;
            Ok(format!("\"{s}\""))
        };
        for sub in ["lists/partial", "archives/partial", "cache", "log"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let status = dir.join("status");
        std::fs::write(&status, b"").with_context(|| format!("creating {}", status.display()))?;
        let config = dir.join("apt.conf");
        let text = format!(
            "// A private apt state for fetching {PACKAGE} (written by mixnn).\n\
             Dir::State {};\n\
             Dir::State::Lists {};\n\
             Dir::State::status {};\n\
             Dir::State::extended_states {};\n\
             Dir::Cache {};\n\
             Dir::Cache::archives {};\n\
             Dir::Cache::pkgcache \"\";\n\
             Dir::Cache::srcpkgcache \"\";\n\
             Dir::Log {};\n\
             // Only the Packages indices: no translations, no AppStream data.\n\
             Acquire::Languages \"none\";\n\
             Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";\n\
             #clear APT::Update::Pre-Invoke;\n\
             #clear APT::Update::Post-Invoke;\n\
             #clear APT::Update::Post-Invoke-Success;\n\
             #clear DPkg::Pre-Invoke;\n\
             #clear DPkg::Post-Invoke;\n",
            quoted(dir)?,
            quoted(&dir.join("lists"))?,
            quoted(&status)?,
            quoted(&dir.join("extended_states"))?,
            quoted(&dir.join("cache"))?,
            quoted(&dir.join("archives"))?,
            quoted(&dir.join("log"))?,
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Ok(PrivateApt { config })
    }

    /// The configuration file (`apt-get -c FILE`).
    pub fn config(&self) -> &Path {
        &self.config
    }
}

/// Which apt state an `apt-get` runs against.
#[derive(Debug, Clone, Copy)]
enum Apt<'a> {
    /// The system's, read only: no binary caches are written.
    System,
    /// A [`PrivateApt`].
    Private(&'a PrivateApt),
}

/// A package as `apt-get download --print-uris` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebFile {
    /// Where it is downloaded from.
    pub url: String,
    /// The file name it is saved under.
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
}

impl DebFile {
    /// Parses a line `'URL' FILE SIZE HASH`.
    pub fn parse(line: &str) -> Option<DebFile> {
        let rest = line.trim().strip_prefix('\'')?;
        let (url, rest) = rest.split_once('\'')?;
        let mut fields = rest.split_whitespace();
        let file = fields.next()?.to_string();
        let size = fields.next()?.parse().ok()?;
        Some(DebFile {
            url: url.to_string(),
            file,
            size,
        })
    }
}

impl Apt<'_> {
    fn name(self) -> &'static str {
        match self {
            Apt::System => "the system's lists",
            Apt::Private(_) => "private lists",
        }
    }

    fn apt_get(self) -> Command {
        let mut c = Command::new("apt-get");
        match self {
            Apt::System => {
                c.args([
                    "-o",
                    "Dir::Cache::pkgcache=",
                    "-o",
                    "Dir::Cache::srcpkgcache=",
                ]);
            }
            Apt::Private(p) => {
                c.arg("-c").arg(p.config());
            }
        }
        c
    }

    /// `apt-get update`; its progress goes to stderr. Returns the first
    /// problem it reported: apt exits 0 when it could not fetch some lists.
    fn update(self) -> anyhow::Result<Option<String>> {
        let mut cmd = self.apt_get();
        cmd.arg("update");
        let name = format!("apt-get update ({})", self.name());
        let stderr = run_showing_progress(&mut cmd, &name)?;
        Ok(stderr
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("E:") || l.starts_with("W: Failed to fetch"))
            .map(collapse_spaces))
    }

    /// Finds the package in this state's lists, says what will be
    /// downloaded and downloads it into `dir`; returns the `.deb`.
    fn download(self, dir: &Path) -> anyhow::Result<PathBuf> {
        let mut cmd = self.apt_get();
        cmd.args(["download", "--print-uris", PACKAGE]);
        let what = format!("apt-get download ({})", self.name());
        let out = run_tool(&mut cmd, &what)?;
        let deb = out
            .lines()
            .find_map(DebFile::parse)
            .with_context(|| format!("{what}: no URI for {PACKAGE} in its output"))?;
        eprintln!(
            "downloading {} ({:.1} MB) from {}",
            deb.file,
            deb.size as f64 / 1e6,
            deb.url
        );
        let mut cmd = self.apt_get();
        cmd.args(["download", PACKAGE]).current_dir(dir);
        run_showing_progress(&mut cmd, &what)?;
        let path = dir.join(&deb.file);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("{what} left no {} in {}", deb.file, dir.display()))?
            .len();
        if size != deb.size {
            bail!(
                "{what}: {} is {size} bytes, expected {}",
                deb.file,
                deb.size
            );
        }
        Ok(path)
    }
}

/// Runs an external tool; returns its stdout. On failure, the error names
/// the tool and its most telling stderr line.
fn run_tool(cmd: &mut Command, name: &str) -> anyhow::Result<String> {
    tracing::debug!(?cmd, "running");
    let out = cmd
        .output()
        .with_context(|| format!("{name}: could not start it"))?;
    if !out.status.success() {
        bail!("{name}: {} ({})", out.status, telling_line(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// As [`run_tool`], with the tool's stdout (apt's `Get:` lines and
/// progress) going to our stderr; returns its stderr.
fn run_showing_progress(cmd: &mut Command, name: &str) -> anyhow::Result<String> {
    use std::os::fd::AsFd;
    tracing::debug!(?cmd, "running");
    let progress = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr")?;
    let out = cmd
        .stdout(Stdio::from(progress))
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{name}: could not start it"))?;
    if !out.status.success() {
        bail!("{name}: {} ({})", out.status, telling_line(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// apt's first error (`E: …`) if it printed one, else the last non-empty
/// line.
fn telling_line(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let mut lines = stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    let line = lines
        .clone()
        .find(|l| l.starts_with("E:"))
        .or_else(|| lines.next_back())
        .unwrap_or("no message");
    collapse_spaces(line)
}

/// Whether `e` is a program that could not be started because it is not
/// installed.
fn not_found(e: &anyhow::Error) -> bool {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

fn collapse_spaces(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
