//! The generated control API (`proto/control.proto`) and the small pieces every client needs: connecting over a
//! Unix socket or TCP, and the one text form of node ids and the topic-name rule shared by server and clients.
//!
//! This module is all that is compiled without the `daemon` feature, which is how `rnctl` stays a thin client.

pub mod client;
pub mod names;

/// Messages, clients and (with the `daemon` feature) servers generated from `proto/control.proto`.
pub mod control {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("remote_network.control.v1");
}

/// The encoded `FileDescriptorSet` of `proto/control.proto` (with its imports): served by gRPC reflection and
/// used by clients to print messages in the proto3 JSON mapping.
pub const CONTROL_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/control_descriptor.bin"));
