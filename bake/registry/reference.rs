//! Image references: `[registry/]repository[:tag][@digest]`, parsed strictly so that a typo
//! is an error that says what is wrong, not a request to the wrong place.
//!
//! Grammar (distribution spec and docker's reference package): the first `/`-separated part is
//! a registry host when it contains a `.` or a `:`, or is `localhost`; otherwise the registry is
//! Docker Hub (`docker.io`, with `library/` for one-part names). Repository parts are
//! `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`; a tag is `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`; a digest
//! is `sha256:` and 64 lowercase hex digits (the only algorithm bake stores).

use std::fmt;
use std::str::FromStr;

/// Docker Hub's registry host, used when a reference names none.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's API actually lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The longest repository name the distribution spec lets registries reject beyond.
const MAX_REPOSITORY_LEN: usize = 255;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Why a reference is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference `{reference}`: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

fn bad(reference: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        reference: reference.to_owned(),
        reason: reason.into(),
    }
}

impl Reference {
    /// A reference from its parts (each checked).
    pub fn new(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Self, ReferenceError> {
        let shown = format!(
            "{registry}/{repository}{}{}",
            tag.map(|t| format!(":{t}")).unwrap_or_default(),
            digest.map(|d| format!("@{d}")).unwrap_or_default()
        );
        check_registry(&shown, registry)?;
        check_repository(&shown, repository)?;
        if let Some(tag) = tag {
            check_tag(&shown, tag)?;
        }
        if let Some(digest) = digest {
            check_digest(&shown, digest)?;
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }

    /// Parses `registry/repository` with neither tag nor digest (a push target).
    pub fn repository_only(text: &str) -> Result<Self, ReferenceError> {
        let parsed: Reference = text.parse()?;
        if parsed.tag.is_some() || parsed.digest.is_some() {
            return Err(bad(
                text,
                "a repository is expected here, without a tag or digest",
            ));
        }
        Ok(parsed)
    }

    /// The registry host (and port), as written: `docker.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host bake talks to (Docker Hub's API host differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask the registry for: the digest if pinned, else the tag, else `latest`.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository at `digest` (keeping the tag for display).
    pub fn with_digest(&self, digest: &str) -> Result<Self, ReferenceError> {
        check_digest(&format!("{self}@{digest}"), digest)?;
        Ok(Reference {
            digest: Some(digest.to_owned()),
            ..self.clone()
        })
    }

    /// The same repository with `tag` and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        check_tag(&format!("{}/{}:{tag}", self.registry, self.repository), tag)?;
        Ok(Reference {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether the registry is on this machine (plain HTTP is allowed there).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

/// Whether `host[:port]` names this machine.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(bad(text, "it is empty"));
        }
        if text.chars().any(char::is_whitespace) {
            return Err(bad(text, "it contains whitespace"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                if digest.is_empty() {
                    return Err(bad(text, "the digest after `@` is empty"));
                }
                check_digest(text, digest)?;
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        // The registry is the first part when it looks like a host.
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path)
            }
            _ => (DOCKER_HUB.to_owned(), rest),
        };
        check_registry(text, &registry)?;
        // A tag follows the last `:` after the last `/`.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let tag = &path[at + 1..];
                if tag.is_empty() {
                    return Err(bad(text, "the tag after `:` is empty"));
                }
                check_tag(text, tag)?;
                (&path[..at], Some(tag.to_owned()))
            }
            None => (path, None),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        };
        check_repository(text, &repository)?;
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

fn check_registry(text: &str, registry: &str) -> Result<(), ReferenceError> {
    let (host, port) = match registry.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => {
                return Err(bad(
                    text,
                    format!("registry `{registry}` has an unclosed `[`"),
                ));
            }
        },
        None => match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        },
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':');
    if !host_ok {
        return Err(bad(
            text,
            format!("registry host `{host}` is not a host name"),
        ));
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(bad(text, format!("registry port `{port}` is not a port")));
    }
    Ok(())
}

fn check_repository(text: &str, repository: &str) -> Result<(), ReferenceError> {
    if repository.is_empty() {
        return Err(bad(text, "the repository name is empty"));
    }
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(bad(
            text,
            format!("the repository name is longer than {MAX_REPOSITORY_LEN} characters"),
        ));
    }
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad(
            text,
            format!(
                "repository `{repository}` has uppercase letters; repository names are lowercase"
            ),
        ));
    }
    for part in repository.split('/') {
        if !component_ok(part) {
            return Err(bad(
                text,
                format!(
                    "`{part}` is not a valid repository path part (lowercase letters and digits, \
                     separated by `.`, `_`, `__` or dashes)"
                ),
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn component_ok(part: &str) -> bool {
    let bytes = part.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

fn check_tag(text: &str, tag: &str) -> Result<(), ReferenceError> {
    let bytes = tag.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if !first_ok || !rest_ok || bytes.len() > 128 {
        return Err(bad(
            text,
            format!(
                "`{tag}` is not a valid tag (letters, digits, `_`, `.`, `-`, not starting with \
                 `.` or `-`, at most 128 characters)"
            ),
        ));
    }
    Ok(())
}

/// Checks a `sha256:<64 lowercase hex>` digest, naming what is wrong.
pub fn check_digest(text: &str, digest: &str) -> Result<(), ReferenceError> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(bad(
            text,
            format!("digest `{digest}` has no algorithm (expected `sha256:<64 hex digits>`)"),
        ));
    };
    if algorithm != "sha256" {
        return Err(bad(
            text,
            format!("digest algorithm `{algorithm}` is not supported (only sha256)"),
        ));
    }
    if hex.len() != 64 {
        return Err(bad(
            text,
            format!(
                "a sha256 digest has 64 hex digits, this one has {}",
                hex.len()
            ),
        ));
    }
    if !hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(
            text,
            "the digest has characters other than lowercase hex digits",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_the_usual_forms() {
        let r: Reference = "127.0.0.1:5000/team/app:1.0".parse().unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.tag(), Some("1.0"));
        assert_eq!(r.reference(), "1.0");
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:1.0");

        let r: Reference = format!("localhost/app@sha256:{HEX}").parse().unwrap();
        assert_eq!(r.registry(), "localhost");
        assert_eq!(r.digest(), Some(format!("sha256:{HEX}").as_str()));
        assert_eq!(r.reference(), format!("sha256:{HEX}"));

        let r: Reference = "debian".parse().unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/debian");
        assert_eq!(r.reference(), "latest");
        assert!(!r.is_loopback());

        let r: Reference = "123456789012.dkr.ecr.us-east-1.amazonaws.com/bake/app:v1"
            .parse()
            .unwrap();
        assert_eq!(r.repository(), "bake/app");
        let r: Reference = format!("reg.example:443/a/b:t@sha256:{HEX}")
            .parse()
            .unwrap();
        assert_eq!(r.tag(), Some("t"));
        assert!(r.digest().is_some());
        assert_eq!(r.to_string(), format!("reg.example:443/a/b:t@sha256:{HEX}"));
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let cases = [
            ("bad::ref", "path part"),
            ("", "empty"),
            ("reg.example/app@", "digest after `@` is empty"),
            ("reg.example/App", "uppercase"),
            (
                &format!("reg.example/app@md5:{}", &HEX[..32]),
                "algorithm `md5`",
            ),
            (&format!("reg.example/app@sha256:{}", &HEX[..40]), "has 40"),
            (
                &format!("reg.example/app@sha256:{}", HEX.to_uppercase()),
                "lowercase hex",
            ),
            ("reg.example/app:", "tag after `:` is empty"),
            ("reg.example/a//b", "path part"),
            ("reg.example/-a", "path part"),
            ("reg.example:99999/a", "port"),
            ("reg.example/a:-x", "not a valid tag"),
            ("reg example/a", "whitespace"),
        ];
        for (text, expected) in cases {
            let err = text.parse::<Reference>().unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(expected),
                "`{text}`: `{message}` does not mention `{expected}`"
            );
            assert!(message.contains(&format!("`{text}`")));
        }
    }

    #[test]
    fn repository_components() {
        for ok in ["a", "a.b", "a_b", "a__b", "a---b", "0x"] {
            assert!(component_ok(ok), "{ok}");
        }
        for bad in ["", "_a", "a_", "a___b", "a..b", "a.", "A"] {
            assert!(!component_ok(bad), "{bad}");
        }
        assert!(Reference::repository_only("127.0.0.1:5000/app").is_ok());
        assert!(Reference::repository_only("127.0.0.1:5000/app:1").is_err());
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost:1"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("registry.example:5000"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
    }
}
