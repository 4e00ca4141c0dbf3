//! Fuzz targets for Sluice's untrusted inputs, one module per target, each a `run(data)` that
//! panics on a finding. The binaries in `fuzz_targets/` hand libFuzzer's inputs to them; see
//! `README.md` for how they are built and run on the stable toolchain.
//!
//! - [`config`]: the config loader, `sluice_config::parse`, on arbitrary text: never panics,
//!   every error has a position and (unless it is about the whole document) a field, and no
//!   input makes the parser allocate more than [`config::PEAK_BYTES_MAX`].
//! - [`conn`]: the connection state machine, `sluice_conn::Conn`, driven by event sequences
//!   that the fuzzer's bytes choose: no byte forwarded twice or out of order, bounded buffers,
//!   each buffer released once, one close, and never stuck with nothing left to wake it.
//!
//! What this crate does not do: it changes nothing in the product crates and reaches them only
//! through their public APIs.

#![deny(unsafe_code)]

pub mod alloc;
pub mod config;
pub mod conn;

/// The seeds and regression inputs through each target without libFuzzer, for a stable
/// `cargo test` (and a debugger) when the instrumented build is not at hand.
#[cfg(test)]
mod tests {
    use std::path::Path;

    fn replay(target: &str, run: fn(&[u8])) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut inputs = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                eprintln!("{}", path.display());
                run(&std::fs::read(&path).unwrap());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no inputs for {target}");
    }

    #[test]
    fn config_inputs() {
        replay("config", crate::config::run);
    }

    #[test]
    fn conn_inputs() {
        replay("conn", crate::conn::run);
    }
}
