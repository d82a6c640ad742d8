//! Hardening profiles shipped with bake (`provisioners/hardening/<profile>/`: `oci.sh` holds the
//! rules that apply to any image, `ami.sh` the ones only a machine has, run after `oci.sh`),
//! compiled into the binary so a recipe's `hardening:` step means the same thing on every
//! machine and its text is covered by bake's own version.

use std::collections::BTreeMap;

use crate::recipe::{Base, Flavour, Recipe, Step};

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

/// Packages a profile configures but cannot install (a hardening step has no network), each
/// with the rule id that configures it and the SCAP rule that looks for it.
const CONFIGURED_PACKAGES: &[(&str, &str, &str)] = &[(
    "libpam-pwquality",
    "pam-passwords",
    "package_pam_pwquality_installed",
)];

/// What `recipe` should add to its bootstrap for its hardening steps to do their whole job:
/// one line per missing package, saying which rule needs it. Empty for other bases (their
/// packages are not bake's to choose) and for rules the recipe excludes.
pub fn missing_bootstrap_packages(recipe: &Recipe) -> Vec<String> {
    let Base::Bootstrap(bootstrap) = &recipe.base else {
        return Vec::new();
    };
    let mut advice = Vec::new();
    for step in &recipe.provisioners {
        let Step::Hardening(hardening) = &step.step else {
            continue;
        };
        if rules(&hardening.profile).is_empty() {
            continue;
        }
        for (package, rule, scap_rule) in CONFIGURED_PACKAGES {
            let wanted = !hardening.exclude.contains_key(*rule)
                && !bootstrap.packages.iter().any(|p| p == package);
            let line = format!(
                "step `{}`: hardening profile `{}` configures `{package}` (rule `{rule}`, SCAP `{scap_rule}`), which the bootstrap does not install: add `{package}` to `base.bootstrap.packages` (a hardening step has no network)",
                step.name, hardening.profile
            );
            if wanted && !advice.contains(&line) {
                advice.push(line);
            }
        }
    }
    advice
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

    fn recipe(packages: &str, exclude: &str) -> Recipe {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        fs_err::write(
            &path,
            format!(
                "bake: 1\nname: r\nbase:\n  bootstrap:\n    suite: bookworm\n    packages: {packages}\nprovisioners:\n  - hardening:\n      profile: baseline\n      flavour: oci\n{exclude}outputs:\n  oci: {{}}\n"
            ),
        )
        .unwrap();
        crate::recipe::load(&path, &Default::default()).unwrap()
    }

    #[test]
    fn a_bootstrap_without_what_the_profile_configures_is_told_what_to_add() {
        let advice = missing_bootstrap_packages(&recipe("[nginx]", ""));
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(
            advice[0].contains("add `libpam-pwquality` to `base.bootstrap.packages`")
                && advice[0].contains("package_pam_pwquality_installed"),
            "{advice:?}"
        );
        assert!(missing_bootstrap_packages(&recipe("[nginx, libpam-pwquality]", "")).is_empty());
        let excluded = "      exclude:\n        - rule: pam-passwords\n          reason: no logins in this image\n";
        assert!(missing_bootstrap_packages(&recipe("[nginx]", excluded)).is_empty());
    }

    #[test]
    fn exclusions_reach_the_script() {
        let exclude = BTreeMap::from([("sshd".to_owned(), "no ssh in this image".to_owned())]);
        let script = script("baseline", Flavour::Ami, &exclude).unwrap();
        assert!(script.starts_with("BAKE_HARDENING_EXCLUDE='sshd'\n"));
    }
}
