//! `log: { level, format }`: Sluice's own log.

use super::{Schema, Walker};
use crate::tree::Node;
use crate::{Log, LogFormat, log_directives};

pub(super) const LOG: Schema = Schema {
    supported: &["level", "format"],
    unsupported: &[],
};

impl Walker<'_> {
    /// `log`; the defaults for what is absent or wrong.
    pub(super) fn log(&mut self, node: &Node) -> Log {
        let mut log = Log::default();
        let Some(fields) = self.mapping(node, "log", &LOG) else {
            return log;
        };
        if let Some(node) = fields.get("level")
            && let Some(text) = self.string(node, "log.level")
        {
            match log_directives(text) {
                Ok(level) => {
                    log.level = level;
                    log.level_location = Some(node.location);
                }
                Err(message) => self.error(node.location, "log.level", message),
            }
        }
        if let Some(node) = fields.get("format") {
            log.format = match self.choice(node, "log.format", &["text", "json"]) {
                Some("json") => LogFormat::Json,
                _ => LogFormat::Text,
            };
        }
        log
    }
}
