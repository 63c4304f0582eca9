//! What a careless or hostile client gets for requests that are not what the API describes: raw bytes sent
//! with a real gRPC client (a pass-through codec), so the daemon's answer to invalid UTF-8, garbage, an oversized
//! message and a megabyte-long field can be checked. The README promises `INVALID_ARGUMENT` (or
//! `RESOURCE_EXHAUSTED` for size) with a short message; never `INTERNAL`, which means a fault of the daemon.

mod common;

use bytes::{Buf, BufMut};
use common::NodeDir;
use remote_network::api::control::ConnectPeerRequest;
use remote_network::api::control::peer_service_client::PeerServiceClient;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Longest message a client-fault status may carry: enough for a sentence naming the field and the rule.
const SHORT: usize = 300;
/// The server's receive limit (tonic's default).
const LIMIT: usize = 4 * 1024 * 1024;

const JOIN_TOPIC: &str = "/remote_network.control.v1.TopicService/JoinTopic";
const CONNECT_PEER: &str = "/remote_network.control.v1.PeerService/ConnectPeer";
const LIST_PEERS: &str = "/remote_network.control.v1.PeerService/ListPeers";
const WATCH_PEERS: &str = "/remote_network.control.v1.PeerService/WatchPeers";
const NODE_INFO: &str = "/remote_network.control.v1.NodeService/GetNodeInfo";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Sends and receives message bytes as they are: what goes on the wire is exactly what the test wrote.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len).to_vec()))
    }
}

/// A unary call with `body` as the request message; the status it failed with.
async fn unary_status(channel: &Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let answer = grpc.unary(tonic::Request::new(body), PathAndQuery::from_static(path), RawCodec).await;
    answer.expect_err(&format!("{path} accepted a malformed request"))
}

/// A server-streaming call with `body` as the request message; the status it failed with.
async fn streaming_status(channel: &Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let answer =
        grpc.server_streaming(tonic::Request::new(body), PathAndQuery::from_static(path), RawCodec).await;
    match answer {
        Err(status) => status,
        // The status may come after the headers, in the trailers of the stream.
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("{path} accepted a malformed request"),
                    Err(status) => break status,
                }
            }
        }
    }
}

/// A length-delimited protobuf field (wire type 2) holding `value`; `value` shorter than 128 bytes.
fn string_field(field: u8, value: &[u8]) -> Vec<u8> {
    let len = u8::try_from(value.len()).expect("short value");
    assert!(len < 0x80, "one-byte length");
    let mut bytes = vec![(field << 3) | 2, len];
    bytes.extend_from_slice(value);
    bytes
}

fn assert_short(status: &tonic::Status, code: Code) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().len() < SHORT, "{} bytes: {}", status.message().len(), status.message());
    assert!(!status.message().is_empty(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_in_a_string_field_is_an_invalid_argument() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let channel = dir.channel().await;
    let not_utf8 = b"top\xff\xfeic";
    for (path, body) in [
        (JOIN_TOPIC, string_field(1, not_utf8)),
        (CONNECT_PEER, string_field(1, not_utf8)),
        (CONNECT_PEER, string_field(2, not_utf8)),
        (LIST_PEERS, string_field(1, not_utf8)),
    ] {
        let status = unary_status(&channel, path, body).await;
        assert_short(&status, Code::InvalidArgument);
        assert!(status.message().contains("UTF-8"), "{path}: {}", status.message());
    }
    // A server-streaming method decodes its one request before answering too.
    let status = streaming_status(&channel, WATCH_PEERS, string_field(2, not_utf8)).await;
    assert_short(&status, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_bytes_are_an_invalid_argument() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let channel = dir.channel().await;
    // An unterminated varint tag, a field with the reserved wire type 7, and a length past the end.
    let garbage: [Vec<u8>; 3] = [vec![0xff; 16], vec![0x0f, 0x00], vec![0x0a, 0x7f, b'x']];
    for body in garbage {
        for path in [JOIN_TOPIC, CONNECT_PEER, NODE_INFO, HEALTH_CHECK] {
            let status = unary_status(&channel, path, body.clone()).await;
            assert_short(&status, Code::InvalidArgument);
        }
        let status = streaming_status(&channel, WATCH_PEERS, body).await;
        assert_short(&status, Code::InvalidArgument);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_the_size_limit_exhausts_a_resource() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let channel = dir.channel().await;
    let status = unary_status(&channel, JOIN_TOPIC, vec![0; LIMIT + 1]).await;
    assert_short(&status, Code::ResourceExhausted);
    assert!(status.message().contains("too large"), "{}", status.message());
    // The daemon is still serving normal requests afterwards.
    let ok = unary_status(&channel, JOIN_TOPIC, string_field(1, b"\xff")).await;
    assert_eq!(ok.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_megabyte_address_is_refused_in_a_short_message() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let mut peers = PeerServiceClient::new(dir.channel().await);
    let huge = "a".repeat(1 << 20);
    for address in [huge.clone(), format!("{huge}:30906"), format!("{}\n:1", "b".repeat(1000))] {
        let status = peers
            .connect_peer(ConnectPeerRequest { address, ..Default::default() })
            .await
            .expect_err("a megabyte is no address");
        assert_short(&status, Code::InvalidArgument);
        assert!(status.message().starts_with("address: "), "{}", status.message());
        assert!(!status.message().contains('\n'), "one line: {}", status.message());
    }
    // A short unparseable address is still quoted whole, so the caller sees what was wrong.
    let status = peers
        .connect_peer(ConnectPeerRequest { address: "notanaddress".to_owned(), ..Default::default() })
        .await
        .expect_err("not an address");
    assert_short(&status, Code::InvalidArgument);
    assert!(status.message().contains("`notanaddress`"), "{}", status.message());
}
