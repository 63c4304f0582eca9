//! Fuzz target for a relay circuit stream as its far end reads it: the setup frame, then length-prefixed relayed
//! packets (`remote_network::exchange::relay::fuzz_circuit_stream`).
//! Any panic, overflow or out-of-bounds access found here is a bug that input could trigger.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    remote_network::exchange::relay::fuzz_circuit_stream(data);
});
