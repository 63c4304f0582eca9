//! Rules on envelopes that hold whatever the connection state: which kinds need a request id, which fields
//! must be set, and how big a peer exchange answer may be. Checked on every frame sent and received (see
//! [`encode_frame`](super::encode_frame) and [`FrameDecoder`](super::FrameDecoder)), so a connection handler
//! only ever sees envelopes that follow them.
//!
//! Also the two pure decisions of the conversation: which protocol version to speak, and which records fit
//! in a peer exchange answer.

use prost::Message;

use super::pb::{self, envelope::Kind};
use super::{MAX_FRAME_BYTES, MAX_PEER_EXCHANGE_RECORDS, SUPPORTED_PROTOCOL_VERSIONS};

/// Most bytes an Envelope adds around its `PeerExchangeResponse`: the request id (tag and a varint of at most
/// 10 bytes) and the kind (tag and a length varint of at most 3 bytes for anything under 2 MiB).
const ENVELOPE_OVERHEAD_MAX_BYTES: usize = 16;

/// Field number of `PeerExchangeResponse.records`, needed to count the bytes one record adds to the answer.
const PEER_EXCHANGE_RECORDS_FIELD: u32 = 1;

/// The name of an envelope kind as in `wire.proto`, for messages and logs.
pub(super) fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Hello(_) => "Hello",
        Kind::GetRecordRequest(_) => "GetRecordRequest",
        Kind::GetRecordResponse(_) => "GetRecordResponse",
        Kind::Ping(_) => "Ping",
        Kind::Pong(_) => "Pong",
        Kind::PeerExchangeRequest(_) => "PeerExchangeRequest",
        Kind::PeerExchangeResponse(_) => "PeerExchangeResponse",
        Kind::Error(_) => "ErrorResponse",
        Kind::DialBackRequest(_) => "DialBackRequest",
        Kind::DialBackResponse(_) => "DialBackResponse",
        Kind::PunchRequest(_) => "PunchRequest",
        Kind::PunchIntroduction(_) => "PunchIntroduction",
        Kind::PunchResponse(_) => "PunchResponse",
        Kind::RelayReservationRequest(_) => "RelayReservationRequest",
        Kind::RelayReservationResponse(_) => "RelayReservationResponse",
        Kind::CircuitRequest(_) => "CircuitRequest",
        Kind::CircuitIncoming(_) => "CircuitIncoming",
        Kind::CircuitResponse(_) => "CircuitResponse",
        Kind::RecordUpdate(_) => "RecordUpdate",
        Kind::RecordUpdateAck(_) => "RecordUpdateAck",
    }
}

/// Checks the rules of `wire.proto` that hold for an envelope on its own. The error says which rule.
pub(super) fn check_envelope(envelope: &pb::Envelope) -> Result<(), String> {
    let Some(kind) = &envelope.kind else {
        return Err(
            "envelope has no kind set: it is empty, or holds a message type this version does not know"
                .to_owned(),
        );
    };
    let name = kind_name(kind);
    let request_id = envelope.request_id;
    match kind {
        Kind::Hello(_) if request_id != 0 => {
            return Err(format!("Hello must have request_id 0, got {request_id}"));
        }
        // An ErrorResponse may have request_id 0: it then refuses the connection as a whole.
        Kind::Hello(_) | Kind::Error(_) => {}
        _ if request_id == 0 => {
            return Err(format!("{name} must have a nonzero request_id"));
        }
        _ => {}
    }
    match kind {
        Kind::Hello(pb::Hello { record: None, .. })
        | Kind::GetRecordResponse(pb::GetRecordResponse { record: None })
        | Kind::RecordUpdate(pb::RecordUpdate { record: None }) => Err(format!("{name} must carry a record")),
        Kind::PunchRequest(pb::PunchRequest { offer: None })
        | Kind::PunchIntroduction(pb::PunchIntroduction { offer: None, .. })
        | Kind::PunchResponse(pb::PunchResponse { offer: None, .. }) => {
            Err(format!("{name} must carry a signed offer"))
        }
        Kind::PeerExchangeResponse(response) if response.records.len() > MAX_PEER_EXCHANGE_RECORDS => {
            Err(format!(
                "PeerExchangeResponse holds {} records, more than the limit of {MAX_PEER_EXCHANGE_RECORDS}",
                response.records.len()
            ))
        }
        _ => Ok(()),
    }
}

/// The protocol version to speak with the peer that sent `hello`: the highest version both sides support, or
/// `None` when there is none (answer with `ERROR_CODE_UNSUPPORTED_VERSION` and close).
#[must_use]
pub fn negotiate_version(hello: &pb::Hello) -> Option<u32> {
    SUPPORTED_PROTOCOL_VERSIONS
        .iter()
        .copied()
        .filter(|version| *version == hello.protocol_version || hello.supported_versions.contains(version))
        .max()
}

/// Builds the answer to a `PeerExchangeRequest` from candidate records, best first: at most `max_records`
/// (the request's), at most [`MAX_PEER_EXCHANGE_RECORDS`], and only as many as fit in one frame. A record too
/// big for the room left is skipped and later, smaller ones still get a chance, so one large record does not
/// empty the answer.
#[must_use]
pub fn build_peer_exchange_response(
    records: impl IntoIterator<Item = pb::SignedRecord>,
    max_records: u32,
) -> pb::PeerExchangeResponse {
    let limit = usize::try_from(max_records).unwrap_or(usize::MAX).min(MAX_PEER_EXCHANGE_RECORDS);
    let budget = MAX_FRAME_BYTES - ENVELOPE_OVERHEAD_MAX_BYTES;
    let mut response = pb::PeerExchangeResponse::default();
    let mut used = 0;
    for record in records {
        if response.records.len() >= limit {
            break;
        }
        let cost = prost::encoding::message::encoded_len(PEER_EXCHANGE_RECORDS_FIELD, &record);
        if used + cost <= budget {
            used += cost;
            response.records.push(record);
        }
    }
    debug_assert_eq!(response.encoded_len(), used);
    response
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{envelope, sample_record};
    use super::super::{MAX_RECORD_BYTES, PROTOCOL_VERSION, encode_frame};
    use super::*;

    #[test]
    fn request_ids_follow_the_rules() {
        let hello = |record| Kind::Hello(pb::Hello { record, ..Default::default() });
        assert!(check_envelope(&envelope(0, hello(Some(sample_record(1))))).is_ok());
        assert!(
            check_envelope(&envelope(5, hello(Some(sample_record(1))))).unwrap_err().contains("request_id 0")
        );
        assert!(check_envelope(&envelope(0, hello(None))).unwrap_err().contains("must carry a record"));
        assert!(
            check_envelope(&envelope(0, Kind::Ping(pb::Ping { nonce: 1 }))).unwrap_err().contains("nonzero")
        );
        assert!(check_envelope(&envelope(0, Kind::Pong(pb::Pong { nonce: 1 }))).is_err());
        assert!(check_envelope(&envelope(0, Kind::Error(pb::ErrorResponse::default()))).is_ok());
        assert!(check_envelope(&envelope(9, Kind::Error(pb::ErrorResponse::default()))).is_ok());
        assert!(
            check_envelope(&envelope(9, Kind::GetRecordResponse(pb::GetRecordResponse { record: None })))
                .is_err()
        );
        assert!(check_envelope(&pb::Envelope { request_id: 3, kind: None }).unwrap_err().contains("no kind"));
        let too_many = pb::PeerExchangeResponse { records: vec![pb::SignedRecord::default(); 33] };
        assert!(check_envelope(&envelope(1, Kind::PeerExchangeResponse(too_many))).is_err());
    }

    #[test]
    fn version_negotiation_picks_the_highest_common_version() {
        let hello = |protocol_version, supported_versions| pb::Hello {
            protocol_version,
            supported_versions,
            ..Default::default()
        };
        assert_eq!(negotiate_version(&hello(1, vec![1])), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate_version(&hello(3, vec![1, 2, 3])), Some(1));
        assert_eq!(negotiate_version(&hello(1, vec![])), Some(1));
        assert_eq!(negotiate_version(&hello(2, vec![2, 3])), None);
    }

    #[test]
    fn peer_exchange_answer_fits_in_a_frame() {
        let big = pb::SignedRecord { body: vec![7; MAX_RECORD_BYTES], signature: vec![1; 64] };
        let response = build_peer_exchange_response(vec![big; 40], 1000);
        assert!(response.records.len() < MAX_PEER_EXCHANGE_RECORDS, "32 records of 8 KiB cannot fit");
        assert!(!response.records.is_empty());
        let frame = envelope(u64::MAX, Kind::PeerExchangeResponse(response));
        assert!(encode_frame(&frame).is_ok());

        let small: Vec<_> = (1..=40).map(sample_record).collect();
        assert_eq!(build_peer_exchange_response(small.clone(), 5).records, small[..5]);
        assert_eq!(build_peer_exchange_response(small.clone(), u32::MAX).records.len(), 32);
        assert!(build_peer_exchange_response(small, 0).records.is_empty());
    }
}
