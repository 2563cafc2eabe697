#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Node key storage: creation, reload, and refusal of damaged key files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use mixnn_net::{Created, NetError, NodeKeys, IDENTITY_KEY_FILE, LINK_KEY_FILE, ONION_KEY_FILE};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const ALL_FILES: [&str; 3] = [IDENTITY_KEY_FILE, ONION_KEY_FILE, LINK_KEY_FILE];

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn snapshot(dir: &Path) -> Vec<Vec<u8>> {
    ALL_FILES
        .iter()
        .map(|f| fs::read(dir.join(f)).unwrap())
        .collect()
}

#[test]
fn keys_are_created_once_private_and_reloaded_byte_identical() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state").join("node1");
    let (keys, created) =
        NodeKeys::load_or_create_with_rng(&dir, &mut ChaCha20Rng::seed_from_u64(1)).unwrap();
    assert_eq!(created, Created::New);
    assert_eq!(mode(&dir), 0o700);
    for file in ALL_FILES {
        let path = dir.join(file);
        assert_eq!(mode(&path), 0o600, "{file}");
        assert_eq!(fs::metadata(&path).unwrap().len(), 32, "{file}");
    }
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        3,
        "no stray temp files"
    );
    let before = snapshot(&dir);

    // A different RNG on restart must not matter: nothing is regenerated.
    let (again, created) = NodeKeys::load_or_create(&dir).unwrap();
    assert_eq!(created, Created::Existing);
    assert_eq!(again.public(), keys.public());
    assert_eq!(snapshot(&dir), before);
    assert_eq!(again.identity().to_bytes(), keys.identity().to_bytes());
    assert_eq!(again.onion().to_bytes(), keys.onion().to_bytes());
}

#[test]
fn public_keys_match_the_secret_keys() {
    let keys = NodeKeys::generate(&mut ChaCha20Rng::seed_from_u64(2));
    let public = keys.public();
    let onion_pub = mixnn_net::x25519_dalek::PublicKey::from(keys.onion());
    assert_eq!(public.onion.as_bytes(), onion_pub.as_bytes());
    assert_eq!(
        public.identity.as_bytes(),
        keys.identity().verifying_key().as_bytes()
    );
    assert_eq!(public.link, keys.link().public());
}

fn fresh_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    NodeKeys::load_or_create_with_rng(root.path(), &mut ChaCha20Rng::seed_from_u64(3)).unwrap();
    root
}

fn assert_names(err: &NetError, file: &str) {
    assert!(err.to_string().contains(file), "{err} should name {file}");
}

#[test]
fn short_key_file_is_an_error_naming_it_and_is_left_alone() {
    for file in ALL_FILES {
        let root = fresh_dir();
        let path = root.path().join(file);
        fs::write(&path, [1u8; 31]).unwrap();
        let err = NodeKeys::load_or_create(root.path()).unwrap_err();
        assert!(
            matches!(err, NetError::KeyFileLength { actual: 31, .. }),
            "{err:?}"
        );
        assert_names(&err, file);
        assert_eq!(fs::read(&path).unwrap(), vec![1u8; 31], "not regenerated");
    }
}

#[test]
fn long_or_empty_key_file_is_an_error() {
    let root = fresh_dir();
    fs::write(root.path().join(LINK_KEY_FILE), [0u8; 64]).unwrap();
    let err = NodeKeys::load_or_create(root.path()).unwrap_err();
    assert!(matches!(err, NetError::KeyFileLength { actual: 64, .. }));
    fs::write(root.path().join(LINK_KEY_FILE), []).unwrap();
    let err = NodeKeys::load_or_create(root.path()).unwrap_err();
    assert!(matches!(err, NetError::KeyFileLength { actual: 0, .. }));
    assert_names(&err, LINK_KEY_FILE);
}

#[test]
fn group_or_world_accessible_key_file_is_an_error_naming_it() {
    for bits in [0o640, 0o604, 0o660] {
        let root = fresh_dir();
        let path = root.path().join(ONION_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(bits)).unwrap();
        let err = NodeKeys::load_or_create(root.path()).unwrap_err();
        assert!(
            matches!(err, NetError::KeyFilePermissions { mode, .. } if mode == bits),
            "{err:?}"
        );
        assert_names(&err, ONION_KEY_FILE);
    }
}

#[test]
fn unreadable_key_path_is_an_error_naming_it() {
    let root = fresh_dir();
    let path = root.path().join(IDENTITY_KEY_FILE);
    fs::remove_file(&path).unwrap();
    // A directory where the file should be: exists, but is not a key file.
    fs::create_dir(&path).unwrap();
    let err = NodeKeys::load_or_create(root.path()).unwrap_err();
    assert_names(&err, IDENTITY_KEY_FILE);
}

#[test]
fn corrupted_key_bytes_change_the_public_key_but_load() {
    // Raw keys have no checksum: any 32 bytes are a valid key. The loader
    // must at least reproduce exactly what is on disk.
    let root = fresh_dir();
    let (before, _) = NodeKeys::load_or_create(root.path()).unwrap();
    let path = root.path().join(LINK_KEY_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[1] ^= 1; // not bit 0 of byte 0: X25519 clamps that away
    fs::write(&path, &bytes).unwrap();
    let (after, _) = NodeKeys::load_or_create(root.path()).unwrap();
    assert_ne!(before.public().link, after.public().link);
    assert_eq!(before.public().identity, after.public().identity);
}
