//! What goes wrong in a config file, and where.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::Location;

/// Everything wrong with one config file; never empty.
///
/// Errors are sorted by position in the file, so they read top-down like the file does.
/// `Display` writes one error per line, without a trailing newline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem in a config file: where it is, which field, and what was expected.
///
/// `Display` gives `{file}:{line}:{column}: {field}: {message}`, e.g.
/// `sluice.yaml:7:16: listeners[0].timeouts.connect: invalid duration "2 sec": ...`.
/// Two parts are left out when they do not apply: the position when `line` is 0 (the file
/// could not be read at all), and the field when `field` is empty (a YAML syntax error or
/// a problem with the document as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file as the caller named it.
    pub file: PathBuf,
    /// 1-based line; 0 when the error is about the file rather than a place in it.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// Path of the field, such as `listeners[1].backends[0].weight`; empty when none applies.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ConfigError {
    /// An error at `location` in `file`.
    pub fn new(
        file: &Path,
        location: Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: location.line,
            column: location.column,
            field: field.into(),
            message: message.into(),
        }
    }

    /// Where the error is, as a [`Location`].
    pub fn location(&self) -> Location {
        Location {
            line: self.line,
            column: self.column,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl ConfigErrors {
    /// The errors, first in the file first.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
