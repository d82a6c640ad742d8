//! `bake __sandbox` (hidden): the helper process the namespace runner starts for each shell
//! step. It talks to bake over its stdin, not to a person; see [`crate::build::runner::sandbox`].

use clap::Args;

use crate::exit::ExitStatus;

#[derive(Debug, Args)]
pub struct SandboxArgs {}

pub fn run(_args: &SandboxArgs) -> ExitStatus {
    match crate::build::runner::sandbox::run() {
        Ok(()) => ExitStatus::Success,
        Err(error) => {
            // bake shows the helper's stderr as the step's, so this is where it gets read.
            let report = crate::diagnostic::Report::from_error(&error);
            eprint!("{}", report.render(false));
            ExitStatus::Infrastructure
        }
    }
}
