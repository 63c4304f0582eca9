//! KRPC with our own mainline node, from a second UDP socket of this process: the workaround that makes a
//! lone node findable and lets it find who announced to it.
//!
//! mainline never stores our announce in its own server and never reads its own server in a lookup. That is
//! right in a large DHT, where our node is rarely among the closest to a topic, and wrong in the small networks
//! this daemon builds: a public seed whose only DHT contacts are read-only nodes behind NATs stores its announce
//! nowhere (nobody can find it), and the first node of a network, or one whose bootstrap does not answer, never
//! learns of the announces others stored at it. So, while our node serves the DHT, each announce is also sent
//! to ourselves (`get_peers` for a token, then `announce_peer`, from a socket bound to the IP others reach us
//! on, so the server stores `IP:port` like anyone else's announce), and each lookup also reads our own store
//! (`get_peers`). Both cost two datagrams on the host and answer within a millisecond.
//!
//! The replies come from our own node, but the socket that receives them is an ordinary UDP socket: a reply
//! counts only if it comes from our node's address and echoes our transaction id, and it is decoded with a
//! size limit; anything else is ignored.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::wire::{self, KrpcReply, KrpcResponse};

/// Our node answers within its socket poll; more than this means it does not answer at all (not a server).
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub(super) enum OwnNodeError {
    #[error("cannot open a UDP socket on {ip}: {source}")]
    Bind { ip: Ipv4Addr, source: std::io::Error },
    #[error("cannot send to our own DHT node at {to}: {source}")]
    Send { to: SocketAddrV4, source: std::io::Error },
    #[error(
        "our own DHT node did not answer its {query} within {REPLY_TIMEOUT:?} (it answers only in server mode)"
    )]
    NoAnswer { query: &'static str },
    #[error("our own DHT node refused the {query}: {code} {message}")]
    Refused { query: &'static str, code: i64, message: String },
    #[error("our own DHT node's {query} answer carried no token")]
    NoToken { query: &'static str },
}

/// Where our mainline node listens, and the requester id we use towards it.
#[derive(Debug, Clone)]
pub(super) struct OwnNode {
    dht: SocketAddrV4,
    /// Whether our node may serve at all (a DHT client never does, whatever mainline's adaptive mode says).
    serves: bool,
    /// Random per process; the requester id of each query derives from it and the sending IP
    /// ([`wire::own_query_id`]): the server keys stored peers by requester id, so a re-announce replaces ours
    /// and the announces under different IPs do not replace each other.
    seed: [u8; 16],
}

impl OwnNode {
    pub(super) fn new(dht: SocketAddrV4, serves: bool) -> Self {
        let mut seed = [0u8; 16];
        // Without randomness the seed is all zeros: still one id per IP, which is all it must be.
        let _ = getrandom::fill(&mut seed);
        OwnNode { dht, serves, seed }
    }

    /// Whether our own node may answer us; mainline's own `server_mode` says whether it does now.
    pub(super) fn serves(&self) -> bool {
        self.serves
    }

    fn requester_id(&self, from: Ipv4Addr) -> [u8; 20] {
        let mut seed = self.seed.to_vec();
        seed.extend_from_slice(&from.octets());
        wire::own_query_id(&seed)
    }

    /// The IPs to store our announce under: the DHT socket's own IP when it is bound to one (loopback
    /// networks included), else every global IPv4 address of this host's interfaces. A host with only private
    /// addresses is behind a NAT: the DHT nodes it announces to store its public address, and an announce
    /// under a private address would send every other peer to an address it cannot reach.
    pub(super) fn announce_ips(&self) -> Vec<Ipv4Addr> {
        if !self.dht.ip().is_unspecified() {
            return vec![*self.dht.ip()];
        }
        let Ok(interfaces) = if_addrs::get_if_addrs() else { return Vec::new() };
        let mut ips: Vec<Ipv4Addr> = interfaces
            .iter()
            .filter_map(|interface| match interface.ip() {
                IpAddr::V4(ip) if !crate::nat::observed::is_private(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            })
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Stores `from:port` under `info_hash` in our own node's server.
    pub(super) async fn announce(
        &self,
        from: Ipv4Addr,
        info_hash: &mainline::Id,
        port: u16,
    ) -> Result<(), OwnNodeError> {
        let to = self.address_from(from);
        let socket = bind(from).await?;
        let token = {
            let tid = transaction_id();
            let query = wire::get_peers_query(tid, &self.requester_id(from), info_hash.as_bytes());
            let reply = exchange(&socket, to, &query, tid).await?;
            checked(reply, "get_peers")?.token.ok_or(OwnNodeError::NoToken { query: "get_peers" })?
        };
        let tid = transaction_id();
        let query = wire::announce_query(tid, &self.requester_id(from), info_hash.as_bytes(), port, &token);
        checked(exchange(&socket, to, &query, tid).await?, "announce_peer")?;
        Ok(())
    }

    /// The peers others announced under `info_hash` at our own node (ours among them, if stored).
    pub(super) async fn stored_peers(
        &self,
        info_hash: &mainline::Id,
    ) -> Result<Vec<SocketAddrV4>, OwnNodeError> {
        let from = if self.dht.ip().is_unspecified() { Ipv4Addr::LOCALHOST } else { *self.dht.ip() };
        let to = self.address_from(from);
        let socket = bind(from).await?;
        let tid = transaction_id();
        let query = wire::get_peers_query(tid, &self.requester_id(from), info_hash.as_bytes());
        Ok(checked(exchange(&socket, to, &query, tid).await?, "get_peers")?.values)
    }

    /// Our node as seen from a socket on `from`: a wildcard-bound node is reached on the sender's own IP.
    fn address_from(&self, from: Ipv4Addr) -> SocketAddrV4 {
        if self.dht.ip().is_unspecified() { SocketAddrV4::new(from, self.dht.port()) } else { self.dht }
    }
}

async fn bind(ip: Ipv4Addr) -> Result<UdpSocket, OwnNodeError> {
    UdpSocket::bind(SocketAddrV4::new(ip, 0)).await.map_err(|source| OwnNodeError::Bind { ip, source })
}

/// Sends `query` and waits for the reply that comes from `to` and echoes `tid`.
async fn exchange(
    socket: &UdpSocket,
    to: SocketAddrV4,
    query: &[u8],
    tid: [u8; 4],
) -> Result<KrpcReply, OwnNodeError> {
    socket.send_to(query, to).await.map_err(|source| OwnNodeError::Send { to, source })?;
    let query_name =
        if query.windows(13).any(|w| w == b"announce_peer") { "announce_peer" } else { "get_peers" };
    let wait = async {
        let mut buffer = vec![0u8; wire::MAX_KRPC_REPLY_BYTES];
        loop {
            let Ok((len, sender)) = socket.recv_from(&mut buffer).await else { continue };
            if sender != SocketAddr::V4(to) {
                continue;
            }
            match wire::parse_krpc_reply(&buffer[..len]) {
                Some(reply) if reply.transaction_id == tid => return reply,
                Some(_) => {}
                None => tracing::debug!("undecodable reply from our own DHT node; ignored"),
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, wait).await.map_err(|_| OwnNodeError::NoAnswer { query: query_name })
}

fn transaction_id() -> [u8; 4] {
    let mut tid = [0u8; 4];
    let _ = getrandom::fill(&mut tid);
    tid
}

/// The response of a reply, or the refusal as an error.
fn checked(reply: KrpcReply, query: &'static str) -> Result<KrpcResponse, OwnNodeError> {
    reply.outcome.map_err(|refusal| OwnNodeError::Refused {
        query,
        code: refusal.code,
        message: refusal.message,
    })
}
