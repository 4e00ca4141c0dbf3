//! `docs/config.md`, the config reference, stays true to the parser: every key the parser knows
//! is documented (reserved ones marked "not yet supported"), its full example passes
//! `sluice check` and uses every built key, and every reserved key, written in a file, is
//! refused as "not yet supported" at its own line and column.
//!
//! The keys come from `sluice_config::known_keys()`, the table the parser itself checks
//! mappings against, so a key added to the parser without its documentation fails here.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::binary;
use serde::Deserialize;
use sluice_config::{Support, known_keys};
use sluice_testkit::{ConfigFile, run_config_command};

/// Marks the full example: the fenced yaml block right after it.
const FULL_EXAMPLE_MARK: &str = "<!-- full-example -->";
const NOT_YET: &str = "not yet supported";

fn reference() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the config reference {}: {e}", path.display()))
}

/// The table rows of the reference that document a key: `| `path` | ...`, by path.
fn rows(reference: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in reference.lines() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((path, _)) = rest.split_once("` |") else {
            continue;
        };
        let previous = rows.insert(path.to_owned(), line.to_owned());
        assert!(previous.is_none(), "docs/config.md documents {path} twice");
    }
    rows
}

/// The fenced yaml block after [`FULL_EXAMPLE_MARK`].
fn full_example(reference: &str) -> String {
    let (_, after) = reference
        .split_once(FULL_EXAMPLE_MARK)
        .unwrap_or_else(|| panic!("docs/config.md has no {FULL_EXAMPLE_MARK}"));
    let after = after.trim_start();
    let body = after
        .strip_prefix("```yaml\n")
        .unwrap_or_else(|| panic!("{FULL_EXAMPLE_MARK} is not followed by a ```yaml block"));
    let (yaml, _) = body
        .split_once("\n```")
        .expect("the full example's block is not closed");
    format!("{yaml}\n")
}

#[test]
fn the_reference_documents_every_key_the_parser_knows() {
    let rows = rows(&reference());
    let mut problems = Vec::new();
    for key in known_keys() {
        let path = key.path();
        match (rows.get(&path), key.support) {
            (None, _) => problems.push(format!("{path}: not documented (no `| `{path}` |` row)")),
            (Some(row), Support::NotYetSupported) if !row.contains(NOT_YET) => {
                problems.push(format!(
                    "{path}: reserved, but its row does not say {NOT_YET:?}"
                ));
            }
            (Some(row), Support::Supported) if row.contains(NOT_YET) => {
                problems.push(format!("{path}: built, but its row says {NOT_YET:?}"));
            }
            _ => {}
        }
    }
    assert!(
        problems.is_empty(),
        "docs/config.md:\n{}",
        problems.join("\n")
    );
}

/// Files the example names under `/etc/sluice/` (password files), made in a fresh directory.
struct ExampleFiles {
    dir: PathBuf,
}

impl ExampleFiles {
    const PREFIX: &str = "/etc/sluice/";

    /// Creates each file `yaml` names under [`Self::PREFIX`]; returns `yaml` naming them there.
    fn create(yaml: &str) -> (Self, String) {
        let dir = std::env::temp_dir().join(format!("sluice-config-doc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut names = BTreeSet::new();
        let mut text = yaml;
        while let Some(at) = text.find(Self::PREFIX) {
            let tail = &text[at + Self::PREFIX.len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .collect();
            names.insert(name);
            text = tail;
        }
        for name in &names {
            std::fs::write(dir.join(name), "example-secret\n").unwrap();
        }
        let yaml = yaml.replace(Self::PREFIX, &format!("{}/", dir.display()));
        (Self { dir }, yaml)
    }
}

impl Drop for ExampleFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_full_example_passes_sluice_check() {
    let (_files, yaml) = ExampleFiles::create(&full_example(&reference()));
    let config = ConfigFile::new(&yaml);
    let output = run_config_command(binary(), "check", &config);
    assert_eq!(
        output.status.code(),
        Some(0),
        "sluice check on the full example of docs/config.md:\n{yaml}\nstdout:\n{}\nstderr:\n{}",
        output.stdout,
        output.stderr
    );
    assert!(output.stdout.contains(": ok"), "stdout:\n{}", output.stdout);
}

/// A YAML document reduced to its shape: which keys sit where.
#[derive(Deserialize)]
#[serde(untagged)]
enum Shape {
    Map(BTreeMap<String, Shape>),
    List(Vec<Shape>),
    Scalar(serde::de::IgnoredAny),
}

/// Every key path written in `shape`, as `known_keys` names them (`[]` for list items).
fn paths(shape: &Shape, at: &str, out: &mut BTreeSet<String>) {
    match shape {
        Shape::Map(entries) => {
            for (key, value) in entries {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                paths(value, &path, out);
                out.insert(path);
            }
        }
        Shape::List(items) => {
            for item in items {
                paths(item, &format!("{at}[]"), out);
            }
        }
        Shape::Scalar(_) => {}
    }
}

#[test]
fn the_full_example_uses_every_built_key() {
    let yaml = full_example(&reference());
    let shape: Shape = serde_saphyr::from_str(&yaml).expect("the full example is YAML");
    let mut used = BTreeSet::new();
    paths(&shape, "", &mut used);
    let missing: Vec<String> = known_keys()
        .filter(|k| k.support == Support::Supported)
        .map(|k| k.path())
        .filter(|path| !used.contains(path))
        .collect();
    assert!(
        missing.is_empty(),
        "the full example of docs/config.md does not use: {}",
        missing.join(", ")
    );
}

/// The reserved keys: those the parser reserves and those the reference marks "not yet
/// supported" (so a reference that promises a refusal the parser does not make fails too).
fn reserved_keys() -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = known_keys()
        .filter(|k| k.support == Support::NotYetSupported)
        .map(|k| k.path())
        .collect();
    keys.extend(
        rows(&reference())
            .into_iter()
            .filter(|(_, row)| row.contains(NOT_YET))
            .map(|(path, _)| path),
    );
    keys
}

/// A valid config with every key of `reserved` written in it, each on its own line, and the
/// error `sluice check` must print for each, as `line:column: field: message`.
fn config_with(reserved: &BTreeSet<String>) -> (String, BTreeSet<String>) {
    // Each mapping the keys may sit in: its lines before the reserved keys, their indentation,
    // and its path in error messages.
    let mappings: [(&str, &[&str], usize, &str); 5] = [
        ("", &["workers: 1"], 0, ""),
        (
            "admin",
            &["admin:", "  bind: \"127.0.0.1:19900\""],
            2,
            "admin",
        ),
        (
            "listeners[]",
            &[
                "listeners:",
                "  - name: reserved",
                "    bind: \"127.0.0.1:19901\"",
            ],
            4,
            "listeners[0]",
        ),
        (
            "listeners[].backends[]",
            &["    backends:", "      - address: \"127.0.0.1:19902\""],
            8,
            "listeners[0].backends[0]",
        ),
        (
            "listeners[].health",
            &["    health:", "      check: tcp"],
            6,
            "listeners[0].health",
        ),
    ];
    let mut lines: Vec<String> = Vec::new();
    let mut expected = BTreeSet::new();
    let mut placed = BTreeSet::new();
    for (parent, opening, indent, field_path) in mappings {
        lines.extend(opening.iter().map(|l| (*l).to_owned()));
        for path in reserved {
            let (key_parent, name) = path.rsplit_once('.').unwrap_or(("", path));
            if key_parent != parent {
                continue;
            }
            lines.push(format!("{:indent$}{name}: x", ""));
            let field = if field_path.is_empty() {
                name.to_owned()
            } else {
                format!("{field_path}.{name}")
            };
            expected.insert(format!(
                "{}:{}: {field}: {name} is {NOT_YET}",
                lines.len(),
                indent + 1
            ));
            placed.insert(path.clone());
        }
        if parent == "listeners[].backends[]" {
            // A backend found through DNS has no address: its reserved keys are its only
            // errors (no "missing address").
            let line = "      - { dns: \"db.example\", port: 5432 }";
            lines.push(line.to_owned());
            for name in ["dns", "port"] {
                let column = line.find(&format!("{name}:")).unwrap() + 1;
                let field = format!("listeners[0].backends[1].{name}");
                let message = format!("{}:{column}: {field}: {name} is {NOT_YET}", lines.len());
                expected.insert(message);
            }
        }
    }
    let unplaced: Vec<&String> = reserved.difference(&placed).collect();
    assert!(
        unplaced.is_empty(),
        "no place in the test's config for the reserved keys {unplaced:?}: add their mapping"
    );
    (lines.join("\n") + "\n", expected)
}

#[test]
fn every_reserved_key_is_refused_as_not_yet_supported_at_its_line() {
    let reserved = reserved_keys();
    assert!(!reserved.is_empty(), "no reserved key at all");
    let (yaml, expected) = config_with(&reserved);
    let config = ConfigFile::new(&yaml);
    let output = run_config_command(binary(), "check", &config);
    let prefix = format!("{}:", config.path().display());
    let printed: BTreeSet<String> = output
        .stderr
        .lines()
        .map(|line| line.strip_prefix(&prefix).unwrap_or(line).to_owned())
        .collect();
    let missing: Vec<&String> = expected.difference(&printed).collect();
    let unexpected: Vec<&String> = printed.difference(&expected).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "sluice check on\n{yaml}\nmissing errors:\n{}\nunexpected output:\n{}",
        join_lines(&missing),
        join_lines(&unexpected)
    );
    assert_eq!(output.status.code(), Some(64), "stderr:\n{}", output.stderr);
}

fn join_lines(lines: &[&String]) -> String {
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
