//! The exit status of a bake run: one enum, used by every command, so that CI can tell a recipe
//! mistake from a broken cloud from a half-done publish without reading the logs.

use std::process::ExitCode;

/// What a finished command tells its caller through the process exit status.
///
/// The numbers are part of bake's interface and documented in the README; never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything asked for was done.
    Success,
    /// `bake outdated`: some recipe's version today is not the one last built.
    Outdated,
    /// The recipe, a variable or the command line is wrong; retrying will not help.
    RecipeOrUsage,
    /// Something outside bake failed (filesystem, network, AWS, a registry, a runner).
    Infrastructure,
    /// Publishing reached some targets and not others; the report lists which.
    PartialPublish,
    /// The run was interrupted (Ctrl-C or SIGTERM) and cleaned up after itself.
    Interrupted,
    /// An artifact failed verification: a bad or untrusted signature, attestations about
    /// another artifact, or none at all.
    Unverified,
}

impl ExitStatus {
    /// The numeric process exit code.
    pub const fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Outdated => 1,
            ExitStatus::RecipeOrUsage => 2,
            ExitStatus::Infrastructure => 3,
            ExitStatus::PartialPublish => 4,
            ExitStatus::Interrupted => 130,
            ExitStatus::Unverified => 5,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        ExitCode::from(status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::ExitStatus;

    #[test]
    fn codes_are_the_documented_ones() {
        let codes: Vec<u8> = [
            ExitStatus::Success,
            ExitStatus::Outdated,
            ExitStatus::RecipeOrUsage,
            ExitStatus::Infrastructure,
            ExitStatus::PartialPublish,
            ExitStatus::Interrupted,
            ExitStatus::Unverified,
        ]
        .iter()
        .map(|s| s.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 130, 5]);
    }
}
