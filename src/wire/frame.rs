//! Framing of the message stream: each frame is a 4-byte big-endian length followed by one encoded
//! [`pb::Envelope`] of exactly that many bytes, at most [`MAX_FRAME_BYTES`].
//!
//! The decoder is built for bytes from an untrusted peer arriving in arbitrary pieces: a declared length over
//! the limit is refused as soon as its 4 bytes are in, before anything of the frame is buffered, and the
//! decoder never holds more than one frame of raw bytes. The first error ends the stream for good: once a
//! frame boundary is lost there is no way to find the next one.

use std::collections::VecDeque;

use prost::Message;

use super::message::check_envelope;
use super::{MAX_FRAME_BYTES, pb};

/// Size of the length prefix of a frame.
const LENGTH_PREFIX_BYTES: usize = 4;

/// A body buffer that grew past this for a large frame is freed once that frame is decoded, so an idle
/// connection does not keep up to [`MAX_FRAME_BYTES`] allocated.
const RETAINED_BUFFER_BYTES: usize = 16 * 1024;

/// Why a frame could not be encoded or decoded. Either way the stream cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `envelope` as one frame. Refuses envelopes that break the rules of `wire.proto` (so we never send
/// what a peer must refuse) and envelopes over [`MAX_FRAME_BYTES`].
pub fn encode_frame(envelope: &pb::Envelope) -> Result<Vec<u8>, FrameError> {
    check_envelope(envelope).map_err(FrameError::Malformed)?;
    let len = envelope.encoded_len();
    let too_large = FrameError::TooLarge { len, max: MAX_FRAME_BYTES };
    if len > MAX_FRAME_BYTES {
        return Err(too_large);
    }
    let prefix = u32::try_from(len).map_err(|_| too_large)?;
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + len);
    frame.extend_from_slice(&prefix.to_be_bytes());
    envelope.encode(&mut frame).map_err(|e| FrameError::Malformed(format!("cannot encode envelope: {e}")))?;
    Ok(frame)
}

/// Turns a byte stream cut into arbitrary pieces back into envelopes.
///
/// Feed it everything read from the stream with [`push`](Self::push) and take envelopes out with
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`. Envelopes decoded before an error are
/// still returned, in order, before the error; the error is then returned on every call and further bytes are
/// ignored. At the end of the stream, [`finish`](Self::finish) tells whether it stopped inside a frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// The length prefix of the frame being received, `prefix_filled` bytes of it so far.
    prefix: [u8; LENGTH_PREFIX_BYTES],
    prefix_filled: usize,
    /// The body of the frame being received; its length is only known once the prefix is complete.
    body: Vec<u8>,
    /// Envelopes decoded and not yet taken.
    decoded: VecDeque<pb::Envelope>,
    /// The error that ended the stream, if any.
    failure: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream. Complete frames are decoded at once; an error is kept and returned by
    /// [`next_frame`](Self::next_frame) after the envelopes decoded before it.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while self.failure.is_none() {
            if self.prefix_filled < LENGTH_PREFIX_BYTES {
                let take = (LENGTH_PREFIX_BYTES - self.prefix_filled).min(bytes.len());
                let (head, rest) = bytes.split_at(take);
                for (slot, byte) in self.prefix.iter_mut().skip(self.prefix_filled).zip(head) {
                    *slot = *byte;
                }
                self.prefix_filled += take;
                bytes = rest;
                if self.prefix_filled < LENGTH_PREFIX_BYTES {
                    return;
                }
                let len = self.declared_len();
                if len > MAX_FRAME_BYTES {
                    self.fail(FrameError::TooLarge { len, max: MAX_FRAME_BYTES });
                    return;
                }
                // One allocation of exactly the frame's size: no reallocation however small the pieces,
                // and never more than the limit.
                self.body.reserve_exact(len);
            }

            let len = self.declared_len();
            let take = len.saturating_sub(self.body.len()).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.body.extend_from_slice(head);
            bytes = rest;
            if self.body.len() < len {
                return;
            }

            match decode_envelope(&self.body) {
                Ok(envelope) => self.decoded.push_back(envelope),
                Err(error) => {
                    self.fail(error);
                    return;
                }
            }
            self.prefix_filled = 0;
            if bytes.is_empty() {
                // Nothing more has arrived: the stream may now stay idle for hours (most sessions do after
                // their Hello), so it holds no buffer; the next frame's prefix sizes a new one exactly.
                self.body = Vec::new();
                return;
            }
            if self.body.capacity() > RETAINED_BUFFER_BYTES {
                self.body = Vec::new();
            } else {
                self.body.clear();
            }
        }
    }

    /// The next decoded envelope; `Ok(None)` when more bytes are needed; the error that ended the stream once
    /// every envelope decoded before it has been taken.
    pub fn next_frame(&mut self) -> Result<Option<pb::Envelope>, FrameError> {
        if let Some(envelope) = self.decoded.pop_front() {
            if self.decoded.is_empty() {
                // An envelope is large (its biggest message inline) and the queue keeps its slots: an idle
                // session would hold a few of them for its whole life (about 1.4 KiB per peer, measured).
                self.decoded = VecDeque::new();
            }
            return Ok(Some(envelope));
        }
        match &self.failure {
            Some(error) => Err(error.clone()),
            None => Ok(None),
        }
    }

    /// Whether the stream ended cleanly: no error, and not inside a frame. Call it at the end of the
    /// stream, after taking every envelope.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(error) = &self.failure {
            return Err(error.clone());
        }
        if self.prefix_filled == 0 {
            return Ok(());
        }
        let detail = if self.prefix_filled < LENGTH_PREFIX_BYTES {
            format!("{} of the {LENGTH_PREFIX_BYTES} length bytes", self.prefix_filled)
        } else {
            format!("{} of {} bytes", self.body.len(), self.declared_len())
        };
        Err(FrameError::Malformed(format!("stream ended inside a frame, after {detail}")))
    }

    /// Raw bytes held for the frame being received: never more than `MAX_FRAME_BYTES + 4`.
    #[must_use]
    pub fn buffered_bytes(&self) -> usize {
        self.prefix_filled + self.body.len()
    }

    /// The body length announced by the complete prefix.
    fn declared_len(&self) -> usize {
        usize::try_from(u32::from_be_bytes(self.prefix)).unwrap_or(usize::MAX)
    }

    /// Ends the stream with `error`, freeing the partial frame.
    fn fail(&mut self, error: FrameError) {
        self.failure = Some(error);
        self.prefix_filled = 0;
        self.body = Vec::new();
    }
}

/// Decodes one frame body and checks the envelope rules.
fn decode_envelope(body: &[u8]) -> Result<pb::Envelope, FrameError> {
    let envelope = pb::Envelope::decode(body)
        .map_err(|e| FrameError::Malformed(format!("frame is not an encoded Envelope: {e}")))?;
    check_envelope(&envelope).map_err(FrameError::Malformed)?;
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::super::pb::envelope::Kind;
    use super::super::test_support::{envelope, sample_conversation};
    use super::*;

    fn encode_all(envelopes: &[pb::Envelope]) -> Vec<u8> {
        envelopes.iter().flat_map(|e| encode_frame(e).expect("valid envelope")).collect()
    }

    /// Everything the decoder returns for `pieces`, up to and including the first error.
    fn decode_pieces<'a>(
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<pb::Envelope>, Option<FrameError>) {
        let mut decoder = FrameDecoder::new();
        let mut envelopes = Vec::new();
        for piece in pieces {
            decoder.push(piece);
            assert!(decoder.buffered_bytes() <= MAX_FRAME_BYTES + LENGTH_PREFIX_BYTES);
            loop {
                match decoder.next_frame() {
                    Ok(Some(envelope)) => envelopes.push(envelope),
                    Ok(None) => break,
                    Err(error) => return (envelopes, Some(error)),
                }
            }
        }
        (envelopes, decoder.finish().err())
    }

    fn too_large_prefix() -> [u8; 4] {
        u32::try_from(MAX_FRAME_BYTES + 1).unwrap().to_be_bytes()
    }

    #[test]
    fn frames_round_trip() {
        let conversation = sample_conversation();
        let stream = encode_all(&conversation);
        assert_eq!(decode_pieces([stream.as_slice()]), (conversation, None));
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode_identically() {
        let conversation = sample_conversation();
        let stream = encode_all(&conversation);
        for split in 0..=stream.len() {
            let (head, tail) = stream.split_at(split);
            assert_eq!(decode_pieces([head, tail]), (conversation.clone(), None), "split at {split}");
        }
        assert_eq!(decode_pieces(stream.chunks(1)), (conversation.clone(), None), "byte by byte");
        assert_eq!(decode_pieces(stream.chunks(3)), (conversation, None), "3 bytes at a time");
    }

    #[test]
    fn oversize_frames_are_refused_from_their_length_alone() {
        let mut decoder = FrameDecoder::new();
        let prefix = too_large_prefix();
        decoder.push(&prefix[..3]);
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.push(&prefix[3..]);
        let too_large = FrameError::TooLarge { len: MAX_FRAME_BYTES + 1, max: MAX_FRAME_BYTES };
        assert_eq!(decoder.next_frame(), Err(too_large.clone()));
        assert_eq!(decoder.buffered_bytes(), 0);
        // Nothing after it is buffered or decoded, and the error stays.
        decoder.push(&vec![0; 1 << 20]);
        assert_eq!(decoder.buffered_bytes(), 0);
        assert_eq!(decoder.next_frame(), Err(too_large));

        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        assert!(matches!(decoder.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn frames_up_to_the_limit_are_accepted_and_larger_ones_not_encoded() {
        let error = |message: String| envelope(7, Kind::Error(pb::ErrorResponse { code: 5, message }));
        // Size the message so that the envelope is exactly MAX_FRAME_BYTES.
        let overhead = error("x".repeat(MAX_FRAME_BYTES)).encoded_len() - MAX_FRAME_BYTES;
        let exact = error("x".repeat(MAX_FRAME_BYTES - overhead));
        assert_eq!(exact.encoded_len(), MAX_FRAME_BYTES);
        let frame = encode_frame(&exact).expect("a frame of exactly the limit is allowed");
        assert_eq!(decode_pieces([frame.as_slice()]), (vec![exact], None));

        let over = error("x".repeat(MAX_FRAME_BYTES - overhead + 1));
        assert_eq!(
            encode_frame(&over),
            Err(FrameError::TooLarge { len: MAX_FRAME_BYTES + 1, max: MAX_FRAME_BYTES })
        );
    }

    #[test]
    fn garbage_after_a_valid_frame_is_an_error_after_the_frame() {
        let valid = envelope(1, Kind::Ping(pb::Ping { nonce: 42 }));
        let mut stream = encode_frame(&valid).unwrap();
        stream.extend_from_slice(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        let (envelopes, error) = decode_pieces([stream.as_slice()]);
        assert_eq!(envelopes, vec![valid.clone()]);
        assert!(matches!(error, Some(FrameError::Malformed(m)) if m.contains("not an encoded Envelope")));

        let mut stream = encode_frame(&valid).unwrap();
        stream.extend_from_slice(&too_large_prefix());
        let (envelopes, error) = decode_pieces([stream.as_slice()]);
        assert_eq!(envelopes, vec![valid]);
        assert!(matches!(error, Some(FrameError::TooLarge { .. })));
    }

    #[test]
    fn envelopes_breaking_the_rules_are_malformed() {
        // A zero-length frame is an Envelope with nothing set.
        let (envelopes, error) = decode_pieces([[0u8, 0, 0, 0].as_slice()]);
        assert!(envelopes.is_empty());
        assert!(matches!(error, Some(FrameError::Malformed(m)) if m.contains("no kind")));

        // Kind field number 99, unknown to this version: decodes with no kind.
        let unknown_kind = [0, 0, 0, 5, 0x08, 0x01, 0x9a, 0x06, 0x00];
        assert!(matches!(decode_pieces([unknown_kind.as_slice()]).1, Some(FrameError::Malformed(_))));

        // A Ping with request_id 0, hand-encoded since encode_frame refuses it.
        let ping =
            pb::Envelope { request_id: 0, kind: Some(Kind::Ping(pb::Ping { nonce: 1 })) }.encode_to_vec();
        let mut stream = u32::try_from(ping.len()).unwrap().to_be_bytes().to_vec();
        stream.extend_from_slice(&ping);
        assert!(
            matches!(decode_pieces([stream.as_slice()]).1, Some(FrameError::Malformed(m)) if m.contains("nonzero"))
        );
        assert!(matches!(
            encode_frame(&pb::Envelope { request_id: 0, kind: Some(Kind::Ping(pb::Ping { nonce: 1 })) }),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_reported() {
        let frame = encode_frame(&envelope(1, Kind::Ping(pb::Ping { nonce: 42 }))).unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..2]);
        assert!(
            matches!(decoder.finish(), Err(FrameError::Malformed(m)) if m.contains("2 of the 4 length bytes"))
        );
        decoder.push(&frame[2..frame.len() - 1]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert!(decoder.finish().is_err());
        decoder.push(&frame[frame.len() - 1..]);
        assert!(decoder.next_frame().unwrap().is_some());
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn an_idle_decoder_holds_no_buffers() {
        let hello = envelope(0, Kind::Error(pb::ErrorResponse { code: 0, message: "z".repeat(300) }));
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode_all(&[hello.clone(), hello.clone()]));
        assert_eq!(decoder.next_frame(), Ok(Some(hello.clone())));
        assert_eq!(decoder.next_frame(), Ok(Some(hello)));
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!((decoder.body.capacity(), decoder.decoded.capacity()), (0, 0));
    }

    #[test]
    fn the_buffer_stays_bounded_with_large_pushes() {
        let big = envelope(9, Kind::Error(pb::ErrorResponse { code: 0, message: "y".repeat(200_000) }));
        let stream: Vec<u8> = encode_all(&[big.clone(), big.clone(), big.clone()]);
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream);
        assert_eq!(decoder.buffered_bytes(), 0);
        for _ in 0..3 {
            assert_eq!(decoder.next_frame(), Ok(Some(big.clone())));
        }
        assert_eq!(decoder.next_frame(), Ok(None));
        assert!(decoder.body.capacity() <= RETAINED_BUFFER_BYTES);
    }
}
