//! The few KRPC (BEP 5) messages this node writes and reads itself, beside the `mainline` crate: queries to our
//! own DHT node (`dht::own_node`) and the mapping probe a node behind a NAT sends from its QUIC socket to a
//! peer's DHT socket, whose reply states the address it saw (BEP 42's `ip` key).
//!
//! Pure: bytes in, values out. Queries are written with sorted keys, as bencode requires; a reply is decoded
//! only up to [`MAX_KRPC_REPLY_BYTES`], and every key we do not name is skipped.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::Deserialize;
use serde_bytes::ByteBuf;

/// First bytes of the requester id of every query this node writes itself (to its own DHT node, or the mapping
/// probe to a peer's DHT socket), so that a DHT node can tell them from queries of DHT nodes: they come from
/// sockets that are not DHT nodes and must never become bootstrap nodes.
pub const OWN_QUERY_ID_TAG: [u8; 4] = *b"rn\x00\x01";

/// A requester id for our own queries: [`OWN_QUERY_ID_TAG`], then 16 bytes derived from `seed`.
pub fn own_query_id(seed: &[u8]) -> [u8; 20] {
    let digest = sha1_smol::Sha1::from(seed).digest().bytes();
    let mut id = [0u8; 20];
    id[..4].copy_from_slice(&OWN_QUERY_ID_TAG);
    id[4..].copy_from_slice(&digest[..16]);
    id
}

/// Whether `requester_id` is one of [`own_query_id`]'s.
pub fn is_own_query_id(requester_id: &[u8]) -> bool {
    requester_id.starts_with(&OWN_QUERY_ID_TAG)
}

/// Larger than any KRPC reply mainline sends (it never sends more than its 2048-byte MTU).
pub const MAX_KRPC_REPLY_BYTES: usize = 4096;

/// A decoded KRPC reply: a response (`y` = `r`) or an error (`y` = `e`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KrpcReply {
    pub transaction_id: Vec<u8>,
    pub outcome: Result<KrpcResponse, KrpcRefusal>,
    /// The sender of the query as the answering node saw it (BEP 42), when stated.
    pub requester: Option<SocketAddrV4>,
}

/// The parts of a response we read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KrpcResponse {
    pub token: Option<Vec<u8>>,
    /// Compact peer entries of a `get_peers` answer.
    pub values: Vec<SocketAddrV4>,
}

/// A KRPC error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct KrpcRefusal {
    pub code: i64,
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct RawReply {
    t: ByteBuf,
    y: ByteBuf,
    #[serde(default)]
    r: Option<RawArguments>,
    #[serde(default)]
    e: Option<(i64, ByteBuf)>,
    #[serde(default)]
    ip: Option<ByteBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct RawArguments {
    #[serde(default)]
    token: Option<ByteBuf>,
    #[serde(default)]
    values: Vec<ByteBuf>,
}

/// Decodes a KRPC reply; `None` for anything that is not one (a query, garbage, more than
/// [`MAX_KRPC_REPLY_BYTES`]).
pub fn parse_krpc_reply(datagram: &[u8]) -> Option<KrpcReply> {
    if datagram.len() > MAX_KRPC_REPLY_BYTES || datagram.first() != Some(&b'd') {
        return None;
    }
    // The decoder recurses once per level, without a limit of its own: deep nesting (thousands of levels fit in
    // one datagram) could exhaust the stack of the thread that receives.
    if !nesting_within(datagram, MAX_KRPC_NESTING) {
        return None;
    }
    let raw: RawReply = serde_bencode::from_bytes(datagram).ok()?;
    let outcome = match (raw.y.as_slice(), raw.r, raw.e) {
        (b"r", Some(arguments), _) => Ok(KrpcResponse {
            token: arguments.token.map(ByteBuf::into_vec),
            values: arguments.values.iter().filter_map(|value| compact_peer(value)).collect(),
        }),
        (b"e", _, Some((code, message))) => {
            Err(KrpcRefusal { code, message: String::from_utf8_lossy(&message).into_owned() })
        }
        _ => return None,
    };
    let requester = raw.ip.as_deref().and_then(|ip| compact_peer(ip));
    Some(KrpcReply { transaction_id: raw.t.into_vec(), outcome, requester })
}

/// Levels of lists and dictionaries a reply may nest: KRPC replies use three (the message, its arguments, the
/// list of values).
const MAX_KRPC_NESTING: usize = 8;

/// Whether the bencoded `bytes` nest lists and dictionaries at most `max` deep; false also for anything that is
/// not well-formed bencode as far as the scan can tell. Iterative: it is what keeps the decoder from recursing
/// deeply.
fn nesting_within(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'd' | b'l' => {
                depth += 1;
                if depth > max {
                    return false;
                }
                at += 1;
            }
            b'e' => {
                let Some(outer) = depth.checked_sub(1) else { return false };
                depth = outer;
                at += 1;
            }
            b'i' => match bytes[at..].iter().position(|b| *b == b'e') {
                Some(end) => at += end + 1,
                None => return false,
            },
            b'0'..=b'9' => {
                let Some(colon) = bytes[at..].iter().position(|b| *b == b':') else { return false };
                let Some(len) =
                    std::str::from_utf8(&bytes[at..at + colon]).ok().and_then(|n| n.parse::<usize>().ok())
                else {
                    return false;
                };
                at = match (at + colon + 1).checked_add(len) {
                    Some(end) if end <= bytes.len() => end,
                    _ => return false,
                };
            }
            _ => return false,
        }
    }
    true
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

/// The end every query shares: the method, the transaction id and `y` = `q`.
fn finish_query(mut out: Vec<u8>, method: &str, tid: &[u8; 4]) -> Vec<u8> {
    out.extend_from_slice(b"e1:q");
    byte_string(&mut out, method.as_bytes());
    out.extend_from_slice(b"1:t");
    byte_string(&mut out, tid);
    out.extend_from_slice(b"1:y1:qe");
    out
}

fn arguments_with_id(id: &[u8; 20]) -> Vec<u8> {
    let mut out = b"d1:ad2:id".to_vec();
    byte_string(&mut out, id);
    out
}

/// `ping` (BEP 5).
pub fn ping_query(tid: [u8; 4], id: &[u8; 20]) -> Vec<u8> {
    finish_query(arguments_with_id(id), "ping", &tid)
}

/// `get_peers` (BEP 5).
pub fn get_peers_query(tid: [u8; 4], id: &[u8; 20], info_hash: &[u8; 20]) -> Vec<u8> {
    let mut out = arguments_with_id(id);
    out.extend_from_slice(b"9:info_hash");
    byte_string(&mut out, info_hash);
    finish_query(out, "get_peers", &tid)
}

/// `announce_peer` (BEP 5) with an explicit port (`implied_port` 0): the QUIC port, not the sending socket's.
pub fn announce_query(tid: [u8; 4], id: &[u8; 20], info_hash: &[u8; 20], port: u16, token: &[u8]) -> Vec<u8> {
    let mut out = arguments_with_id(id);
    out.extend_from_slice(b"12:implied_porti0e9:info_hash");
    byte_string(&mut out, info_hash);
    out.extend_from_slice(format!("4:porti{port}e5:token").as_bytes());
    byte_string(&mut out, token);
    finish_query(out, "announce_peer", &tid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_bencoded_with_sorted_keys() {
        let id = [b'i'; 20];
        let info_hash = [b'h'; 20];
        assert_eq!(
            get_peers_query(*b"tttt", &id, &info_hash),
            b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiii9:info_hash20:hhhhhhhhhhhhhhhhhhhhe1:q9:get_peers1:t4:tttt1:y1:qe"
        );
        assert_eq!(
            announce_query(*b"tttt", &id, &info_hash, 30906, b"tok"),
            &b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiii12:implied_porti0e9:info_hash20:hhhhhhhhhhhhhhhhhhhh4:porti30906e\
               5:token3:toke1:q13:announce_peer1:t4:tttt1:y1:qe"[..]
        );
        assert_eq!(ping_query(*b"tttt", &id), b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiiie1:q4:ping1:t4:tttt1:y1:qe");
    }

    #[test]
    fn replies_are_read_for_values_tokens_requesters_and_errors() {
        let reply = parse_krpc_reply(
            b"d2:ip6:\xcb\x00\x71\x64\x78\xba1:rd2:id20:iiiiiiiiiiiiiiiiiiii5:token2:xy6:valuesl6:\x7f\x00\x00\x01\x78\xbaee1:t4:tttt1:y1:re",
        )
        .expect("a get_peers reply");
        assert_eq!(reply.transaction_id, b"tttt");
        assert_eq!(reply.requester, Some("203.0.113.100:30906".parse().expect("address")));
        let response = reply.outcome.expect("a response");
        assert_eq!(response.token.as_deref(), Some(&b"xy"[..]));
        assert_eq!(response.values, vec!["127.0.0.1:30906".parse::<SocketAddrV4>().expect("address")]);

        let error = parse_krpc_reply(b"d1:eli203e9:Bad tokene1:t4:tttt1:y1:ee").expect("an error");
        assert_eq!(error.outcome, Err(KrpcRefusal { code: 203, message: "Bad token".into() }));
    }

    #[test]
    fn anything_else_is_not_a_reply() {
        for datagram in [
            &b""[..],
            b"not bencode",
            b"d1:ad2:id20:iiiiiiiiiiiiiiiiiiiie1:q4:ping1:t4:tttt1:y1:qe", // a query
            b"d1:t4:tttt1:y1:re",                                          // a response without arguments
            b"d1:rd2:id20:iiiiiiiiiiiiiiiiiiiie1:t4:tttt1:y1:r",           // truncated
        ] {
            assert_eq!(parse_krpc_reply(datagram), None, "{:?}", String::from_utf8_lossy(datagram));
        }
        let mut huge = b"d1:rd5:token5000:".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 5000));
        huge.extend_from_slice(b"e1:t4:tttt1:y1:re");
        assert_eq!(parse_krpc_reply(&huge), None);
        assert!(compact_peer(b"short").is_none());
    }

    /// The reply parser sees datagrams from the network (on the QUIC socket, from an address we pinged):
    /// nesting as deep as a datagram allows and random mutations of a real reply must not panic.
    #[test]
    fn hostile_replies_never_panic() {
        let depth = (MAX_KRPC_REPLY_BYTES - 32) / 2;
        let mut nested = b"d1:t4:tttt1:y1:r1:x".to_vec();
        nested.extend(std::iter::repeat_n(b'l', depth));
        nested.extend(std::iter::repeat_n(b'e', depth));
        nested.push(b'e');
        assert!(nested.len() <= MAX_KRPC_REPLY_BYTES);
        let _ = parse_krpc_reply(&nested);

        let valid = b"d2:ip6:\xcb\x00\x71\x64\x78\xba1:rd2:id20:iiiiiiiiiiiiiiiiiiii5:token2:xy6:valuesl6:\x7f\x00\x00\x01\x78\xbaee1:t4:tttt1:y1:re";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut datagram = valid.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % datagram.len() as u64) as usize;
                match next() % 3 {
                    0 => datagram[at] = next() as u8,
                    1 => {
                        datagram.remove(at);
                    }
                    _ => datagram.insert(at, next() as u8),
                }
            }
            let _ = parse_krpc_reply(&datagram);
        }
    }
}
