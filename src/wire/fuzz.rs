//! Parsers of untrusted bytes in one call each over arbitrary input, for the fuzz targets (`tests/fuzz`) and
//! for the randomised tests below: the receive path of a peer stream (framing, envelope rules, verification of
//! every record and punch offer that arrives), and the UDP datagrams outside QUIC (address reflection,
//! birthday probes and the KRPC replies the endpoint socket takes for itself).

use std::hint::black_box;
use std::time::Duration;

use super::pb::{self, envelope::Kind};
use super::{
    DEFAULT_MAX_CLOCK_SKEW, FrameDecoder, MAX_FRAME_BYTES, REFLECT_NONCE_BYTES, REFLECT_REQUEST_BYTES,
    VerifyPolicy, birthday_probe, check_not_replayed, encode_frame, is_control_datagram, negotiate_version,
    parse_birthday_probe, parse_krpc_reply, parse_reflect_reply, parse_reflect_request, punch_offer_parties,
    reflect_reply, verify_punch_offer, verify_record,
};
use crate::api::names::{NODE_ID_LEN, NodeId};

/// The verifier's clock while fuzzing: fixed so that every input behaves the same on every run, and so that
/// seed inputs with records timestamped near it reach every check.
pub(super) const FUZZ_NOW_MS: i64 = 1_760_000_000_000;

/// Sizes of the pieces the input is cut into, in turn: single bytes and odd sizes cut length prefixes and
/// bodies at every kind of place, large ones carry whole frames.
const PIECE_SIZES: [usize; 8] = [1, 5, 2, 64, 3, 1021, 4, 16_384];

/// Feeds `data` as a received stream to a [`FrameDecoder`] in irregular pieces, and runs [`verify_record`]
/// on every record in the Hello, GetRecordResponse and PeerExchangeResponse envelopes decoded, as a
/// connection would. Stops at the first framing error, as a connection would.
///
/// # Panics
///
/// Never on any input: it panics only if an invariant of this module is broken (the decoder holding
/// more than one frame of bytes, or a record accepted as coming from a node other than its signer), which is
/// what the fuzzer is there to find.
pub fn fuzz_decode_and_verify(data: &[u8]) {
    let policy = VerifyPolicy {
        now_ms: FUZZ_NOW_MS,
        max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        max_age: Some(Duration::from_secs(24 * 3600)),
    };
    let mut decoder = FrameDecoder::new();
    let mut rest = data;
    for size in PIECE_SIZES.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        rest = tail;
        decoder.push(piece);
        assert!(decoder.buffered_bytes() <= MAX_FRAME_BYTES + 4, "the decoder holds more than one frame");
        loop {
            match decoder.next_frame() {
                Ok(Some(envelope)) => handle_envelope(&envelope, &policy),
                Ok(None) => break,
                Err(error) => {
                    black_box(error.to_string());
                    return;
                }
            }
        }
    }
    black_box(decoder.finish().map_err(|error| error.to_string()).err());
}

/// What a connection does with a decoded envelope, minus the IO.
fn handle_envelope(envelope: &pb::Envelope, policy: &VerifyPolicy) {
    let records: Vec<&pb::SignedRecord> = match &envelope.kind {
        Some(Kind::Hello(hello)) => {
            black_box(negotiate_version(hello));
            hello.record.iter().collect()
        }
        Some(Kind::GetRecordResponse(response)) => response.record.iter().collect(),
        Some(Kind::PeerExchangeResponse(response)) => response.records.iter().collect(),
        _ => Vec::new(),
    };
    let offer = match &envelope.kind {
        Some(Kind::PunchRequest(request)) => request.offer.as_ref(),
        Some(Kind::PunchIntroduction(introduction)) => introduction.offer.as_ref(),
        Some(Kind::PunchResponse(response)) => response.offer.as_ref(),
        _ => None,
    };
    if let Some(offer) = offer {
        check_punch_offer(offer);
    }
    for signed in records {
        match verify_record(signed, None, policy) {
            Ok(verified) => {
                // The record as another node's, as a connection authenticated for someone else would see
                // it: refused before its signature is checked again. (All zeros encodes a small-order point,
                // never the node id of a verified record.)
                let impersonated = verify_record(signed, Some(NodeId([0; NODE_ID_LEN])), policy);
                assert!(impersonated.is_err(), "a record was accepted for a node that did not sign it");
                black_box(check_not_replayed(verified.seq, Some(verified.seq.saturating_add(1))).err());
            }
            Err(error) => {
                black_box(error.to_string());
            }
        }
    }
    // Whatever was accepted can be sent on: re-encoding must not fail on anything but size.
    black_box(encode_frame(envelope).err());
}

/// A punch offer as a rendezvous and a target check it: parties first, then the signature against them.
fn check_punch_offer(offer: &pb::SignedPunchOffer) {
    let (from, to) = match punch_offer_parties(offer) {
        Ok(parties) => parties,
        Err(error) => {
            black_box(error.to_string());
            return;
        }
    };
    match verify_punch_offer(offer, from, to, FUZZ_NOW_MS) {
        Ok(verified) => {
            assert!(verified.from == from && verified.to == to, "a verified offer names other parties");
            let other = NodeId([0; NODE_ID_LEN]);
            assert!(
                verify_punch_offer(offer, other, to, FUZZ_NOW_MS).is_err(),
                "an offer was accepted from a node that did not sign it"
            );
        }
        Err(error) => {
            black_box(error.to_string());
        }
    }
}

/// Feeds one received UDP datagram to every parser the endpoint and DHT sockets run on datagrams that are not
/// QUIC, and checks what they promise: a reflection is answered only to a request at least as large as the
/// answer (no amplification), and every address or nonce read back is exactly what its encoder would write.
///
/// # Panics
///
/// Only if one of those promises is broken.
pub fn fuzz_datagram(datagram: &[u8]) {
    if is_control_datagram(datagram) {
        if let Some(nonce) = parse_reflect_request(datagram) {
            let widest = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().expect("an address");
            assert!(datagram.len() >= REFLECT_REQUEST_BYTES, "a short reflection request was accepted");
            assert!(reflect_reply(&nonce, widest).len() <= datagram.len(), "a reflection answer amplifies");
        }
        if let Some(nonce) = datagram.get(8..8 + REFLECT_NONCE_BYTES) {
            let nonce: [u8; REFLECT_NONCE_BYTES] = nonce.try_into().expect("sixteen bytes");
            if let Some(observed) = parse_reflect_reply(datagram, &nonce) {
                assert_eq!(
                    reflect_reply(&nonce, observed),
                    datagram,
                    "a reflection reply read back differently"
                );
            }
        }
        if let Some(nonce) = parse_birthday_probe(datagram) {
            assert_eq!(birthday_probe(nonce).as_slice(), datagram, "a birthday probe read back differently");
        }
    }
    if let Some(reply) = parse_krpc_reply(datagram) {
        black_box(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{NOW_MS, sample_conversation};
    use super::*;

    /// xorshift64*: a few lines of deterministic randomness, enough to vary test inputs.
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A value in `0..bound` (`bound` > 0).
        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }

        /// One to four random edits of `input`: bit flips, byte changes, cuts, insertions, duplications and
        /// removals.
        fn mutate(&mut self, input: &mut Vec<u8>) {
            for _ in 0..self.below(4) + 1 {
                let at = self.below(input.len() + 1);
                match self.below(6) {
                    0 if at < input.len() => input[at] ^= 1 << self.below(8),
                    1 if at < input.len() => input[at] = self.next() as u8,
                    2 => input.truncate(at),
                    3 => {
                        let len = self.below(8) + 1;
                        let insert = self.bytes(len);
                        input.splice(at..at, insert);
                    }
                    4 => {
                        let end = (at + self.below(64)).min(input.len());
                        let copy = input[at..end].to_vec();
                        input.splice(end..end, copy);
                    }
                    _ => {
                        let end = (at + self.below(16)).min(input.len());
                        input.drain(at..end);
                    }
                }
            }
        }
    }

    fn conversation_stream() -> Vec<u8> {
        sample_conversation().iter().flat_map(|e| encode_frame(e).expect("valid envelope")).collect()
    }

    #[test]
    fn the_fuzz_clock_matches_the_test_records() {
        assert_eq!(FUZZ_NOW_MS, NOW_MS);
    }

    #[test]
    fn valid_conversation_passes_through() {
        fuzz_decode_and_verify(&conversation_stream());
    }

    #[test]
    fn random_inputs_do_not_panic() {
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let len = rng.below(600);
            fuzz_decode_and_verify(&rng.bytes(len));
        }
        // Random bytes behind plausible length prefixes, so that envelope decoding sees random data
        // rather than the stream stopping at an absurd length.
        for _ in 0..2000 {
            let mut stream = Vec::new();
            for _ in 0..rng.below(4) + 1 {
                let len = rng.below(300);
                stream.extend_from_slice(&(len as u32).to_be_bytes());
                stream.extend(rng.bytes(len));
            }
            fuzz_decode_and_verify(&stream);
        }
    }

    #[test]
    fn mutated_valid_inputs_do_not_panic() {
        // Mutations of single frames and of the whole conversation. Single frames keep the number of records
        // verified per input low: signature checks are slow in unoptimised test builds.
        let mut bases: Vec<Vec<u8>> =
            sample_conversation().iter().map(|e| encode_frame(e).expect("valid envelope")).collect();
        bases.push(conversation_stream());
        let mut rng = Xorshift(0x0123_4567_89ab_cdef);
        for _ in 0..1000 {
            let mut input = bases[rng.below(bases.len())].clone();
            rng.mutate(&mut input);
            fuzz_decode_and_verify(&input);
        }
    }

    /// The datagrams nodes send, and random and mutated bytes behind each datagram tag and as KRPC.
    fn datagram_bases() -> Vec<Vec<u8>> {
        let nonce = [7u8; REFLECT_NONCE_BYTES];
        vec![
            super::super::reflect_request(&nonce).to_vec(),
            reflect_reply(&nonce, "203.0.113.7:30906".parse().expect("v4")),
            reflect_reply(&nonce, "[2001:db8::7]:1".parse().expect("v6")),
            birthday_probe(0x0102_0304_0506_0708).to_vec(),
            super::super::ping_query(*b"rn\0\x01", &[3; 20]),
            b"d1:rd2:id20:abcdefghij01234567895:token8:aoeusnthe1:t4:rn\0\x011:y1:re".to_vec(),
            b"d1:eli201e23:A Generic Error Ocurrede1:t4:rn\0\x011:y1:ee".to_vec(),
        ]
    }

    #[test]
    fn datagrams_nodes_send_read_back_and_random_ones_do_not_panic() {
        for base in datagram_bases() {
            fuzz_datagram(&base);
        }
        let mut rng = Xorshift(0x5151_2727_4343_8989);
        let bases = datagram_bases();
        for _ in 0..20_000 {
            let mut input = bases[rng.below(bases.len())].clone();
            rng.mutate(&mut input);
            fuzz_datagram(&input);
        }
    }

    /// Writes seed inputs for the fuzz target (valid frames whose records verify at [`FUZZ_NOW_MS`]) to the
    /// directory named by `WIRE_FUZZ_SEEDS_DIR`:
    /// `WIRE_FUZZ_SEEDS_DIR=tests/fuzz/seeds/decode_verify cargo test write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to refresh the fuzz seeds"]
    fn write_fuzz_seeds() {
        let Some(dir) = std::env::var_os("WIRE_FUZZ_SEEDS_DIR") else {
            panic!("set WIRE_FUZZ_SEEDS_DIR to the directory to write the seeds to");
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (index, envelope) in sample_conversation().iter().enumerate() {
            std::fs::write(dir.join(format!("frame-{index}")), encode_frame(envelope).unwrap()).unwrap();
        }
        std::fs::write(dir.join("conversation"), conversation_stream()).unwrap();
    }
}
