//! The keys the parser knows, as a list: what the config reference (`docs/config.md`) must
//! document. It is read from the same schemas that reject unknown fields, so it cannot list a
//! key the parser does not take, nor miss one it does.

use std::fmt;

use crate::validate::SCHEMAS;

/// One key the parser knows, at its place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// The mapping that holds it, from the top of the file; `[]` stands for each item of a
    /// list, and the top level is empty: `listeners[].timeouts`.
    pub parent: &'static str,
    /// The key itself: `connect`.
    pub name: &'static str,
    /// Whether it is built, or reserved for a capability to come.
    pub support: Support,
}

/// Whether a known key does something yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Support {
    /// Read and applied.
    Supported,
    /// Reserved: written in a file it is an error, "not yet supported", at its line.
    NotYetSupported,
}

impl Key {
    /// Its whole path, as the reference writes it: `listeners[].timeouts.connect`.
    pub fn path(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.parent.is_empty() {
            f.write_str(self.name)
        } else {
            write!(f, "{}.{}", self.parent, self.name)
        }
    }
}

/// Every key the parser knows, mapping by mapping from the top of the file, supported keys
/// before reserved ones within each mapping.
pub fn known_keys() -> impl Iterator<Item = Key> {
    SCHEMAS.iter().flat_map(|&(parent, schema)| {
        let supported = schema.supported.iter().map(move |&name| Key {
            parent,
            name,
            support: Support::Supported,
        });
        let reserved = schema.unsupported.iter().map(move |&name| Key {
            parent,
            name,
            support: Support::NotYetSupported,
        });
        supported.chain(reserved)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_is_listed_once() {
        let mut paths: Vec<String> = known_keys().map(|k| k.path()).collect();
        let count = paths.len();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), count, "a key is listed twice");
    }

    #[test]
    fn each_mapping_sits_under_a_known_key() {
        let paths: Vec<String> = known_keys().map(|k| k.path()).collect();
        for (parent, _) in SCHEMAS.iter().filter(|(parent, _)| !parent.is_empty()) {
            let key = parent.strip_suffix("[]").unwrap_or(parent);
            assert!(
                paths.iter().any(|p| p == key),
                "{parent}: no known key {key} holds it"
            );
        }
    }

    #[test]
    fn paths_read_as_the_reference_writes_them() {
        let paths: Vec<String> = known_keys().map(|k| k.path()).collect();
        for path in ["workers", "admin.bind", "listeners[].timeouts.connect"] {
            assert!(paths.iter().any(|p| p == path), "{path} missing");
        }
    }
}
