//! Configuration errors, each pointing at a file, a line, a column and a key.
//!
//! TOML and serde report byte offsets and their own wording ("unknown field", "usize");
//! this module turns those into positions and the vocabulary of the configuration file
//! ("unknown key", "an integer"), so an operator can act on the message without reading Rust.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where in a configuration file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file as the operator named it (not canonicalised, so messages match the command line).
    pub file: PathBuf,
    /// 1-based line; `None` when the problem concerns the whole file.
    /// (`u32` keeps `ConfigError` small; no configuration has four billion lines.)
    pub line: Option<u32>,
    /// 1-based column, counted in characters.
    pub column: Option<u32>,
}

impl Location {
    /// The location of byte offset `offset` in `text`.
    pub(crate) fn at(file: &Path, text: &str, offset: usize) -> Location {
        let offset = clamp_to_char_boundary(text, offset);
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..offset].chars().count() + 1;
        Location {
            file: file.to_path_buf(),
            line: Some(u32::try_from(line).unwrap_or(u32::MAX)),
            column: Some(u32::try_from(column).unwrap_or(u32::MAX)),
        }
    }

    /// A location for problems that have no better place than the file itself.
    pub(crate) fn file(file: &Path) -> Location {
        Location {
            file: file.to_path_buf(),
            line: None,
            column: None,
        }
    }
}

fn clamp_to_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: missing, unreadable, or not UTF-8.
    #[error("{}: cannot read configuration: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML (unbalanced quotes, duplicate keys, ...).
    #[error("{location}: invalid TOML: {message}")]
    Syntax { location: Location, message: String },
    /// A key this version does not know, usually a typo or a key in the wrong section.
    #[error("{location}: unknown key `{key}` in {section} (expected one of {expected})")]
    UnknownKey {
        location: Location,
        key: String,
        /// "the top level", "[relay]", "[[listener]]", ...
        section: String,
        /// The keys allowed there, for the operator to compare against.
        expected: String,
    },
    /// A value of the wrong type, a missing required key, or a value that fails validation.
    #[error("{location}: {key}: {message}")]
    Invalid {
        location: Location,
        /// Dotted path of the key, e.g. `relay.trusted_networks` or `listener.tls`.
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// Where the problem is, when it is in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Syntax { location, .. }
            | ConfigError::UnknownKey { location, .. }
            | ConfigError::Invalid { location, .. } => Some(location),
        }
    }

    /// A validation error at `span` of `text`.
    pub(crate) fn invalid(
        origin: &Path,
        text: &str,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            location: Location::at(origin, text, span.start),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Translate an error from the TOML parser or from serde into the file's vocabulary.
    pub(crate) fn from_toml(err: &toml::de::Error, text: &str, origin: &Path) -> ConfigError {
        let location = match err.span() {
            Some(span) => Location::at(origin, text, span.start),
            None => Location::file(origin),
        };
        let keys = error_keys(err);
        let message = err.message().trim().replace('\n', "; ");

        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((key, expected)) = rest.split_once('`')
        {
            let expected = expected.trim_start_matches(',').trim();
            let expected = expected
                .strip_prefix("expected one of ")
                .or_else(|| expected.strip_prefix("expected "))
                .unwrap_or(expected);
            return ConfigError::UnknownKey {
                location,
                key: key.to_string(),
                section: section_name(&keys),
                expected: expected.to_string(),
            };
        }

        const SERDE_PHRASES: &[&str] = &[
            "invalid type",
            "invalid value",
            "invalid length",
            "missing field",
            "unknown variant",
            "duplicate field",
        ];
        let from_serde = SERDE_PHRASES.iter().any(|p| message.starts_with(p));
        if keys.is_empty() && !from_serde {
            return ConfigError::Syntax { location, message };
        }
        ConfigError::Invalid {
            location,
            key: if keys.is_empty() {
                "(top level)".to_string()
            } else {
                keys.clone()
            },
            message: reword(&message, &keys),
        }
    }
}

/// Sections written as arrays of tables, so messages show them as `[[name]]`.
const ARRAY_SECTIONS: &[&str] = &["listener", "route", "filter"];

fn section_name(keys: &str) -> String {
    if keys.is_empty() {
        "the top level".to_string()
    } else if ARRAY_SECTIONS.contains(&keys) {
        format!("[[{keys}]]")
    } else {
        format!("[{keys}]")
    }
}

/// The dotted key path serde was inside when it failed.
///
/// `toml::de::Error` records the path but only shows it through `Display`, as a final line
/// "in `a.b`" when the error carries no source text. The bad-configs tests pin this, so a
/// toml upgrade that changes the format fails loudly instead of losing key names.
fn error_keys(err: &toml::de::Error) -> String {
    let mut bare = err.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    shown
        .lines()
        .last()
        .and_then(|line| line.strip_prefix("in `"))
        .and_then(|line| line.strip_suffix('`'))
        .unwrap_or("")
        .to_string()
}

/// Replace serde's Rust vocabulary with the configuration file's.
fn reword(message: &str, keys: &str) -> String {
    if ARRAY_SECTIONS.contains(&keys) && message.contains("expected a sequence") {
        return format!(
            "write [[{keys}]] (an array of tables, one per {keys}), not [{keys}]: {message}"
        );
    }
    // toml's wording when a keyword (tls = "none") is given a non-string value.
    if message == "wanted string or table" {
        return "expected a string".to_string();
    }
    let mut out = message.replace("missing field", "missing required key");
    for rust_type in ["i64", "u64", "usize", "u32", "u16"] {
        out = out.replace(&format!("expected {rust_type}"), "expected an integer");
    }
    out = out.replace("expected a sequence", "expected a list like [\"a\", \"b\"]");
    // Our raw type names ("struct RawRelay", "enum RawTlsMode") mean nothing to an operator.
    if let Some(at) = out.find("expected struct Raw") {
        out.truncate(at);
        out.push_str("expected a table");
    } else if let Some(at) = out.find("expected enum Raw") {
        out.truncate(at);
        out.push_str("expected a string");
    }
    out
}
