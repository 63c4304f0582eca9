//! A peer that lies, replays or sends garbage, against a real daemon.
//!
//! The rogue side is built from the library's own QUIC endpoint and wire codec, so the handshake is genuine
//! (TLS with a raw ed25519 key) and only the content is hostile: records naming another node than the key the
//! handshake proved, records signed by the wrong key, replays of an older seq, frames that do not decode or
//! declare an absurd size. Each must be refused, its connection closed with the right code, nothing stored,
//! and a well-behaved session on the same daemon must carry on.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{NodeDir, stderr};
use ed25519_dalek::SigningKey;
use prost::Message;
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::{ExchangeStats, GetNodeInfoRequest};
use remote_network::api::names::NodeId;
use remote_network::exchange::session::EnvelopeReader;
use remote_network::quic::{QuicEndpoint, QuicLimits};
use remote_network::wire::{self, VerifyPolicy, pb};

/// Application close codes the daemon uses (see `exchange::session::CloseCode`).
const CLOSE_PROTOCOL: u32 = 2;
const CLOSE_VERIFICATION: u32 = 3;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn node_id(key: &SigningKey) -> NodeId {
    NodeId(key.verifying_key().to_bytes())
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    i64::try_from(now.as_millis()).expect("fits")
}

/// A record body claiming `claimed` with `seq`, listing one address.
fn body(claimed: NodeId, seq: u64) -> pb::RecordBody {
    pb::RecordBody {
        node_id: claimed.as_bytes().to_vec(),
        seq,
        timestamp_ms: now_ms(),
        topics: vec!["lab".into()],
        addresses: vec![pb::Address { address: "127.0.0.1:9".into(), kind: 1 }],
        protocol_versions: vec![wire::PROTOCOL_VERSION],
        ..Default::default()
    }
}

fn hello(record: pb::SignedRecord) -> Vec<u8> {
    let hello = pb::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        supported_versions: vec![wire::PROTOCOL_VERSION],
        record: Some(record),
        observed_address: "127.0.0.1:1".into(),
    };
    wire::encode_frame(&pb::Envelope { request_id: 0, kind: Some(pb::envelope::Kind::Hello(hello)) })
        .expect("frame")
}

/// A QUIC session with the daemon up to the point where it has sent its `Hello` (which is checked).
struct Rogue {
    connection: quinn::Connection,
    send: quinn::SendStream,
    reader: EnvelopeReader,
    _endpoint: QuicEndpoint,
}

impl Rogue {
    async fn connect(daemon: SocketAddr, tls_key: &SigningKey, daemon_id: NodeId) -> Self {
        let endpoint =
            QuicEndpoint::bind("127.0.0.1:0".parse().expect("addr"), tls_key, QuicLimits::default())
                .expect("bind");
        let outbound = endpoint.connect(daemon, Some(daemon_id)).await.expect("handshake");
        let (send, recv) = outbound.connection.accept_bi().await.expect("the daemon opens the stream");
        let mut reader = EnvelopeReader::new(recv);
        let first = reader.next().await.expect("frame").expect("a Hello");
        let Some(pb::envelope::Kind::Hello(hello)) = first.kind else {
            panic!("first message is not a Hello")
        };
        // The daemon's own record verifies against the key its handshake proved.
        wire::verify_record(&hello.record.expect("record"), Some(daemon_id), &VerifyPolicy::at(now_ms()))
            .expect("the daemon's record verifies");
        Self { connection: outbound.connection, send, reader, _endpoint: endpoint }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The daemon may close first; the close code is what the test checks.
        let _ = self.send.write_all(bytes).await;
    }

    /// The application close code the daemon closed the connection with.
    async fn close_code(&self) -> u32 {
        match tokio::time::timeout(Duration::from_secs(30), self.connection.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                u32::try_from(close.error_code.into_inner()).expect("small code")
            }
            Ok(other) => panic!("closed without an application code: {other}"),
            Err(_) => panic!("the daemon kept the connection open"),
        }
    }

    /// Sends a GetRecord request and returns the answer's record seq.
    async fn get_record(&mut self, request_id: u64) -> u64 {
        let request = pb::Envelope {
            request_id,
            kind: Some(pb::envelope::Kind::GetRecordRequest(pb::GetRecordRequest {})),
        };
        self.send(&wire::encode_frame(&request).expect("frame")).await;
        let answer = tokio::time::timeout(Duration::from_secs(30), self.reader.next())
            .await
            .expect("answer in time")
            .expect("frame")
            .expect("an answer");
        assert_eq!(answer.request_id, request_id);
        let Some(pb::envelope::Kind::GetRecordResponse(response)) = answer.kind else {
            panic!("not a record")
        };
        let record = response.record.expect("record");
        pb::RecordBody::decode(record.body.as_slice()).expect("body").seq
    }
}

struct Daemon {
    dir: NodeDir,
    _node: common::TestNode,
    id: NodeId,
    quic: SocketAddr,
}

async fn daemon() -> Daemon {
    let dir = NodeDir::new();
    let node = dir.start();
    let info = NodeServiceClient::new(dir.channel().await)
        .get_node_info(GetNodeInfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .node
        .expect("node");
    let id = NodeId::parse(&info.node_id).expect("id");
    let quic = info.listen.expect("listen").quic.parse().expect("quic addr");
    Daemon { dir, _node: node, id, quic }
}

impl Daemon {
    async fn stats(&self) -> ExchangeStats {
        NodeServiceClient::new(self.dir.channel().await)
            .get_node_info(GetNodeInfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .node
            .expect("node")
            .exchange
            .expect("exchange stats")
    }

    fn stored(&self, id: NodeId) -> Option<u64> {
        let out = self.dir.rnctl(&["-o", "json", "peers", "show", &id.to_string()]);
        if out.status.code() == Some(5) {
            return None;
        }
        assert!(out.status.success(), "{}", stderr(&out));
        common::json(&out)["peer"]["seq"].as_str().map(|s| s.parse().expect("seq"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_for_another_node_than_the_tls_key_is_refused() {
    let daemon = daemon().await;
    let (tls, other) = (key(1), key(2));
    let mut rogue = Rogue::connect(daemon.quic, &tls, daemon.id).await;
    // Signed properly by `other`, but presented over a connection authenticated as `tls`.
    rogue.send(&hello(wire::sign_record(&body(node_id(&other), 1), &other))).await;
    assert_eq!(rogue.close_code().await, CLOSE_VERIFICATION);
    assert_eq!(daemon.stored(node_id(&tls)), None);
    assert_eq!(daemon.stored(node_id(&other)), None);
    assert_eq!(daemon.stats().await.impersonations_rejected, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_signed_by_another_key_is_refused() {
    let daemon = daemon().await;
    let (tls, forger) = (key(3), key(4));
    let mut rogue = Rogue::connect(daemon.quic, &tls, daemon.id).await;
    // Names the right node, but the signature is the forger's.
    rogue.send(&hello(wire::sign_record(&body(node_id(&tls), 1), &forger))).await;
    assert_eq!(rogue.close_code().await, CLOSE_VERIFICATION);
    assert_eq!(daemon.stored(node_id(&tls)), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_record_is_a_replay_and_is_refused() {
    let daemon = daemon().await;
    let peer = key(5);
    let newer = wire::sign_record(&body(node_id(&peer), 10), &peer);
    let older = wire::sign_record(&body(node_id(&peer), 5), &peer);

    let mut first = Rogue::connect(daemon.quic, &peer, daemon.id).await;
    first.send(&hello(newer)).await;
    assert!(first.get_record(1).await > 0, "the verified session serves requests");
    assert_eq!(daemon.stored(node_id(&peer)), Some(10));
    first.connection.close(0u32.into(), b"done");

    let mut second = Rogue::connect(daemon.quic, &peer, daemon.id).await;
    second.send(&hello(older)).await;
    assert_eq!(second.close_code().await, CLOSE_VERIFICATION);
    assert_eq!(daemon.stored(node_id(&peer)), Some(10), "the stored record is unchanged");
    assert_eq!(daemon.stats().await.replays_rejected, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_oversized_frames_close_only_their_own_connection() {
    let daemon = daemon().await;
    let good_key = key(6);
    let mut good = Rogue::connect(daemon.quic, &good_key, daemon.id).await;
    good.send(&hello(wire::sign_record(&body(node_id(&good_key), 1), &good_key))).await;
    let seq = good.get_record(1).await;
    assert!(seq > 0);

    // A frame declaring 4 GiB is refused as soon as its length is read.
    let mut oversized = Rogue::connect(daemon.quic, &key(7), daemon.id).await;
    oversized.send(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
    assert_eq!(oversized.close_code().await, CLOSE_PROTOCOL);

    // A frame of the right shape whose content is not an envelope.
    let mut garbage = Rogue::connect(daemon.quic, &key(8), daemon.id).await;
    garbage.send(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(garbage.close_code().await, CLOSE_PROTOCOL);

    // Garbage after a valid exchange ends that session too.
    let late_key = key(9);
    let mut late = Rogue::connect(daemon.quic, &late_key, daemon.id).await;
    late.send(&hello(wire::sign_record(&body(node_id(&late_key), 1), &late_key))).await;
    late.get_record(1).await;
    late.send(&[0, 0, 0, 3, 0xde, 0xad, 0xbe]).await;
    assert_eq!(late.close_code().await, CLOSE_PROTOCOL);

    // The well-behaved session never noticed.
    assert!(good.connection.close_reason().is_none());
    assert_eq!(good.get_record(2).await, seq);
    assert_eq!(daemon.stored(node_id(&good_key)), Some(1));
    assert_eq!(daemon.stored(node_id(&key(7))), None);
}
