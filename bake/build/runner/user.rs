//! The user a step runs as: `name`, `uid`, `name:group` or `uid:gid`, resolved against the
//! image's own `/etc/passwd` and `/etc/group`, read from the host side through
//! [`read_image_file`] (never the host's account database, and never through a symlink out of
//! the root).
//!
//! The rules are Docker's, so that a recipe means what a Dockerfile `USER` would: a name must
//! exist; a number need not (then the group is 0 and `HOME` is `/`); supplementary groups are
//! the image's groups that list the user by name.

use std::path::{Path, PathBuf};

use super::root_path::read_image_file;

/// Account files bigger than this are not account files: 4 MiB is tens of thousands of users,
/// and bake holds the whole file in memory.
const MAX_ACCOUNT_FILE_BYTES: u64 = 4 << 20;

/// `HOME` for a user the image does not list: root's by convention, else Docker's `/`.
const ROOT_HOME: &str = "/root";
const UNLISTED_HOME: &str = "/";

/// Ids and home of the user a step runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary group first.
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no user `{name}` in the image's /etc/passwd")]
    UnknownUser { name: String },
    #[error("no group `{name}` in the image's /etc/group")]
    UnknownGroup { name: String },
    #[error("`{spec}` is not `user`, `uid`, `user:group` or `uid:gid`")]
    Malformed { spec: String },
    #[error("failed to read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves a step's `user` (root when `None`) against the image at `root`.
pub fn resolve_user(root: &Path, spec: Option<&str>) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match spec {
        None => ("0", None),
        Some(spec) => match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        },
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(UserError::Malformed {
            spec: spec.unwrap_or_default().to_owned(),
        });
    }
    let passwd = parse_passwd(&read(root, "/etc/passwd")?);
    let groups = parse_group(&read(root, "/etc/group")?);

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid).cloned(),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == user_part)
                .cloned()
                .ok_or_else(|| UserError::UnknownUser {
                    name: user_part.to_owned(),
                })?,
        ),
    };
    let uid = entry
        .as_ref()
        .map_or_else(|| user_part.parse().unwrap_or(0), |e| e.uid);
    let gid = match group_part {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|g| g.name == group)
                    .ok_or_else(|| UserError::UnknownGroup {
                        name: group.to_owned(),
                    })?
                    .gid
            }
        },
        None => entry.as_ref().map_or(0, |e| e.gid),
    };
    let mut supplementary = vec![gid];
    if let Some(entry) = &entry {
        for group in &groups {
            if group.members.contains(&entry.name) && !supplementary.contains(&group.gid) {
                supplementary.push(group.gid);
            }
        }
    }
    let home = match &entry {
        Some(entry) if !entry.home.is_empty() => entry.home.clone(),
        _ if uid == 0 => ROOT_HOME.to_owned(),
        _ => UNLISTED_HOME.to_owned(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

/// The file's text, or empty when the image has none.
fn read(root: &Path, path: &str) -> Result<String, UserError> {
    match read_image_file(root, Path::new(path), MAX_ACCOUNT_FILE_BYTES) {
        Ok(found) => Ok(found.map(|(_, text)| text).unwrap_or_default()),
        Err(source) => Err(UserError::Read {
            path: root.join(path.trim_start_matches('/')),
            source,
        }),
    }
}

/// The well-formed lines of a passwd file; others (comments, NIS `+` lines) are skipped, as
/// glibc does.
fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 {
                return None;
            }
            Some(Passwd {
                name: fields[0].to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_owned(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<Group> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            Some(Group {
                name: fields[0].to_owned(),
                gid: fields[2].parse().ok()?,
                members: fields[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App,,,:/home/app:/bin/sh
broken:x:notanumber:1::/:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
adm:x:4:app
app:x:1000:
docker:x:999:someone,app
";

    fn image(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs_err::create_dir_all(dir.path().join("etc")).unwrap();
        if let Some(text) = passwd {
            fs_err::write(dir.path().join("etc/passwd"), text).unwrap();
        }
        if let Some(text) = group {
            fs_err::write(dir.path().join("etc/group"), text).unwrap();
        }
        dir
    }

    #[test]
    fn default_is_root() {
        let dir = image(Some(PASSWD), Some(GROUP));
        let user = resolve_user(dir.path(), None).unwrap();
        assert_eq!(
            user,
            ResolvedUser {
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: "/root".into()
            }
        );
    }

    #[test]
    fn a_name_gets_its_ids_home_and_groups() {
        let dir = image(Some(PASSWD), Some(GROUP));
        let user = resolve_user(dir.path(), Some("app")).unwrap();
        assert_eq!(
            user,
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 4, 999],
                home: "/home/app".into()
            }
        );
        assert_eq!(resolve_user(dir.path(), Some("1000")).unwrap(), user);
    }

    #[test]
    fn an_explicit_group_wins() {
        let dir = image(Some(PASSWD), Some(GROUP));
        let user = resolve_user(dir.path(), Some("app:docker")).unwrap();
        assert_eq!((user.uid, user.gid), (1000, 999));
        assert_eq!(user.groups, [999, 4]);
        let numeric = resolve_user(dir.path(), Some("1000:50")).unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1000, 50));
    }

    #[test]
    fn an_unlisted_uid_gets_group_zero_and_slash_home() {
        let dir = image(None, None);
        let user = resolve_user(dir.path(), Some("4242")).unwrap();
        assert_eq!(
            user,
            ResolvedUser {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: "/".into()
            }
        );
        assert_eq!(resolve_user(dir.path(), None).unwrap().home, "/root");
    }

    #[test]
    fn unknown_names_and_bad_specs_fail() {
        let dir = image(Some(PASSWD), Some(GROUP));
        assert!(matches!(
            resolve_user(dir.path(), Some("nobody")),
            Err(UserError::UnknownUser { name }) if name == "nobody"
        ));
        assert!(matches!(
            resolve_user(dir.path(), Some("app:wheel")),
            Err(UserError::UnknownGroup { name }) if name == "wheel"
        ));
        assert!(matches!(
            resolve_user(dir.path(), Some(":1")),
            Err(UserError::Malformed { .. })
        ));
        assert!(matches!(
            resolve_user(dir.path(), Some("app:")),
            Err(UserError::Malformed { .. })
        ));
    }

    #[test]
    fn a_passwd_symlinked_out_of_the_root_is_read_inside_it() {
        let dir = image(None, Some(GROUP));
        let outside = tempfile::tempdir().unwrap();
        fs_err::write(outside.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        // Absolute target: the image would read `<root><outside>/passwd`, which is not there.
        std::os::unix::fs::symlink(outside.path().join("passwd"), dir.path().join("etc/passwd"))
            .unwrap();
        assert!(matches!(
            resolve_user(dir.path(), Some("evil")),
            Err(UserError::UnknownUser { .. })
        ));
    }
}
