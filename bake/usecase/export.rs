//! Exporting a built image out of the store: an OCI image layout directory (optionally with its
//! signed attestations as referrers) or a docker-archive tarball.

use std::path::PathBuf;

use super::Context;
use super::record::{FindRecordError, find_record};
use crate::artifact::export::{self, ExportError};
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::id::Version;
use crate::recipe::VarSources;

/// Where to write the image, and as what.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Write an OCI image layout into this directory.
    pub oci_layout: Option<PathBuf>,
    /// Write a docker-archive tarball.
    pub docker_archive: Option<PathBuf>,
    /// Also copy the image's signed attestations into the OCI layout, as referrers.
    pub attestations: bool,
    /// The tag to give the image (default: `bake/NAME:SHORT-VERSION`).
    pub tag: Option<String>,
}

/// What was written: `written` maps `oci_layout`, `attestations` (how many) and
/// `docker_archive` to what they are. (Fields in the order `--output json` has always printed
/// them.)
#[derive(Debug, serde::Serialize)]
pub struct Exported {
    pub image_digest: String,
    pub tag: String,
    pub version: Version,
    pub written: serde_json::Map<String, serde_json::Value>,
}

/// Why nothing (or not everything) was exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportUseError {
    #[error(transparent)]
    Context(#[from] super::ContextError),
    #[error(transparent)]
    Find(#[from] FindRecordError),
    #[error("version {version} of `{name}` has no OCI image: it was built as an AMI")]
    NoImage { version: String, name: String },
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Attestations(crate::provenance::layout::LayoutError),
}

impl Diagnose for ExportUseError {
    fn hint(&self) -> Option<String> {
        match self {
            ExportUseError::NoImage { .. } => {
                Some("export writes images; give the recipe `outputs.oci` to build one".into())
            }
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            ExportUseError::Find(_) | ExportUseError::NoImage { .. } => ExitStatus::RecipeOrUsage,
            _ => ExitStatus::Infrastructure,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            ExportUseError::Find(e) => e.reports(),
            _ => vec![Report::from_error(self).with_hint(Diagnose::hint(self))],
        }
    }
}

/// Writes the image of the version `what` names (a version, a prefix or a recipe file).
pub fn export(
    ctx: &Context,
    what: &str,
    vars: &VarSources,
    options: &ExportOptions,
) -> Result<Exported, ExportUseError> {
    let store = ctx.store()?;
    let record = find_record(ctx, store, what, vars)?;
    let short = record.version.short().to_owned();
    let tag = options
        .tag
        .clone()
        .unwrap_or_else(|| format!("bake/{}:{short}", record.name));
    let Some(image) = record.image() else {
        return Err(ExportUseError::NoImage {
            version: record.version.to_string(),
            name: record.name.clone(),
        });
    };
    let digest_text = image.image_digest.to_string();
    let digest = &digest_text;
    let mut written = serde_json::Map::new();
    if let Some(dir) = &options.oci_layout {
        let ref_name = tag.rsplit(':').next().unwrap_or(&short).to_owned();
        export::to_oci_layout(store, digest, dir, &ref_name)?;
        if options.attestations {
            use crate::provenance::layout::Layout;
            let n = Layout::open(store.root())
                .and_then(|from| Layout::open(dir)?.copy_referrers_from(&from, digest))
                .map_err(ExportUseError::Attestations)?;
            written.insert("attestations".into(), n.into());
        }
        written.insert("oci_layout".into(), dir.display().to_string().into());
    }
    if let Some(file) = &options.docker_archive {
        export::to_docker_archive(store, digest, file, &tag)?;
        written.insert("docker_archive".into(), file.display().to_string().into());
    }
    Ok(Exported {
        image_digest: digest_text,
        tag,
        version: record.version.clone(),
        written,
    })
}
