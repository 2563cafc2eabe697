#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mixnn_designer::checkpoint::fuzzing::checkpoint(data));
