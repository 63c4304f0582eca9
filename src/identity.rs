//! The node's identity: an ed25519 key pair whose public half is the node id.
//!
//! The key is created on first start and stored in the data dir as PKCS#8 PEM (`node.key`, mode 0600), so
//! standard tools can read it. A key file that others can read, or that does not parse, stops the daemon with an
//! error saying what to do: it is never silently replaced, because a new key means a new node id for every peer.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};

use crate::api::names::NodeId;

/// File name of the key inside the data dir.
pub const KEY_FILE: &str = "node.key";

/// The node's key pair.
pub struct Identity {
    signing_key: SigningKey,
    node_id: NodeId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "key file {path} is readable or writable by others (mode {mode:04o}); it holds the node's secret key: \
         run `chmod 600 {path}` and check who could have copied it"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} is not a valid ed25519 PKCS#8 PEM key ({reason}); restore it from a backup, or move it \
         away to create a new identity (peers will then see a new node id)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("key file {path} is not a regular file; move it away")]
    NotAFile { path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the operating system could not provide random bytes for a new key: {0}")]
    Random(String),
}

impl Identity {
    /// Loads the key from `data_dir`, creating it (and the directory, mode 0700) on first start.
    /// Returns the identity and whether it was newly created.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, bool), IdentityError> {
        let path = data_dir.join(KEY_FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => Self::load(&path).map(|identity| (identity, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ensure_private_dir(data_dir)?;
                Self::create(&path).map(|identity| (identity, true))
            }
            Err(source) => Err(IdentityError::Io { action: "inspect", path, source }),
        }
    }

    /// Loads an existing key file, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |action| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { action, path, source }
        };
        let meta = fs::metadata(path).map_err(io("inspect"))?;
        if !meta.is_file() {
            return Err(IdentityError::NotAFile { path: path.to_path_buf() });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::TooOpen { path: path.to_path_buf(), mode });
        }
        let pem = fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                IdentityError::Corrupt { path: path.to_path_buf(), reason: "not text".into() }
            }
            _ => io("read")(e),
        })?;
        let signing_key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| IdentityError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Self::from_signing_key(signing_key))
    }

    /// Creates a new key and writes it with mode 0600. Never overwrites an existing file, so two daemons racing
    /// on a fresh data dir cannot end up with different keys on disk.
    fn create(path: &Path) -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        let signing_key = SigningKey::from_bytes(&seed);
        let pem = signing_key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;

        // Write a temporary file fully, then link it into place: the key file either does not exist or is
        // complete, even if the process dies half-way.
        let tmp = path.with_extension(format!("key.tmp.{}", std::process::id()));
        let io = |action, p: &Path| {
            let p = p.to_path_buf();
            move |source| IdentityError::Io { action, path: p, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let written = file.write_all(pem.as_bytes()).and_then(|()| file.sync_all());
        drop(file);
        let linked = written.and_then(|()| fs::hard_link(&tmp, path));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load(path),
            Err(source) => {
                return Err(IdentityError::Io { action: "write", path: path.to_path_buf(), source });
            }
        }
        if let Some(dir) = path.parent() {
            // Make the new directory entry durable too.
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(Self::from_signing_key(signing_key))
    }

    fn from_signing_key(signing_key: SigningKey) -> Self {
        let node_id = NodeId(signing_key.verifying_key().to_bytes());
        Self { signing_key, node_id }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing_key
    }
}

/// Creates the data dir with mode 0700 if it does not exist yet, and narrows an existing one to 0700: it holds
/// the node's key and its peer database, which only the daemon's user may read.
pub fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |action| move |source| IdentityError::Io { action, path: dir.to_path_buf(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create directory"))?;
    let mode = fs::metadata(dir).map_err(io("inspect"))?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict the mode of"))?;
        tracing::info!(path = %dir.display(), "data dir was open to other users; narrowed to 0700");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_with_the_same_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let (first, created) = Identity::load_or_create(&data).expect("create");
        assert!(created);
        let mode = fs::metadata(data.join(KEY_FILE)).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(&data).expect("stat").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (second, created) = Identity::load_or_create(&data).expect("load");
        assert!(!created);
        assert_eq!(first.node_id(), second.node_id());
    }

    #[test]
    fn world_readable_key_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (identity, _) = Identity::load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        let before = fs::read(&path).expect("read");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Identity::load_or_create(dir.path()).expect_err("must refuse");
        assert!(matches!(err, IdentityError::TooOpen { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
        assert_eq!(fs::read(&path).expect("read"), before);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(Identity::load_or_create(dir.path()).expect("load").0.node_id(), identity.node_id());
    }

    #[test]
    fn corrupt_key_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = Identity::load_or_create(dir.path()).expect_err("must refuse");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(fs::read_to_string(&path).expect("read").contains("garbage"));
    }
}
