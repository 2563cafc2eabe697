#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mixnn_wire::fuzzing::block_decode(data));
