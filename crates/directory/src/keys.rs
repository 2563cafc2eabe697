//! The directory's own Ed25519 signing key, kept in a 32-byte file readable
//! only by its owner.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::error::{DirectoryError, Result};

/// The directory authority's signing key (zeroized on drop).
pub struct DirectoryKeys {
    signing: SigningKey,
}

impl std::fmt::Debug for DirectoryKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("DirectoryKeys")
            .field("public", &hex::encode(self.public()))
            .finish_non_exhaustive()
    }
}

impl DirectoryKeys {
    /// Loads the secret key from `path`, or creates a fresh one there (mode
    /// 0600 on unix; parent directories are created). Refuses a file of the
    /// wrong size, or, on unix, one readable by group or others.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match fs::File::open(path) {
            Ok(file) => Self::load(path, file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(DirectoryError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// A key from its 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = Zeroizing::new(secret);
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// A fresh key from `rng`.
    pub fn generate(rng: &mut (impl rand::CryptoRng + rand::RngCore)) -> Self {
        Self {
            signing: SigningKey::generate(rng),
        }
    }

    /// The public key designers pin.
    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The signing key.
    pub(crate) fn signing(&self) -> &SigningKey {
        &self.signing
    }

    fn load(path: &Path, mut file: fs::File) -> Result<Self> {
        let io = |source| DirectoryError::Io {
            path: path.to_owned(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(DirectoryError::KeyFile {
                    path: path.to_owned(),
                    reason: format!("mode {:o} lets others read it; chmod 600", mode & 0o777),
                });
            }
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(33));
        Read::by_ref(&mut file)
            .take(33)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let secret: [u8; 32] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| DirectoryError::KeyFile {
                    path: path.to_owned(),
                    reason: format!("expected 32 bytes, found {}", bytes.len()),
                })?;
        Ok(Self::from_secret(secret))
    }

    fn create(path: &Path) -> Result<Self> {
        let io = |source| DirectoryError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io)?;
        }
        let keys = Self::generate(&mut OsRng);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        let secret = Zeroizing::new(keys.signing.to_bytes());
        file.write_all(secret.as_slice()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_or_create_persists_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/directory.key");
        let a = DirectoryKeys::load_or_create(&path).unwrap();
        let b = DirectoryKeys::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        assert_eq!(fs::metadata(&path).unwrap().len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(!format!("{a:?}").contains(&hex::encode(a.signing.to_bytes())));
    }

    #[test]
    fn load_refuses_wrong_size_and_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, [1u8; 31]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(
            DirectoryKeys::load_or_create(&path),
            Err(DirectoryError::KeyFile { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::write(&path, [1u8; 32]).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            let err = DirectoryKeys::load_or_create(&path).unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }
}
