//! `bake attest VERSION|REF`: sign (again) the provenance of a built version. (Also, until
//! `bake build` and `bake ami` call [`crate::usecase::attest`] themselves, the wrappers they use
//! to sign at the end of a build.)

use super::common::{AttestArgs, Outcome};
use crate::exit::ExitStatus;
use crate::settings::OutputFormat;
use crate::usecase::{self, Context};

/// `bake attest VERSION|REF`: sign (again) the provenance of a built version: its image's
/// attestations, or, for a version whose record lists AMIs, the AMIs' provenance (each AMI tagged
/// with the envelope's digest, the envelope kept in the store and optionally in SSM).
#[derive(Debug, clap::Args)]
pub struct AttestCommandArgs {
    /// A recipe file (its current version), a version (or prefix), `name:short-version`, an
    /// image digest or an AMI id.
    #[arg(value_name = "RECIPE|VERSION|REF")]
    pub what: String,
    #[command(flatten)]
    pub vars: super::VarArgs,
    /// Also keep an AMI's provenance envelope in this SSM parameter (in each AMI's region).
    #[arg(long, value_name = "NAME")]
    pub ssm_parameter: Option<String>,
    #[command(flatten)]
    pub attest: AttestArgs,
}

pub fn run(args: &AttestCommandArgs, ctx: &Context) -> Outcome {
    let manifest = usecase::attest::attest_version(
        ctx,
        &args.what,
        &args.vars.sources(),
        &args.attest.signing_options(),
        args.ssm_parameter.as_deref(),
    )?;
    match ctx.settings.output {
        OutputFormat::Json => super::print_json(&manifest),
        OutputFormat::Human => {
            println!("version    {}", manifest.version);
            if let Some(a) = &manifest.attestations {
                println!("provenance {}", a.provenance.envelope_digest);
                println!("signed by  {} ({})", a.signer.key_id, a.signer.reference);
            }
            for ami in &manifest.outputs.amis {
                println!("ami        {} ({})", ami.image_id, ami.region);
            }
        }
    }
    Ok(ExitStatus::Success)
}
