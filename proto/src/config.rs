//! Loading TOML files with errors that name the file, line, column and field.
//!
//! Every Sekisho binary reads TOML (its own config, the policy). A person who made a mistake
//! must be told where: `policy.toml:12:14: rules[1].action: unknown variant "alow"`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config or policy file that could not be used, with where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is not tied to a place in the file.
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// Dotted path of the field, e.g. `rules[2].applications`; empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Converts byte offsets of one source text into 1-based line and column numbers.
pub struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// An error located at `span` (byte range in the text), about `field`.
    pub fn error(
        &self,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = span.map(|s| self.line_col(s.start)).unwrap_or((0, 0));
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses `text` (read from `file`) as `T`, reporting the field path of type errors.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let src = Source { file, text };
    let de = toml::de::Deserializer::parse(text)
        .map_err(|e| src.error(e.span(), "", e.message().trim().to_string()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." { String::new() } else { path };
        src.error(inner.span(), field, inner.message().trim().to_string())
    })
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(file: &Path) -> Result<(T, String), ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read file: {e}"),
    })?;
    let value = parse_toml(file, &text)?;
    Ok((value, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Conf {
        name: String,
        port: u16,
        #[serde(default)]
        items: Vec<Item>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        kind: String,
    }

    #[test]
    fn type_error_names_line_and_field() {
        let text = "name = \"x\"\nport = \"eighty\"\n";
        let err = parse_toml::<Conf>(Path::new("c.toml"), text).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert_eq!(err.field, "port");
        assert!(err.to_string().starts_with("c.toml:2:"), "{err}");
    }

    #[test]
    fn unknown_field_in_array_names_path() {
        let text = "name = \"x\"\nport = 1\n[[items]]\nkind = \"a\"\n[[items]]\nknid = \"b\"\n";
        let err = parse_toml::<Conf>(Path::new("c.toml"), text).unwrap_err();
        assert_eq!(err.line, 6, "{err}");
        assert!(err.field.starts_with("items[1]"), "{err}");
        assert!(err.message.contains("knid"), "{err}");
    }

    #[test]
    fn syntax_error_has_line() {
        let err =
            parse_toml::<Conf>(Path::new("c.toml"), "name = \"x\"\nport = = 1\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }
}
