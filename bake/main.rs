//! The `bake` binary: parse the command line, set up logging, run, exit with the status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = bake::cli::Cli::parse();
    let settings = match bake::settings::Settings::resolve(&cli.global) {
        Ok(settings) => settings,
        Err(error) => {
            // Before settings there is no colour choice: plain text.
            let report = bake::diagnostic::Report::from_error(&error).with_hint(error.hint());
            eprint!("{}", report.render(false));
            return bake::exit::ExitStatus::RecipeOrUsage.into();
        }
    };
    bake::cli::init_logging(&settings);
    bake::cli::run(cli.command, &settings).into()
}
