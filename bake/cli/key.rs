//! `bake key generate`: make a signing key for provenance (ed25519 or ECDSA P-256), kept in the
//! store (`keys/NAME.key`, mode 0600, with `keys/NAME.pub`) or at a path.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::common::{Failure, Outcome};
use super::print_json;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::provenance::keys::{self, KeyAlgorithm, LocalKey, Signer as _};
use crate::settings::OutputFormat;
use crate::usecase::Context;

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a signing key (the store's `default` key unless --name or --out).
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The signature algorithm.
    #[arg(long, value_enum, default_value_t = KeyAlgorithm::EcdsaP256)]
    pub algorithm: KeyAlgorithm,
    /// The key's name in the store (`keys/NAME.key`).
    #[arg(long, default_value = keys::DEFAULT_KEY_NAME, conflicts_with = "out")]
    pub name: String,
    /// Write the private key here instead (the public key goes beside it, `.pub`).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace an existing key (signatures made with the old key no longer verify with it).
    #[arg(long)]
    pub force: bool,
}

#[derive(serde::Serialize)]
struct Generated {
    key_id: String,
    algorithm: &'static str,
    private_key: PathBuf,
    public_key: PathBuf,
}

pub fn run(args: &KeyArgs, ctx: &Context) -> Outcome {
    let KeyCommand::Generate(args) = &args.command;
    let path = args
        .out
        .clone()
        .unwrap_or_else(|| keys::store_key_path(&ctx.settings.store, &args.name));
    let result = LocalKey::generate(args.algorithm).and_then(|mut key| {
        let public = key.write(&path, args.force)?;
        Ok((key, public))
    });
    let (key, public) = result.map_err(|error| {
        let hint = matches!(error, keys::KeyError::Exists { .. }).then(|| {
            "keep the old key, or pass --force if nothing must verify with it any more".to_owned()
        });
        Failure::usage(Report::from_error(&error).with_hint(hint))
    })?;
    let generated = Generated {
        key_id: key.public_key().key_id(),
        algorithm: args.algorithm.name(),
        private_key: path,
        public_key: public,
    };
    match ctx.settings.output {
        OutputFormat::Json => print_json(&generated),
        OutputFormat::Human => {
            println!("key id       {}", generated.key_id);
            println!("algorithm    {}", generated.algorithm);
            println!("private key  {}", generated.private_key.display());
            println!("public key   {}", generated.public_key.display());
        }
    }
    Ok(ExitStatus::Success)
}
