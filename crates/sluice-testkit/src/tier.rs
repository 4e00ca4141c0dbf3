//! Test sizes and measured figures.
//!
//! The fault suite runs at the sizes the issues name in the default tier (what `.ci/run` runs)
//! and at larger sizes in the `slow` tier (`scripts/test-slow.sh`, which sets `SLUICE_TIER=slow`).
//! Every fault test reports the figure it measured through [`figure`], so one command prints the
//! table of faults, pass figures and measured figures (`scripts/fault-table.sh`).

use std::fs::OpenOptions;
use std::io::Write as _;

/// True in the `slow` tier (`SLUICE_TIER=slow`).
pub fn slow_tier() -> bool {
    std::env::var("SLUICE_TIER").is_ok_and(|tier| tier == "slow")
}

/// `default` in the default tier, `slow` in the slow tier.
pub fn tiered<T>(default: T, slow: T) -> T {
    if slow_tier() { slow } else { default }
}

/// Reports one measured figure of a fault test: printed to stderr (shown with `--nocapture` or
/// when the test fails) and, when `SLUICE_FIGURES` names a file, appended to it as one
/// tab-separated line `fault<TAB>pass figure<TAB>measured figure`.
pub fn figure(fault: &str, pass: &str, measured: &str) {
    eprintln!("figure: {fault} | pass: {pass} | measured: {measured}");
    let Ok(path) = std::env::var("SLUICE_FIGURES") else {
        return;
    };
    let line = format!("{fault}\t{pass}\t{measured}\n");
    // Tests run in parallel: one write of one whole line per call, opened in append mode.
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(&path) {
        let _ = file.write_all(line.as_bytes());
    }
}
