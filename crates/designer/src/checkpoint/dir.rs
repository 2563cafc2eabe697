//! A directory of checkpoint files: atomic writes, pruning, and the
//! newest usable file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::format::{decode_defect, Checkpoint, CheckpointError};

/// Suffix of a file being written; such files are never read.
const TMP_SUFFIX: &str = ".tmp";

/// A directory of checkpoints named `step-0000000123.ckpt`, of which the
/// newest `keep` are kept. One writer per directory.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    path: PathBuf,
    keep: usize,
}

/// The file name of the checkpoint of `step`.
pub fn file_name(step: u64) -> String {
    format!("step-{step:010}.ckpt")
}

/// The step of a checkpoint file name, `None` for any other name (temp
/// files included).
fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?.strip_suffix(".ckpt")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl CheckpointDir {
    /// Opens `path`, creating it (and its parents) if needed. `keep` is how
    /// many of the newest files [`CheckpointDir::write`] leaves (at least 2).
    pub fn open(path: &Path, keep: usize) -> Result<Self, CheckpointError> {
        if keep < 2 {
            return Err(CheckpointError::Keep {
                path: path.to_path_buf(),
                keep,
            });
        }
        fs::create_dir_all(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            what: "create checkpoint directory",
            source,
        })?;
        Ok(CheckpointDir {
            path: path.to_path_buf(),
            keep,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `c` atomically as `step-….ckpt`: a temp file in the same
    /// directory, written, fsynced and renamed into place, then the
    /// directory fsynced; a crash leaves either the old set of files or the
    /// new one, never a partial checkpoint under its final name. Then
    /// removes the files beyond the newest `keep`, and the files of steps
    /// after `c.step` (an abandoned timeline: the run went back to an
    /// earlier checkpoint), so [`CheckpointDir::latest`] never prefers them.
    /// Returns the file's path.
    pub fn write(&self, c: &Checkpoint) -> Result<PathBuf, CheckpointError> {
        c.consistency()
            .map_err(|reason| CheckpointError::Inconsistent { reason })?;
        let name = file_name(c.step);
        let path = self.path.join(&name);
        let tmp = self.path.join(format!("{name}{TMP_SUFFIX}"));
        let io = |path: &Path, what: &'static str| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, what, source }
        };
        let written = (|| {
            let mut f = fs::File::create(&tmp).map_err(io(&tmp, "create temp file"))?;
            f.write_all(&c.encode()).map_err(io(&tmp, "write"))?;
            f.sync_all().map_err(io(&tmp, "fsync"))?;
            drop(f);
            fs::rename(&tmp, &path).map_err(io(&path, "rename temp file into place"))
        })();
        if let Err(e) = written {
            // Best effort: latest() ignores temp files anyway.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&self.path).map_err(io(&self.path, "fsync directory"))?;
        self.prune(c.step);
        Ok(path)
    }

    /// Removes old and abandoned checkpoints and leftover temp files;
    /// failures are logged, not returned (the new checkpoint is safe).
    fn prune(&self, step: u64) {
        let entries = match self.entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("pruning checkpoints: {e}");
                return;
            }
        };
        let mut kept = 0;
        for (s, name) in entries.checkpoints {
            if s <= step && kept < self.keep {
                kept += 1;
                continue;
            }
            self.remove(&name);
        }
        for name in entries.temps {
            self.remove(&name);
        }
    }

    fn remove(&self, name: &str) {
        let p = self.path.join(name);
        if let Err(e) = fs::remove_file(&p) {
            tracing::warn!("removing old checkpoint {}: {e}", p.display());
        }
    }

    /// Checkpoint files, newest first, and leftover temp files.
    fn entries(&self) -> Result<Entries, CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            what: "list checkpoint directory",
            source,
        };
        let mut out = Entries::default();
        for entry in fs::read_dir(&self.path).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if let Some(step) = parse_file_name(&name) {
                out.checkpoints.push((step, name));
            } else if name
                .strip_suffix(TMP_SUFFIX)
                .and_then(parse_file_name)
                .is_some()
            {
                out.temps.push(name);
            }
        }
        out.checkpoints.sort_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// The newest checkpoint that reads, passes its checksum and parses,
    /// with one warning per newer file skipped (`"step-0000000200.ckpt:
    /// checksum mismatch; using step-0000000100.ckpt"`). `Ok(None)` if the
    /// directory holds no checkpoint file; [`CheckpointError::NoneUsable`]
    /// if it holds some but none can be used. Temp files are ignored.
    pub fn latest(&self) -> Result<Option<(Checkpoint, Vec<String>)>, CheckpointError> {
        let entries = self.entries()?;
        if entries.checkpoints.is_empty() {
            return Ok(None);
        }
        let mut problems = Vec::new();
        for (step, name) in entries.checkpoints {
            match self.read_named(step, &name) {
                Ok(c) => {
                    let warnings = problems
                        .into_iter()
                        .map(|p| format!("{p}; using {name}"))
                        .collect();
                    return Ok(Some((c, warnings)));
                }
                Err(problem) => problems.push(format!("{name}: {problem}")),
            }
        }
        Err(CheckpointError::NoneUsable {
            path: self.path.clone(),
            problems,
        })
    }

    /// Reads one file of the directory; the error is a short reason.
    fn read_named(&self, step: u64, name: &str) -> Result<Checkpoint, String> {
        let bytes = fs::read(self.path.join(name)).map_err(|e| format!("cannot read: {e}"))?;
        let c = decode_defect(&bytes).map_err(|d| d.to_string())?;
        if c.step != step {
            return Err(format!("holds step {}, not the step of its name", c.step));
        }
        Ok(c)
    }
}

/// What a checkpoint directory holds.
#[derive(Default)]
struct Entries {
    /// `(step, file name)`, newest first.
    checkpoints: Vec<(u64, String)>,
    /// Leftover temp files.
    temps: Vec<String>,
}

/// Makes a rename in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Directories cannot be fsynced here; the rename is atomic all the same.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_parse_back_and_others_do_not() {
        for step in [0, 1, 123, 9_999_999_999, u64::MAX] {
            assert_eq!(parse_file_name(&file_name(step)), Some(step));
        }
        assert_eq!(file_name(123), "step-0000000123.ckpt");
        for other in [
            "step-0000000123.ckpt.tmp",
            "step-.ckpt",
            "step-12a.ckpt",
            "step-+12.ckpt",
            "step-99999999999999999999999.ckpt",
            "Step-0000000123.ckpt",
            "notes.txt",
        ] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
    }
}
