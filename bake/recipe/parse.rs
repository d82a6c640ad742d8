//! YAML text → [`RawRecipe`], with parser errors turned into located, actionable
//! [`RecipeError`]s. This is the only place that knows which YAML crate bake uses.

use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::error::{RecipeError, RecipeErrorKind};
use super::raw::RawRecipe;
use crate::diagnostic::{SourceFile, SourceSpan, did_you_mean};

/// Parses a recipe file's text.
pub fn parse_recipe(file: &Arc<SourceFile>) -> Result<RawRecipe, RecipeError> {
    parse_yaml(file)
}

/// Parses any YAML document of bake's (a recipe or a variable file) into `T`.
pub fn parse_yaml<T: DeserializeOwned>(file: &Arc<SourceFile>) -> Result<T, RecipeError> {
    // The parser's defaults are what bake wants: duplicate keys are errors (two `name:` keys are
    // a mistake, never an override) and a resource budget stops alias bombs.
    serde_saphyr::from_str(&file.text).map_err(|e| yaml_error(file, &e))
}

fn yaml_error(file: &Arc<SourceFile>, error: &serde_saphyr::Error) -> RecipeError {
    let message = strip_location(&error.without_snippet().to_string());
    let span = error.location().filter(|l| l.line() > 0).map(|l| {
        let (line, column) = (l.line() as usize, l.column() as usize);
        let len = l.span().len() as usize;
        if len > 0 {
            SourceSpan::new(file, line, column, len)
        } else {
            SourceSpan::token_at(file, line, column)
        }
    });
    let (kind, hint) = explain(&message);
    RecipeError {
        kind: Box::new(kind),
        span,
        hint,
    }
}

/// The parser appends ` at line N, column M`; bake shows the location its own way.
fn strip_location(message: &str) -> String {
    let message = message.trim();
    let message = message.strip_prefix("error: ").unwrap_or(message);
    // `line N column M: ` may also lead the message.
    let message = match message.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map_or(message, |(_, m)| m),
        None => message,
    };
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => message[..i].to_owned(),
        _ => message.to_owned(),
    }
}

/// Turns a serde/parser message into a kind and a hint a person can act on.
fn explain(message: &str) -> (RecipeErrorKind, Option<String>) {
    if let Some((given, expected)) = parse_unknown(message, "unknown field `") {
        let hint = suggestion(&given, &expected);
        return (
            RecipeErrorKind::UnknownField {
                field: given,
                context: String::new(),
            },
            hint,
        );
    }
    if let Some((given, expected)) = parse_unknown(message, "unknown variant `") {
        let hint = suggestion(&given, &expected);
        return (
            RecipeErrorKind::UnknownVariant {
                what: "kind".into(),
                given,
            },
            hint,
        );
    }
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set ").next().unwrap_or(rest);
        return (
            RecipeErrorKind::Syntax(format!("duplicate key `{key}`")),
            Some("each key may appear once in a mapping; remove or merge the other one".into()),
        );
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return (
            RecipeErrorKind::Syntax(format!("missing required field `{field}`")),
            Some(format!("add `{field}:` to this mapping")),
        );
    }
    let plain = match message {
        m if m.starts_with("invalid u") || m.starts_with("invalid i") => {
            "expected a whole number".to_owned()
        }
        "expected string scalar" => "expected a string".to_owned(),
        "invalid boolean" => "expected `true` or `false`".to_owned(),
        m => m.to_owned(),
    };
    (RecipeErrorKind::Syntax(plain), None)
}

/// Splits "unknown field `x`, expected one of a, b" into ("x", ["a", "b"]).
fn parse_unknown(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let (given, rest) = rest.split_once('`')?;
    let expected = rest
        .trim_start_matches(", ")
        .strip_prefix("expected one of ")
        .or_else(|| rest.trim_start_matches(", ").strip_prefix("expected "))
        .unwrap_or("");
    let expected = expected
        .split(", ")
        .map(|s| s.trim_matches('`').to_owned())
        .filter(|s| !s.is_empty() && !s.contains(' '))
        .collect();
    Some((given.to_owned(), expected))
}

fn suggestion(given: &str, expected: &[String]) -> Option<String> {
    if expected.is_empty() {
        return None;
    }
    Some(
        match did_you_mean(given, expected.iter().map(String::as_str)) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!(
                "expected one of {}",
                expected
                    .iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_gets_a_suggestion() {
        let (kind, hint) =
            explain("unknown field `provisioner`, expected one of bake, provisioners, tests");
        assert_eq!(kind.to_string(), "unknown field `provisioner`");
        assert_eq!(hint.as_deref(), Some("did you mean `provisioners`?"));
    }

    #[test]
    fn unknown_variant_without_near_match_lists_choices() {
        let (kind, hint) = explain("unknown variant `zzz`, expected one of scratch, image");
        assert_eq!(kind.to_string(), "unknown kind `zzz`");
        assert_eq!(hint.as_deref(), Some("expected one of `scratch`, `image`"));
    }

    #[test]
    fn location_suffix_is_removed() {
        assert_eq!(
            strip_location("invalid u32 at line 1, column 7"),
            "invalid u32".to_owned()
        );
    }
}
