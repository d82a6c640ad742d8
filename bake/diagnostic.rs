//! How bake shows an error to a person: `error: …`, the place in a source file with the
//! offending line and a caret, one `Caused by: …` line per underlying cause, then `hint: …`
//! where bake knows the fix. The same data renders as JSON for `--output json`.
//!
//! Every error type in bake turns into one or more [`Report`]s at the edge (the CLI); nothing
//! deeper prints anything.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

/// A text file bake read and may point into: a recipe, a variable file, a script.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// The path as the user gave it (relative paths stay relative, so messages stay short and
    /// snapshot tests stay stable).
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Arc<Self> {
        Arc::new(SourceFile {
            name: name.into(),
            text: text.into(),
        })
    }

    /// The 1-based line `line`, without its line terminator.
    pub fn line(&self, line: usize) -> Option<&str> {
        self.text
            .split('\n')
            .nth(line.checked_sub(1)?)
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
    }

    /// The 1-based (line, column) of a byte offset; columns count characters.
    pub fn position_of(&self, byte_offset: usize) -> (usize, usize) {
        let before = &self.text[..byte_offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// The byte offset of a 1-based (line, column); `None` when out of range.
    pub fn offset_of(&self, line: usize, column: usize) -> Option<usize> {
        let mut offset = 0;
        for (index, text) in self.text.split('\n').enumerate() {
            if index + 1 == line {
                let within = text
                    .char_indices()
                    .nth(column.saturating_sub(1))
                    .map_or(text.len(), |(i, _)| i);
                return Some(offset + within);
            }
            offset += text.len() + 1;
        }
        None
    }
}

/// A place in a source file: 1-based line and column (in characters) and a width for the caret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpan {
    pub file: Arc<SourceFile>,
    pub line: usize,
    pub column: usize,
    pub width: usize,
}

impl SourceSpan {
    pub fn new(file: &Arc<SourceFile>, line: usize, column: usize, width: usize) -> Self {
        SourceSpan {
            file: Arc::clone(file),
            line: line.max(1),
            column: column.max(1),
            width: width.max(1),
        }
    }

    /// The source text the span covers (on its line).
    pub fn text(&self) -> String {
        self.file
            .line(self.line)
            .map(|l| l.chars().skip(self.column - 1).take(self.width).collect())
            .unwrap_or_default()
    }

    /// A span at `line:column` whose width covers the token that starts there: a key up to its
    /// colon, a quoted string, or a plain word.
    pub fn token_at(file: &Arc<SourceFile>, line: usize, column: usize) -> Self {
        let width = file
            .line(line)
            .map(|text| token_width(text.chars().skip(column.saturating_sub(1))))
            .unwrap_or(1);
        SourceSpan::new(file, line, column, width)
    }
}

fn token_width(mut rest: impl Iterator<Item = char>) -> usize {
    let Some(first) = rest.next() else { return 1 };
    if first == '"' || first == '\'' {
        let mut width = 1;
        for c in rest {
            width += 1;
            if c == first {
                break;
            }
        }
        return width;
    }
    let mut width = 1;
    let mut previous = first;
    for c in rest {
        // A plain scalar ends at `: `, `#` after a space, or a flow indicator.
        if (previous == ':' && c == ' ') || c == ',' || c == ']' || c == '}' || c == '#' {
            break;
        }
        width += 1;
        previous = c;
    }
    if previous == ':' { width - 1 } else { width }.max(1)
}

impl std::fmt::Display for SourceSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.name, self.line, self.column)
    }
}

/// An error that knows how to be shown to a user: what to do about it, and which exit status
/// it means. The CLI renders every failure through this one trait.
pub trait Diagnose: StdError + 'static {
    /// What the user can do about it, when bake knows.
    fn hint(&self) -> Option<String> {
        None
    }

    /// The exit status a command that fails with this error ends with.
    fn exit_status(&self) -> crate::exit::ExitStatus {
        crate::exit::ExitStatus::Infrastructure
    }

    /// The error as reports: one (message, causes, hint), unless the error carries several
    /// (a recipe with many mistakes reports each).
    fn reports(&self) -> Vec<Report>
    where
        Self: Sized,
    {
        vec![Report::from_error(self).with_hint(Diagnose::hint(self))]
    }
}

/// Files, sockets and processes: outside bake, so an infrastructure failure.
impl Diagnose for std::io::Error {}

/// One error, ready to show: what went wrong, where, why, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub message: String,
    pub span: Option<SourceSpan>,
    pub causes: Vec<String>,
    pub hint: Option<String>,
}

impl Report {
    pub fn new(message: impl Into<String>) -> Self {
        Report {
            message: message.into(),
            span: None,
            causes: Vec::new(),
            hint: None,
        }
    }

    /// A report for any error: its message, then each `source()` as a cause.
    pub fn from_error(error: &(dyn StdError + 'static)) -> Self {
        let mut report = Report::new(error.to_string());
        let mut source = error.source();
        while let Some(cause) = source {
            report.causes.push(cause.to_string());
            source = cause.source();
        }
        report
    }

    pub fn with_span(mut self, span: Option<SourceSpan>) -> Self {
        self.span = span;
        self
    }

    pub fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    /// Renders the report as text; `color` adds ANSI styles (the caller decides, from the
    /// terminal and `NO_COLOR`).
    pub fn render(&self, color: bool) -> String {
        let style = Style { color };
        let mut out = String::new();
        let _ = writeln!(out, "{}: {}", style.error("error"), self.message);
        if let Some(span) = &self.span {
            let gutter = span.line.to_string().len();
            let pad = " ".repeat(gutter);
            let _ = writeln!(out, "{pad}{} {span}", style.dim("-->"));
            if let Some(text) = span.file.line(span.line) {
                let text = text.replace('\t', " ");
                let _ = writeln!(out, "{pad} {}", style.dim("|"));
                let _ = writeln!(out, "{} {} {text}", span.line, style.dim("|"));
                let caret_pad = " ".repeat(span.column - 1);
                let width = span
                    .width
                    .min(text.chars().count().saturating_sub(span.column - 1))
                    .max(1);
                let carets = "^".repeat(width);
                let _ = writeln!(
                    out,
                    "{pad} {} {caret_pad}{}",
                    style.dim("|"),
                    style.error(&carets)
                );
            }
        }
        for cause in &self.causes {
            let _ = writeln!(out, "  {} {cause}", style.dim("Caused by:"));
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "{}: {hint}", style.hint("hint"));
        }
        out
    }

    /// The machine-readable form used by `--output json`.
    pub fn to_json(&self) -> JsonReport {
        JsonReport {
            message: self.message.clone(),
            file: self.span.as_ref().map(|s| s.file.name.clone()),
            line: self.span.as_ref().map(|s| s.line),
            column: self.span.as_ref().map(|s| s.column),
            causes: self.causes.clone(),
            hint: self.hint.clone(),
        }
    }
}

/// A [`Report`] as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct JsonReport {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    fn error(&self, text: &str) -> String {
        self.paint("1;31", text)
    }
    fn hint(&self, text: &str) -> String {
        self.paint("1;36", text)
    }
    fn dim(&self, text: &str) -> String {
        self.paint("1;34", text)
    }
}

/// The closest candidate to `given`, if one is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    given: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // Jaro-Winkler above 0.8 catches missing letters in longer identifiers; an edit distance of
    // one per four characters (at least one) catches transpositions in short ones (`evn`/`env`),
    // without suggesting unrelated words.
    const MIN_SIMILARITY: f64 = 0.8;
    let max_edits = (given.chars().count() / 4).max(1);
    candidates
        .into_iter()
        .filter_map(|c| {
            let score = strsim::jaro_winkler(given, c);
            let close = strsim::damerau_levenshtein(given, c) <= max_edits;
            (score >= MIN_SIMILARITY || close).then_some((score, c))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// An error's message followed by each of its causes, `: `-separated, on one line.
pub fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_span_with_caret_causes_and_hint() {
        let file = SourceFile::new("r.yaml", "bake: 1\nnmae: web\n");
        let report = Report {
            message: "unknown field `nmae`".into(),
            span: Some(SourceSpan::token_at(&file, 2, 1)),
            causes: vec!["because".into()],
            hint: Some("did you mean `name`?".into()),
        };
        assert_eq!(
            report.render(false),
            "error: unknown field `nmae`\n --> r.yaml:2:1\n  |\n2 | nmae: web\n  | ^^^^\n  Caused by: because\nhint: did you mean `name`?\n"
        );
    }

    #[test]
    fn token_width_stops_at_key_colon_and_covers_quotes() {
        let file = SourceFile::new("r.yaml", "a: \"x y\" # c\nkey: [one, two]\n");
        assert_eq!(SourceSpan::token_at(&file, 1, 4).width, 5);
        assert_eq!(SourceSpan::token_at(&file, 2, 1).width, 3);
        assert_eq!(SourceSpan::token_at(&file, 2, 7).width, 3);
    }

    #[test]
    fn offsets_and_positions_round_trip() {
        let file = SourceFile::new("f", "ab\ncdé\nf");
        for (line, column) in [(1, 1), (2, 3), (3, 1)] {
            let offset = file.offset_of(line, column).unwrap();
            assert_eq!(file.position_of(offset), (line, column));
        }
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        let fields = ["provisioners", "publish", "outputs"];
        assert_eq!(did_you_mean("provisioner", fields), Some("provisioners"));
        assert_eq!(did_you_mean("zzz", fields), None);
        assert_eq!(did_you_mean("evn", ["env", "name"]), Some("env"));
    }
}
