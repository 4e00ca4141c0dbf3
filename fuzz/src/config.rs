//! The config loader on arbitrary text.
//!
//! Checks, for every input: `parse` returns instead of panicking or hanging; it allocates at most
//! [`PEAK_BYTES_MAX`] at once (alias bombs and deep nesting included); every error has a line
//! and column inside the text, names a field unless it is about the document as a whole, and
//! prints as one line; errors come sorted by position; a config that loads keeps the promises
//! its type documents.

use std::collections::HashSet;
use std::path::Path;

use sluice_config::{Config, ConfigErrors};

use crate::alloc;

/// The most memory one parse may take at once. `sluice-config` caps the tree at 16 MiB and the
/// parser's recorded anchors at 4 MiB; inputs here are far smaller than its 4 MiB file limit.
/// A bound of twice the sum leaves room for the parser's own buffers while still catching an
/// expansion that escapes the budgets (a billion-laughs document would take gigabytes).
pub const PEAK_BYTES_MAX: usize = 40 * 1024 * 1024;

/// Messages of errors that name no field: those about the document as a whole (see
/// `sluice_config::ConfigError`: YAML that does not parse, an empty document, a document that
/// is not a mapping, a top-level key that is not a name), and an empty top-level key, whose
/// path is the empty name itself (the message quotes it).
const NO_FIELD_ERRORS: [&str; 5] = [
    "invalid YAML: ",
    "the file is empty",
    "expected a mapping of settings",
    "expected a field name",
    "unknown field \"\",",
];

/// One input: `data` as text (invalid UTF-8 replaced, as a file that `load` accepts has none).
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("fuzz.yaml");
    let (result, peak) = alloc::peak_during(|| sluice_config::parse(&text, file));
    assert!(
        peak <= PEAK_BYTES_MAX,
        "parsing {} bytes took {peak} bytes of memory at once (bound {PEAK_BYTES_MAX})",
        text.len()
    );
    match &result {
        Ok(config) => check_config(config),
        Err(errors) => check_errors(&text, errors),
    }
}

/// What `Config`'s documentation promises about a config that loaded.
fn check_config(config: &Config) {
    assert!(!config.listeners.is_empty(), "a config without listeners");
    let mut names = HashSet::new();
    for listener in &config.listeners {
        assert!(
            (1..=64).contains(&listener.name.len()),
            "listener name {:?}",
            listener.name
        );
        assert!(
            names.insert(&listener.name),
            "two listeners named {:?}",
            listener.name
        );
        assert!(
            !listener.backends.is_empty(),
            "listener {:?} has no backends",
            listener.name
        );
        let mut addresses = HashSet::new();
        for backend in &listener.backends {
            assert!(backend.weight <= 1000, "weight {}", backend.weight);
            assert!(
                addresses.insert(&backend.address),
                "backend {} twice in listener {:?}",
                backend.address,
                listener.name
            );
            assert!(backend.location.line >= 1);
        }
        assert!(listener.location.line >= 1);
    }
}

/// Every error can be found in the file and read on one line.
fn check_errors(text: &str, errors: &ConfigErrors) {
    assert!(!errors.0.is_empty(), "an error list with no error");
    let lines = line_count(text);
    let chars = text.chars().count();
    let mut previous = (0, 0);
    for error in errors {
        let shown = error.to_string();
        assert!(
            error.line >= 1 && error.line <= lines,
            "line {} outside the text's {lines} lines: {shown}",
            error.line
        );
        assert!(
            error.column >= 1 && error.column <= chars + 1,
            "column {} outside the text: {shown}",
            error.column
        );
        assert!(
            !error.field.is_empty() || NO_FIELD_ERRORS.iter().any(|m| error.message.starts_with(m)),
            "an error that names no field: {shown}"
        );
        assert!(
            !error.message.is_empty(),
            "an error with no message: {shown}"
        );
        assert!(
            !shown.chars().any(char::is_control),
            "an error that does not print as one line of plain text: {shown:?}"
        );
        assert!(
            (error.line, error.column) >= previous,
            "errors out of order: {errors}"
        );
        previous = (error.line, error.column);
    }
}

/// Lines as YAML counts them (a line break is `\n`, `\r\n` or `\r`), plus one for a position
/// just past the end. Unicode line separators count too, to stay generous to the parser.
fn line_count(text: &str) -> usize {
    let mut breaks = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => breaks += 1,
            _ => {}
        }
    }
    breaks + 2
}
