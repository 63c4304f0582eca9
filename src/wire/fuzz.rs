//! The whole receive path in one call over arbitrary bytes, for the fuzz target (`tests/fuzz`) and for the
//! randomised tests below: framing, envelope rules, and verification of every record that arrives.

use std::hint::black_box;
use std::time::Duration;

use super::pb::{self, envelope::Kind};
use super::{
    DEFAULT_MAX_CLOCK_SKEW, FrameDecoder, MAX_FRAME_BYTES, VerifyPolicy, check_not_replayed, encode_frame,
    negotiate_version, verify_record,
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
            for _ in 0..rng.below(4) + 1 {
                let at = rng.below(input.len() + 1);
                match rng.below(6) {
                    0 if at < input.len() => input[at] ^= 1 << rng.below(8),
                    1 if at < input.len() => input[at] = rng.next() as u8,
                    2 => input.truncate(at),
                    3 => {
                        let len = rng.below(8) + 1;
                        let insert = rng.bytes(len);
                        input.splice(at..at, insert);
                    }
                    4 => {
                        let end = (at + rng.below(64)).min(input.len());
                        let copy = input[at..end].to_vec();
                        input.splice(end..end, copy);
                    }
                    _ => {
                        let end = (at + rng.below(16)).min(input.len());
                        input.drain(at..end);
                    }
                }
            }
            fuzz_decode_and_verify(&input);
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
