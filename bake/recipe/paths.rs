//! Resolving the paths a recipe names (scripts, source files, bases) so that they can never
//! reach outside the recipe's directory, whether through `..`, an absolute path or a symlink.

use std::path::{Component, Path, PathBuf};

use super::error::RecipeErrorKind;

/// Resolves `relative` (as written in the recipe) against `root`, the canonical directory of the
/// recipe, following symlinks, and checks that the result is still inside `root`.
pub fn resolve_within(
    root: &Path,
    relative: &str,
    what: &'static str,
) -> Result<PathBuf, RecipeErrorKind> {
    let written = Path::new(relative);
    if relative.is_empty() {
        return Err(RecipeErrorKind::Invalid {
            what,
            value: relative.to_owned(),
            reason: "the path is empty".into(),
        });
    }
    if written.is_absolute() {
        return Err(RecipeErrorKind::EscapesRoot {
            what,
            path: relative.to_owned(),
        });
    }
    // Reject a lexical escape even when the target happens not to exist, so the message says
    // what is really wrong.
    let mut depth: i64 = 0;
    for component in written.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(RecipeErrorKind::EscapesRoot {
                what,
                path: relative.to_owned(),
            });
        }
    }
    let joined = root.join(written);
    let canonical = match fs_err::canonicalize(&joined) {
        Ok(path) => path,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RecipeErrorKind::MissingFile {
                what,
                path: relative.to_owned(),
            });
        }
        Err(source) => {
            return Err(RecipeErrorKind::Io {
                what,
                path: relative.to_owned(),
                source,
            });
        }
    };
    if !canonical.starts_with(root) {
        return Err(RecipeErrorKind::EscapesRoot {
            what,
            path: relative.to_owned(),
        });
    }
    Ok(canonical)
}

/// Resolves the path of a base recipe (as written) against `root`. Unlike [`resolve_within`] it
/// may lead out of the recipe's directory (`../base.yaml`): a base recipe is not read into the
/// build, it is planned and built from its own directory and enters this recipe's version only
/// as its version, so recipes of a fleet can share one base from a directory above them.
pub fn resolve_recipe_reference(
    root: &Path,
    relative: &str,
    what: &'static str,
) -> Result<PathBuf, RecipeErrorKind> {
    if relative.is_empty() || Path::new(relative).is_absolute() {
        return Err(RecipeErrorKind::Invalid {
            what,
            value: relative.to_owned(),
            reason: "write the path relative to this recipe's directory".into(),
        });
    }
    match fs_err::canonicalize(root.join(relative)) {
        Ok(path) if path.is_file() => Ok(path),
        Ok(_) => Err(RecipeErrorKind::Invalid {
            what,
            value: relative.to_owned(),
            reason: "it is not a file".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RecipeErrorKind::MissingFile {
            what,
            path: relative.to_owned(),
        }),
        Err(source) => Err(RecipeErrorKind::Io {
            what,
            path: relative.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confines_paths_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs_err::canonicalize(dir.path()).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs_err::write(root.join("ok.sh"), "true").unwrap();
        fs_err::write(outside.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("link")).unwrap();
        fs_err::create_dir(root.join("sub")).unwrap();

        assert_eq!(
            resolve_within(&root, "ok.sh", "script").unwrap(),
            root.join("ok.sh")
        );
        assert_eq!(
            resolve_within(&root, "sub/../ok.sh", "script").unwrap(),
            root.join("ok.sh")
        );
        for escaping in ["../x", "/etc/passwd", "link", "sub/../../x"] {
            assert!(
                matches!(
                    resolve_within(&root, escaping, "script"),
                    Err(RecipeErrorKind::EscapesRoot { .. })
                ),
                "{escaping} should escape"
            );
        }
        assert!(matches!(
            resolve_within(&root, "missing.sh", "script"),
            Err(RecipeErrorKind::MissingFile { .. })
        ));
    }
}
