//! libFuzzer entry point for `sluice_fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::config::run(data));
