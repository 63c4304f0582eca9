//! Fuzz target for the peer-to-peer receive path: arbitrary bytes as a QUIC stream from a hostile peer,
//! through framing, envelope rules and record verification (`remote_network::wire::fuzz_decode_and_verify`).
//! Any panic, overflow or out-of-bounds access found here is a bug a peer could trigger remotely.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    remote_network::wire::fuzz_decode_and_verify(data);
});
