#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mixnn_wire::fuzzing::peel_session_bytes(data));
