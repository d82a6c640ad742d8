//! Variable values: where they come from and how they are checked.
//!
//! Precedence, lowest first (a later source overrides an earlier one):
//! 1. the variable's `default` in the recipe,
//! 2. `BAKE_VAR_<name>` environment variables,
//! 3. `--var-file FILE.yaml` files, in the order given,
//! 4. `--var name=value` arguments, in the order given.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use serde_saphyr::Spanned;

use super::error::{RecipeError, RecipeErrorKind};
use super::model::{Variable, VariableKind, VariableValue};
use super::parse::parse_yaml;
use crate::diagnostic::{SourceFile, SourceSpan, did_you_mean};

/// The prefix of environment variables that set recipe variables.
pub const ENV_PREFIX: &str = "BAKE_VAR_";

/// Values given from outside the recipe.
#[derive(Debug, Clone, Default)]
pub struct VarSources {
    /// `--var name=value`, in order.
    pub cli: Vec<(String, String)>,
    /// `--var-file` paths, in order.
    pub files: Vec<PathBuf>,
    /// `BAKE_VAR_<name>` values.
    pub env: Vec<(String, String)>,
}

impl VarSources {
    /// Collects `BAKE_VAR_*` from the process environment.
    pub fn with_process_env(mut self) -> Self {
        self.env = std::env::vars()
            .filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).map(|n| (n.to_owned(), v)))
            .collect();
        self.env.sort();
        self
    }
}

/// A value as given, before checking it against the declaration.
enum Given {
    /// A string from the command line or environment, parsed by the declared type.
    Text(String),
    /// A typed YAML value from a variable file.
    Yaml(Value, SourceSpan),
}

/// A declared variable as the validator sees it.
pub struct Declaration {
    pub kind: VariableKind,
    pub description: Option<String>,
    pub required: bool,
    pub sensitive: bool,
    pub default: Option<Value>,
    pub allowed: Option<Vec<Value>>,
    pub span: SourceSpan,
}

/// Resolves every declared variable's value from `sources`, collecting every error.
pub fn resolve(
    declarations: &BTreeMap<String, Declaration>,
    sources: &VarSources,
    errors: &mut Vec<RecipeError>,
) -> BTreeMap<String, Variable> {
    let mut given: BTreeMap<String, (Given, String)> = BTreeMap::new();
    let names: Vec<&str> = declarations.keys().map(String::as_str).collect();

    for (name, value) in &sources.env {
        if declarations.contains_key(name) {
            given.insert(
                name.clone(),
                (Given::Text(value.clone()), format!("{ENV_PREFIX}{name}")),
            );
        } else {
            tracing::debug!(
                "ignoring {ENV_PREFIX}{name}: the recipe declares no variable `{name}`"
            );
        }
    }
    for path in &sources.files {
        let text = match fs_err::read_to_string(path) {
            Ok(text) => text,
            Err(source) => {
                errors.push(RecipeError::new(RecipeErrorKind::VarFile {
                    path: path.clone(),
                    source,
                }));
                continue;
            }
        };
        let file = SourceFile::new(path.display().to_string(), text);
        let values: BTreeMap<String, Spanned<Value>> = match parse_yaml(&file) {
            Ok(values) => values,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for (name, value) in values {
            let span = span_of(&file, &value);
            if declarations.contains_key(&name) {
                given.insert(
                    name,
                    (
                        Given::Yaml(value.value, span),
                        format!("`{}`", path.display()),
                    ),
                );
            } else {
                tracing::warn!(
                    "{}: the recipe declares no variable `{name}`; ignoring it",
                    span
                );
            }
        }
    }
    for (name, value) in &sources.cli {
        if declarations.contains_key(name) {
            given.insert(
                name.clone(),
                (Given::Text(value.clone()), format!("--var {name}")),
            );
        } else {
            let hint = match did_you_mean(name, names.iter().copied()) {
                Some(best) => format!("did you mean `{best}`?"),
                None if names.is_empty() => "this recipe declares no variables".to_owned(),
                None => format!("the recipe declares {}", quoted_list(&names)),
            };
            errors.push(
                RecipeError::new(RecipeErrorKind::UndeclaredVariable {
                    name: name.clone(),
                    source_name: "--var".into(),
                })
                .hint(hint),
            );
        }
    }

    let mut resolved = BTreeMap::new();
    for (name, declaration) in declarations {
        let value = match given.remove(name) {
            Some((given, source_name)) => {
                match check_given(name, declaration, given, &source_name) {
                    Ok(value) => Some(value),
                    Err(e) => {
                        errors.push(*e);
                        continue;
                    }
                }
            }
            None => declaration.default.clone(),
        };
        if value.is_none() && declaration.required {
            errors.push(
                RecipeError::at(
                    RecipeErrorKind::MissingVariable(name.clone()),
                    declaration.span.clone(),
                )
                .hint(format!(
                    "give it a value with --var {name}=…, a --var-file, or {ENV_PREFIX}{name}"
                )),
            );
            continue;
        }
        resolved.insert(
            name.clone(),
            Variable {
                kind: declaration.kind,
                description: declaration.description.clone(),
                sensitive: declaration.sensitive,
                value: value.map(|value| VariableValue {
                    value,
                    sensitive: declaration.sensitive,
                }),
                declared_at: declaration.span.clone(),
            },
        );
    }
    resolved
}

fn check_given(
    name: &str,
    declaration: &Declaration,
    given: Given,
    source_name: &str,
) -> Result<Value, Box<RecipeError>> {
    let (value, span) = match given {
        // A value from the command line or environment has no place in a file; point at the
        // declaration it breaks instead.
        Given::Text(text) => match parse_text(declaration.kind, &text) {
            Some(value) => (value, Some(declaration.span.clone())),
            None => {
                let shown = if declaration.sensitive {
                    super::model::REDACTED.to_owned()
                } else {
                    format!("`{text}`")
                };
                return Err(Box::new(
                    RecipeError::at(
                        RecipeErrorKind::VariableType {
                            name: name.to_owned(),
                            expected: declaration.kind.name(),
                            found: shown,
                            source_name: source_name.to_owned(),
                        },
                        declaration.span.clone(),
                    )
                    .hint(kind_hint(declaration.kind)),
                ));
            }
        },
        Given::Yaml(value, span) => (value, Some(span)),
    };
    if let Err(found) = check_kind(declaration.kind, &value) {
        let mut error = RecipeError::new(RecipeErrorKind::VariableType {
            name: name.to_owned(),
            expected: declaration.kind.name(),
            found: if declaration.sensitive {
                super::model::REDACTED.to_owned()
            } else {
                found
            },
            source_name: source_name.to_owned(),
        })
        .hint(kind_hint(declaration.kind));
        error.span = span;
        return Err(Box::new(error));
    }
    if let Err(e) = check_allowed(name, declaration, &value, source_name) {
        let mut e = e;
        if e.span.is_none() {
            e.span = span;
        }
        return Err(e);
    }
    Ok(value)
}

/// Parses a command-line or environment string as a value of `kind`.
pub fn parse_text(kind: VariableKind, text: &str) -> Option<Value> {
    match kind {
        VariableKind::String => Some(Value::String(text.to_owned())),
        VariableKind::Number => {
            if let Ok(i) = text.trim().parse::<i64>() {
                Some(Value::from(i))
            } else {
                let f = text.trim().parse::<f64>().ok()?;
                serde_json::Number::from_f64(f).map(Value::Number)
            }
        }
        VariableKind::Bool => match text.trim() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        VariableKind::List => {
            let trimmed = text.trim();
            if trimmed.starts_with('[') {
                let file = SourceFile::new("--var", trimmed);
                let items: Vec<Value> = parse_yaml(&file).ok()?;
                items.iter().all(is_scalar).then_some(Value::Array(items))
            } else if trimmed.is_empty() {
                Some(Value::Array(Vec::new()))
            } else {
                Some(Value::Array(
                    trimmed
                        .split(',')
                        .map(|s| Value::String(s.trim().to_owned()))
                        .collect(),
                ))
            }
        }
    }
}

fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// Checks that `value` has the declared kind; on mismatch returns what was found instead.
pub fn check_kind(kind: VariableKind, value: &Value) -> Result<(), String> {
    let ok = match kind {
        VariableKind::String => value.is_string(),
        VariableKind::Number => value.is_number(),
        VariableKind::Bool => value.is_boolean(),
        VariableKind::List => value
            .as_array()
            .is_some_and(|items| items.iter().all(is_scalar)),
    };
    if ok { Ok(()) } else { Err(describe(value)) }
}

/// "the string `x`", "the number 3", … for messages.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("the bool `{b}`"),
        Value::Number(n) => format!("the number `{n}`"),
        Value::String(s) => format!("the string `{s}`"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn kind_hint(kind: VariableKind) -> String {
    match kind {
        VariableKind::String => "quote the value to make it a string".into(),
        VariableKind::Number => "write a number such as 3 or 2.5".into(),
        VariableKind::Bool => "write true or false".into(),
        VariableKind::List => "write a list such as [a, b] (on the command line also a,b)".into(),
    }
}

fn check_allowed(
    name: &str,
    declaration: &Declaration,
    value: &Value,
    source_name: &str,
) -> Result<(), Box<RecipeError>> {
    let Some(allowed) = &declaration.allowed else {
        return Ok(());
    };
    // For a list, `allowed` constrains each element.
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    for item in items {
        if !allowed.contains(item) {
            let shown = if declaration.sensitive {
                super::model::REDACTED.to_owned()
            } else {
                short(item)
            };
            let allowed_text = allowed.iter().map(short).collect::<Vec<_>>().join(", ");
            let hint = match (item.as_str(), declaration.sensitive) {
                (Some(s), false) => {
                    let options: Vec<String> = allowed
                        .iter()
                        .filter_map(|a| a.as_str().map(str::to_owned))
                        .collect();
                    did_you_mean(s, options.iter().map(String::as_str))
                        .map(|b| format!("did you mean `{b}`?"))
                }
                _ => None,
            };
            return Err(Box::new(
                RecipeError::new(RecipeErrorKind::NotAllowed {
                    name: name.to_owned(),
                    value: shown,
                    allowed: allowed_text,
                    source_name: source_name.to_owned(),
                })
                .maybe_hint(hint),
            ));
        }
    }
    Ok(())
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The span of a parsed value in `file`.
pub fn span_of<T>(file: &Arc<SourceFile>, value: &Spanned<T>) -> SourceSpan {
    let location = &value.referenced;
    let len = location.span().len() as usize;
    if len > 0 {
        SourceSpan::new(
            file,
            location.line() as usize,
            location.column() as usize,
            len,
        )
    } else {
        SourceSpan::token_at(file, location.line() as usize, location.column() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_parse_by_kind() {
        assert_eq!(parse_text(VariableKind::Number, "3"), Some(Value::from(3)));
        assert_eq!(parse_text(VariableKind::Number, "x"), None);
        assert_eq!(
            parse_text(VariableKind::Bool, "true"),
            Some(Value::Bool(true))
        );
        assert_eq!(parse_text(VariableKind::Bool, "yes"), None);
        assert_eq!(
            parse_text(VariableKind::List, "a, b"),
            Some(serde_json::json!(["a", "b"]))
        );
        assert_eq!(
            parse_text(VariableKind::List, "[1, two]"),
            Some(serde_json::json!([1, "two"]))
        );
    }
}
