//! The init replay tags a node keeps in its state directory, so that an
//! init recorded before a restart is refused after it (the core checks and
//! returns the tags, this file stores them).
//!
//! ```text
//! init-replay.bin = record*      record = tag (16) ‖ issued_at (u64 LE)
//! ```
//!
//! A record is appended (and synced) for every accepted init before the
//! node sends anything the init produced. At start, and when the file
//! holds far more records than the core still remembers (tags older than
//! the init window are forgotten), it is rewritten atomically with the
//! live tags. A torn last record (a crash mid-append) is cut off.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use mixnn_wire::InitTag;

const RECORD: usize = 16 + 8;

/// The open replay file.
#[derive(Debug)]
pub struct ReplayFile {
    path: PathBuf,
    file: File,
    records: usize,
}

impl ReplayFile {
    /// Opens (or creates) the file at `path`; returns it with the tags it
    /// holds.
    pub fn open(path: &Path) -> std::io::Result<(ReplayFile, Vec<(InitTag, u64)>)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tags: Vec<(InitTag, u64)> = bytes
            .chunks_exact(RECORD)
            .map(|r| {
                let mut tag = [0u8; 16];
                tag.copy_from_slice(&r[..16]);
                let mut at = [0u8; 8];
                at.copy_from_slice(&r[16..]);
                (InitTag(tag), u64::from_le_bytes(at))
            })
            .collect();
        let file = open_append(path)?;
        let mut f = ReplayFile {
            path: path.to_path_buf(),
            file,
            records: tags.len(),
        };
        if bytes.len() % RECORD != 0 {
            // Cut the torn record, so that appends stay aligned.
            f.rewrite(&tags)?;
        }
        Ok((f, tags))
    }

    /// Appends `tags` and syncs them to disk.
    pub fn append(&mut self, tags: &[(InitTag, u64)]) -> std::io::Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(tags.len() * RECORD);
        for (tag, at) in tags {
            bytes.extend_from_slice(&tag.0);
            bytes.extend_from_slice(&at.to_le_bytes());
        }
        self.file.write_all(&bytes)?;
        self.file.sync_data()?;
        self.records += tags.len();
        Ok(())
    }

    /// Replaces the file's content with `tags` (written to a temporary
    /// file, synced, renamed over it).
    pub fn rewrite(&mut self, tags: &[(InitTag, u64)]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            for (tag, at) in tags {
                f.write_all(&tag.0)?;
                f.write_all(&at.to_le_bytes())?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = open_append(&self.path)?;
        self.records = tags.len();
        Ok(())
    }

    /// Records in the file.
    pub fn records(&self) -> usize {
        self.records
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_survive_a_reopen_a_rewrite_and_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init-replay.bin");
        let (mut f, tags) = ReplayFile::open(&path).unwrap();
        assert!(tags.is_empty());
        let a = (InitTag([1; 16]), 100);
        let b = (InitTag([2; 16]), 200);
        f.append(&[a, b]).unwrap();
        drop(f);
        // A crash in the middle of the next record.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[3; 10])
            .unwrap();
        let (mut f, tags) = ReplayFile::open(&path).unwrap();
        assert_eq!(tags, vec![a, b]);
        let c = (InitTag([4; 16]), 300);
        f.append(&[c]).unwrap();
        let (mut f, tags) = ReplayFile::open(&path).unwrap();
        assert_eq!(tags, vec![a, b, c]);
        f.rewrite(&[b]).unwrap();
        assert_eq!(f.records(), 1);
        f.append(&[a]).unwrap();
        let (_, tags) = ReplayFile::open(&path).unwrap();
        assert_eq!(tags, vec![b, a]);
    }
}
