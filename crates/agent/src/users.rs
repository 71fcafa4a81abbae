//! Users and groups of the sandbox, read from its own `/etc/passwd` and `/etc/group`
//! (no NSS: the agent is statically linked and the files are the source of truth).
//! Read on every lookup: sandbox code may add users at any time.

use std::path::{Path, PathBuf};

/// A user of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: String,
    /// Supplementary groups (including the primary one).
    pub groups: Vec<u32>,
}

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user in `/etc/passwd`.
    #[error("user '{0}' does not exist in the sandbox")]
    Unknown(String),
    /// No such group in `/etc/group`.
    #[error("group '{0}' does not exist in the sandbox")]
    UnknownGroup(String),
    /// `/etc/passwd` could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The account database of a root directory (`/` inside a sandbox, a temp dir in tests).
#[derive(Debug, Clone)]
pub struct Accounts {
    passwd: PathBuf,
    group: PathBuf,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts::under(Path::new("/"))
    }
}

impl Accounts {
    /// The databases in `<root>/etc`.
    pub fn under(root: &Path) -> Self {
        Accounts {
            passwd: root.join("etc/passwd"),
            group: root.join("etc/group"),
        }
    }

    /// Looks a user up by name.
    pub fn user(&self, name: &str) -> Result<User, UserError> {
        let passwd = std::fs::read_to_string(&self.passwd).map_err(|source| UserError::Read {
            path: self.passwd.clone(),
            source,
        })?;
        let mut user = passwd
            .lines()
            .filter_map(parse_passwd_line)
            .find(|u| u.name == name)
            .ok_or_else(|| UserError::Unknown(name.to_owned()))?;
        let group = std::fs::read_to_string(&self.group).unwrap_or_default();
        user.groups = supplementary_groups(&group, &user.name, user.gid);
        Ok(user)
    }

    /// A user as a container image's `User` names one: `user`, `uid`, `user:group` or
    /// `uid:gid`. A uid without an account runs with gid 0 and home `/`, as in Docker;
    /// a group replaces the primary group and the supplementary ones.
    pub fn by_spec(&self, spec: &str) -> Result<User, UserError> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let mut found = match user.parse::<u32>() {
            Ok(uid) => {
                let passwd = std::fs::read_to_string(&self.passwd).unwrap_or_default();
                match passwd
                    .lines()
                    .filter_map(parse_passwd_line)
                    .find(|u| u.uid == uid)
                {
                    Some(mut u) => {
                        let group = std::fs::read_to_string(&self.group).unwrap_or_default();
                        u.groups = supplementary_groups(&group, &u.name, u.gid);
                        u
                    }
                    None => User {
                        name: uid.to_string(),
                        uid,
                        gid: 0,
                        home: PathBuf::from("/"),
                        shell: "/bin/sh".into(),
                        groups: vec![0],
                    },
                }
            }
            Err(_) => self.user(user)?,
        };
        if let Some(group) = group {
            let gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => std::fs::read_to_string(&self.group)
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| {
                        let mut f = l.split(':');
                        (f.next()? == group).then_some(())?;
                        f.nth(1)?.parse().ok()
                    })
                    .ok_or_else(|| UserError::UnknownGroup(group.to_owned()))?,
            };
            found.gid = gid;
            found.groups = vec![gid];
        }
        Ok(found)
    }

    /// uid → name and gid → name tables, for listing many files.
    pub fn names(&self) -> Names {
        let passwd = std::fs::read_to_string(&self.passwd).unwrap_or_default();
        let group = std::fs::read_to_string(&self.group).unwrap_or_default();
        Names {
            users: passwd
                .lines()
                .filter_map(parse_passwd_line)
                .map(|u| (u.uid, u.name))
                .collect(),
            groups: group
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let gid = f.nth(1)?.parse().ok()?;
                    Some((gid, name.to_owned()))
                })
                .collect(),
        }
    }
}

/// Name tables for owners and groups.
#[derive(Debug, Clone, Default)]
pub struct Names {
    users: std::collections::HashMap<u32, String>,
    groups: std::collections::HashMap<u32, String>,
}

impl Names {
    /// The user name of `uid`, or the number.
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }
    /// The group name of `gid`, or the number.
    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

fn parse_passwd_line(line: &str) -> Option<User> {
    if line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    Some(User {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: PathBuf::from(if f[5].is_empty() { "/" } else { f[5] }),
        shell: f[6].to_owned(),
        groups: Vec::new(),
    })
}

fn supplementary_groups(group: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        if f[3].split(',').any(|m| m == user) {
            if let Ok(gid) = f[2].parse() {
                if !gids.contains(&gid) {
                    gids.push(gid);
                }
            }
        }
    }
    gids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("etc")).unwrap();
        std::fs::write(
            tmp.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nbroken\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("etc/group"),
            "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\n",
        )
        .unwrap();
        let acc = Accounts::under(tmp.path());
        let u = acc.user("user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, Path::new("/home/user"));
        assert_eq!(u.groups, vec![1000, 27]);
        assert!(matches!(acc.user("nobody"), Err(UserError::Unknown(n)) if n == "nobody"));
        let names = acc.names();
        assert_eq!(names.user(1000), "user");
        assert_eq!(names.group(27), "sudo");
        assert_eq!(names.user(4242), "4242");
        let u = acc.by_spec("1000").unwrap();
        assert_eq!((u.name.as_str(), u.gid), ("user", 1000));
        let u = acc.by_spec("4242").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_path()), (4242, 0, Path::new("/")));
        let u = acc.by_spec("user:sudo").unwrap();
        assert_eq!((u.uid, u.gid, u.groups.clone()), (1000, 27, vec![27]));
        let u = acc.by_spec("0:33").unwrap();
        assert_eq!((u.uid, u.gid), (0, 33));
        assert!(
            matches!(acc.by_spec("user:nogroup"), Err(UserError::UnknownGroup(g)) if g == "nogroup")
        );
        assert!(matches!(acc.by_spec("nobody"), Err(UserError::Unknown(_))));
    }
}
