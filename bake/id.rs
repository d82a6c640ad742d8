//! Validated identifiers every stage hands on: [`Digest`] (the SHA-256 of some bytes, as OCI
//! writes it) and [`Version`] (the digest of a recipe's canonical inputs). Both are parsed once,
//! where text enters bake (a file, an argument, an AWS tag), and carried as values from then on,
//! so no stage slices `sha256:` prefixes or re-checks hex by hand.
//!
//! Both wrap oci-spec's [`Sha256Digest`] (64 lowercase hex digits); bake writes nothing but
//! SHA-256, so other algorithms are refused where they enter.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Sha256Digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many hex digits of a version name it in tags, image names and AMI names.
pub const SHORT_LEN: usize = 12;

/// The hex digits of text that may be `sha256:`-prefixed (a digest or version kept as text in a
/// document bake does not own, or a cache key); other text is returned as it is.
pub fn hex_part(text: &str) -> &str {
    text.strip_prefix("sha256:").unwrap_or(text)
}

/// The first [`SHORT_LEN`] hex digits of such text, for people (all of it when shorter).
pub fn short_text(text: &str) -> &str {
    let hex = hex_part(text);
    hex.get(..SHORT_LEN).unwrap_or(hex)
}

/// Text that is not `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a {what} (`sha256:` and 64 lowercase hex digits)")]
pub struct BadId {
    pub what: &'static str,
    pub text: String,
}

fn parse_sha256(text: &str, what: &'static str) -> Result<Sha256Digest, BadId> {
    let bad = || BadId {
        what,
        text: text.to_owned(),
    };
    let hex = text.strip_prefix("sha256:").ok_or_else(bad)?;
    // oci-spec checks the length and the alphabet; it also accepts uppercase, which no
    // digest bake writes or compares has.
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    Sha256Digest::from_str(hex).map_err(|_| bad())
}

/// `sha256:<hex>` of some bytes: a blob, a manifest, a disk image.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Digest(Sha256Digest);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::from_hex(&hex::encode(sha2::Sha256::digest(bytes))).expect("sha256 is 64 hex")
    }

    /// The digest a finished SHA-256 hasher computed.
    pub fn from_hasher(hasher: sha2::Sha256) -> Digest {
        use sha2::Digest as _;
        Digest::from_hex(&hex::encode(hasher.finalize())).expect("sha256 is 64 hex")
    }

    /// From 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Digest, BadId> {
        parse_sha256(&format!("sha256:{hex}"), "sha256 digest").map(Digest)
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        self.0.digest()
    }

    /// The first [`SHORT_LEN`] hex digits.
    pub fn short(&self) -> &str {
        &self.hex()[..SHORT_LEN]
    }

    /// As oci-spec's general digest type.
    pub fn to_oci(&self) -> oci_spec::image::Digest {
        self.0.clone().into()
    }
}

impl FromStr for Digest {
    type Err = BadId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_sha256(text, "sha256 digest").map(Digest)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl TryFrom<&oci_spec::image::Digest> for Digest {
    type Error = BadId;

    fn try_from(digest: &oci_spec::image::Digest) -> Result<Self, Self::Error> {
        digest.as_ref().parse()
    }
}

/// A recipe version: the digest of the canonical JSON of its plan inputs. What the store keys
/// builds by and what every artifact is traced back to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(String);

impl Version {
    /// The version whose canonical inputs digest to `digest`.
    pub fn from_digest(digest: Digest) -> Version {
        Version(digest.to_string())
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first [`SHORT_LEN`] hex digits, for names and tags.
    pub fn short(&self) -> &str {
        &self.hex()[..SHORT_LEN]
    }
}

impl FromStr for Version {
    type Err = BadId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_sha256(text, "version")?;
        Ok(Version(text.to_owned()))
    }
}

impl AsRef<str> for Version {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Version {
    type Target = str;

    /// A version is read as text in messages, tags and paths far more often than it is built;
    /// it derefs to its `sha256:<hex>` form, which is always valid.
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Version {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Version {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Version {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A version as people type it: `sha256:<hex>` or just hex digits, at least [`SHORT_LEN`] of
/// them (lowercase), naming every version that starts with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPrefix(String);

impl VersionPrefix {
    /// The hex digits given.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The first [`SHORT_LEN`] hex digits: what names a version in tags and parameters.
    pub fn short(&self) -> &str {
        &self.0[..SHORT_LEN]
    }

    /// Whether `version` starts with this prefix.
    pub fn matches(&self, version: &Version) -> bool {
        version.hex().starts_with(&self.0)
    }
}

impl FromStr for VersionPrefix {
    type Err = BadId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hex = hex_part(text);
        let valid = (SHORT_LEN..=64).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid {
            Ok(VersionPrefix(hex.to_owned()))
        } else {
            Err(BadId {
                what: "version prefix",
                text: text.to_owned(),
            })
        }
    }
}

impl fmt::Display for VersionPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_prefixes_take_twelve_to_sixty_four_lowercase_hex_digits() {
        let hex = "0123456789abcdef".repeat(4);
        let version: Version = format!("sha256:{hex}").parse().unwrap();
        for given in [&hex[..12], &hex[..40], hex.as_str()] {
            for text in [given.to_owned(), format!("sha256:{given}")] {
                let prefix: VersionPrefix = text.parse().unwrap();
                assert_eq!(prefix.hex(), given);
                assert_eq!(prefix.short(), &hex[..12]);
                assert!(prefix.matches(&version), "{text}");
            }
        }
        let other: VersionPrefix = "0123456789ab0".parse().unwrap();
        assert!(!other.matches(&version));
        for bad in [
            &hex[..11],
            "sha256:0123456789a",
            "0123456789AB",
            "0123456789ag",
            "sha512:0123456789ab",
        ] {
            assert!(bad.parse::<VersionPrefix>().is_err(), "{bad}");
        }
        assert!(format!("{hex}0").parse::<VersionPrefix>().is_err());
    }

    #[test]
    fn digests_and_versions_parse_only_lowercase_sha256() {
        let hex = "ab".repeat(32);
        let digest: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(digest.hex(), hex);
        assert_eq!(digest.short(), &hex[..12]);
        assert_eq!(digest.to_string(), format!("sha256:{hex}"));
        for bad in [
            hex.clone(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[..62]),
            format!("sha512:{hex}"),
            "sha256:".into(),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
        let version: Version = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(version.short(), &hex[..12]);
        assert_eq!(version, format!("sha256:{hex}"));
        let json = serde_json::to_string(&version).unwrap();
        assert_eq!(json, format!("\"sha256:{hex}\""));
        assert_eq!(serde_json::from_str::<Version>(&json).unwrap(), version);
        let error = serde_json::from_str::<Version>("\"v1\"").unwrap_err();
        assert!(error.to_string().contains("is not a version"), "{error}");
    }

    #[test]
    fn the_digest_of_bytes_is_their_sha256() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
