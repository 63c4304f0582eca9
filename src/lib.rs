//! remote-network: a peer-to-peer node that finds peers per topic on the BitTorrent Mainline DHT, exchanges
//! signed metadata with them over QUIC, keeps what it learns in SQLite, and is driven through a gRPC control API.
//!
//! Without the default `daemon` feature only [`api`] is built: the generated control API and client helpers that
//! `rnctl` (and any Rust program) uses to talk to a running node.

pub mod api;

#[cfg(feature = "daemon")]
pub mod clock;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod control;
#[cfg(feature = "daemon")]
pub mod dht;
#[cfg(feature = "daemon")]
pub mod exchange;
#[cfg(feature = "daemon")]
pub mod identity;
#[cfg(feature = "daemon")]
pub mod lifecycle;
#[cfg(feature = "daemon")]
pub mod limits;
#[cfg(feature = "daemon")]
pub mod loopback;
#[cfg(feature = "daemon")]
pub mod nat;
#[cfg(feature = "daemon")]
pub mod node;
#[cfg(feature = "daemon")]
pub mod quic;
#[cfg(feature = "daemon")]
pub mod store;
#[cfg(feature = "daemon")]
pub mod sync;
#[cfg(feature = "daemon")]
pub mod telemetry;
#[cfg(feature = "daemon")]
pub mod wire;
