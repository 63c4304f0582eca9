//! Connecting to a running daemon: over its Unix socket (the default) or a TCP endpoint, optionally presenting a
//! bearer token. Used by `rnctl`, by tests, and by any Rust program that drives a node.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where a daemon's control API listens.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    /// An `http://host:port` URL.
    Tcp(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(url) => f.write_str(url),
        }
    }
}

/// Opens a channel to the daemon. Connects eagerly, so an absent daemon is reported here rather than at the
/// first call.
pub async fn connect(target: &Target) -> Result<Channel, tonic::transport::Error> {
    match target {
        Target::Unix(path) => connect_unix(path).await,
        Target::Tcp(url) => Endpoint::from_shared(url.clone())?.connect().await,
    }
}

/// Opens a channel over a Unix domain socket.
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by the HTTP/2 layer but never resolved: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Fails if the token cannot be sent as an HTTP header value.
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        match token {
            None => Ok(Self(None)),
            Some(token) => {
                format!("Bearer {token}").parse().map(|value| Self(Some(value))).map_err(|_| InvalidToken)
            }
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A token holding characters that cannot travel in an HTTP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidToken;

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the token must be printable ASCII without spaces")
    }
}

impl std::error::Error for InvalidToken {}
