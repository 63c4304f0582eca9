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

use serde::Deserialize;
use serde_bytes::ByteBuf;
use tokio::net::UdpSocket;

/// Our node answers within its socket poll; more than this means it does not answer at all (not a server).
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// Larger than any KRPC reply mainline sends (it never sends more than its 2048-byte MTU).
const MAX_REPLY_BYTES: usize = 4096;

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
    /// One id per process: the server keys stored peers by requester id, so a re-announce replaces ours.
    requester_id: [u8; 20],
}

impl OwnNode {
    pub(super) fn new(dht: SocketAddrV4) -> Self {
        let mut requester_id = [0u8; 20];
        // Without randomness the id is all zeros: still one id per process, which is all it must be.
        let _ = getrandom::fill(&mut requester_id);
        OwnNode { dht, requester_id }
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
            let reply =
                exchange(&socket, to, &get_peers_query(tid, &self.requester_id, info_hash), tid).await?;
            reply.checked("get_peers")?.token.ok_or(OwnNodeError::NoToken { query: "get_peers" })?
        };
        let tid = transaction_id();
        let query = announce_query(tid, &self.requester_id, info_hash, port, &token);
        exchange(&socket, to, &query, tid).await?.checked("announce_peer")?;
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
        let reply = exchange(&socket, to, &get_peers_query(tid, &self.requester_id, info_hash), tid).await?;
        Ok(reply.checked("get_peers")?.values.iter().filter_map(|value| compact_peer(value)).collect())
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
) -> Result<Reply, OwnNodeError> {
    socket.send_to(query, to).await.map_err(|source| OwnNodeError::Send { to, source })?;
    let query_name =
        if query.windows(13).any(|w| w == b"announce_peer") { "announce_peer" } else { "get_peers" };
    let wait = async {
        let mut buffer = vec![0u8; MAX_REPLY_BYTES];
        loop {
            let Ok((len, sender)) = socket.recv_from(&mut buffer).await else { continue };
            if sender != SocketAddr::V4(to) {
                continue;
            }
            match serde_bencode::from_bytes::<Reply>(&buffer[..len]) {
                Ok(reply) if reply.t.as_slice() == tid => return reply,
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "undecodable reply from our own DHT node; ignored"),
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

/// The part of a KRPC reply we read. Keys we do not name (`ip`, `v`, `nodes`, `id`) are skipped.
#[derive(Debug, Deserialize)]
struct Reply {
    t: ByteBuf,
    y: ByteBuf,
    #[serde(default)]
    r: Option<ReplyArguments>,
    #[serde(default)]
    e: Option<(i64, ByteBuf)>,
}

#[derive(Debug, Default, Deserialize)]
struct ReplyArguments {
    #[serde(default)]
    token: Option<ByteBuf>,
    #[serde(default)]
    values: Vec<ByteBuf>,
}

impl Reply {
    fn checked(self, query: &'static str) -> Result<ReplyArguments, OwnNodeError> {
        match (self.y.as_slice(), self.r, self.e) {
            (b"r", Some(arguments), _) => Ok(arguments),
            (_, _, Some((code, message))) => Err(OwnNodeError::Refused {
                query,
                code,
                message: String::from_utf8_lossy(&message).into_owned(),
            }),
            _ => Err(OwnNodeError::Refused {
                query,
                code: 0,
                message: "a reply that is neither r nor e".into(),
            }),
        }
    }
}

/// BEP 5 compact peer info: 4 bytes of IPv4 address and 2 of port, big-endian.
fn compact_peer(value: &[u8]) -> Option<SocketAddrV4> {
    let [a, b, c, d, high, low]: [u8; 6] = value.try_into().ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([high, low])))
}

/// A bencoded byte string: `<length>:<bytes>`.
fn byte_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(bytes);
}

/// `get_peers` (BEP 5). Dictionary keys are written in sorted order, as bencode requires.
fn get_peers_query(tid: [u8; 4], id: &[u8; 20], info_hash: &mainline::Id) -> Vec<u8> {
    let mut out = b"d1:ad2:id".to_vec();
    byte_string(&mut out, id);
    out.extend_from_slice(b"9:info_hash");
    byte_string(&mut out, info_hash.as_bytes());
    out.extend_from_slice(b"e1:q9:get_peers1:t");
    byte_string(&mut out, &tid);
    out.extend_from_slice(b"1:y1:qe");
    out
}

/// `announce_peer` (BEP 5) with an explicit port (`implied_port` 0): the QUIC port, not this socket's.
fn announce_query(tid: [u8; 4], id: &[u8; 20], info_hash: &mainline::Id, port: u16, token: &[u8]) -> Vec<u8> {
    let mut out = b"d1:ad2:id".to_vec();
    byte_string(&mut out, id);
    out.extend_from_slice(b"12:implied_porti0e9:info_hash");
    byte_string(&mut out, info_hash.as_bytes());
    out.extend_from_slice(format!("4:porti{port}e5:token").as_bytes());
    byte_string(&mut out, token);
    out.extend_from_slice(b"e1:q13:announce_peer1:t");
    byte_string(&mut out, &tid);
    out.extend_from_slice(b"1:y1:qe");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_bencoded_with_sorted_keys() {
        let id = [b'i'; 20];
        let info_hash = mainline::Id::from_bytes([b'h'; 20]).expect("20 bytes");
        let query = get_peers_query(*b"tttt", &id, &info_hash);
        assert_eq!(
            query,
            b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiii9:info_hash20:hhhhhhhhhhhhhhhhhhhhe1:q9:get_peers1:t4:tttt1:y1:qe"
        );
        let announce = announce_query(*b"tttt", &id, &info_hash, 30906, b"tok");
        assert_eq!(
            announce,
            &b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiii12:implied_porti0e9:info_hash20:hhhhhhhhhhhhhhhhhhhh4:porti30906e\
               5:token3:toke1:q13:announce_peer1:t4:tttt1:y1:qe"[..]
        );
    }

    #[test]
    fn replies_are_read_for_values_tokens_and_errors() {
        let reply: Reply = serde_bencode::from_bytes(
            b"d2:ip6:\x7f\x00\x00\x01\x00\x011:rd2:id20:iiiiiiiiiiiiiiiiiiii5:token2:xy6:valuesl6:\x7f\x00\x00\x01\x78\xbaee1:t4:tttt1:y1:re",
        )
        .expect("a get_peers reply");
        assert_eq!(reply.t.as_slice(), b"tttt");
        let arguments = reply.checked("get_peers").expect("a reply");
        assert_eq!(arguments.token.as_ref().map(|t| t.as_slice()), Some(&b"xy"[..]));
        let peers: Vec<_> = arguments.values.iter().filter_map(|v| compact_peer(v)).collect();
        assert_eq!(peers, vec!["127.0.0.1:30906".parse::<SocketAddrV4>().expect("address")]);

        let error: Reply =
            serde_bencode::from_bytes(b"d1:eli203e9:Bad tokene1:t4:tttt1:y1:ee").expect("an error");
        match error.checked("announce_peer") {
            Err(OwnNodeError::Refused { code: 203, message, .. }) => assert_eq!(message, "Bad token"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(compact_peer(b"short").is_none());
    }
}
