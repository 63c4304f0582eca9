//! The few UDP datagrams nodes exchange outside QUIC, on the same sockets: the address reflection a node behind
//! a sequential NAT uses to sample its NAT's next port, and the birthday probes that find a mapping of an
//! endpoint-dependent NAT with random ports (see "Datagrams outside QUIC" in `proto/wire.proto`).
//!
//! Every such datagram starts with a zero byte and the ASCII tag `rn-`: a QUIC packet always has the fixed bit
//! (0x40) of its first byte set, so the endpoint's socket tells the two apart on the first byte, and the tag
//! keeps a QUIC peer that greases the fixed bit from being mistaken for us. Nothing here is authenticated:
//! a reflection only hints at a port to try, a probe only at a socket to dial from; the QUIC handshake that
//! follows is what proves who is at the other end.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// First bytes of every datagram this module defines.
pub const DATAGRAM_PREFIX: &[u8; 4] = b"\0rn-";
const REFLECT_REQUEST_TAG: &[u8; 8] = b"\0rn-refq";
const REFLECT_REPLY_TAG: &[u8; 8] = b"\0rn-refr";
const BIRTHDAY_TAG: &[u8; 8] = b"\0rn-bday";
/// A reflection request is padded to this size, so that the reply (always smaller) can never amplify a flood
/// aimed at a forged source.
pub const REFLECT_REQUEST_BYTES: usize = 64;
/// Length of the nonce a reflection request carries and its reply echoes.
pub const REFLECT_NONCE_BYTES: usize = 16;
/// Length of a birthday probe: tag and the punch's nonce.
pub const BIRTHDAY_PROBE_BYTES: usize = 16;

/// Whether a received datagram is one of ours rather than QUIC.
pub fn is_control_datagram(datagram: &[u8]) -> bool {
    datagram.starts_with(DATAGRAM_PREFIX)
}

/// "Tell me the address you see this datagram come from."
pub fn reflect_request(nonce: &[u8; REFLECT_NONCE_BYTES]) -> [u8; REFLECT_REQUEST_BYTES] {
    let mut datagram = [0u8; REFLECT_REQUEST_BYTES];
    datagram[..8].copy_from_slice(REFLECT_REQUEST_TAG);
    datagram[8..8 + REFLECT_NONCE_BYTES].copy_from_slice(nonce);
    datagram
}

/// The nonce of a reflection request; `None` for anything else, including a request shorter than the padded
/// size (answering it would send more than was received).
pub fn parse_reflect_request(datagram: &[u8]) -> Option<[u8; REFLECT_NONCE_BYTES]> {
    if datagram.len() < REFLECT_REQUEST_BYTES || !datagram.starts_with(REFLECT_REQUEST_TAG) {
        return None;
    }
    datagram[8..8 + REFLECT_NONCE_BYTES].try_into().ok()
}

/// The answer to a reflection request: its nonce and the source address it came from.
pub fn reflect_reply(nonce: &[u8; REFLECT_NONCE_BYTES], observed: SocketAddr) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + REFLECT_NONCE_BYTES + 1 + 16 + 2);
    datagram.extend_from_slice(REFLECT_REPLY_TAG);
    datagram.extend_from_slice(nonce);
    match observed.ip() {
        IpAddr::V4(ip) => {
            datagram.push(4);
            datagram.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            datagram.push(6);
            datagram.extend_from_slice(&ip.octets());
        }
    }
    datagram.extend_from_slice(&observed.port().to_be_bytes());
    datagram
}

/// The address a reflection reply states, if `datagram` is a well-formed reply to the request with `nonce`.
pub fn parse_reflect_reply(datagram: &[u8], nonce: &[u8; REFLECT_NONCE_BYTES]) -> Option<SocketAddr> {
    let rest = datagram.strip_prefix(REFLECT_REPLY_TAG)?;
    let rest = rest.strip_prefix(nonce.as_slice())?;
    let (&family, rest) = rest.split_first()?;
    let (ip, rest) = match family {
        4 => {
            let (octets, rest) = rest.split_first_chunk::<4>()?;
            (IpAddr::V4(Ipv4Addr::from(*octets)), rest)
        }
        6 => {
            let (octets, rest) = rest.split_first_chunk::<16>()?;
            (IpAddr::V6(Ipv6Addr::from(*octets)), rest)
        }
        _ => return None,
    };
    let port: [u8; 2] = rest.try_into().ok()?;
    let port = u16::from_be_bytes(port);
    (port != 0).then_some(SocketAddr::new(ip, port))
}

/// A birthday probe for the punch with `nonce`.
pub fn birthday_probe(nonce: u64) -> [u8; BIRTHDAY_PROBE_BYTES] {
    let mut datagram = [0u8; BIRTHDAY_PROBE_BYTES];
    datagram[..8].copy_from_slice(BIRTHDAY_TAG);
    datagram[8..].copy_from_slice(&nonce.to_be_bytes());
    datagram
}

/// The punch nonce a birthday probe carries.
pub fn parse_birthday_probe(datagram: &[u8]) -> Option<u64> {
    let rest = datagram.strip_prefix(BIRTHDAY_TAG)?;
    let nonce: [u8; 8] = rest.try_into().ok()?;
    Some(u64::from_be_bytes(nonce))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reflection_round_trips_and_never_amplifies() {
        let nonce = [7u8; REFLECT_NONCE_BYTES];
        let request = reflect_request(&nonce);
        assert!(is_control_datagram(&request));
        assert_eq!(parse_reflect_request(&request), Some(nonce));
        assert_eq!(parse_reflect_request(&request[..40]), None, "an unpadded request is not answered");
        for observed in ["203.0.113.101:20017", "[2001:db8::5]:443"] {
            let observed: SocketAddr = observed.parse().unwrap();
            let reply = reflect_reply(&nonce, observed);
            assert!(reply.len() <= request.len(), "the reply is no larger than the request");
            assert_eq!(parse_reflect_reply(&reply, &nonce), Some(observed));
            assert_eq!(parse_reflect_reply(&reply, &[8u8; REFLECT_NONCE_BYTES]), None, "another nonce");
            assert_eq!(parse_reflect_reply(&reply[..reply.len() - 1], &nonce), None, "truncated");
        }
    }

    #[test]
    fn probes_carry_the_punch_nonce_and_quic_is_never_mistaken_for_one() {
        let probe = birthday_probe(0xdead_beef_0102_0304);
        assert!(is_control_datagram(&probe));
        assert_eq!(parse_birthday_probe(&probe), Some(0xdead_beef_0102_0304));
        assert_eq!(parse_birthday_probe(&probe[..12]), None);
        assert_eq!(parse_reflect_request(&probe), None);
        // Long and short header QUIC packets have the fixed bit set in their first byte.
        for first in [0xc3u8, 0x40, 0x5f] {
            let mut packet = vec![first];
            packet.extend_from_slice(b"rn-bday\0\0\0\0\0\0\0\0");
            assert!(!is_control_datagram(&packet));
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let nonce = [1u8; REFLECT_NONCE_BYTES];
        for datagram in [&b""[..], b"\0", b"\0rn-", b"\0rn-refr", b"\0rn-refr\x01\x01", b"\0rn-bday123"] {
            assert_eq!(parse_reflect_reply(datagram, &nonce), None);
            assert_eq!(parse_reflect_request(datagram), None);
            assert_eq!(parse_birthday_probe(datagram), None);
        }
        let mut bad_family = reflect_reply(&nonce, "203.0.113.1:1".parse().unwrap());
        bad_family[8 + REFLECT_NONCE_BYTES] = 5;
        assert_eq!(parse_reflect_reply(&bad_family, &nonce), None);
    }
}
