//! The node's UDP socket as quinn sees it: quinn's own tokio socket, except that it never offers to send
//! several datagrams in one system call (GSO).
//!
//! quinn gives every connection a send buffer sized for the largest batch it may hand to the socket at once,
//! and never shrinks it: with GSO that is up to ten datagrams, about 12–15 KiB per connection for as long as the
//! connection lives, most of it unused by a protocol whose messages fit in a packet or two. Batching only speeds
//! up bulk transfers, which this transport does not carry. Receiving is unchanged (GRO, when the kernel offers
//! it, costs per-endpoint buffers, not per-connection ones).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// A socket that sends one datagram per call and otherwise forwards to quinn's socket.
pub(super) struct SingleDatagramSocket {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl SingleDatagramSocket {
    pub(super) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for SingleDatagramSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleDatagramSocket").field("local_addr", &self.inner.local_addr().ok()).finish()
    }
}

impl AsyncUdpSocket for SingleDatagramSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
