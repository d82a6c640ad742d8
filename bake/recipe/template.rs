//! Rendering recipe strings and script files with handlebars, strictly: a variable that is not
//! in the context is an error at its file, line and column, never an empty string.
//!
//! The context is explicit: `var.<name>` for each declared variable, plus the recipe's `name`,
//! `version`, `version_short` and `arch`, and `region` in fields that are rendered once per
//! region. Sensitive values can be rendered redacted (`***`) for anything shown to a person.

use std::collections::BTreeMap;

use handlebars::{Handlebars, RenderErrorReason};
use serde_json::{Map, Value};

use super::error::{RecipeError, RecipeErrorKind};
use super::model::{REDACTED, Recipe, Template, TemplateOrigin};
use crate::diagnostic::{SourceSpan, did_you_mean};

/// The names bake itself puts in every template context, and where each is known.
pub const BUILTINS: [(&str, &str); 5] = [
    ("name", "everywhere"),
    ("version", "everywhere"),
    ("version_short", "everywhere"),
    ("arch", "everywhere"),
    (
        "region",
        "only in fields rendered per region: AMI names, descriptions and tags, instance user data, and SSM parameter names and descriptions",
    ),
];

/// What a template can refer to.
#[derive(Debug, Clone)]
pub struct Context {
    value: Value,
    /// Every name a template may use in this recipe, for suggestions.
    known: Vec<String>,
    /// Names that exist in general but not in this context (such as `region`).
    unavailable: Vec<&'static str>,
    /// Declared variables without a value.
    unset: Vec<String>,
}

/// Whether sensitive variables render as their value (for execution) or as `***` (for
/// anything printed or recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Reveal,
    Redact,
}

impl Context {
    /// The context for `recipe` at `version` (`None` before the version is known: validation
    /// uses a placeholder so templates that mention it still check), optionally for one region.
    pub fn new(
        recipe: &Recipe,
        version: Option<&str>,
        region: Option<&str>,
        secrets: Secrets,
    ) -> Self {
        // Before the version is known (validation), an all-zero one stands in.
        let version: crate::id::Version =
            version.and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                crate::id::Version::from_digest(
                    crate::id::Digest::from_hex(&"0".repeat(64)).expect("64 hex digits"),
                )
            });
        let mut vars = Map::new();
        let mut unset = Vec::new();
        for (name, variable) in &recipe.variables {
            match &variable.value {
                Some(v) if v.sensitive && secrets == Secrets::Redact => {
                    vars.insert(name.clone(), Value::String(REDACTED.into()));
                }
                Some(v) => {
                    vars.insert(name.clone(), v.value.clone());
                }
                None => unset.push(format!("var.{name}")),
            }
        }
        let arch = recipe
            .outputs
            .ami
            .as_ref()
            .map(|a| a.architecture.ec2())
            .or_else(|| recipe.outputs.oci.as_ref().map(|o| o.architecture.oci()))
            .unwrap_or("x86_64");
        let mut root = Map::new();
        root.insert("var".into(), Value::Object(vars));
        root.insert("name".into(), Value::String(recipe.name.clone()));
        root.insert("version".into(), Value::String(version.to_string()));
        root.insert(
            "version_short".into(),
            Value::String(version.short().to_owned()),
        );
        root.insert("arch".into(), Value::String(arch.to_owned()));
        let mut unavailable = vec!["region"];
        if let Some(region) = region {
            root.insert("region".into(), Value::String(region.to_owned()));
            unavailable.clear();
        }
        let mut known: Vec<String> = recipe
            .variables
            .keys()
            .map(|n| format!("var.{n}"))
            .collect();
        known.extend(root.keys().filter(|k| *k != "var").cloned());
        Context {
            value: Value::Object(root),
            known,
            unavailable,
            unset,
        }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }
}

/// A strict handlebars renderer that does no HTML escaping (recipes render shell, not HTML).
pub struct Renderer {
    handlebars: Handlebars<'static>,
}

impl Default for Renderer {
    fn default() -> Self {
        let mut handlebars = Handlebars::new();
        handlebars.set_strict_mode(true);
        handlebars.register_escape_fn(handlebars::no_escape);
        Renderer { handlebars }
    }
}

impl Renderer {
    /// Renders `template` in `context`; an error points at the offending place in the recipe or
    /// script file.
    pub fn render(&self, template: &Template, context: &Context) -> Result<String, RecipeError> {
        if !template.text.contains("{{") {
            return Ok(template.text.clone());
        }
        self.handlebars
            .render_template(&template.text, context.value())
            .map_err(|e| self.explain(template, context, &e))
    }

    /// Renders every template in `templates`, collecting all errors.
    pub fn check_all<'a>(
        &self,
        templates: impl IntoIterator<Item = &'a Template>,
        context: &Context,
        errors: &mut Vec<RecipeError>,
    ) {
        for template in templates {
            if let Err(e) = self.render(template, context) {
                errors.push(e);
            }
        }
    }

    fn explain(
        &self,
        template: &Template,
        context: &Context,
        error: &handlebars::RenderError,
    ) -> RecipeError {
        let position = error.line_no.zip(error.column_no);
        match error.reason() {
            RenderErrorReason::MissingVariable(Some(path)) => {
                let path = path.trim_start_matches("this.").to_owned();
                let span = locate_text(template, &path, position);
                if context.unset.contains(&path) {
                    let name = path.trim_start_matches("var.");
                    return RecipeError {
                        kind: Box::new(RecipeErrorKind::UnsetTemplateVariable(path.clone())),
                        span,
                        hint: Some(format!(
                            "give `{name}` a value with --var {name}=…, a --var-file or BAKE_VAR_{name}, or a `default` in the recipe"
                        )),
                    };
                }
                if let Some(builtin) = context.unavailable.iter().find(|b| **b == path) {
                    let where_known = BUILTINS
                        .iter()
                        .find(|(n, _)| n == builtin)
                        .map_or("", |(_, w)| w);
                    return RecipeError {
                        kind: Box::new(RecipeErrorKind::UnavailableTemplateVariable(path.clone())),
                        span,
                        hint: Some(format!("`{path}` is known {where_known}")),
                    };
                }
                let hint = match did_you_mean(&path, context.known.iter().map(String::as_str)) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None if !path.starts_with("var.") && context.known.contains(&format!("var.{path}")) => {
                        format!("variables are under `var`: write `{{{{var.{path}}}}}`")
                    }
                    None => format!(
                        "templates can use {}",
                        context
                            .known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                RecipeError {
                    kind: Box::new(RecipeErrorKind::UnknownTemplateVariable(path)),
                    span,
                    hint: Some(hint),
                }
            }
            RenderErrorReason::TemplateError(template_error) => {
                let span = template_error
                    .pos()
                    .and_then(|(line, column)| map_position(template, line, column));
                let reason = match template_error.reason() {
                    handlebars::TemplateErrorReason::InvalidSyntax(_) => {
                        "a `{{…}}` expression is malformed or not closed".to_owned()
                    }
                    other => other.to_string(),
                };
                RecipeError {
                    kind: Box::new(RecipeErrorKind::Template(reason)),
                    span: span.or_else(|| origin_span(template)),
                    hint: Some("close it with `}}`, or write a literal `{{` as `\\{{`".into()),
                }
            }
            RenderErrorReason::HelperNotFound(name) => RecipeError {
                kind: Box::new(RecipeErrorKind::Template(format!("unknown helper `{name}`"))),
                span: locate_text(template, name, position),
                hint: Some("bake's templates support the built-in helpers: if, unless, each, with, lookup, eq, ne, and, or, not".into()),
            },
            other => RecipeError {
                kind: Box::new(RecipeErrorKind::Template(other.to_string())),
                span: position
                    .and_then(|(l, c)| map_position(template, l, c))
                    .or_else(|| origin_span(template)),
                hint: None,
            },
        }
    }
}

/// The span where the template starts.
fn origin_span(template: &Template) -> Option<SourceSpan> {
    match &template.origin {
        TemplateOrigin::Yaml { span, .. } => Some(span.clone()),
        TemplateOrigin::File(file) => Some(SourceSpan::new(file, 1, 1, 1)),
    }
}

/// Finds `needle` inside a `{{…}}` of the template and maps it to the source file.
fn locate_text(
    template: &Template,
    needle: &str,
    near: Option<(usize, usize)>,
) -> Option<SourceSpan> {
    let in_template = find_in_mustache(&template.text, needle);
    let Some(offset) = in_template else {
        return near
            .and_then(|(l, c)| map_position(template, l, c))
            .or_else(|| origin_span(template));
    };
    match &template.origin {
        TemplateOrigin::File(file) => {
            let (line, column) = file.position_of(offset);
            Some(SourceSpan::new(file, line, column, needle.chars().count()))
        }
        TemplateOrigin::Yaml { span, .. } => {
            // Search the recipe text from where the scalar starts: this lands on the exact
            // characters whatever the quoting or indentation of the scalar.
            let file = &span.file;
            let start = file.offset_of(span.line, span.column).unwrap_or(0);
            match find_in_mustache(&file.text[start..], needle) {
                Some(found) => {
                    let (line, column) = file.position_of(start + found);
                    Some(SourceSpan::new(file, line, column, needle.chars().count()))
                }
                None => Some(span.clone()),
            }
        }
    }
}

/// The byte offset of `needle` where it appears inside `{{ … }}` in `text`.
fn find_in_mustache(text: &str, needle: &str) -> Option<usize> {
    let mut search_from = 0;
    while let Some(open) = text[search_from..].find("{{") {
        let open = search_from + open;
        let close = text[open..].find("}}").map_or(text.len(), |c| open + c);
        if let Some(i) = text[open..close].find(needle) {
            return Some(open + i);
        }
        search_from = open + 2;
    }
    None
}

/// Maps a 1-based (line, column) inside the template text to the source file.
fn map_position(template: &Template, line: usize, column: usize) -> Option<SourceSpan> {
    match &template.origin {
        TemplateOrigin::File(file) => Some(SourceSpan::token_at(file, line, column)),
        // A block scalar's lines all start at its indentation column; a plain scalar is one line.
        TemplateOrigin::Yaml { span, .. } => Some(SourceSpan::token_at(
            &span.file,
            span.line + line - 1,
            span.column + column - 1,
        )),
    }
}

/// Renders a map of templates.
pub fn render_map(
    renderer: &Renderer,
    map: &BTreeMap<String, Template>,
    context: &Context,
) -> Result<BTreeMap<String, String>, RecipeError> {
    map.iter()
        .map(|(k, t)| Ok((k.clone(), renderer.render(t, context)?)))
        .collect()
}
