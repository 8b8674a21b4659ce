//! Errors that point at the recipe text: file, line, column, snippet and hint.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};

/// Lines longer than this are reported by position, without a snippet.
const MAX_SNIPPET_COLUMNS: usize = 1000;

/// A problem with a recipe, located in its source text.
///
/// Rendered by miette as `file:line:column` with the offending snippet; the
/// [`fmt::Display`] form alone already carries `file:line:column: message`, so
/// the error stays useful where no fancy renderer is installed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{location}: {message}")]
pub struct RecipeError {
    message: String,
    location: String,
    label: String,
    hint: Option<String>,
    span: Option<SourceSpan>,
    src: NamedSource<Arc<String>>,
}

impl RecipeError {
    /// An error at `span` (byte range) of `source`, which was read from `file`.
    pub(crate) fn new(
        file: &str,
        source: &Arc<String>,
        span: Option<std::ops::Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        let (location, span) = match span {
            Some(r) => {
                let (line, col) = line_col(source, r.start);
                let len = r.end.saturating_sub(r.start);
                // A snippet of a line thousands of columns long helps no one
                // (and past column 65,535 the renderer gives up): the
                // location alone then.
                let start = r.start.min(source.len());
                let line_len = source[start..].find('\n').unwrap_or(source.len() - start) + col;
                let span = (line_len <= MAX_SNIPPET_COLUMNS && len <= 64 * 1024)
                    .then(|| SourceSpan::new(r.start.into(), len));
                (format!("{file}:{line}:{col}"), span)
            }
            None => (file.to_string(), None),
        };
        let message: String = message.into();
        RecipeError {
            label: "here".to_string(),
            message,
            location,
            hint: None,
            span,
            src: NamedSource::new(file, source.clone()),
        }
    }

    /// Adds a `hint:` that tells the user what to do.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Replaces the label shown under the snippet.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// An owned copy, for renderers that take the error by value.
    pub fn clone_for_report(&self) -> RecipeError {
        self.clone()
    }

    /// The message without its location.
    #[cfg(test)]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// `file:line:column` (or only the file when the error has no place).
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

impl Diagnostic for RecipeError {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.hint.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display + 'a>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.span.map(|_| &self.src as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        self.span.map(|s| {
            Box::new(std::iter::once(miette::LabeledSpan::new_with_span(Some(self.label.clone()), s)))
                as Box<dyn Iterator<Item = miette::LabeledSpan>>
        })
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
pub fn line_col(source: &str, at: usize) -> (usize, usize) {
    let at = at.min(source.len());
    let before = &source[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let s = "a = 1\nbb = 2\n";
        assert_eq!(line_col(s, 0), (1, 1));
        assert_eq!(line_col(s, 6), (2, 1));
        assert_eq!(line_col(s, 9), (2, 4));
    }

    #[test]
    fn an_error_far_along_a_long_line_has_a_place_and_no_snippet() {
        let src = Arc::new(format!(
            "[image]\nname = \"x\"\nlabels = {{ a = \"{}\", b = 1 }}\n",
            "y".repeat(70_000)
        ));
        let at = src.find("b = 1").unwrap();
        let e = RecipeError::new("r.toml", &src, Some(at..at + 1), "bad");
        assert_eq!(e.location(), format!("r.toml:3:{}", line_col(&src, at).1));
        assert!(line_col(&src, at).1 > 65_535);
        assert!(miette::Diagnostic::labels(&e).is_none(), "no snippet for such a line");
    }

    #[test]
    fn display_carries_the_location() {
        let src = Arc::new("x = 1\n[image]\nname = \"A\"\n".to_string());
        let e = RecipeError::new("r.toml", &src, Some(21..24), "bad name");
        assert_eq!(e.to_string(), "r.toml:3:8: bad name");
    }
}
