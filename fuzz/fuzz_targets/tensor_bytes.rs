#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mixnn_model::fuzzing::tensor_bytes(data));
