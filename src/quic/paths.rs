//! The endpoint's socket: the node's one UDP socket (sending one datagram per call), plus relayed paths that
//! look like UDP to QUIC.
//!
//! A connection through a relay is an ordinary QUIC connection between the two peers, end to end (their own
//! TLS, their own keys), whose packets travel inside a stream of each side's connection to the relay instead
//! of in UDP datagrams. quinn sends and receives through [`PathSocket`]: packets for a relayed peer are
//! addressed to a synthetic address that stands for the relay circuit, and [`PathSocket`] hands them to that
//! circuit instead of the network; packets arriving over a circuit are received as if from that address.
//!
//! Synthetic addresses come from 240.0.0.0/4 (reserved by RFC 1112 §4, "class E"), which no host can have, so
//! a synthetic address never shadows a real peer and a real datagram can never claim to come from one.
//!
//! The socket also keeps the few datagrams that are not QUIC (`wire::datagram`) away from quinn: it answers
//! address reflection requests itself (rate-limited) and drops the rest, such as stray birthday probes. It also
//! takes the replies to the KRPC pings sent from it ([`KrpcWaiters`]): a DHT node's answer states the address
//! our packets came from, which measures our NAT's mapping towards a second port of a peer.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::source_limit::{Rate, SourceLimiter};
use crate::sync::lock;
use crate::wire;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// Packets received over circuits and not yet read by QUIC; beyond this they are dropped, as a full socket
/// buffer drops datagrams.
const MAX_QUEUED_PACKETS: usize = 1024;
/// Sources whose reflection budget is tracked at once (see [`SourceLimiter`]).
const REFLECTION_SOURCES: usize = 4096;

/// Whether `address` stands for a relay circuit.
pub fn is_relayed(address: &SocketAddr) -> bool {
    matches!(address, SocketAddr::V4(v4) if v4.ip().octets()[0] >= 240 && !v4.ip().is_broadcast())
}

/// The relay circuits of one endpoint, shared by its socket and by whoever opens and accepts circuits.
#[derive(Default)]
pub struct RelayPaths {
    next: AtomicU32,
    /// Whether any circuit exists: while none does (most of the time), receiving skips the circuit queue and
    /// its lock entirely, so the UDP path costs one relaxed load more than a bare socket.
    active: std::sync::atomic::AtomicBool,
    circuits: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    received: Mutex<Received>,
}

#[derive(Default)]
struct Received {
    packets: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

impl fmt::Debug for RelayPaths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayPaths").field("circuits", &lock(&self.circuits).len()).finish()
    }
}

impl RelayPaths {
    /// Registers a circuit: packets QUIC sends to the returned address go into `outgoing`.
    pub fn register(&self, outgoing: mpsc::Sender<Vec<u8>>) -> SocketAddr {
        // 2^28 addresses × 65535 ports: a counter never wraps into a live circuit in practice, and the
        // map check below makes sure of it.
        let mut circuits = lock(&self.circuits);
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let ip = Ipv4Addr::from(0xF000_0000 | (n >> 16 & 0x0FFF_FFFF));
            let port = (n & 0xFFFF) as u16;
            let address = SocketAddr::V4(SocketAddrV4::new(ip, port.max(1)));
            if let std::collections::hash_map::Entry::Vacant(slot) = circuits.entry(address) {
                slot.insert(outgoing);
                self.active.store(true, Ordering::Release);
                return address;
            }
        }
    }

    /// Forgets a circuit; packets to it are dropped from now on.
    pub fn unregister(&self, address: &SocketAddr) {
        let mut circuits = lock(&self.circuits);
        circuits.remove(address);
        // Packets still queued are read before the flag is checked again (see `poll_recv`); clearing it only
        // with the map empty keeps a delivered packet from waiting for the next UDP datagram.
        if circuits.is_empty() && lock(&self.received).packets.is_empty() {
            self.active.store(false, Ordering::Release);
        }
    }

    /// A packet that arrived over the circuit `from`, to be read by QUIC.
    pub fn deliver(&self, from: SocketAddr, packet: Vec<u8>) {
        let mut received = lock(&self.received);
        if received.packets.len() >= MAX_QUEUED_PACKETS {
            return;
        }
        received.packets.push_back((from, packet));
        if let Some(waker) = received.waker.take() {
            waker.wake();
        }
    }

    fn send(&self, transmit: &Transmit<'_>) {
        let Some(circuit) = lock(&self.circuits).get(&transmit.destination).cloned() else { return };
        let size = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for datagram in transmit.contents.chunks(size) {
            // A full circuit drops the packet, like a full network queue; QUIC's loss recovery takes over.
            let _ = circuit.try_send(datagram.to_vec());
        }
    }
}

/// KRPC pings sent from the node's socket and awaiting their reply. Empty almost always (a probe is a round
/// trip, a few times per NAT probe), and then the receive path costs one relaxed load.
#[derive(Debug, Default)]
pub struct KrpcWaiters {
    active: std::sync::atomic::AtomicBool,
    waiting: Mutex<Vec<KrpcWaiter>>,
}

#[derive(Debug)]
struct KrpcWaiter {
    from: SocketAddr,
    transaction_id: [u8; 4],
    reply: tokio::sync::oneshot::Sender<SocketAddrV4>,
}

/// Pings awaiting a reply at once; the oldest is given up beyond this.
const MAX_KRPC_WAITERS: usize = 16;

impl KrpcWaiters {
    /// Registers a ping to `from` with `transaction_id`; the receiver gets the address the reply states.
    pub fn expect(
        &self,
        from: SocketAddr,
        transaction_id: [u8; 4],
    ) -> tokio::sync::oneshot::Receiver<SocketAddrV4> {
        let (reply, receiver) = tokio::sync::oneshot::channel();
        let mut waiting = lock(&self.waiting);
        waiting.retain(|waiter| !waiter.reply.is_closed());
        if waiting.len() >= MAX_KRPC_WAITERS {
            waiting.remove(0);
        }
        waiting.push(KrpcWaiter { from, transaction_id, reply });
        self.active.store(true, Ordering::Release);
        receiver
    }

    /// Gives up waiting for the reply to the ping with `transaction_id` (answered or timed out).
    pub fn forget(&self, transaction_id: [u8; 4]) {
        let mut waiting = lock(&self.waiting);
        waiting.retain(|waiter| waiter.transaction_id != transaction_id && !waiter.reply.is_closed());
        self.active.store(!waiting.is_empty(), Ordering::Release);
    }

    /// Whether `datagram` from `from` is the reply to a waiting ping; if so, hands the address it states to
    /// the waiter. Only a well-formed reply from the pinged address with the ping's transaction id counts.
    fn take(&self, from: SocketAddr, datagram: &[u8]) -> bool {
        if !self.active.load(Ordering::Acquire) || datagram.first() != Some(&b'd') {
            return false;
        }
        let mut waiting = lock(&self.waiting);
        if !waiting.iter().any(|waiter| waiter.from == from) {
            return false;
        }
        let Some(reply) = wire::parse_krpc_reply(datagram) else { return false };
        let Some(index) =
            waiting.iter().position(|w| w.from == from && w.transaction_id[..] == reply.transaction_id[..])
        else {
            return false;
        };
        let waiter = waiting.swap_remove(index);
        if let Some(requester) = reply.requester {
            let _ = waiter.reply.send(requester);
        }
        self.active.store(!waiting.is_empty(), Ordering::Release);
        true
    }
}

/// The endpoint's socket: the real UDP socket, and the relay circuits.
#[derive(Debug)]
pub struct PathSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    paths: Arc<RelayPaths>,
    krpc: Arc<KrpcWaiters>,
    /// Budgets of reflection answers, per asking IP and overall.
    reflections: Mutex<SourceLimiter>,
}

impl PathSocket {
    /// `reflections`: the token buckets of address reflections, per IP and for everyone together.
    pub fn new(
        udp: Arc<dyn AsyncUdpSocket>,
        paths: Arc<RelayPaths>,
        krpc: Arc<KrpcWaiters>,
        (per_ip, total): (Rate, Rate),
    ) -> Self {
        let reflections = SourceLimiter::new(per_ip, total, REFLECTION_SOURCES);
        Self { udp, paths, krpc, reflections: Mutex::new(reflections) }
    }

    /// New budgets for address reflections, from the next one on.
    pub fn set_reflection_rates(&self, (per_ip, total): (Rate, Rate)) {
        lock(&self.reflections).set_rates(per_ip, total);
    }

    /// Handles a datagram that is not QUIC: answers a reflection request (within the rate limit) and drops
    /// everything else. Nothing is sent back for anything malformed.
    fn handle_control(&self, from: SocketAddr, datagram: &[u8]) {
        let Some(nonce) = wire::parse_reflect_request(datagram) else { return };
        if !lock(&self.reflections).allow(from.ip(), Instant::now()) {
            return;
        }
        let reply = wire::reflect_reply(&nonce, from);
        let transmit =
            Transmit { destination: from, ecn: None, contents: &reply, segment_size: None, src_ip: None };
        // A full socket buffer loses the answer, as the network could; the asker tries again.
        let _ = self.udp.try_send(&transmit);
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // Circuits never block a sender (they drop instead), so writability is the UDP socket's.
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if is_relayed(&transmit.destination) {
            self.paths.send(transmit);
            return Ok(());
        }
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if self.paths.active.load(Ordering::Acquire) {
            let mut received = lock(&self.paths.received);
            if let (Some((from, packet)), Some(buf), Some(slot)) =
                (received.packets.pop_front(), bufs.first_mut(), meta.first_mut())
            {
                let len = packet.len().min(buf.len());
                buf[..len].copy_from_slice(&packet[..len]);
                *slot = RecvMeta { addr: from, len, stride: len, ecn: None, dst_ip: None };
                return Poll::Ready(Ok(1));
            }
            // Registered before polling the UDP socket, so a packet delivered meanwhile wakes us.
            if !received.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                received.waker = Some(cx.waker().clone());
            }
        }
        match self.udp.poll_recv(cx, bufs, meta) {
            // A datagram from the network claiming a synthetic source is forged: drop it (keep polling). Our
            // own non-QUIC datagrams are handled here and never reach quinn (a coalesced batch, where `stride`
            // is less than `len`, is QUIC's: ours are never sent back to back in equal sizes to one socket).
            Poll::Ready(Ok(n)) => {
                let mut kept = 0;
                for i in 0..n {
                    let datagram = &bufs[i][..meta[i].len.min(bufs[i].len())];
                    let control = meta[i].stride >= meta[i].len && wire::is_control_datagram(datagram);
                    if control {
                        self.handle_control(meta[i].addr, datagram);
                    } else if self.krpc.take(meta[i].addr, datagram) {
                        // The reply to one of our KRPC pings: taken, not QUIC's.
                    } else if !is_relayed(&meta[i].addr) {
                        meta.swap(kept, i);
                        bufs.swap(kept, i);
                        kept += 1;
                    }
                }
                if kept == 0 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Ok(kept))
            }
            other => other,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// One datagram per send call, never a GSO batch: quinn gives every connection a send buffer sized for the
    /// largest batch the socket takes at once and never shrinks it (up to ten datagrams, 12–15 KiB per
    /// connection for its whole life), while batching only pays off for bulk transfers, which this transport
    /// does not carry. Receiving is unchanged (GRO buffers are per endpoint, not per connection).
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_addresses_are_class_e_and_unique() {
        let paths = RelayPaths::default();
        let (tx, _rx) = mpsc::channel(1);
        let a = paths.register(tx.clone());
        let b = paths.register(tx);
        assert_ne!(a, b);
        assert!(is_relayed(&a) && is_relayed(&b));
        assert!(!is_relayed(&"203.0.113.7:30906".parse().unwrap()));
        assert!(!is_relayed(&"255.255.255.255:1".parse().unwrap()));
        assert!(!is_relayed(&"[2001:db8::1]:1".parse().unwrap()));
    }

    #[test]
    fn packets_to_a_circuit_are_split_per_datagram_and_dropped_when_full_or_gone() {
        let paths = RelayPaths::default();
        let (tx, mut rx) = mpsc::channel(2);
        let address = paths.register(tx);
        let contents = [1u8, 2, 3, 4, 5];
        let transmit = Transmit {
            destination: address,
            ecn: None,
            contents: &contents,
            segment_size: Some(2),
            src_ip: None,
        };
        paths.send(&transmit);
        assert_eq!(rx.try_recv().unwrap(), vec![1, 2]);
        assert_eq!(rx.try_recv().unwrap(), vec![3, 4]);
        // The third datagram did not fit in the circuit's queue of two: dropped, not blocking.
        assert!(rx.try_recv().is_err());
        paths.unregister(&address);
        paths.send(&transmit);
        assert!(rx.try_recv().is_err());
    }
}
