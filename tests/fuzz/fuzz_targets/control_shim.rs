//! Fuzz target for the control socket's HTTP/2 framing shim: a client's bytes, preface, frames and HPACK header
//! blocks (`remote_network::control::fuzz_forward_requests`).
//! Any panic, overflow or out-of-bounds access found here is a bug that input could trigger.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    remote_network::control::fuzz_forward_requests(data);
});
