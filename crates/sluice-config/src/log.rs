//! Sluice's own log: the level names and directives that `log.level`, `--log-level` and
//! RUST_LOG accept, checked in one place so that the three agree.

use crate::Location;

/// `log: { level, format }`: how Sluice writes its own log (on stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// The filter, as [`log_directives`] writes it (`info`, the default; `info,sluice_health=debug`).
    /// `--log-level` and RUST_LOG take precedence over it.
    pub level: String,
    /// Where `log.level` is written, if it is, for the binary's own check of the filter.
    pub level_location: Option<Location>,
    /// One line a human reads, or one JSON object a line (`log.format`, default text).
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".to_owned(),
            level_location: None,
            format: LogFormat::Text,
        }
    }
}

/// The shape of each log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogFormat {
    /// `2024-01-01T00:00:00Z  INFO listening listener=front bind=...`.
    #[default]
    Text,
    /// One JSON object a line, with `timestamp`, `level`, `message` and the fields.
    Json,
}

/// The level names accepted, and the level each means (`warning` is `warn`).
pub const LOG_LEVELS: &[(&str, &str)] = &[
    ("off", "off"),
    ("error", "error"),
    ("warn", "warn"),
    ("warning", "warn"),
    ("info", "info"),
    ("debug", "debug"),
    ("trace", "trace"),
];

/// Checks a level or comma-separated `target=level` directives and writes them as the log
/// filter reads them: level names are case-insensitive and `warning` becomes `warn`. A word
/// the filter would take for a target name (`warning2`, `verbose`), which turns every line
/// off, is an error: the message says why and what is expected.
pub fn log_directives(text: &str) -> Result<String, String> {
    let invalid = |why: String| {
        let names: Vec<&str> = LOG_LEVELS.iter().map(|(name, _)| *name).collect();
        format!(
            "{why}; expected a level ({}) or comma-separated target=level directives, like \
             \"info,sluice_health=debug\"",
            names.join(", ")
        )
    };
    let mut directives = Vec::new();
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        let Some((_, level)) = LOG_LEVELS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(level))
        else {
            return Err(invalid(format!("unknown level {level:?}")));
        };
        directives.push(match target {
            Some("") => return Err(invalid(format!("no target before \"={level}\""))),
            Some(target) => format!("{target}={level}"),
            None => (*level).to_owned(),
        });
    }
    if directives.is_empty() {
        return Err(invalid("empty".to_owned()));
    }
    Ok(directives.join(","))
}
