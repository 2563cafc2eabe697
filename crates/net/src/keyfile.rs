//! Reading and writing raw 32-byte secret key files.
//!
//! A key file holds exactly [`SECRET_KEY_LEN`] raw bytes, mode `0600`, in a
//! directory created with mode `0700`. Writes are atomic (temporary file,
//! `fsync`, `rename`, `fsync` of the directory), so a crash leaves either the
//! old file or the new one, never a torn key.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::NetError;

/// Length in bytes of every secret key file.
pub const SECRET_KEY_LEN: usize = 32;

/// Permission bits a key file must not have: any access by group or others.
#[cfg(unix)]
const FORBIDDEN_MODE_BITS: u32 = 0o077;

/// Whether `path` exists. Errors other than "not found" are reported, so an
/// unreadable directory is not mistaken for a fresh one.
pub(crate) fn exists(path: &Path) -> Result<bool, NetError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(NetError::KeyFileRead {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `dir` (and parents) with mode `0700` if it does not exist.
pub(crate) fn create_dir(dir: &Path) -> Result<(), NetError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| NetError::KeyDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads a key file, checking its permissions and size first.
pub(crate) fn read_key(path: &Path) -> Result<Zeroizing<[u8; SECRET_KEY_LEN]>, NetError> {
    let read_err = |source| NetError::KeyFileRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    // Check the opened file itself, not the path, so the checks and the read
    // see the same inode.
    let meta = file.metadata().map_err(read_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & FORBIDDEN_MODE_BITS != 0 {
            return Err(NetError::KeyFilePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    if !meta.is_file() || meta.len() != SECRET_KEY_LEN as u64 {
        return Err(NetError::KeyFileLength {
            path: path.to_path_buf(),
            expected: SECRET_KEY_LEN,
            actual: meta.len(),
        });
    }
    let mut key = Zeroizing::new([0u8; SECRET_KEY_LEN]);
    file.read_exact(key.as_mut_slice()).map_err(read_err)?;
    Ok(key)
}

/// Atomically writes `key` to `path` with mode `0600`.
pub(crate) fn write_key(path: &Path, key: &[u8; SECRET_KEY_LEN]) -> Result<(), NetError> {
    let write_err = |source| NetError::KeyFileWrite {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| write_err(io::Error::other("key file path has no parent directory")))?;
    let name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::other("key file path has no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);

    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(write_err)?;
    // `mode` only applies when the file is created; a stale temporary file
    // left by a crash keeps its old bits, so set them explicitly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(write_err)?;
    }
    file.write_all(key).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_err)?;
    // Make the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_key(&path, &[9; 32]).unwrap();
        assert_eq!(*read_key(&path).unwrap(), [9; 32]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn overwrite_replaces_stale_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        fs::write(dir.path().join(".k.key.tmp"), b"junk from a crash").unwrap();
        write_key(&path, &[1; 32]).unwrap();
        assert_eq!(*read_key(&path).unwrap(), [1; 32]);
    }

    #[test]
    fn read_rejects_directory_in_place_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        create_dir(&path).unwrap();
        assert!(read_key(&path).is_err());
    }

    #[test]
    fn exists_distinguishes_missing_from_present() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        assert!(!exists(&path).unwrap());
        write_key(&path, &[1; 32]).unwrap();
        assert!(exists(&path).unwrap());
    }
}
