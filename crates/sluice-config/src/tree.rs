//! A YAML document as a tree of nodes that remember where they start.
//!
//! serde-saphyr parses and enforces the input budget; this module only turns its events
//! into [`Node`]s so that validation can walk the whole document by hand and report every
//! problem, instead of stopping at the first one as a derived `Deserialize` would.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::Location;

/// The most memory, in bytes, that the tree of one document may take. Aliases let a small
/// file expand into a large tree; serde-saphyr's budget bounds the number of events, and
/// this bounds what each costs here, strings included.
pub(crate) const TREE_BYTES_MAX: usize = 16 * 1024 * 1024;

thread_local! {
    /// Bytes the tree being built may still take. Parsing is synchronous and not
    /// re-entrant, so one counter per thread is exactly one counter per parse.
    static TREE_BYTES_LEFT: Cell<usize> = const { Cell::new(0) };
}

/// Parses `text` into a tree, within serde-saphyr's `options` and [`TREE_BYTES_MAX`].
pub(crate) fn parse(
    text: &str,
    options: serde_saphyr::Options,
) -> Result<Node, serde_saphyr::Error> {
    TREE_BYTES_LEFT.set(TREE_BYTES_MAX);
    let result = serde_saphyr::from_str_with_options(text, options);
    TREE_BYTES_LEFT.set(0);
    result
}

/// Takes `bytes` from the budget of the tree being built.
fn charge<E: de::Error>(bytes: usize) -> Result<(), E> {
    let left = TREE_BYTES_LEFT.get();
    if bytes > left {
        return Err(E::custom(format!(
            "the document expands to more than {} MiB (are aliases repeating large parts?)",
            TREE_BYTES_MAX / (1024 * 1024)
        )));
    }
    TREE_BYTES_LEFT.set(left - bytes);
    Ok(())
}

/// One YAML node and the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    pub location: Location,
}

/// The value of a node, with YAML's implicit typing already applied by serde-saphyr.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order; serde-saphyr rejects duplicate keys before we see them.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The value of `key` when this node is a mapping that holds it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Value::Str(name) if name == key))
                .map(|(_, value)| value),
            _ => None,
        }
    }
}

impl Value {
    /// What the value is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a floating-point number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        // Charged after the fact: the children, already charged, dominate, and a node's own
        // size is a constant.
        charge::<D::Error>(size_of::<Node>() + size_of::<(Node, Node)>())?;
        let at = spanned.referenced;
        Ok(Node {
            value: spanned.value,
            location: Location {
                line: usize::try_from(at.line()).unwrap_or(usize::MAX),
                column: usize::try_from(at.column()).unwrap_or(usize::MAX),
            },
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        // Beyond i128 nothing in a config makes sense; saturate so range checks reject it.
        Ok(Value::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_char<E: de::Error>(self, v: char) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        charge(v.len())?;
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        charge(v.len())?;
        Ok(Value::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        // Only `!!binary` produces bytes; a config never needs them, so keep them as text
        // when they are UTF-8 and let validation reject the value's shape otherwise.
        charge(v.len())?;
        Ok(Value::Str(String::from_utf8_lossy(v).into_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Node, Node>()? {
            entries.push(entry);
        }
        Ok(Value::Map(entries))
    }
}
