//! Errors of loading a contract: every one names the file, the line and column where it can, what is
//! wrong and what to do (docs/architecture.md: "Errors name the file, the field or offset, and what to do").
//!
//! Schema errors (a field that does not parse, an unknown field, a duplicate key) carry the location
//! serde-saphyr reports; semantic errors (an unknown run, a threshold that does not suit the metric)
//! carry the location of the offending value, kept with `serde_saphyr::Spanned` while parsing.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::localizer::Localizer;
use serde_saphyr::{Location, MessageFormatter, SnippetMode, UserMessageFormatter};

/// Where in a contract file something is: 1-based line and column, as editors count them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    /// The contract file (or the origin given to [`crate::parse`]).
    pub path: PathBuf,
    /// 1-based line; 0 when unknown.
    pub line: usize,
    /// 1-based column in characters; 0 when unknown.
    pub column: usize,
    /// The text of that line, for a snippet under the message.
    pub source_line: Option<String>,
}

impl SourceLocation {
    /// The location of a parsed value in `src`.
    pub(crate) fn at(path: &Path, src: &str, loc: Location) -> Self {
        Self::at_line_col(path, src, loc.line() as usize, loc.column() as usize)
    }

    /// The location `line:column` in `src` (1-based; 0 = unknown).
    pub(crate) fn at_line_col(path: &Path, src: &str, line: usize, column: usize) -> Self {
        let source_line =
            line.checked_sub(1).and_then(|i| src.lines().nth(i)).map(|l| l.trim_end().to_string());
        Self { path: path.to_path_buf(), line, column, source_line }
    }
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.path.display())
        } else {
            write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
        }
    }
}

/// Why a contract could not be loaded. `Display` reads `path:line:col: what is wrong; what to do`.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The file could not be read.
    #[error("{}: cannot read the contract: {source}; check the path (contracts live in `contracts/NAME.yaml`)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The YAML does not parse into the schema: bad syntax, an unknown or missing field, a value of the
    /// wrong type, a duplicate key.
    #[error("{at}: {message}; {hint}")]
    Schema { at: SourceLocation, message: String, hint: String },
    /// The YAML parses, but says something inconsistent: an unknown reference, a duplicate id, a
    /// threshold that does not suit the metric, an amendment history out of order.
    #[error("{at}: {message}; {hint}")]
    Invalid { at: SourceLocation, message: String, hint: String },
}

impl ContractError {
    /// Where the error is, when it is in the file's text.
    pub fn location(&self) -> Option<&SourceLocation> {
        match self {
            ContractError::Read { .. } => None,
            ContractError::Schema { at, .. } | ContractError::Invalid { at, .. } => Some(at),
        }
    }

    /// The offending source line with a caret under the column, for terminals:
    /// ```text
    ///    7 |     bogus: 2
    ///      |     ^
    /// ```
    pub fn snippet(&self) -> Option<String> {
        let at = self.location()?;
        let text = at.source_line.as_ref()?;
        let gutter = at.line.to_string();
        let pad = " ".repeat(gutter.len());
        let caret = " ".repeat(at.column.saturating_sub(1));
        Some(format!("{gutter} | {text}\n{pad} | {caret}^"))
    }

    pub(crate) fn invalid(at: SourceLocation, message: impl Into<String>, hint: impl Into<String>) -> Self {
        ContractError::Invalid { at, message: message.into(), hint: hint.into() }
    }

    /// Converts a serde-saphyr error, keeping its location and adding what to do.
    pub(crate) fn from_yaml(path: &Path, src: &str, err: &serde_saphyr::Error) -> Self {
        let message = plain_message(err);
        let at = match err.location() {
            Some(loc) => SourceLocation::at(path, src, loc),
            None => SourceLocation::at_line_col(path, src, 0, 0),
        };
        let hint = schema_hint(&message).to_string();
        ContractError::Schema { at, message, hint }
    }
}

/// The message of a serde-saphyr error without its location suffix or snippet (we print our own).
fn plain_message(err: &serde_saphyr::Error) -> String {
    let options = serde_saphyr::render_options! {
        formatter: &PlainMessages,
        snippets: SnippetMode::Off,
    };
    err.render_with_options(options)
}

/// serde-saphyr's user-facing messages, with the location left to [`SourceLocation`].
struct PlainMessages;

impl MessageFormatter for PlainMessages {
    fn localizer(&self) -> &dyn Localizer {
        &NoLocationSuffix
    }

    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> Cow<'a, str> {
        UserMessageFormatter.format_message(err)
    }
}

/// English wording without the "at line X, column Y" suffix.
struct NoLocationSuffix;

impl Localizer for NoLocationSuffix {
    fn attach_location<'a>(&self, base: Cow<'a, str>, _loc: Location) -> Cow<'a, str> {
        base
    }
}

/// What to do about a schema error, chosen from the kind of message.
fn schema_hint(message: &str) -> &'static str {
    if message.contains("unknown field") {
        "remove the field or fix its spelling (docs/contracts.md lists every field)"
    } else if message.contains("unknown variant") {
        "use one of the values listed"
    } else if message.contains("missing field") {
        "add the field (docs/contracts.md says what it means)"
    } else if message.contains("duplicate") {
        "every key and id must be unique: rename or remove one of them"
    } else {
        "fix the value at this position (docs/contracts.md describes the schema)"
    }
}
