//! The shared key both hosts hold, used only to authenticate lanes (HMAC-SHA256, see
//! [`handshake`](crate::handshake)).
//!
//! A key file is raw bytes, used as they are (a trailing newline is part of the key): at
//! least [`MIN_KEY_LEN`] and at most [`MAX_KEY_LEN`] bytes, a regular file, and not
//! readable or writable by group or others (`mode & 0o077 == 0`). [`Key::generate`] writes
//! [`GENERATED_KEY_LEN`] random bytes with mode `0600`. Copy the same file to both hosts.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Shortest accepted key.
pub const MIN_KEY_LEN: usize = 16;
/// Longest accepted key file (a larger file is probably not a key).
pub const MAX_KEY_LEN: usize = 4096;
/// Length of keys made by [`Key::generate`].
pub const GENERATED_KEY_LEN: usize = 32;

/// What is wrong with a key file. Each message says how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be opened.
    #[error("cannot open key file {path}")]
    Open {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the file failed.
    #[error("cannot read key file {path}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path is a directory, device, FIFO...
    #[error("key file {path} is not a regular file")]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// Group or others may read or write the file.
    #[error(
        "key file {path} has mode {mode:04o}, so group or others may read or write it; \
         the key must be private to its owner: run `chmod 600 {path}`"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is shorter than [`MIN_KEY_LEN`].
    #[error(
        "key file {path} holds {len} bytes, but a key needs at least {MIN_KEY_LEN}; \
         make a new one (e.g. `head -c 32 /dev/urandom > {path} && chmod 600 {path}`) \
         and copy it to both hosts"
    )]
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The file is longer than [`MAX_KEY_LEN`].
    #[error(
        "key file {path} holds {len} bytes, more than the {MAX_KEY_LEN} a key may have; \
         is this the right file?"
    )]
    TooLong {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// An in-memory key of the wrong length.
    #[error("a key must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes, got {len}")]
    BadLength {
        /// The length given.
        len: usize,
    },
    /// [`Key::generate`] would overwrite a file.
    #[error("refusing to overwrite existing file {path}; remove it first or choose another path")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// [`Key::generate`] could not create or write the file.
    #[error("cannot write key file {path}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The operating system's random source failed.
    #[error("cannot get random bytes for a new key")]
    Random(#[source] rand::Error),
}

/// A shared secret. `Debug` shows its length, never its bytes.
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Loads a key file, checking that it is a private regular file of a sensible length.
    pub fn load(path: impl AsRef<Path>) -> Result<Key, KeyError> {
        let path = path.as_ref();
        let p = || path.to_path_buf();
        let file = File::open(path).map_err(|source| KeyError::Open { path: p(), source })?;
        // Checks on the opened file, not the path, so they describe what we read.
        let meta = file
            .metadata()
            .map_err(|source| KeyError::Read { path: p(), source })?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile { path: p() });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: p(), mode });
        }
        check_file_len(path, meta.len())?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_KEY_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| KeyError::Read { path: p(), source })?;
        // The file may have changed since fstat.
        check_file_len(path, bytes.len() as u64)?;
        Ok(Key { bytes })
    }

    /// Creates a new key file with [`GENERATED_KEY_LEN`] random bytes and mode `0600`.
    /// Refuses to overwrite an existing file.
    pub fn generate(path: impl AsRef<Path>) -> Result<Key, KeyError> {
        let path = path.as_ref();
        let mut bytes = vec![0u8; GENERATED_KEY_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(KeyError::Random)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_path_buf(),
                },
                _ => KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let written = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            });
        if let Err(e) = written {
            // Do not leave a partial key behind; the write error is what matters.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Key { bytes })
    }

    /// A key from bytes already in memory (tests, keys from a secret store).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            Ok(Key {
                bytes: bytes.to_vec(),
            })
        } else {
            Err(KeyError::BadLength { len: bytes.len() })
        }
    }

    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a key has at least [`MIN_KEY_LEN`] bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // Best effort: do not leave the key in freed memory.
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

fn check_file_len(path: &Path, len: u64) -> Result<(), KeyError> {
    if len < MIN_KEY_LEN as u64 {
        Err(KeyError::TooShort {
            path: path.to_path_buf(),
            len,
        })
    } else if len > MAX_KEY_LEN as u64 {
        Err(KeyError::TooLong {
            path: path.to_path_buf(),
            len,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn generate_then_load_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let k = Key::generate(&path).unwrap();
        assert_eq!(k.len(), GENERATED_KEY_LEN);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Key::load(&path).unwrap();
        assert_eq!(loaded.bytes(), k.bytes());
        // Two keys are not the same bytes.
        let other = Key::generate(dir.path().join("key2")).unwrap();
        assert_ne!(other.bytes(), k.bytes());
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_with_mode(&path, b"precious contents here", 0o600);
        let err = Key::generate(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"));
        assert_eq!(fs::read(&path).unwrap(), b"precious contents here");
    }

    #[test]
    fn load_rejects_group_or_other_access_and_says_chmod_600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            write_with_mode(&path, &[1; 32], mode);
            let err = Key::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { mode: m, .. } if m == mode));
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
        for mode in [0o600, 0o400] {
            write_with_mode(&path, &[1; 32], mode);
            assert!(Key::load(&path).is_ok(), "mode {mode:o}");
        }
    }

    #[test]
    fn load_checks_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        for len in [0usize, 1, 15] {
            write_with_mode(&path, &vec![9; len], 0o600);
            let err = Key::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::TooShort { len: l, .. } if l == len as u64));
            assert!(err.to_string().contains("at least 16"), "{err}");
        }
        write_with_mode(&path, &[9; 16], 0o600);
        assert_eq!(Key::load(&path).unwrap().len(), 16);
        write_with_mode(&path, &vec![9; MAX_KEY_LEN + 1], 0o600);
        assert!(matches!(
            Key::load(&path).unwrap_err(),
            KeyError::TooLong { .. }
        ));
    }

    #[test]
    fn load_reports_missing_file_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = Key::load(&missing).unwrap_err();
        assert!(matches!(err, KeyError::Open { .. }));
        assert!(err.to_string().contains("nope"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            Key::load(dir.path()).unwrap_err(),
            KeyError::NotAFile { .. }
        ));
    }

    #[test]
    fn debug_does_not_show_key_bytes() {
        let k = Key::from_bytes(b"SECRETSECRETSECRET").unwrap();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("SECRET") && !dbg.contains("83"), "{dbg}");
        assert!(dbg.contains("len: 18"));
        assert!(Key::from_bytes(&[0; 15]).is_err());
    }
}
