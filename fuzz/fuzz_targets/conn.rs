//! libFuzzer entry point for `sluice_fuzz::conn`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::conn::run(data));
