//! Hardening profiles shipped with bake (`provisioners/hardening/<profile>/<flavour>.sh`),
//! compiled into the binary so a recipe's `hardening:` step means the same thing on every
//! machine and its text is covered by bake's own version.

use std::collections::BTreeMap;

use crate::recipe::Flavour;

const BASELINE_OCI: &str = include_str!("../../provisioners/hardening/baseline/oci.sh");
const BASELINE_AMI: &str = include_str!("../../provisioners/hardening/baseline/ami.sh");

/// The script of `profile` in `flavour`, with the recipe's exclusions (rule id → reason) set
/// for it; `None` for a profile bake does not ship.
pub fn script(
    profile: &str,
    flavour: Flavour,
    exclude: &BTreeMap<String, String>,
) -> Option<String> {
    let body = match (profile, flavour) {
        ("baseline", Flavour::Oci) => BASELINE_OCI,
        ("baseline", Flavour::Ami) => BASELINE_AMI,
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
