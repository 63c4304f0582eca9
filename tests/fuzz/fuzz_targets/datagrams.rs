//! Fuzz target for UDP datagrams outside QUIC as the endpoint and DHT sockets receive them: address reflection requests
//! and replies, birthday probes, KRPC replies (`remote_network::wire::fuzz_datagram`).
//! Any panic, overflow or out-of-bounds access found here is a bug that input could trigger.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    remote_network::wire::fuzz_datagram(data);
});
