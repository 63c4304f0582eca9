//! Where the control API listens: a Unix socket (default, mode 0660) and optionally TCP guarded by a bearer
//! token.
//!
//! The socket is guarded by a lock file beside it, held for the daemon's lifetime. A socket file left by a
//! crashed daemon has no lock holder and is replaced; a live daemon's socket is never taken over. The new socket
//! is bound under a temporary name, given its mode, then renamed into place, so clients never see it half-made.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::config::TokenSource;
use crate::lifecycle::{ExclusiveLock, LockError};

/// Mode of the control socket: the daemon's user and group may connect.
const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{path} exists and is not a socket; remove it or choose another path with --control-socket")]
    NotASocket { path: PathBuf },
    #[error(
        "another process is accepting connections on {path} although no remote-network holds its lock; stop \
         it, or choose another path with --control-socket"
    )]
    InUse { path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Tcp { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("control token: {0}")]
    Token(String),
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(String),
}

/// The bound control socket. Dropping it removes the socket file; the lock is released last.
#[derive(Debug)]
pub struct ControlSocket {
    listener: Option<tokio::net::UnixListener>,
    path: PathBuf,
    _lock: ExclusiveLock,
}

impl ControlSocket {
    /// Binds the socket at `path`, replacing a stale one. Must run inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, TransportError> {
        let io = |action, p: &Path| {
            let p = p.to_path_buf();
            move |source| TransportError::Io { action, path: p, source }
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // Group members need to traverse the directory to reach the socket.
        fs::create_dir_all(dir).map_err(io("create directory", dir))?;

        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock =
            ExclusiveLock::acquire(Path::new(&lock_name), &format!("control socket {}", path.display()))?;

        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // We hold the lock, so no remote-network owns this socket; make sure nothing else does either.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(TransportError::InUse { path: path.to_path_buf() });
                }
                tracing::info!(path = %path.display(), "replacing a stale control socket");
            }
            Ok(_) => return Err(TransportError::NotASocket { path: path.to_path_buf() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspect", path)(e)),
        }

        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let listener = tokio::net::UnixListener::bind(&tmp).map_err(io("bind", &tmp))?;
        let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io("set permissions of", &tmp))
            .and_then(|()| fs::rename(&tmp, path).map_err(io("move socket into", path)));
        if let Err(e) = placed {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Self { listener: Some(listener), path: path.to_path_buf(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the listener to the server; the file stays owned (and cleaned up) by `self`.
    pub fn take_listener(&mut self) -> Option<tokio::net::UnixListener> {
        self.listener.take()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Still ours: the lock kept every other daemon from replacing it.
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads the bearer token from config. A token file must not be readable by others, like the node key.
pub fn load_token(source: &TokenSource) -> Result<String, TransportError> {
    let token = match source {
        TokenSource::Inline(token) => token.clone(),
        TokenSource::File(path) => {
            let meta = fs::metadata(path).map_err(|source| TransportError::Io {
                action: "read token file",
                path: path.clone(),
                source,
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                return Err(TransportError::Token(format!(
                    "{} is accessible to every user (mode {mode:04o}); run `chmod 640 {}`",
                    path.display(),
                    path.display()
                )));
            }
            let text = fs::read_to_string(path).map_err(|source| TransportError::Io {
                action: "read token file",
                path: path.clone(),
                source,
            })?;
            text.trim().to_owned()
        }
    };
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TransportError::Token(
            "the token must be non-empty printable ASCII without spaces".into(),
        ));
    }
    Ok(token)
}

/// Checks `authorization: Bearer <token>` on every call of the TCP listener. The token can be replaced while
/// the listener runs (on reload); clones share it.
#[derive(Clone)]
pub struct RequireToken {
    expected: std::sync::Arc<std::sync::RwLock<std::sync::Arc<[u8]>>>,
}

impl RequireToken {
    pub fn new(token: &str) -> Self {
        Self { expected: std::sync::Arc::new(std::sync::RwLock::new(token.as_bytes().into())) }
    }

    /// Puts `token` in force for the calls that follow; says whether it differs from the one it replaces.
    pub fn replace(&self, token: &str) -> bool {
        let mut expected = self.expected.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = !constant_time_eq(&expected, token.as_bytes());
        *expected = token.as_bytes().into();
        changed
    }

    fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let given = metadata.get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
        // The scheme is case-insensitive (RFC 9110 section 11.1), the token is not.
        let credentials = match given.iter().position(|&b| b == b' ') {
            Some(space) if given[..space].eq_ignore_ascii_case(b"bearer") => &given[space + 1..],
            _ => &[][..],
        };
        let expected = self.expected.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if !credentials.is_empty() && constant_time_eq(credentials, &expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this control endpoint requires `authorization: Bearer <token>` with the node's control token",
            ))
        }
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Compares without an early exit, so response timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_but_a_live_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        // A crash leaves the socket file behind with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let mut first = ControlSocket::bind(&path).expect("stale socket replaced");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let err = ControlSocket::bind(&path).expect_err("live socket kept");
        assert!(matches!(err, TransportError::Lock(LockError::Busy { .. })), "{err}");
        assert!(first.take_listener().is_some());
        drop(first);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[tokio::test]
    async fn a_regular_file_is_never_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        fs::write(&path, "precious").expect("write");
        let err = ControlSocket::bind(&path).expect_err("not a socket");
        assert!(matches!(err, TransportError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("read"), "precious");
    }

    #[test]
    fn token_check() {
        let check = RequireToken::new("s3cret");
        let mut md = MetadataMap::new();
        assert_eq!(check.check(&md).expect_err("missing").code(), tonic::Code::Unauthenticated);
        md.insert("authorization", "Bearer wrong".parse().expect("ascii"));
        assert!(check.check(&md).is_err());
        md.insert("authorization", "Bearer s3cret".parse().expect("ascii"));
        assert!(check.check(&md).is_ok());
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            md.insert("authorization", format!("{scheme} s3cret").parse().expect("ascii"));
            assert!(check.check(&md).is_ok(), "{scheme}");
        }
        for wrong in ["Bearer S3CRET", "Basic s3cret", "Bearers3cret", "Bearer ", "s3cret"] {
            md.insert("authorization", wrong.parse().expect("ascii"));
            assert!(check.check(&md).is_err(), "{wrong}");
        }
        // A replaced token is in force at once for every clone; the old one no longer is.
        let clone = check.clone();
        assert!(check.replace("n3w"));
        assert!(!check.replace("n3w"));
        md.insert("authorization", "Bearer s3cret".parse().expect("ascii"));
        assert!(clone.check(&md).is_err());
        md.insert("authorization", "Bearer n3w".parse().expect("ascii"));
        assert!(clone.check(&md).is_ok());
    }

    #[test]
    fn world_readable_token_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        fs::write(&path, "s3cret\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(load_token(&TokenSource::File(path.clone())).is_err());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(load_token(&TokenSource::File(path)).expect("token"), "s3cret");
    }
}
