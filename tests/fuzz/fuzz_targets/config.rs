//! Fuzz target for config file text: TOML, key flattening, every setting parsed and checked, durations and byte sizes
//! read back (`remote_network::config::fuzz_config_text`).
//! Any panic, overflow or out-of-bounds access found here is a bug that input could trigger.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    remote_network::config::fuzz_config_text(data);
});
