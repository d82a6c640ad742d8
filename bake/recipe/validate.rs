//! [`RawRecipe`] → [`Recipe`]: every check that needs more than the YAML's shape. Errors are
//! collected, not returned at the first, so a person sees everything wrong at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::error::{RecipeError, RecipeErrorKind};
use super::model::*;
use super::paths::{resolve_recipe_reference, resolve_within};
use super::raw::*;
use super::template::{Context, Renderer, Secrets};
use super::vars::{self, Declaration, VarSources, span_of};
use crate::ami::boot::Accelerator;
use crate::diagnostic::{SourceFile, SourceSpan, did_you_mean};

/// Hardening profiles bake ships (in `provisioners/hardening/`).
pub const HARDENING_PROFILES: [&str; 1] = ["baseline"];

/// Variants `mmdebstrap --variant` accepts.
const BOOTSTRAP_VARIANTS: [&str; 10] = [
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
];

/// A shell step that hangs must not hold a CI runner forever; 30 minutes covers a large
/// `apt-get upgrade` on a slow mirror.
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Tests are quick checks; five minutes is generous.
const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// A software-emulated (no KVM) UEFI boot of a cloud kernel takes a few minutes.
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The smallest root volume a Debian cloud image with a kernel fits on, and EBS's largest.
/// Canary checkpoints when the recipe names none: a small first step the alarms can judge,
/// then half, then all.
const DEFAULT_CANARY_CHECKPOINTS: [u8; 3] = [10, 50, 100];
/// How long a canary pauses at a checkpoint: long enough for alarms on request metrics
/// (typically 1-minute periods, a few datapoints) to see the new instances.
const DEFAULT_CHECKPOINT_DELAY: Duration = Duration::from_secs(10 * 60);
/// How long bake waits for a rollout before it rolls it back: a large group with warm-up and
/// checkpoints fits in an hour.
const DEFAULT_ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const DISK_SIZE_GIB: std::ops::RangeInclusive<u64> = 1..=16384;

pub(super) struct Validator<'a> {
    file: Arc<SourceFile>,
    /// The canonical recipe directory.
    root: PathBuf,
    /// How the recipe's directory is shown in messages (relative, as the user named it).
    display_dir: PathBuf,
    sources: &'a VarSources,
    errors: Vec<RecipeError>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(
        file: Arc<SourceFile>,
        root: PathBuf,
        display_dir: PathBuf,
        sources: &'a VarSources,
    ) -> Self {
        Validator {
            file,
            root,
            display_dir,
            sources,
            errors: Vec::new(),
        }
    }

    fn span<T>(&self, value: &S<T>) -> SourceSpan {
        span_of(&self.file, value)
    }

    fn error<T>(&mut self, at: &S<T>, kind: RecipeErrorKind) -> &mut RecipeError {
        let span = self.span(at);
        self.errors.push(RecipeError::at(kind, span));
        self.errors.last_mut().expect("just pushed")
    }

    fn invalid<T>(
        &mut self,
        at: &S<T>,
        what: &'static str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> &mut RecipeError {
        self.error(
            at,
            RecipeErrorKind::Invalid {
                what,
                value: value.to_string(),
                reason: reason.into(),
            },
        )
    }

    /// The span of the mapping key `key` that holds `value` (a mapping's own location is that of
    /// its first entry, which is not where a person looks for it).
    fn key_span<T>(&self, value: &S<T>, key: &str) -> SourceSpan {
        let at = self.span(value);
        let offset = self.file.offset_of(at.line, at.column).unwrap_or(0);
        let needle = format!("{key}:");
        match self.file.text[..offset].rfind(&needle) {
            Some(found) => {
                let (line, column) = self.file.position_of(found);
                SourceSpan::new(&self.file, line, column, key.chars().count())
            }
            None => at,
        }
    }

    fn template(&self, value: &S<String>) -> Template {
        Template {
            text: value.value.clone(),
            origin: TemplateOrigin::Yaml {
                span: self.span(value),
            },
        }
    }

    /// Resolves a relative path inside the recipe directory, reporting problems at `at`.
    fn path(&mut self, at: &S<String>, what: &'static str) -> Option<PathBuf> {
        match resolve_within(&self.root, &at.value, what) {
            Ok(path) => Some(path),
            Err(kind) => {
                let hint = match &kind {
                    RecipeErrorKind::EscapesRoot { .. } => Some(format!(
                        "paths in a recipe are relative to its directory `{}` and must stay inside it; move the file there",
                        self.display_dir.display()
                    )),
                    RecipeErrorKind::MissingFile { .. } => Some(format!(
                        "paths are relative to the recipe's directory `{}`",
                        self.display_dir.display()
                    )),
                    _ => None,
                };
                self.error(at, kind).hint = hint;
                None
            }
        }
    }

    pub(super) fn validate(mut self, raw: RawRecipe) -> Result<Recipe, Vec<RecipeError>> {
        self.schema_version(&raw.bake);
        let name = self.name(&raw.name);
        let declarations = self.declarations(&raw.variables);
        let variables = vars::resolve(&declarations, self.sources, &mut self.errors);
        let base = self.base(&raw.base);
        let build = self.build(&raw.build);
        let provisioners = raw
            .provisioners
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.provisioner(i, p))
            .collect();
        let outputs = self.outputs(&raw.outputs, &raw.base);
        let tests = raw
            .tests
            .iter()
            .enumerate()
            .filter_map(|(i, t)| self.test(i, t, &outputs))
            .collect();
        let publish = self.publish(&raw.publish, &outputs);
        let audit = raw.audit.as_ref().and_then(|a| self.audit(a, &outputs));
        let provenance = raw
            .provenance
            .as_ref()
            .map(|p| self.provenance(p))
            .unwrap_or_default();
        let lifecycle = raw
            .lifecycle
            .as_ref()
            .map(|l| self.lifecycle(l, &publish))
            .unwrap_or_default();

        let recipe = Recipe {
            source: Arc::clone(&self.file),
            path: PathBuf::new(),
            root: self.root.clone(),
            name,
            description: raw.description,
            variables,
            base: base.unwrap_or(Base::Scratch),
            build,
            provisioners,
            tests,
            outputs,
            publish,
            audit,
            provenance,
            lifecycle,
        };
        // Templates can only be checked once variables are resolved and the shape is valid;
        // checking them against a broken recipe would only add noise.
        if self.errors.is_empty() {
            check_templates(&recipe, &mut self.errors);
        }
        if self.errors.is_empty() {
            Ok(recipe)
        } else {
            Err(self.errors)
        }
    }

    fn schema_version(&mut self, bake: &S<Value>) {
        if bake.value != 1 {
            let shown = match &bake.value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            self.error(bake, RecipeErrorKind::SchemaVersion(shown)).hint =
                Some("write `bake: 1` as the recipe's first line".into());
        }
    }

    fn name(&mut self, name: &S<String>) -> String {
        if !is_simple_name(&name.value, 128) {
            self.invalid(
                name,
                "recipe name",
                &name.value,
                "use 1 to 128 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit",
            );
        }
        name.value.clone()
    }

    fn declarations(
        &mut self,
        raw: &BTreeMap<String, S<RawVariable>>,
    ) -> BTreeMap<String, Declaration> {
        let mut out = BTreeMap::new();
        for (name, variable) in raw {
            let span = self.key_span(variable, name);
            if !is_identifier(name) {
                self.invalid(
                    variable,
                    "variable name",
                    name,
                    "use letters, digits and `_`, not starting with a digit",
                );
                continue;
            }
            let v = &variable.value;
            let Some(kind) = VariableKind::parse(&v.kind.value) else {
                let hint = did_you_mean(&v.kind.value, VariableKind::NAMES)
                    .map(|b| format!("did you mean `{b}`?"))
                    .unwrap_or_else(|| {
                        "a variable's type is one of `string`, `number`, `bool`, `list`".into()
                    });
                self.error(
                    &v.kind,
                    RecipeErrorKind::UnknownVariant {
                        what: "variable type".into(),
                        given: v.kind.value.clone(),
                    },
                )
                .hint = Some(hint);
                continue;
            };
            let mut ok = true;
            if let Some(default) = &v.default {
                if v.sensitive {
                    self.error(default, RecipeErrorKind::SensitiveDefault(name.clone()))
                        .hint = Some(format!(
                        "a secret in a recipe file ends up in version control; pass it with --var {name}=… or {}{name}",
                        vars::ENV_PREFIX
                    ));
                    ok = false;
                } else if v.required {
                    self.error(default, RecipeErrorKind::Conflict(format!(
                        "variable `{name}` is required and has a default"
                    )))
                    .hint = Some("remove `required: true` (the default is used when no value is given) or the default".into());
                    ok = false;
                } else if let Err(found) = vars::check_kind(kind, &default.value) {
                    self.error(
                        default,
                        RecipeErrorKind::VariableType {
                            name: name.clone(),
                            expected: kind.name(),
                            found,
                            source_name: "its default".into(),
                        },
                    );
                    ok = false;
                }
            }
            let mut allowed_values = None;
            if let Some(allowed) = &v.allowed {
                let element_kind = if kind == VariableKind::List {
                    VariableKind::String
                } else {
                    kind
                };
                let mut good = Vec::new();
                for item in &allowed.value {
                    let fits = if kind == VariableKind::List {
                        matches!(item, Value::String(_) | Value::Number(_) | Value::Bool(_))
                    } else {
                        vars::check_kind(element_kind, item).is_ok()
                    };
                    if !fits {
                        self.error(
                            allowed,
                            RecipeErrorKind::VariableType {
                                name: name.clone(),
                                expected: kind.name(),
                                found: vars::describe(item),
                                source_name: "its `allowed` list".into(),
                            },
                        );
                        ok = false;
                    }
                    good.push(item.clone());
                }
                if let (true, Some(default)) = (ok, &v.default) {
                    let items: Vec<&Value> = match &default.value {
                        Value::Array(items) => items.iter().collect(),
                        other => vec![other],
                    };
                    if let Some(bad) = items.into_iter().find(|i| !good.contains(i)) {
                        self.error(
                            default,
                            RecipeErrorKind::NotAllowed {
                                name: name.clone(),
                                value: vars::describe(bad),
                                allowed: good
                                    .iter()
                                    .map(|g| {
                                        format!(
                                            "`{}`",
                                            g.as_str().map_or(g.to_string(), str::to_owned)
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                source_name: "its default".into(),
                            },
                        );
                        ok = false;
                    }
                }
                allowed_values = Some(good);
            }
            if ok {
                out.insert(
                    name.clone(),
                    Declaration {
                        kind,
                        description: v.description.clone(),
                        required: v.required,
                        sensitive: v.sensitive,
                        default: v.default.as_ref().map(|d| d.value.clone()),
                        allowed: allowed_values,
                        span,
                    },
                );
            }
        }
        out
    }

    fn base(&mut self, base: &S<RawBase>) -> Option<Base> {
        Some(match &base.value {
            RawBase::Scratch => Base::Scratch,
            RawBase::Image(reference) => {
                if let Err(e) = crate::registry::Reference::from_str(&reference.value) {
                    self.invalid(reference, "image reference", &reference.value, e.reason)
                        .hint = Some(
                        "write `registry.example.com/repository:tag` or `…@sha256:<64 hex>`".into(),
                    );
                    return None;
                }
                Base::Image {
                    reference: reference.value.clone(),
                }
            }
            RawBase::OciLayout(layout) => {
                let path = self.path(&layout.path, "OCI layout")?;
                if !path.join("index.json").is_file() {
                    self.invalid(
                        &layout.path,
                        "OCI layout",
                        &layout.path.value,
                        "it has no `index.json`",
                    );
                    return None;
                }
                Base::OciLayout {
                    path,
                    relative_path: layout.path.value.clone(),
                    tag: layout.tag.as_ref().map(|t| t.value.clone()),
                }
            }
            RawBase::Rootfs(tarball) => {
                let path = self.path(tarball, "rootfs tarball")?;
                if !path.is_file() {
                    self.invalid(
                        tarball,
                        "rootfs tarball",
                        &tarball.value,
                        "it is not a file",
                    );
                    return None;
                }
                Base::Rootfs {
                    path,
                    relative_path: tarball.value.clone(),
                }
            }
            RawBase::Bootstrap(b) => Base::Bootstrap(self.bootstrap(b)?),
            RawBase::Recipe(other) => {
                let path = match resolve_recipe_reference(&self.root, &other.value, "base recipe") {
                    Ok(path) => path,
                    Err(kind) => {
                        let hint = matches!(kind, RecipeErrorKind::MissingFile { .. }).then(|| {
                            format!(
                                "the path is relative to the recipe's directory `{}`",
                                self.display_dir.display()
                            )
                        });
                        self.error(other, kind).hint = hint;
                        return None;
                    }
                };
                Base::Recipe {
                    path,
                    relative_path: other.value.clone(),
                }
            }
            RawBase::Ami(filter) => Base::Ami(self.ami_filter(base, filter)?),
        })
    }

    fn bootstrap(&mut self, b: &RawBootstrap) -> Option<Bootstrap> {
        let distro = match b.distro.as_ref().map(|d| d.value.as_str()) {
            None | Some("debian") => Distro::Debian,
            Some("ubuntu") => Distro::Ubuntu,
            Some(other) => {
                let d = b.distro.as_ref().expect("matched Some");
                self.error(
                    d,
                    RecipeErrorKind::UnknownVariant {
                        what: "distribution".into(),
                        given: other.into(),
                    },
                )
                .hint = Some("bake bootstraps `debian` or `ubuntu`".into());
                return None;
            }
        };
        let mut ok = true;
        if !is_simple_name(&b.suite.value, 64) {
            self.invalid(
                &b.suite,
                "suite",
                &b.suite.value,
                "write a suite or codename such as `bookworm` or `noble`",
            );
            ok = false;
        }
        let variant = match &b.variant {
            None => "minbase".to_owned(),
            Some(v) if BOOTSTRAP_VARIANTS.contains(&v.value.as_str()) => v.value.clone(),
            Some(v) => {
                let hint = did_you_mean(&v.value, BOOTSTRAP_VARIANTS)
                    .map(|b| format!("did you mean `{b}`?"))
                    .unwrap_or_else(|| {
                        format!("mmdebstrap variants: {}", BOOTSTRAP_VARIANTS.join(", "))
                    });
                self.error(
                    v,
                    RecipeErrorKind::UnknownVariant {
                        what: "bootstrap variant".into(),
                        given: v.value.clone(),
                    },
                )
                .hint = Some(hint);
                ok = false;
                String::new()
            }
        };
        let mut packages = BTreeSet::new();
        for p in &b.packages {
            if is_package_spec(&p.value) {
                packages.insert(p.value.clone());
            } else {
                self.invalid(p, "package", &p.value, "Debian package names use lowercase letters, digits, `+`, `-` and `.` (optionally `=version` or `:arch`)");
                ok = false;
            }
        }
        let mirror = match &b.mirror {
            Some(m)
                if m.value.starts_with("http://")
                    || m.value.starts_with("https://")
                    || m.value.starts_with("file://") =>
            {
                m.value.clone()
            }
            Some(m) => {
                self.invalid(
                    m,
                    "mirror",
                    &m.value,
                    "write an http://, https:// or file:// URL",
                );
                ok = false;
                String::new()
            }
            None => match distro {
                Distro::Debian => "http://deb.debian.org/debian".into(),
                Distro::Ubuntu => "http://archive.ubuntu.com/ubuntu".into(),
            },
        };
        let components = match &b.components {
            Some(c) => c.iter().map(|c| c.value.clone()).collect(),
            None => vec!["main".to_owned()],
        };
        let mut suites: Vec<ArchiveSuite> = Vec::new();
        for extra in &b.suites {
            let words: Vec<&str> = extra.value.split_whitespace().collect();
            let (url, suite) = match words.as_slice() {
                [suite] => (mirror.as_str(), *suite),
                [url, suite] => (*url, *suite),
                _ => ("", ""),
            };
            let url_ok = url.starts_with("http://")
                || url.starts_with("https://")
                || url.starts_with("file://");
            if !url_ok || !is_simple_name(suite, 64) {
                self.invalid(
                    extra,
                    "suite",
                    &extra.value,
                    "write `SUITE` (read from `mirror`) or `URL SUITE`, such as `bookworm-updates` or `http://deb.debian.org/debian-security bookworm-security`",
                );
                ok = false;
                continue;
            }
            let archive = ArchiveSuite {
                mirror: url.trim_end_matches('/').to_owned(),
                suite: suite.to_owned(),
            };
            if (archive.mirror == mirror.trim_end_matches('/') && archive.suite == b.suite.value)
                || suites.contains(&archive)
            {
                self.invalid(extra, "suite", &extra.value, "it is listed twice");
                ok = false;
                continue;
            }
            suites.push(archive);
        }
        let (keyring, keyring_path) = match &b.keyring {
            Some(k) => match self.path(k, "archive keyring") {
                Some(path) => (Some(k.value.clone()), Some(path)),
                None => {
                    ok = false;
                    (None, None)
                }
            },
            None => (None, None),
        };
        ok.then(|| Bootstrap {
            distro,
            suite: b.suite.value.clone(),
            variant,
            packages: packages.into_iter().collect(),
            mirror,
            components,
            suites,
            keyring,
            keyring_path,
        })
    }

    fn ami_filter(&mut self, at: &S<RawBase>, f: &RawAmiFilter) -> Option<AmiFilter> {
        if f.owners.is_empty() && f.ssm_parameter.is_none() {
            self.error(
                at,
                RecipeErrorKind::Conflict(
                    "a source AMI filter needs `owners` or `ssm_parameter`".into(),
                ),
            )
            .hint =
                Some("for example `owners: [amazon]` with `name: al2023-ami-2023.*-x86_64`".into());
            return None;
        }
        if f.ssm_parameter.is_none() && f.name.is_none() {
            self.error(
                at,
                RecipeErrorKind::Conflict("a source AMI filter needs a `name` pattern".into()),
            )
            .hint = Some("without one, any image of these owners would match".into());
            return None;
        }
        let architecture = self.architecture(f.architecture.as_ref())?;
        Some(AmiFilter {
            owners: f.owners.iter().map(|o| o.value.clone()).collect(),
            name: f.name.as_ref().map(|n| n.value.clone()),
            architecture,
            virtualization_type: f
                .virtualization_type
                .as_ref()
                .map_or("hvm".into(), |v| v.value.clone()),
            root_device_type: f
                .root_device_type
                .as_ref()
                .map_or("ebs".into(), |v| v.value.clone()),
            most_recent: f.most_recent,
            ssm_parameter: f.ssm_parameter.as_ref().map(|s| s.value.clone()),
        })
    }

    fn architecture(&mut self, arch: Option<&S<String>>) -> Option<Architecture> {
        match arch.map(|a| a.value.as_str()) {
            None | Some("x86_64") | Some("amd64") => Some(Architecture::X86_64),
            Some("arm64") | Some("aarch64") => Some(Architecture::Arm64),
            Some(other) => {
                let a = arch.expect("matched Some");
                self.error(
                    a,
                    RecipeErrorKind::UnknownVariant {
                        what: "architecture".into(),
                        given: other.into(),
                    },
                )
                .hint = Some("bake builds `x86_64` (amd64) or `arm64`".into());
                None
            }
        }
    }

    fn build(&mut self, b: &RawBuild) -> BuildSettings {
        let source_date_epoch = b
            .source_date_epoch
            .as_ref()
            .and_then(|s| match s.value.as_u64() {
                Some(v) => Some(v),
                None => {
                    self.invalid(
                        s,
                        "source_date_epoch",
                        &s.value,
                        "write seconds since 1970-01-01 UTC as a whole number",
                    );
                    None
                }
            });
        let level = b
            .compression_level
            .as_ref()
            .and_then(|l| match l.value.as_i64() {
                Some(v) => Some((v, l)),
                None => {
                    self.invalid(l, "compression_level", &l.value, "write a whole number");
                    None
                }
            });
        let compression = match b.compression.as_ref().map(|c| c.value.as_str()) {
            None | Some("gzip") => match level {
                None => Compression::Gzip(6),
                Some((v @ 1..=9, _)) => Compression::Gzip(v as u32),
                Some((v, at)) => {
                    self.invalid(at, "compression_level", v, "gzip levels are 1 to 9");
                    Compression::Gzip(6)
                }
            },
            Some("zstd") => match level {
                None => Compression::Zstd(3),
                Some((v @ 1..=19, _)) => Compression::Zstd(v as i32),
                Some((v, at)) => {
                    self.invalid(at, "compression_level", v, "zstd levels are 1 to 19");
                    Compression::Zstd(3)
                }
            },
            Some(other) => {
                let at = b.compression.as_ref().expect("matched Some");
                self.error(
                    at,
                    RecipeErrorKind::UnknownVariant {
                        what: "compression".into(),
                        given: other.into(),
                    },
                )
                .hint = Some("layers are compressed with `gzip` or `zstd`".into());
                Compression::Gzip(6)
            }
        };
        let runner = match b.runner.as_ref().map(|r| r.value.as_str()) {
            None | Some("chroot") => RunnerKind::Chroot,
            Some("docker") => RunnerKind::Docker,
            Some(other) => {
                let at = b.runner.as_ref().expect("matched Some");
                self.error(
                    at,
                    RecipeErrorKind::UnknownVariant {
                        what: "runner".into(),
                        given: other.into(),
                    },
                )
                .hint = Some("runners are `chroot` (namespaces, no daemon) and `docker`".into());
                RunnerKind::Chroot
            }
        };
        let cache =
            b.cache.as_ref().and_then(|c| {
                match crate::registry::Reference::repository_only(&c.value) {
                    Ok(_) => Some(c.value.clone()),
                    Err(e) => {
                        self.invalid(
                        c,
                        "layer cache repository",
                        &c.value,
                        format!(
                            "{e}; write `registry/name`, such as `registry.example.com/bake-cache`"
                        ),
                    );
                        None
                    }
                }
            });
        BuildSettings {
            source_date_epoch,
            compression,
            squash: b.squash,
            runner,
            cache,
        }
    }

    fn provisioner(&mut self, index: usize, p: &S<RawProvisioner>) -> Option<Provisioner> {
        let position = index + 1;
        let (name, step) = match &p.value {
            RawProvisioner::File(f) => (
                f.name
                    .as_ref()
                    .map(|n| n.value.clone())
                    .unwrap_or_else(|| format!("file #{position}")),
                Step::File(self.file_step(f)?),
            ),
            RawProvisioner::Shell(s) => (
                s.name
                    .as_ref()
                    .map(|n| n.value.clone())
                    .unwrap_or_else(|| format!("shell #{position}")),
                Step::Shell(self.shell_step(p, s)?),
            ),
            RawProvisioner::Hardening(h) => (
                format!("hardening {} #{position}", h.profile.value),
                Step::Hardening(self.hardening_step(h)?),
            ),
        };
        Some(Provisioner { name, step })
    }

    fn file_step(&mut self, f: &RawFileStep) -> Option<FileStep> {
        let source = self.path(&f.source, "source file");
        if !f.destination.value.starts_with('/') && !f.destination.value.starts_with("{{") {
            self.invalid(
                &f.destination,
                "destination",
                &f.destination.value,
                "destinations are absolute paths in the image",
            )
            .hint = Some(format!("write `/{}`", f.destination.value));
        }
        let mode = f.mode.as_ref().and_then(|m| match &m.value {
            Value::String(s)
                if s.len() <= 5 && u32::from_str_radix(s, 8).is_ok_and(|v| v <= 0o7777) =>
            {
                u32::from_str_radix(s, 8).ok()
            }
            _ => {
                let written = self.span(m).text();
                self.invalid(m, "mode", written, "write an octal mode as a quoted string")
                    .hint = Some(
                    "for example `mode: \"0644\"` (unquoted, YAML reads 0644 as a decimal number)"
                        .into(),
                );
                None
            }
        });
        let owner = f.owner.as_ref().and_then(|o| match parse_owner(&o.value) {
            Some(owner) => Some(owner),
            None => {
                self.invalid(
                    o,
                    "owner",
                    &o.value,
                    "write numeric `uid:gid`, such as `0:0` or `101:101`",
                );
                None
            }
        });
        let source = source?;
        let templates = if f.template {
            self.file_templates(&f.source, &source)?
        } else {
            Vec::new()
        };
        Some(FileStep {
            relative_source: f.source.value.clone(),
            source,
            templates,
            destination: self.template(&f.destination),
            mode,
            owner,
            template: f.template,
        })
    }

    /// Reads every regular file of a templated `file` source as a template.
    fn file_templates(
        &mut self,
        at: &S<String>,
        source: &Path,
    ) -> Option<Vec<(PathBuf, Template)>> {
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(source)
            .follow_links(false)
            .sort_by_file_name()
        {
            let Ok(entry) = entry else { continue };
            if !entry.file_type().is_file() {
                continue;
            }
            let relative = entry
                .path()
                .strip_prefix(source)
                .unwrap_or(Path::new(""))
                .to_path_buf();
            let shown = self.display_dir.join(&at.value).join(&relative);
            match fs_err::read_to_string(entry.path()) {
                Ok(text) => out.push((
                    relative,
                    Template {
                        text: text.clone(),
                        origin: TemplateOrigin::File(SourceFile::new(
                            shown.display().to_string(),
                            text,
                        )),
                    },
                )),
                Err(e) => {
                    self.error(at, RecipeErrorKind::Io {
                        what: "templated source file",
                        path: shown.display().to_string(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    })
                    .hint = Some("templated files must be UTF-8 text; set `template: false` to copy them as they are".into());
                    return None;
                }
            }
        }
        Some(out)
    }

    fn shell_step(&mut self, at: &S<RawProvisioner>, s: &RawShellStep) -> Option<ShellStep> {
        let script = match (&s.inline, &s.script) {
            (Some(inline), None) => Script::Inline(self.template(inline)),
            (None, Some(script)) => {
                let path = self.path(script, "script")?;
                let rendered = s.template.unwrap_or(true);
                let template = if rendered {
                    match fs_err::read_to_string(&path) {
                        Ok(text) => Some(Template {
                            text: text.clone(),
                            origin: TemplateOrigin::File(SourceFile::new(
                                self.display_dir.join(&script.value).display().to_string(),
                                text,
                            )),
                        }),
                        Err(e) => {
                            self.error(script, RecipeErrorKind::Io {
                                what: "script",
                                path: script.value.clone(),
                                source: std::io::Error::new(e.kind(), e.to_string()),
                            })
                            .hint = Some("a templated script must be UTF-8 text; set `template: false` to run it as is".into());
                            return None;
                        }
                    }
                } else {
                    None
                };
                Script::File {
                    path,
                    relative_path: script.value.clone(),
                    template,
                    rendered,
                }
            }
            (Some(_), Some(script)) => {
                self.error(
                    script,
                    RecipeErrorKind::Conflict("a shell step has both `inline` and `script`".into()),
                )
                .hint = Some("keep one: `inline` for a few commands, `script` for a file".into());
                return None;
            }
            (None, None) => {
                self.error(
                    at,
                    RecipeErrorKind::Conflict("a shell step needs `inline` or `script`".into()),
                );
                return None;
            }
        };
        let mut env = BTreeMap::new();
        for (name, value) in &s.env {
            if !is_identifier(name) {
                self.invalid(
                    value,
                    "environment variable name",
                    name,
                    "use letters, digits and `_`, not starting with a digit",
                );
            }
            env.insert(name.clone(), self.template(value));
        }
        let timeout = self.duration(s.timeout.as_ref(), DEFAULT_STEP_TIMEOUT);
        if let Some(w) = &s.workdir
            && !w.value.starts_with('/')
        {
            self.invalid(
                w,
                "workdir",
                &w.value,
                "write an absolute path in the image",
            );
        }
        Some(ShellStep {
            script,
            env,
            network: s.network,
            timeout,
            user: s.user.as_ref().map(|u| u.value.clone()),
            workdir: s.workdir.as_ref().map(|w| w.value.clone()),
            expect_reboot: s.expect_reboot,
        })
    }

    fn hardening_step(&mut self, h: &RawHardeningStep) -> Option<HardeningStep> {
        if !HARDENING_PROFILES.contains(&h.profile.value.as_str()) {
            let hint = did_you_mean(&h.profile.value, HARDENING_PROFILES)
                .map(|b| format!("did you mean `{b}`?"))
                .unwrap_or_else(|| format!("bake ships: {}", HARDENING_PROFILES.join(", ")));
            self.error(
                &h.profile,
                RecipeErrorKind::UnknownVariant {
                    what: "hardening profile".into(),
                    given: h.profile.value.clone(),
                },
            )
            .hint = Some(hint);
            return None;
        }
        let flavour = match h.flavour.as_ref().map(|f| f.value.as_str()) {
            None => None,
            Some("ami") => Some(Flavour::Ami),
            Some("oci") => Some(Flavour::Oci),
            Some(other) => {
                let at = h.flavour.as_ref().expect("matched Some");
                self.error(at, RecipeErrorKind::UnknownVariant {
                    what: "hardening flavour".into(),
                    given: other.into(),
                })
                .hint = Some("`ami` (a full system) or `oci` (a container); by default it follows the recipe's output".into());
                return None;
            }
        };
        let mut exclude = BTreeMap::new();
        let rules = crate::build::hardening::rules(&h.profile.value);
        for e in &h.exclude {
            if !rules.contains(&e.value.rule.value.as_str()) {
                let hint = did_you_mean(&e.value.rule.value, rules.iter().copied())
                    .map(|b| format!("did you mean `{b}`?"))
                    .unwrap_or_else(|| {
                        format!(
                            "profile `{}` has the rules {}",
                            h.profile.value,
                            rules.join(", ")
                        )
                    });
                self.error(
                    &e.value.rule,
                    RecipeErrorKind::UnknownVariant {
                        what: "hardening rule".into(),
                        given: e.value.rule.value.clone(),
                    },
                )
                .hint = Some(hint);
            }
            if e.value.reason.value.trim().is_empty() {
                self.invalid(
                    &e.value.reason,
                    "exclusion reason",
                    "",
                    "say why the rule does not apply, for the audit trail",
                );
            }
            if exclude
                .insert(e.value.rule.value.clone(), e.value.reason.value.clone())
                .is_some()
            {
                self.error(
                    &e.value.rule,
                    RecipeErrorKind::Conflict(format!(
                        "rule `{}` is excluded twice",
                        e.value.rule.value
                    )),
                );
            }
        }
        Some(HardeningStep {
            profile: h.profile.value.clone(),
            flavour,
            exclude,
        })
    }

    fn provenance(&mut self, p: &S<RawProvenance>) -> ProvenanceSettings {
        let raw = &p.value;
        if let (Some(_), Some(kms)) = (&raw.signing_key, &raw.kms_key) {
            self.invalid(
                kms,
                "provenance key",
                &kms.value,
                "a recipe names either a `signing_key` file or a `kms_key`, not both",
            );
        }
        let signing_key = raw.signing_key.as_ref().and_then(|key| {
            if Path::new(&key.value).is_absolute() {
                let path = PathBuf::from(&key.value);
                if !path.is_file() {
                    self.invalid(
                        key,
                        "provenance signing key",
                        &key.value,
                        "it is not a file",
                    )
                    .hint = Some("make one with `bake key generate`".into());
                }
                Some(path)
            } else {
                self.path(key, "provenance signing key")
            }
        });
        let kms_key = raw.kms_key.as_ref().and_then(|key| {
            if key.value.trim().is_empty() {
                self.invalid(key, "provenance KMS key", "", "it is empty")
                    .hint = Some("give a key id, `alias/NAME` or a key ARN".into());
                None
            } else {
                Some(key.value.clone())
            }
        });
        let mut sbom_formats = Vec::new();
        for format in &raw.sbom_formats {
            if matches!(format.value.as_str(), "spdx" | "cyclonedx") {
                if !sbom_formats.contains(&format.value) {
                    sbom_formats.push(format.value.clone());
                }
            } else {
                self.error(
                    format,
                    RecipeErrorKind::UnknownVariant {
                        what: "SBOM format".into(),
                        given: format.value.clone(),
                    },
                )
                .hint =
                    Some("bake writes `spdx` (SPDX 2.3) and `cyclonedx` (CycloneDX 1.5)".into());
            }
        }
        ProvenanceSettings {
            signing_key,
            kms_key,
            sbom_formats,
        }
    }

    fn lifecycle(&mut self, l: &S<RawLifecycle>, publish: &Publish) -> Lifecycle {
        let raw = &l.value;
        let mut channels = BTreeMap::new();
        for (name, retention) in &raw.channels {
            if !publish.channels.contains(name) {
                self.error(
                    retention,
                    RecipeErrorKind::Conflict(format!(
                        "lifecycle channel `{name}` is not in publish.channels"
                    )),
                )
                .hint = Some("declare it under publish.channels, or remove its retention".into());
                continue;
            }
            let keep = retention
                .value
                .keep
                .as_ref()
                .and_then(|k| self.count(k, "lifecycle channel keep"))
                .unwrap_or(DEFAULT_CHANNEL_KEEP);
            let older_than = retention
                .value
                .older_than
                .as_ref()
                .and_then(|d| self.lifecycle_duration(d));
            channels.insert(name.clone(), ChannelRetention { keep, older_than });
        }
        Lifecycle {
            keep: raw
                .keep
                .as_ref()
                .and_then(|k| self.count(k, "lifecycle keep")),
            older_than: raw
                .older_than
                .as_ref()
                .and_then(|d| self.lifecycle_duration(d)),
            grace: raw
                .grace
                .as_ref()
                .and_then(|d| self.lifecycle_duration(d))
                .unwrap_or(Duration::ZERO),
            channels,
        }
    }

    /// A whole number of versions (`keep`), at least 1: keeping none is never what gc means.
    fn count(&mut self, at: &S<Value>, what: &'static str) -> Option<u32> {
        match at.value.as_u64() {
            Some(n @ 1..=10_000) => Some(n as u32),
            _ => {
                self.invalid(
                    at,
                    what,
                    &at.value,
                    "write a whole number of versions, at least 1",
                );
                None
            }
        }
    }

    /// A retention duration; unlike step timeouts, zero is allowed (`0s`: no wait).
    fn lifecycle_duration(&mut self, at: &S<String>) -> Option<Duration> {
        match humantime::parse_duration(&at.value) {
            Ok(d) => Some(d),
            Err(_) => {
                self.invalid(
                    at,
                    "duration",
                    &at.value,
                    "write a duration such as `0s`, `12h` or `30d`",
                );
                None
            }
        }
    }

    fn audit(&mut self, a: &S<RawAudit>, outputs: &Outputs) -> Option<Audit> {
        let raw = &a.value;
        let mut ok = true;
        let on_builder = outputs
            .ami
            .as_ref()
            .is_some_and(|ami| ami.strategy == AmiStrategy::Instance);
        if let Some(scanner) = &raw.scanner
            && scanner.value != "openscap"
        {
            self.error(
                scanner,
                RecipeErrorKind::UnknownVariant {
                    what: "audit scanner".into(),
                    given: scanner.value.clone(),
                },
            )
            .hint = Some("bake scans with `openscap` (Debian's openscap-scanner)".into());
            ok = false;
        }
        let datastream = if Path::new(&raw.datastream.value).is_absolute() {
            let path = PathBuf::from(&raw.datastream.value);
            if !path.is_file() {
                self.invalid(
                    &raw.datastream,
                    "audit data stream",
                    &raw.datastream.value,
                    "it is not a file",
                )
                .hint = Some("give a SCAP source data stream (`.xml` or `.xml.xz`)".into());
                ok = false;
            }
            Some(path)
        } else {
            self.path(&raw.datastream, "audit data stream")
        };
        let profile = raw.profile.value.trim();
        if profile.is_empty()
            || !profile
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            self.invalid(
                &raw.profile,
                "audit profile",
                &raw.profile.value,
                "an XCCDF profile id is letters, digits, `_`, `-` and `.`",
            );
            ok = false;
        }
        let profile = if profile.starts_with("xccdf_") {
            profile.to_owned()
        } else {
            format!("xccdf_org.ssgproject.content_profile_{profile}")
        };
        let target = match raw.target.as_ref().map(|t| t.value.as_str()) {
            None if outputs.ami.is_some() => AuditTarget::Machine,
            None => AuditTarget::Container,
            Some("machine") => AuditTarget::Machine,
            Some("container") if on_builder => {
                // An instance build's gate scans the running builder, which is a machine:
                // nothing would make its content treat it as a container.
                let at = raw.target.as_ref().expect("matched Some");
                self.error(
                    at,
                    RecipeErrorKind::Conflict(
                        "`target: container` cannot apply to `strategy: instance`: the gate scans the running builder, a machine".into(),
                    ),
                )
                .hint = Some("remove `target` (an AMI is scanned as a `machine`)".into());
                ok = false;
                AuditTarget::Machine
            }
            Some("container") => AuditTarget::Container,
            Some(other) => {
                let at = raw.target.as_ref().expect("matched Some");
                self.error(
                    at,
                    RecipeErrorKind::UnknownVariant {
                        what: "audit target".into(),
                        given: other.into(),
                    },
                )
                .hint = Some("`machine` (an AMI) or `container` (an OCI image)".into());
                ok = false;
                AuditTarget::Machine
            }
        };
        let min_pass_ratio_centi = match &raw.min_pass_ratio {
            None => None,
            Some(at) => match at.value.as_f64().filter(|r| (0.0..=100.0).contains(r)) {
                Some(r) => Some((r * 100.0).round() as u32),
                None => {
                    self.invalid(
                        at,
                        "min_pass_ratio",
                        &at.value,
                        "write a percentage from 0 to 100",
                    );
                    ok = false;
                    None
                }
            },
        };
        let max_failures = match &raw.max_failures {
            None => None,
            Some(at) => match at.value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Some(n),
                None => {
                    self.invalid(
                        at,
                        "max_failures",
                        &at.value,
                        "write a whole number of rules, 0 or more",
                    );
                    ok = false;
                    None
                }
            },
        };
        if raw.min_pass_ratio.is_none() && raw.max_failures.is_none() {
            self.invalid(
                a,
                "audit",
                "",
                "it has no threshold: set `min_pass_ratio`, `max_failures` or both",
            );
            ok = false;
        }
        let mut exceptions = BTreeMap::new();
        for e in &raw.exceptions {
            let rule = e.value.rule.value.trim();
            let rule = rule
                .strip_prefix("xccdf_org.ssgproject.content_rule_")
                .unwrap_or(rule);
            if rule.is_empty() {
                self.invalid(&e.value.rule, "audit exception rule", "", "name a rule id");
                ok = false;
            }
            if e.value.reason.value.trim().is_empty() {
                self.invalid(
                    &e.value.reason,
                    "audit exception reason",
                    "",
                    "say why the failure is accepted, for the audit trail",
                );
                ok = false;
            }
            if exceptions
                .insert(rule.to_owned(), e.value.reason.value.clone())
                .is_some()
            {
                self.error(
                    &e.value.rule,
                    RecipeErrorKind::Conflict(format!("rule `{rule}` is excepted twice")),
                );
                ok = false;
            }
        }
        let datastream = datastream?;
        ok.then(|| Audit {
            scanner: Scanner::Openscap,
            datastream,
            datastream_path: raw.datastream.value.clone(),
            profile,
            target,
            min_pass_ratio_centi,
            max_failures,
            exceptions,
            support_status: raw.support_status.unwrap_or(true),
        })
    }

    fn duration(&mut self, at: Option<&S<String>>, default: Duration) -> Duration {
        let Some(at) = at else { return default };
        match humantime::parse_duration(&at.value) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                self.invalid(
                    at,
                    "duration",
                    &at.value,
                    "write a duration such as `90s`, `10m` or `1h 30m`",
                );
                default
            }
        }
    }

    fn test(&mut self, index: usize, t: &S<RawTest>, outputs: &Outputs) -> Option<Test> {
        Some(match &t.value {
            RawTest::Command(c) => Test::Command {
                name: c
                    .name
                    .as_ref()
                    .map(|n| n.value.clone())
                    .unwrap_or_else(|| format!("test #{}", index + 1)),
                run: self.template(&c.run),
                exit_code: c.exit_code,
                stdout_contains: c.stdout_contains.as_ref().map(|s| self.template(s)),
                user: c.user.as_ref().map(|u| u.value.clone()),
                network: c.network,
                timeout: self.duration(c.timeout.as_ref(), DEFAULT_TEST_TIMEOUT),
            },
            RawTest::Boot(b) => {
                if outputs.ami.is_none() {
                    self.error(t, RecipeErrorKind::Conflict("a boot test needs an AMI output".into()))
                        .hint = Some("boot tests start the disk image in QEMU; add `outputs.ami` or remove the test".into());
                }
                if b.marker.value.trim().is_empty() {
                    self.invalid(
                        &b.marker,
                        "boot marker",
                        "",
                        "write the text the booted system prints on its serial console",
                    );
                }
                let accelerator = match b.accelerator.as_ref().map(|a| (a, a.value.as_str())) {
                    None | Some((_, "auto")) => Accelerator::Auto,
                    Some((_, "kvm")) => Accelerator::Kvm,
                    Some((_, "tcg")) => Accelerator::Tcg,
                    Some((at, other)) => {
                        self.error(
                            at,
                            RecipeErrorKind::UnknownVariant {
                                what: "boot accelerator".into(),
                                given: other.into(),
                            },
                        )
                        .hint = Some(
                            "`auto` (KVM when it works, else software emulation), `kvm` or `tcg`"
                                .into(),
                        );
                        Accelerator::Auto
                    }
                };
                Test::Boot {
                    marker: b.marker.value.clone(),
                    timeout: self.duration(b.timeout.as_ref(), DEFAULT_BOOT_TIMEOUT),
                    accelerator,
                }
            }
            RawTest::Compliance(_) => {
                // Parsed only to say where the gate went: a second, weaker scan (no data stream,
                // no exceptions) next to `audit:` would be a way to pass a gate by accident.
                self.error(
                    t,
                    RecipeErrorKind::Conflict(
                        "`compliance` tests are gone: the compliance gate is the recipe's `audit:` section".into(),
                    ),
                )
                .hint = Some(
                    "move `profile` to `audit.profile` and `min_score` to `audit.min_pass_ratio`, and name the data stream in `audit.datastream`".into(),
                );
                return None;
            }
        })
    }

    fn outputs(&mut self, o: &RawOutputs, base: &S<RawBase>) -> Outputs {
        let oci = o.oci.as_ref().and_then(|oci| self.oci_output(oci));
        let ami = o.ami.as_ref().and_then(|ami| self.ami_output(ami));
        if o.oci.is_none() && o.ami.is_none() {
            self.error(
                base,
                RecipeErrorKind::Conflict("the recipe has no outputs".into()),
            )
            .hint =
                Some("add `outputs.oci` for an image, `outputs.ami` for an AMI, or both".into());
        }
        let from_ami = matches!(base.value, RawBase::Ami(_));
        if let Some(ami) = &o.ami {
            match (ami.value.strategy.value.as_str(), from_ami) {
                ("instance", false) => {
                    self.error(&ami.value.strategy, RecipeErrorKind::Conflict(
                        "the `instance` strategy builds from a source AMI, but the base is not `ami`".into(),
                    ))
                    .hint = Some("use `strategy: snapshot` to turn this base into an AMI without an instance".into());
                }
                ("snapshot", true) => {
                    self.error(&ami.value.strategy, RecipeErrorKind::Conflict(
                        "the `snapshot` strategy builds a disk locally and cannot start from a source AMI".into(),
                    ))
                    .hint = Some("use `strategy: instance` with an `ami` base".into());
                }
                _ => {}
            }
        }
        if from_ami && let Some(oci) = &o.oci {
            self.error(
                oci,
                RecipeErrorKind::Conflict("an OCI image cannot be built from a source AMI".into()),
            );
        }
        Outputs { oci, ami }
    }

    fn oci_output(&mut self, o: &S<RawOciOutput>) -> Option<OciOutput> {
        let v = &o.value;
        let (os, architecture, variant) = match &v.platform {
            None => ("linux".to_owned(), Architecture::X86_64, None),
            Some(p) => {
                let parts: Vec<&str> = p.value.split('/').collect();
                let arch = match parts.get(1).copied() {
                    Some("amd64") => Some(Architecture::X86_64),
                    Some("arm64") => Some(Architecture::Arm64),
                    _ => None,
                };
                match (parts.first().copied(), arch, parts.len()) {
                    (Some("linux"), Some(arch), 2 | 3) => (
                        "linux".to_owned(),
                        arch,
                        parts.get(2).map(|s| (*s).to_owned()),
                    ),
                    _ => {
                        self.invalid(
                            p,
                            "platform",
                            &p.value,
                            "bake builds `linux/amd64` or `linux/arm64` (optionally `/v8`)",
                        );
                        return None;
                    }
                }
            }
        };
        let mut env = BTreeMap::new();
        for (k, val) in &v.env {
            if k.is_empty() || k.contains('=') {
                self.invalid(
                    val,
                    "environment variable name",
                    k,
                    "a name cannot be empty or contain `=`",
                );
            }
            env.insert(k.clone(), self.template(val));
        }
        let mut ports = BTreeSet::new();
        for p in &v.ports {
            match normalize_port(&p.value) {
                Some(port) => {
                    ports.insert(port);
                }
                None => {
                    self.invalid(
                        p,
                        "port",
                        &p.value,
                        "write `PORT` or `PORT/tcp` or `PORT/udp` with PORT from 1 to 65535",
                    );
                }
            }
        }
        if let Some(w) = &v.workdir
            && !w.value.starts_with('/')
        {
            self.invalid(
                w,
                "workdir",
                &w.value,
                "write an absolute path in the image",
            );
        }
        Some(OciOutput {
            os,
            architecture,
            variant,
            entrypoint: v
                .entrypoint
                .as_ref()
                .map(|e| e.iter().map(|s| self.template(s)).collect()),
            cmd: v
                .cmd
                .as_ref()
                .map(|e| e.iter().map(|s| self.template(s)).collect()),
            env,
            user: v.user.as_ref().map(|u| u.value.clone()),
            workdir: v.workdir.as_ref().map(|w| w.value.clone()),
            labels: v
                .labels
                .iter()
                .map(|(k, val)| (k.clone(), self.template(val)))
                .collect(),
            annotations: v
                .annotations
                .iter()
                .map(|(k, val)| (k.clone(), self.template(val)))
                .collect(),
            ports: ports.into_iter().collect(),
            stop_signal: v.stop_signal.as_ref().map(|s| s.value.clone()),
        })
    }

    fn regions(&mut self, regions: &[S<String>]) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for r in regions {
            if !is_region(&r.value) {
                self.invalid(
                    r,
                    "region",
                    &r.value,
                    "write an AWS region code such as `us-east-1` or `eu-west-3`",
                );
            } else if !seen.insert(r.value.clone()) {
                self.error(
                    r,
                    RecipeErrorKind::Conflict(format!("region `{}` is listed twice", r.value)),
                );
            } else {
                out.push(r.value.clone());
            }
        }
        out
    }

    fn ami_output(&mut self, a: &S<RawAmiOutput>) -> Option<AmiOutput> {
        let v = &a.value;
        let strategy = match v.strategy.value.as_str() {
            "snapshot" => AmiStrategy::Snapshot,
            "instance" => AmiStrategy::Instance,
            other => {
                let hint = did_you_mean(other, ["snapshot", "instance"])
                    .map(|b| format!("did you mean `{b}`?"))
                    .unwrap_or_else(|| {
                        "`snapshot` (no builder instance) or `instance` (Packer-style)".into()
                    });
                self.error(
                    &v.strategy,
                    RecipeErrorKind::UnknownVariant {
                        what: "AMI strategy".into(),
                        given: other.into(),
                    },
                )
                .hint = Some(hint);
                return None;
            }
        };
        if v.regions.value.is_empty() {
            self.invalid(
                &v.regions,
                "regions",
                "[]",
                "list at least one region; the first is where the AMI is built",
            );
        }
        let regions = self.regions(&v.regions.value);
        let architecture = self.architecture(v.architecture.as_ref())?;
        let boot_mode = match v.boot_mode.as_ref().map(|b| b.value.as_str()) {
            None | Some("uefi") => BootMode::Uefi,
            Some("legacy-bios") => BootMode::LegacyBios,
            Some("uefi-preferred") => BootMode::UefiPreferred,
            Some(other) => {
                let at = v.boot_mode.as_ref().expect("matched Some");
                self.error(
                    at,
                    RecipeErrorKind::UnknownVariant {
                        what: "boot mode".into(),
                        given: other.into(),
                    },
                )
                .hint = Some("`uefi`, `legacy-bios` or `uefi-preferred`".into());
                return None;
            }
        };
        if strategy == AmiStrategy::Snapshot && boot_mode == BootMode::LegacyBios {
            let at = v.boot_mode.as_ref().expect("legacy-bios was written");
            self.error(
                at,
                RecipeErrorKind::Conflict("the snapshot strategy builds UEFI disks only".into()),
            )
            .hint = Some("use `boot_mode: uefi`".into());
        }
        let disk_size_gib = match &v.disk_size_gib {
            None => 8,
            Some(d) => match d.value.as_u64().filter(|n| DISK_SIZE_GIB.contains(n)) {
                Some(n) => n as u32,
                None => {
                    self.invalid(
                        d,
                        "disk_size_gib",
                        &d.value,
                        "write a whole number of GiB from 1 to 16384",
                    );
                    8
                }
            },
        };
        let volume_type = match &v.volume_type {
            None => "gp3".to_owned(),
            Some(t) if ["gp2", "gp3", "io1", "io2", "standard"].contains(&t.value.as_str()) => {
                t.value.clone()
            }
            Some(t) => {
                self.invalid(
                    t,
                    "volume_type",
                    &t.value,
                    "EBS root volume types are gp3, gp2, io1, io2, standard",
                );
                "gp3".to_owned()
            }
        };
        let encrypted = v.encryption.encrypted.unwrap_or(true);
        if let Some(k) = &v.encryption.kms_key_id {
            if !is_kms_key(&k.value) {
                self.invalid(
                    k,
                    "KMS key",
                    &k.value,
                    "write a key id, `alias/NAME` or a key or alias ARN",
                );
            }
            if !encrypted {
                self.error(
                    k,
                    RecipeErrorKind::Conflict("a KMS key is given but `encrypted` is false".into()),
                );
            }
        }
        let mut region_kms_key_ids = BTreeMap::new();
        for (region, key) in &v.encryption.region_kms_key_ids {
            if !regions.contains(region) {
                self.error(
                    key,
                    RecipeErrorKind::Conflict(format!(
                        "region `{region}` has a KMS key but is not in `regions`"
                    )),
                );
            }
            if !is_kms_key(&key.value) {
                self.invalid(
                    key,
                    "KMS key",
                    &key.value,
                    "write a key id, `alias/NAME` or a key or alias ARN",
                );
            }
            region_kms_key_ids.insert(region.clone(), key.value.clone());
        }
        let mut share_accounts = Vec::new();
        for account in &v.sharing.accounts {
            let text = match &account.value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => other.to_string(),
            };
            if text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit()) {
                share_accounts.push(text);
            } else {
                self.invalid(
                    account,
                    "account id",
                    &text,
                    "AWS account ids are 12 digits; quote them to keep leading zeros",
                );
            }
        }
        for org in &v.sharing.organizations {
            if !org.value.starts_with("arn:aws") || !org.value.contains(":organization/") {
                self.invalid(
                    org,
                    "organization ARN",
                    &org.value,
                    "write `arn:aws:organizations::ACCOUNT:organization/o-…`",
                );
            }
        }
        for ou in &v.sharing.organizational_units {
            if !ou.value.starts_with("arn:aws") || !ou.value.contains(":ou/") {
                self.invalid(
                    ou,
                    "organizational unit ARN",
                    &ou.value,
                    "write `arn:aws:organizations::ACCOUNT:ou/o-…/ou-…`",
                );
            }
        }
        let deprecate_after = v
            .deprecate_after
            .as_ref()
            .map(|d| self.duration(Some(d), Duration::ZERO));
        let instance = match (&v.instance, strategy) {
            (Some(i), AmiStrategy::Instance) => self.instance_settings(i, architecture),
            (Some(i), AmiStrategy::Snapshot) => {
                self.error(
                    i,
                    RecipeErrorKind::Conflict(
                        "`instance` settings apply only to `strategy: instance`".into(),
                    ),
                );
                None
            }
            (None, AmiStrategy::Instance) => self.instance_settings_default(architecture),
            (None, AmiStrategy::Snapshot) => None,
        };
        Some(AmiOutput {
            strategy,
            name: v
                .name
                .as_ref()
                .map(|n| self.template(n))
                .unwrap_or_else(|| Template {
                    text: "{{name}}-{{version_short}}".into(),
                    origin: TemplateOrigin::Yaml {
                        span: self.span(&v.strategy),
                    },
                }),
            description: v.description.as_ref().map(|d| self.template(d)),
            regions,
            architecture,
            boot_mode,
            disk_size_gib,
            volume_type,
            encrypted,
            kms_key_id: v.encryption.kms_key_id.as_ref().map(|k| k.value.clone()),
            region_kms_key_ids,
            share_accounts,
            share_organizations: v
                .sharing
                .organizations
                .iter()
                .map(|o| o.value.clone())
                .collect(),
            share_organizational_units: v
                .sharing
                .organizational_units
                .iter()
                .map(|o| o.value.clone())
                .collect(),
            public: v.sharing.public,
            tags: v
                .tags
                .iter()
                .map(|(k, t)| (k.clone(), self.template(t)))
                .collect(),
            deprecate_after,
            instance,
        })
    }

    fn instance_settings_default(&mut self, arch: Architecture) -> Option<InstanceSettings> {
        Some(InstanceSettings {
            instance_type: default_instance_type(arch).into(),
            subnet_id: None,
            vpc_id: None,
            ssh_username: "ec2-user".into(),
            ssh_cidr: None,
            ssh_host: None,
            ssh_port: 22,
            bastion: None,
            iam_instance_profile: None,
            user_data: None,
            root_volume_gib: None,
        })
    }

    fn port(&mut self, at: Option<&S<Value>>, default: u16) -> u16 {
        let Some(at) = at else { return default };
        match at.value.as_u64().filter(|p| (1..=65535).contains(p)) {
            Some(p) => p as u16,
            None => {
                self.invalid(at, "port", &at.value, "write a port number from 1 to 65535");
                default
            }
        }
    }

    fn instance_settings(
        &mut self,
        i: &S<RawInstanceSettings>,
        arch: Architecture,
    ) -> Option<InstanceSettings> {
        let v = &i.value;
        if let Some(s) = &v.subnet_id
            && !s.value.starts_with("subnet-")
        {
            self.invalid(
                s,
                "subnet id",
                &s.value,
                "subnet ids look like `subnet-0123456789abcdef0`",
            );
        }
        if let Some(s) = &v.vpc_id
            && !s.value.starts_with("vpc-")
        {
            self.invalid(
                s,
                "VPC id",
                &s.value,
                "VPC ids look like `vpc-0123456789abcdef0`",
            );
        }
        if let Some(c) = &v.ssh_cidr
            && !is_cidr(&c.value)
        {
            self.invalid(
                c,
                "CIDR",
                &c.value,
                "write an IPv4 CIDR such as `203.0.113.7/32`",
            );
        }
        let ssh_username = v
            .ssh_username
            .as_ref()
            .map_or("ec2-user".into(), |u| u.value.clone());
        let ssh_port = self.port(v.ssh_port.as_ref(), 22);
        let bastion = v.bastion.as_ref().map(|b| Bastion {
            host: b.value.host.value.clone(),
            port: self.port(b.value.port.as_ref(), 22),
            user: b
                .value
                .user
                .as_ref()
                .map_or(ssh_username.clone(), |u| u.value.clone()),
        });
        let root_volume_gib = v.root_volume_gib.as_ref().and_then(|r| {
            match r.value.as_u64().filter(|n| DISK_SIZE_GIB.contains(n)) {
                Some(n) => Some(n as u32),
                None => {
                    self.invalid(
                        r,
                        "root_volume_gib",
                        &r.value,
                        "write a whole number of GiB from 1 to 16384",
                    );
                    None
                }
            }
        });
        Some(InstanceSettings {
            instance_type: v
                .instance_type
                .as_ref()
                .map_or(default_instance_type(arch).into(), |t| t.value.clone()),
            subnet_id: v.subnet_id.as_ref().map(|s| s.value.clone()),
            vpc_id: v.vpc_id.as_ref().map(|s| s.value.clone()),
            ssh_username,
            ssh_cidr: v.ssh_cidr.as_ref().map(|s| s.value.clone()),
            ssh_host: v.ssh_host.as_ref().map(|s| s.value.clone()),
            ssh_port,
            bastion,
            iam_instance_profile: v.iam_instance_profile.as_ref().map(|s| s.value.clone()),
            user_data: v.user_data.as_ref().map(|s| self.template(s)),
            root_volume_gib,
        })
    }

    fn publish(&mut self, p: &RawPublish, outputs: &Outputs) -> Publish {
        let mut publish = Publish::default();
        for r in &p.registries {
            if outputs.oci.is_none() {
                self.needs(r, "registry target", "outputs.oci");
            }
            let repo = &r.value.repository;
            let last = repo.value.rsplit('/').next().unwrap_or("");
            if last.contains(':') || repo.value.contains('@') || !repo.value.contains('/') {
                self.invalid(
                    repo,
                    "repository",
                    &repo.value,
                    "write `registry.example.com/name` without a tag or digest; tags go in `tags`",
                );
            } else if let Err(e) = oci_spec::distribution::Reference::from_str(&repo.value) {
                self.invalid(repo, "repository", &repo.value, e.to_string());
            }
            publish.registries.push(RegistryTarget {
                repository: repo.value.clone(),
                tags: r.value.tags.iter().map(|t| self.template(t)).collect(),
                insecure: r.value.insecure,
            });
        }
        for e in &p.ecr {
            if outputs.oci.is_none() {
                self.needs(e, "ECR target", "outputs.oci");
            }
            let repo = &e.value.repository;
            if !is_ecr_repository(&repo.value) {
                self.invalid(repo, "ECR repository name", &repo.value, "use 2 to 256 lowercase letters, digits and `._-/` separators, without the registry host");
            }
            if let Some(region) = &e.value.region
                && !is_region(&region.value)
            {
                self.invalid(
                    region,
                    "region",
                    &region.value,
                    "write an AWS region code such as `us-east-1`",
                );
            }
            if let Some(key) = &e.value.kms_key
                && key.value.trim().is_empty()
            {
                self.invalid(
                    key,
                    "KMS key",
                    &key.value,
                    "give a key id, ARN or `alias/…`, or leave `kms_key` out for AES-256",
                );
            }
            publish.ecr.push(EcrTarget {
                repository: repo.value.clone(),
                region: e.value.region.as_ref().map(|r| r.value.clone()),
                tags: e.value.tags.iter().map(|t| self.template(t)).collect(),
                create: e.value.create,
                immutable_tags: e.value.immutable_tags,
                scan_on_push: e.value.scan_on_push,
                kms_key: e.value.kms_key.as_ref().map(|k| k.value.clone()),
            });
        }
        let ami_regions: Vec<String> = outputs
            .ami
            .as_ref()
            .map(|a| a.regions.clone())
            .unwrap_or_default();
        for lt in &p.launch_templates {
            if outputs.ami.is_none() {
                self.needs(lt, "launch template target", "outputs.ami");
            }
            let v = &lt.value;
            let template = match (&v.name, &v.id) {
                (Some(n), None) => LaunchTemplateRef::Name(n.value.clone()),
                (None, Some(id)) => {
                    if !id.value.starts_with("lt-") {
                        self.invalid(
                            id,
                            "launch template id",
                            &id.value,
                            "ids look like `lt-0123456789abcdef0`",
                        );
                    }
                    LaunchTemplateRef::Id(id.value.clone())
                }
                _ => {
                    self.error(
                        lt,
                        RecipeErrorKind::Conflict(
                            "a launch template target needs exactly one of `name` and `id`".into(),
                        ),
                    );
                    continue;
                }
            };
            let regions = v
                .regions
                .as_ref()
                .map(|r| self.subset_regions(r, &ami_regions));
            let source_version = match &v.source_version {
                None => "$Default".to_owned(),
                Some(s) => match &s.value {
                    Value::String(t) if t == "$Default" || t == "$Latest" => t.clone(),
                    Value::Number(n) if n.as_u64().is_some_and(|n| n > 0) => n.to_string(),
                    other => {
                        self.invalid(
                            s,
                            "source_version",
                            other,
                            "write `$Default`, `$Latest` or a version number",
                        );
                        "$Default".to_owned()
                    }
                },
            };
            let (http_tokens_required, hop_limit) = match &v.metadata {
                None => (None, None),
                Some(m) => {
                    let tokens = match m.value.http_tokens.as_ref().map(|t| t.value.as_str()) {
                        None => None,
                        Some("required") => Some(true),
                        Some("optional") => Some(false),
                        Some(other) => {
                            let at = m.value.http_tokens.as_ref().expect("matched Some");
                            self.invalid(
                                at,
                                "http_tokens",
                                other,
                                "write `required` (IMDSv2 only) or `optional`",
                            );
                            None
                        }
                    };
                    let hops = m.value.http_put_response_hop_limit.as_ref().and_then(|h| match h.value.as_u64().filter(|n| (1..=64).contains(n)) {
                        Some(n) => Some(n as u8),
                        None => {
                            self.invalid(h, "hop limit", &h.value, "write a number from 1 to 64 (1 keeps credentials away from containers)");
                            None
                        }
                    });
                    (tokens, hops)
                }
            };
            let instance_refresh = v.instance_refresh.as_ref().map(|r| {
                let group = &r.value.auto_scaling_group;
                if group.value.is_empty() || group.value.len() > 255 {
                    self.invalid(
                        group,
                        "Auto Scaling group name",
                        &group.value,
                        "write the group's name (1 to 255 characters)",
                    );
                }
                let min_healthy = r.value.min_healthy_percentage.as_ref().and_then(|m| {
                    match m.value.as_u64().filter(|n| *n <= 100) {
                        Some(n) => Some(n as u8),
                        None => {
                            self.invalid(
                                m,
                                "min_healthy_percentage",
                                &m.value,
                                "write a whole number from 0 to 100",
                            );
                            None
                        }
                    }
                });
                InstanceRefresh {
                    auto_scaling_group: group.value.clone(),
                    min_healthy_percentage: min_healthy,
                    skip_matching: r.value.skip_matching,
                }
            });
            publish.launch_templates.push(LaunchTemplateTarget {
                template,
                regions,
                source_version,
                set_default: v.set_default,
                http_tokens_required,
                hop_limit,
                instance_refresh,
            });
        }
        for s in &p.ssm_parameters {
            if outputs.ami.is_none() {
                self.needs(s, "SSM parameter target", "outputs.ami");
            }
            let name = &s.value.name;
            if name.value.contains('/')
                && !name.value.starts_with('/')
                && !name.value.starts_with("{{")
            {
                self.invalid(
                    name,
                    "SSM parameter name",
                    &name.value,
                    "a hierarchical parameter name starts with `/`",
                );
            }
            if name.value.to_ascii_lowercase().starts_with("/aws")
                || name.value.to_ascii_lowercase().starts_with("aws")
            {
                self.invalid(
                    name,
                    "SSM parameter name",
                    &name.value,
                    "names starting with `aws` or `/aws` are reserved by AWS",
                );
            }
            let regions = s
                .value
                .regions
                .as_ref()
                .map(|r| self.subset_regions(r, &ami_regions));
            publish.ssm_parameters.push(SsmTarget {
                name: self.template(name),
                regions,
                description: s.value.description.as_ref().map(|d| self.template(d)),
            });
        }
        let repositories: Vec<String> = publish
            .registries
            .iter()
            .map(|r| r.repository.clone())
            .chain(publish.ecr.iter().map(|e| e.repository.clone()))
            .collect();
        for t in &p.ecs_task_definitions {
            if outputs.oci.is_none() {
                self.needs(t, "ECS task definition target", "outputs.oci");
            }
            let v = &t.value;
            if !v
                .family
                .value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                || v.family.value.is_empty()
                || v.family.value.len() > 255
            {
                self.invalid(
                    &v.family,
                    "task definition family",
                    &v.family.value,
                    "use up to 255 letters, digits, `-` and `_`",
                );
            }
            if !is_region(&v.region.value) {
                self.invalid(
                    &v.region,
                    "region",
                    &v.region.value,
                    "write an AWS region code such as `us-east-1`",
                );
            }
            let repository = match &v.repository {
                Some(r) if repositories.contains(&r.value) => r.value.clone(),
                Some(r) => {
                    let hint = did_you_mean(&r.value, repositories.iter().map(String::as_str))
                        .map(|b| format!("did you mean `{b}`?"))
                        .unwrap_or_else(|| {
                            "name a repository from `publish.registries` or `publish.ecr`".into()
                        });
                    self.invalid(
                        r,
                        "repository",
                        &r.value,
                        "the recipe does not publish to it",
                    )
                    .hint = Some(hint);
                    continue;
                }
                None if repositories.len() == 1 => repositories[0].clone(),
                None => {
                    self.error(t, RecipeErrorKind::Conflict(
                        "an ECS task definition target needs `repository` when the recipe publishes to more or fewer than one repository".into(),
                    ))
                    .hint = Some("name the repository whose digest the task definition pins".into());
                    continue;
                }
            };
            let template = match &v.template {
                Some(path) => self.path(path, "task definition template"),
                None => None,
            };
            if let Some(service) = &v.service
                && (service.value.cluster.value.is_empty() || service.value.name.value.is_empty())
            {
                self.error(
                    service,
                    RecipeErrorKind::Conflict("a service needs a `cluster` and a `name`".into()),
                );
            }
            publish.ecs_task_definitions.push(EcsTarget {
                family: v.family.value.clone(),
                container: v.container.value.clone(),
                region: v.region.value.clone(),
                repository,
                template,
                template_relative: v.template.as_ref().map(|t| t.value.clone()),
                service: v.service.as_ref().map(|s| EcsService {
                    cluster: s.value.cluster.value.clone(),
                    name: s.value.name.value.clone(),
                }),
            });
        }
        let mut channels = BTreeSet::new();
        for c in &p.channels {
            if !is_simple_name(&c.value, 64) {
                self.invalid(
                    c,
                    "channel",
                    &c.value,
                    "use lowercase letters, digits, `-`, `_` or `.`",
                );
            } else if !channels.insert(c.value.clone()) {
                self.error(
                    c,
                    RecipeErrorKind::Conflict(format!("channel `{}` is listed twice", c.value)),
                );
            }
        }
        publish.channels = channels.into_iter().collect();
        for (channel, raw) in &p.rollouts {
            if !publish.channels.contains(channel) {
                self.error(
                    raw,
                    RecipeErrorKind::Conflict(format!(
                        "rollout for channel `{channel}`, which is not in publish.channels"
                    )),
                )
                .hint = did_you_mean(channel, publish.channels.iter().map(String::as_str))
                    .map(|c| format!("did you mean `{c}`?"));
                continue;
            }
            if let Some(rollout) = self.rollout(raw, &publish) {
                publish.rollouts.insert(channel.clone(), rollout);
            }
        }
        publish
    }

    /// A channel's rollout settings; AWS's own defaults where the recipe is silent.
    fn rollout(&mut self, raw: &S<RawRollout>, publish: &Publish) -> Option<Rollout> {
        let r = &raw.value;
        let strategy = match r.strategy.as_ref().map(|s| s.value.as_str()) {
            None | Some("rolling") => RolloutStrategy::Rolling,
            Some("canary") => RolloutStrategy::Canary,
            Some("blue_green") => RolloutStrategy::BlueGreen,
            Some(other) => {
                let at = r.strategy.as_ref().expect("matched Some");
                self.invalid(
                    at,
                    "rollout strategy",
                    other,
                    "write `canary`, `rolling` or `blue_green`",
                );
                RolloutStrategy::Rolling
            }
        };
        let mut checkpoints = Vec::new();
        if let Some(list) = &r.checkpoints {
            if strategy != RolloutStrategy::Canary {
                self.error(
                    list,
                    RecipeErrorKind::Conflict("checkpoints need `strategy: canary`".into()),
                );
            }
            for c in &list.value {
                match c.value.as_u64().filter(|n| (1..=100).contains(n)) {
                    Some(n) if checkpoints.last().is_none_or(|last| u64::from(*last) < n) => {
                        checkpoints.push(n as u8)
                    }
                    Some(_) => {
                        self.invalid(c, "checkpoint", &c.value, "checkpoints must ascend");
                    }
                    None => {
                        self.invalid(
                            c,
                            "checkpoint",
                            &c.value,
                            "write a percentage from 1 to 100",
                        );
                    }
                }
            }
            if checkpoints.last().is_some_and(|last| *last != 100) {
                self.invalid(
                    list,
                    "checkpoints",
                    format!("{checkpoints:?}"),
                    "the last checkpoint must be 100, or the rollout never replaces every instance",
                );
            }
        } else if strategy == RolloutStrategy::Canary {
            checkpoints = DEFAULT_CANARY_CHECKPOINTS.to_vec();
        }
        let min_healthy = r.min_healthy_percentage.as_ref().and_then(|m| {
            match m.value.as_u64().filter(|n| *n <= 100) {
                Some(n) => Some(n as u8),
                None => {
                    self.invalid(
                        m,
                        "min_healthy_percentage",
                        &m.value,
                        "write a whole number from 0 to 100",
                    );
                    None
                }
            }
        });
        for alarm in &r.alarms {
            if alarm.value.is_empty() || alarm.value.len() > 255 {
                self.invalid(
                    alarm,
                    "alarm name",
                    &alarm.value,
                    "write a CloudWatch alarm's name (1 to 255 characters)",
                );
            }
        }
        let checkpoint_delay = self.duration(r.checkpoint_delay.as_ref(), DEFAULT_CHECKPOINT_DELAY);
        let timeout = self.duration(r.timeout.as_ref(), DEFAULT_ROLLOUT_TIMEOUT);
        let instance_warmup = r
            .instance_warmup
            .as_ref()
            .map(|w| self.duration(Some(w), Duration::ZERO));
        let bake_time = r
            .bake_time
            .as_ref()
            .map(|b| self.duration(Some(b), Duration::ZERO));
        let auto_scaling_groups = match &r.auto_scaling_groups {
            Some(groups) => groups
                .iter()
                .map(|g| {
                    let name = &g.value.name;
                    if name.value.is_empty() || name.value.len() > 255 {
                        self.invalid(
                            name,
                            "Auto Scaling group name",
                            &name.value,
                            "write the group's name (1 to 255 characters)",
                        );
                    }
                    RolloutGroup {
                        name: name.value.clone(),
                        regions: g.value.regions.as_ref().map(|r| self.regions(r)),
                    }
                })
                .collect(),
            None => publish
                .launch_templates
                .iter()
                .filter_map(|t| t.instance_refresh.as_ref())
                .map(|refresh| RolloutGroup {
                    name: refresh.auto_scaling_group.clone(),
                    regions: None,
                })
                .collect(),
        };
        let ecs_services = match &r.ecs_services {
            Some(services) => {
                let mut out = Vec::new();
                for s in services {
                    let v = &s.value;
                    let families = publish
                        .ecs_task_definitions
                        .iter()
                        .map(|t| t.family.as_str());
                    let target = match &v.family {
                        Some(f) => publish
                            .ecs_task_definitions
                            .iter()
                            .find(|t| t.family == f.value),
                        None if publish.ecs_task_definitions.len() == 1 => {
                            publish.ecs_task_definitions.first()
                        }
                        None => None,
                    };
                    let Some(target) = target else {
                        let hint = v
                            .family
                            .as_ref()
                            .and_then(|f| did_you_mean(&f.value, families))
                            .map(|f| format!("did you mean `{f}`?"))
                            .unwrap_or_else(|| {
                                "name the family of one of publish.ecs_task_definitions".into()
                            });
                        self.error(
                            s,
                            RecipeErrorKind::Conflict(
                                "a rollout service needs `family`: the task definition target it runs".into(),
                            ),
                        )
                        .hint = Some(hint);
                        continue;
                    };
                    out.push(RolloutService {
                        cluster: v.cluster.value.clone(),
                        name: v.name.value.clone(),
                        family: target.family.clone(),
                        region: target.region.clone(),
                    });
                }
                out
            }
            None => publish
                .ecs_task_definitions
                .iter()
                .filter_map(|t| {
                    t.service.as_ref().map(|s| RolloutService {
                        cluster: s.cluster.clone(),
                        name: s.name.clone(),
                        family: t.family.clone(),
                        region: t.region.clone(),
                    })
                })
                .collect(),
        };
        Some(Rollout {
            strategy,
            checkpoints,
            checkpoint_delay,
            min_healthy_percentage: min_healthy,
            instance_warmup,
            bake_time,
            alarms: r.alarms.iter().map(|a| a.value.clone()).collect(),
            skip_matching: r.skip_matching,
            timeout,
            auto_scaling_groups,
            ecs_services,
        })
    }

    fn needs<T>(&mut self, at: &S<T>, what: &str, output: &str) {
        self.error(
            at,
            RecipeErrorKind::Conflict(format!("a {what} needs `{output}`")),
        )
        .hint = Some(format!(
            "add `{output}` to the recipe, or remove this target"
        ));
    }

    fn subset_regions(&mut self, regions: &[S<String>], ami_regions: &[String]) -> Vec<String> {
        let valid = self.regions(regions);
        for r in regions {
            if is_region(&r.value) && !ami_regions.contains(&r.value) {
                self.error(
                    r,
                    RecipeErrorKind::Conflict(format!(
                        "region `{}` is not one the AMI is distributed to",
                        r.value
                    )),
                )
                .hint = Some("add it to `outputs.ami.regions`".into());
            }
        }
        valid
    }
}

/// Renders every template of the recipe in the context it will be rendered in, so an unknown
/// variable is reported by `bake validate` rather than in the middle of a build.
fn check_templates(recipe: &Recipe, errors: &mut Vec<RecipeError>) {
    let renderer = Renderer::default();
    let global = Context::new(recipe, None, None, Secrets::Redact);
    let mut global_templates: Vec<&Template> = Vec::new();
    for p in &recipe.provisioners {
        match &p.step {
            Step::File(f) => {
                global_templates.push(&f.destination);
                global_templates.extend(f.templates.iter().map(|(_, t)| t));
            }
            Step::Shell(s) => {
                match &s.script {
                    Script::Inline(t) => global_templates.push(t),
                    Script::File {
                        template: Some(t), ..
                    } => global_templates.push(t),
                    Script::File { template: None, .. } => {}
                }
                global_templates.extend(s.env.values());
            }
            Step::Hardening(_) => {}
        }
    }
    for t in &recipe.tests {
        if let Test::Command {
            run,
            stdout_contains,
            ..
        } = t
        {
            global_templates.push(run);
            global_templates.extend(stdout_contains);
        }
    }
    if let Some(oci) = &recipe.outputs.oci {
        // Image metadata is stored in the image and readable by anyone who can pull it.
        let sensitive: Vec<&String> = recipe
            .variables
            .iter()
            .filter(|(_, v)| v.sensitive)
            .map(|(n, _)| n)
            .collect();
        let metadata = oci
            .entrypoint
            .iter()
            .flatten()
            .chain(oci.cmd.iter().flatten())
            .chain(oci.env.values())
            .chain(oci.labels.values())
            .chain(oci.annotations.values());
        for template in metadata {
            if let Some(name) = sensitive
                .iter()
                .find(|n| template.text.contains(&format!("var.{n}")))
            {
                let span = match &template.origin {
                    TemplateOrigin::Yaml { span } => Some(span.clone()),
                    TemplateOrigin::File(_) => None,
                };
                errors.push(RecipeError {
                    kind: Box::new(RecipeErrorKind::Conflict(format!(
                        "sensitive variable `{name}` would be stored in the image's metadata"
                    ))),
                    span,
                    hint: Some("pass secrets at run time (ECS secrets, environment of the task), not in the image".into()),
                });
            }
        }
        global_templates.extend(oci.entrypoint.iter().flatten());
        global_templates.extend(oci.cmd.iter().flatten());
        global_templates.extend(oci.env.values());
        global_templates.extend(oci.labels.values());
        global_templates.extend(oci.annotations.values());
    }
    for r in &recipe.publish.registries {
        global_templates.extend(&r.tags);
    }
    for e in &recipe.publish.ecr {
        global_templates.extend(&e.tags);
    }
    renderer.check_all(global_templates, &global, errors);

    if let Some(ami) = &recipe.outputs.ami {
        let region = ami
            .regions
            .first()
            .map(String::as_str)
            .unwrap_or("us-east-1");
        let regional = Context::new(recipe, None, Some(region), Secrets::Redact);
        let mut regional_templates: Vec<&Template> = vec![&ami.name];
        regional_templates.extend(&ami.description);
        regional_templates.extend(ami.tags.values());
        if let Some(instance) = &ami.instance {
            regional_templates.extend(&instance.user_data);
        }
        for s in &recipe.publish.ssm_parameters {
            regional_templates.push(&s.name);
            regional_templates.extend(&s.description);
        }
        renderer.check_all(regional_templates, &regional, errors);
    }
}

fn default_instance_type(arch: Architecture) -> &'static str {
    match arch {
        Architecture::X86_64 => "t3.small",
        Architecture::Arm64 => "t4g.small",
    }
}

fn is_simple_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_package_spec(s: &str) -> bool {
    let name = s.split(['=', ':']).next().unwrap_or("");
    name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.')
        })
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `ap-southeast-4`, …
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts.len() <= 4
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok()
}

fn is_kms_key(s: &str) -> bool {
    s.starts_with("alias/")
        || s.starts_with("arn:aws")
        || (s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        || s.starts_with("mrk-")
}

fn is_cidr(s: &str) -> bool {
    match s.split_once('/') {
        Some((ip, len)) => {
            ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
        }
        None => false,
    }
}

fn is_ecr_repository(s: &str) -> bool {
    (2..=256).contains(&s.len())
        && s.split('/').all(|part| {
            !part.is_empty()
                && part.as_bytes()[0].is_ascii_alphanumeric()
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
}

fn parse_owner(s: &str) -> Option<(u32, u32)> {
    let (uid, gid) = s.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

fn normalize_port(value: &Value) -> Option<String> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return None,
    };
    let (port, proto) = text.split_once('/').unwrap_or((&text, "tcp"));
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    matches!(proto, "tcp" | "udp" | "sctp").then(|| format!("{port}/{proto}"))
}

/// The directory to show for `recipe_path` in messages.
pub(super) fn display_dir(recipe_path: &Path) -> PathBuf {
    recipe_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions() {
        for ok in ["us-east-1", "eu-west-3", "us-gov-west-1", "ap-southeast-4"] {
            assert!(is_region(ok), "{ok}");
        }
        for bad in ["us-east", "useast1", "US-EAST-1", "us-east-x", ""] {
            assert!(!is_region(bad), "{bad}");
        }
    }

    #[test]
    fn ports_normalize() {
        assert_eq!(
            normalize_port(&Value::from(8080)).as_deref(),
            Some("8080/tcp")
        );
        assert_eq!(
            normalize_port(&Value::from("53/udp")).as_deref(),
            Some("53/udp")
        );
        assert_eq!(normalize_port(&Value::from("0")), None);
        assert_eq!(normalize_port(&Value::from("80/icmp")), None);
    }
}
