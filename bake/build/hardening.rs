//! Hardening profiles shipped with bake (`provisioners/hardening/<profile>/`: `oci.sh` holds the
//! rules that apply to any image, `ami.sh` the ones only a machine has, run after `oci.sh`),
//! compiled into the binary so a recipe's `hardening:` step means the same thing on every
//! machine and its text is covered by bake's own version.

use std::collections::BTreeMap;

use crate::recipe::Flavour;

const BASELINE_OCI: &str = include_str!("../../provisioners/hardening/baseline/oci.sh");
const BASELINE_AMI: &str = include_str!("../../provisioners/hardening/baseline/ami.sh");

/// The rule ids of `profile` (in any flavour): each rule of a profile script is guarded by
/// `if ! excluded RULE`.
pub fn rules(profile: &str) -> Vec<&'static str> {
    let scripts: &[&'static str] = match profile {
        "baseline" => &[BASELINE_OCI, BASELINE_AMI],
        _ => &[],
    };
    let mut ids: Vec<&'static str> = scripts
        .iter()
        .flat_map(|script| script.lines())
        .filter_map(|line| line.split("! excluded ").nth(1))
        .filter_map(|rest| rest.split([';', ' ', '&']).next())
        .filter(|id| !id.is_empty())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The script of `profile` in `flavour`, with the recipe's exclusions (rule id → reason) set
/// for it; `None` for a profile bake does not ship.
pub fn script(
    profile: &str,
    flavour: Flavour,
    exclude: &BTreeMap<String, String>,
) -> Option<String> {
    let body = match (profile, flavour) {
        ("baseline", Flavour::Oci) => BASELINE_OCI.to_owned(),
        // The machine flavour is every container rule plus the machine-only ones.
        ("baseline", Flavour::Ami) => format!("{BASELINE_OCI}\n{BASELINE_AMI}"),
        _ => return None,
    };
    let ids: Vec<&str> = exclude.keys().map(String::as_str).collect();
    // Rule ids are validated as plain words by the recipe, so they need no quoting beyond this.
    let ids: Vec<String> = ids
        .iter()
        .filter(|id| {
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(|id| (*id).to_owned())
        .collect();
    Some(format!(
        "BAKE_HARDENING_EXCLUDE='{}'\nexport BAKE_HARDENING_EXCLUDE\n{body}",
        ids.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_read_from_the_profiles() {
        let rules = rules("baseline");
        for id in [
            "login-defs",
            "setuid-binaries",
            "sshd",
            "sysctl",
            "journald",
        ] {
            assert!(rules.contains(&id), "{id} missing from {rules:?}");
        }
        assert!(super::rules("nope").is_empty());
    }

    #[test]
    fn exclusions_reach_the_script() {
        let exclude = BTreeMap::from([("sshd".to_owned(), "no ssh in this image".to_owned())]);
        let script = script("baseline", Flavour::Ami, &exclude).unwrap();
        assert!(script.starts_with("BAKE_HARDENING_EXCLUDE='sshd'\n"));
    }
}
