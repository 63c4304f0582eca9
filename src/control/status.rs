//! Statuses for requests tonic refuses before a handler runs, mapped once for every service.
//!
//! The README promises that a malformed request is answered `INVALID_ARGUMENT` (or `RESOURCE_EXHAUSTED` when
//! it is too big), with a short message. tonic answers those itself, before any handler sees the request: a body
//! that does not decode is `INTERNAL` ("failed to decode Protobuf message: …", also for invalid UTF-8 in a
//! string field), a frame with a bad compression flag `INTERNAL` ("protocol error: …"), and a message over the
//! 4 MiB receive limit `OUT_OF_RANGE`. Those are the caller's faults, not ours: [`ClientFaultsLayer`] rewrites
//! them, and caps any error message at [`MAX_MESSAGE_BYTES`] so that no status (a handler's included) can grow
//! past what clients accept in a header.
//!
//! Why a tower layer on the HTTP responses rather than a tonic hook: the decode errors are made by the codec
//! inside the generated servers (`tonic_prost::ProstCodec`, chosen at code generation), and tonic has no
//! server-side hook for statuses it produces; interceptors see requests only. A layer sees every service's
//! responses, including health and reflection, in one place.
//!
//! Only trailers-only responses (the status in the headers, no body) are rewritten. That is how tonic answers
//! every unary error and every request it cannot decode on unary and server-streaming methods: it decodes the
//! single request message before the handler is called. The only method with a request stream is server
//! reflection, which ends its stream with OK when a request in it does not decode, so no client fault ever
//! reaches the trailers of a streamed response. (Rewriting trailers would also need the `http-body` crate,
//! which this crate does not depend on directly.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use tonic::{Code, Status};

use super::convert::truncated;

/// Longest error message sent, in bytes; longer ones are cut (at a character boundary) with their length said.
/// Far below the header list limits of HTTP/2 clients (16 KiB for tonic's), which a status over them breaks.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// The layer added to every control server: see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientFaultsLayer;

impl<S> tower::Layer<S> for ClientFaultsLayer {
    type Service = ClientFaults<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientFaults { inner }
    }
}

/// The service [`ClientFaultsLayer`] wraps around the control API.
#[derive(Debug, Clone)]
pub struct ClientFaults<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for ClientFaults<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    // Boxed: the crate has no pin-projection helper, and one allocation per request is noise beside the
    // HTTP/2 and protobuf work of serving it.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(status) = rewrite(response.headers()) {
                // Replace both headers from a fresh status so the message is percent-encoded as gRPC wants.
                let mut fresh = HeaderMap::new();
                if status.add_header(&mut fresh).is_ok() {
                    let headers = response.headers_mut();
                    headers.remove(Status::GRPC_MESSAGE);
                    for name in [Status::GRPC_STATUS, Status::GRPC_MESSAGE] {
                        if let Some(value) = fresh.remove(&name) {
                            headers.insert(name, value);
                        }
                    }
                    // tonic leaves the status it answered with in the extensions; keep it in step.
                    response.extensions_mut().insert(status);
                }
            }
            Ok(response)
        })
    }
}

/// The status to answer instead of the one in `headers`, if it needs changing.
fn rewrite(headers: &HeaderMap) -> Option<Status> {
    let code = Code::from_bytes(headers.get(Status::GRPC_STATUS)?.as_bytes());
    let message = headers.get(Status::GRPC_MESSAGE).map(|v| percent_decode(v.as_bytes())).unwrap_or_default();
    let (code, message) = match classify(code, &message) {
        Some((code, message)) => (code, message),
        None if message.len() > MAX_MESSAGE_BYTES => (code, message),
        None => return None,
    };
    Some(Status::new(code, truncated(&message, MAX_MESSAGE_BYTES)))
}

/// tonic's own statuses for requests that are the client's fault: the code they get, the prefix tonic's message
/// starts with, and what the caller is told instead (followed by the rest of tonic's message, which says where
/// the request went wrong).
const CLIENT_FAULTS: [(Code, &str, Code, &str); 4] = [
    (
        Code::Internal,
        "failed to decode Protobuf message: ",
        Code::InvalidArgument,
        "the request is not a valid protobuf message: ",
    ),
    (
        Code::Internal,
        "failed to decode Protobuf message",
        Code::InvalidArgument,
        "the request is not a valid protobuf message",
    ),
    (Code::Internal, "protocol error: ", Code::InvalidArgument, "the request is not valid gRPC framing: "),
    (
        Code::OutOfRange,
        "Error, decoded message length too large: ",
        Code::ResourceExhausted,
        "the request message is too large: ",
    ),
];

/// The code and message a status tonic made for a client fault should have instead.
fn classify(code: Code, message: &str) -> Option<(Code, String)> {
    CLIENT_FAULTS.iter().find_map(|&(tonic_code, prefix, ours, said)| {
        let rest = message.strip_prefix(prefix).filter(|_| code == tonic_code)?;
        Some((ours, format!("{said}{rest}")))
    })
}

/// Undoes gRPC's percent-encoding of `grpc-message`; bytes that do not form UTF-8 are replaced.
fn percent_decode(encoded: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        match (
            encoded[i],
            encoded.get(i + 1).copied().and_then(hex),
            encoded.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits make at most 0xff.
                bytes.push(u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX));
                i += 3;
            }
            (byte, _, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(status: &Status) -> HeaderMap {
        let mut headers = HeaderMap::new();
        status.add_header(&mut headers).expect("valid status");
        headers
    }

    #[test]
    fn decode_failures_are_invalid_arguments() {
        let tonic_said = Status::internal(
            "failed to decode Protobuf message: JoinTopicRequest.topic: invalid string value: data is not UTF-8 \
             encoded",
        );
        let status = rewrite(&headers_of(&tonic_said)).expect("rewritten");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "the request is not a valid protobuf message: JoinTopicRequest.topic: invalid string value: data is \
             not UTF-8 encoded"
        );
        let framing = Status::internal("protocol error: received message with invalid compression flag: 7");
        assert_eq!(rewrite(&headers_of(&framing)).expect("rewritten").code(), Code::InvalidArgument);
    }

    #[test]
    fn oversized_requests_exhaust_a_resource() {
        let tonic_said = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        let status = rewrite(&headers_of(&tonic_said)).expect("rewritten");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("5000000 bytes"), "{}", status.message());
    }

    #[test]
    fn handler_statuses_pass_unchanged_unless_too_long() {
        for status in [
            Status::internal("store: disk I/O error"),
            Status::out_of_range("page 7 is past the end"),
            Status::invalid_argument("topic: a topic is 1-255 bytes"),
        ] {
            assert!(rewrite(&headers_of(&status)).is_none(), "{status:?}");
        }
        let long = Status::unavailable(format!("relay failed: {}", "é".repeat(5000)));
        let status = rewrite(&headers_of(&long)).expect("cut");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().len() < MAX_MESSAGE_BYTES + 64, "{}", status.message().len());
        assert!(status.message().starts_with("relay failed: é"));
    }

    #[test]
    fn percent_decoding_round_trips_what_tonic_encodes() {
        let status = Status::internal("a b%c\u{e9}\n");
        let headers = headers_of(&status);
        let encoded = headers.get(Status::GRPC_MESSAGE).expect("message");
        assert_eq!(percent_decode(encoded.as_bytes()), "a b%c\u{e9}\n");
        assert_eq!(percent_decode(b"100%"), "100%");
    }
}
