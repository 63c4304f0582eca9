//! Caps and timeouts of the daemon's local servers (the control socket, the control TCP listener and the
//! monitoring HTTP port), shared by the servers and changed in place when the config is reloaded.
//!
//! Each server holds one [`ServerLimits`]: a connection it accepts takes an [`OpenConnection`] slot, or is
//! closed at once when none is free, so that idle or stalled clients can never take every file descriptor the
//! daemon (and its database) needs. [`IdleTimeout`] ends a connection on which nothing was read or written for
//! the idle timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::config::declared;

/// The limits of one server, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimitSettings {
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// How long a new connection may take to send its first request's headers (for the control API, the
    /// HTTP/2 preface too).
    pub handshake_timeout: Duration,
    /// How long a connection may stay without a request in progress before it is closed.
    pub idle_timeout: Duration,
}

impl ServerLimitSettings {
    /// The control API's defaults (`control.*` in [`crate::config`]).
    pub fn control() -> Self {
        Self::declared(["control.max_connections", "control.handshake_timeout", "control.idle_timeout"])
    }

    /// The monitoring port's defaults (`monitoring.*` in [`crate::config`]).
    pub fn monitoring() -> Self {
        Self::declared([
            "monitoring.max_connections",
            "monitoring.handshake_timeout",
            "monitoring.idle_timeout",
        ])
    }

    fn declared([max_connections, handshake_timeout, idle_timeout]: [&str; 3]) -> Self {
        Self {
            max_connections: declared::count(max_connections),
            handshake_timeout: declared::duration(handshake_timeout),
            idle_timeout: declared::duration(idle_timeout),
        }
    }
}

/// A server's limits in force, changed in place by [`ServerLimits::set`], with the count of its open
/// connections.
#[derive(Debug)]
pub struct ServerLimits {
    max_connections: AtomicUsize,
    handshake_timeout_ms: AtomicU64,
    idle_timeout_ms: AtomicU64,
    open: AtomicUsize,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl ServerLimits {
    pub fn new(settings: ServerLimitSettings) -> Arc<Self> {
        let limits = Self {
            max_connections: AtomicUsize::new(0),
            handshake_timeout_ms: AtomicU64::new(0),
            idle_timeout_ms: AtomicU64::new(0),
            open: AtomicUsize::new(0),
        };
        limits.set(settings);
        Arc::new(limits)
    }

    /// Puts new limits in force. Connections already open beyond a lowered cap stay until they close; the
    /// timeouts apply to every connection from its next wait on.
    pub fn set(&self, settings: ServerLimitSettings) {
        self.max_connections.store(settings.max_connections, Ordering::Relaxed);
        self.handshake_timeout_ms.store(millis(settings.handshake_timeout), Ordering::Relaxed);
        self.idle_timeout_ms.store(millis(settings.idle_timeout), Ordering::Relaxed);
    }

    pub fn settings(&self) -> ServerLimitSettings {
        ServerLimitSettings {
            max_connections: self.max_connections.load(Ordering::Relaxed),
            handshake_timeout: self.handshake_timeout(),
            idle_timeout: self.idle_timeout(),
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// Connections holding a slot now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a new connection, or `None` when the cap is reached.
    pub fn try_open(self: &Arc<Self>) -> Option<OpenConnection> {
        let max = self.max_connections.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1))
            .ok()?;
        Some(OpenConnection(self.clone()))
    }
}

/// One connection's slot; freed when dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<ServerLimits>);

impl OpenConnection {
    pub fn limits(&self) -> &ServerLimits {
        &self.0
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection that fails its pending read with [`io::ErrorKind::TimedOut`] once nothing was read or written
/// for the idle timeout of its server's limits (read again at each reset, so a reload applies). It holds its
/// slot for as long as it lives.
#[derive(Debug)]
pub struct IdleTimeout<S> {
    inner: S,
    slot: OpenConnection,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, slot: OpenConnection) -> Self {
        let deadline = Box::pin(tokio::time::sleep(slot.limits().idle_timeout()));
        Self { inner, slot, deadline }
    }

    fn activity(&mut self) {
        let idle = self.slot.limits().idle_timeout();
        self.deadline.as_mut().reset(Instant::now() + idle);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.activity();
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, data);
        if written.is_ready() {
            this.activity();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn settings(max_connections: usize, idle: Duration) -> ServerLimitSettings {
        ServerLimitSettings { max_connections, handshake_timeout: Duration::from_secs(1), idle_timeout: idle }
    }

    #[test]
    fn slots_are_capped_freed_and_follow_a_new_cap() {
        let limits = ServerLimits::new(settings(2, Duration::from_secs(1)));
        let (a, b) = (limits.try_open(), limits.try_open());
        assert!(a.is_some() && b.is_some());
        assert!(limits.try_open().is_none(), "a third connection over a cap of two");
        drop(a);
        assert_eq!(limits.open_connections(), 1);
        assert!(limits.try_open().is_some());
        limits.set(settings(1, Duration::from_secs(1)));
        assert!(limits.try_open().is_none(), "lowered cap, one still open");
        assert_eq!(limits.settings().max_connections, 1);
    }

    #[tokio::test]
    async fn a_connection_without_traffic_times_out_and_traffic_keeps_it() {
        let limits = ServerLimits::new(settings(4, Duration::from_secs(2)));
        let (client, server) = tokio::io::duplex(64);
        let mut server = IdleTimeout::new(server, limits.try_open().expect("slot"));
        let mut client = client;
        let mut buf = [0u8; 8];
        // Traffic every 0.5 s for 3 s, longer than the idle timeout in all.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            client.write_all(b"ping").await.expect("write");
            assert_eq!(server.read(&mut buf).await.expect("read"), 4);
        }
        let error = server.read(&mut buf).await.expect_err("idle");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(server);
        assert_eq!(limits.open_connections(), 0, "the slot is freed with the connection");
    }
}
