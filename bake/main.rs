//! The `bake` binary: parse the command line, set up logging, run, exit with the status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = bake::cli::Cli::parse();
    let settings = bake::settings::Settings::resolve(&cli.global);
    bake::cli::init_logging(&settings);
    bake::cli::run(cli.command, &settings).into()
}
