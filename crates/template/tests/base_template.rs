//! Checks the real `base` template built by `cubicle tpl build base` in the data
//! directory `$CUBICLE_DATA_DIR` (default `/var/lib/cubicle`). Fails, never skips, if it
//! is not built.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cubicle_core::{uid_map, DataDir, TemplateName};
use cubicle_template::{recipe, Template, TemplateError, TemplateStore};

fn base() -> Template {
    let dir = std::env::var_os("CUBICLE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DataDir::DEFAULT));
    let store = TemplateStore::new(DataDir::new(&dir));
    let name: TemplateName = "base".parse().unwrap();
    match store.get(&name) {
        Ok(t) => t,
        Err(TemplateError::NotFound { .. }) => panic!(
            "base template not built: run `cubicle tpl build base` (data dir {})",
            dir.display()
        ),
        Err(e) => panic!("base template in {} is not usable: {e}", dir.display()),
    }
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn is_built_from_the_current_recipe() {
    let t = base();
    assert_eq!(t.meta.recipe, "base");
    assert_eq!(t.meta.uid_shift, uid_map::HOST_BASE);
    assert_eq!(
        t.meta.recipe_hash,
        recipe::BASE.hash(t.meta.uid_shift),
        "the base recipe changed since the template was built: run `cubicle tpl build base`"
    );
    assert!(t.meta.size_bytes > 10 << 20, "{}", t.meta.size_bytes);
    assert!(t.meta.file_count > 1000, "{}", t.meta.file_count);
    assert!(t.meta.built_at_unix().is_some(), "{}", t.meta.built_at);
}

#[test]
fn has_the_programs() {
    let r = base().rootfs;
    for p in [
        "usr/bin/bash",
        "usr/bin/python3",
        "usr/bin/sudo",
        "usr/bin/ps",
        "usr/bin/ls",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        // Follow symlinks inside the rootfs only (python3 -> python3.11).
        let mut path = r.join(p);
        for _ in 0..8 {
            match fs::read_link(&path) {
                Ok(target) if target.is_absolute() => {
                    path = r.join(target.strip_prefix("/").unwrap())
                }
                Ok(target) => path = path.parent().unwrap().join(target),
                Err(_) => break,
            }
        }
        let m = lstat(&path);
        assert!(m.is_file() && m.len() > 0, "{p} missing or empty");
    }
    let sudo = lstat(&r.join("usr/bin/sudo"));
    assert_eq!(
        sudo.permissions().mode() & 0o7777,
        0o4755,
        "sudo lost its setuid bit"
    );
    assert_eq!(
        sudo.uid(),
        uid_map::HOST_BASE,
        "sudo must belong to sandbox root"
    );
}

#[test]
fn has_the_user_with_passwordless_sudo() {
    let r = base().rootfs;
    let passwd = fs::read_to_string(r.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("user:"))
        .expect("no user in /etc/passwd");
    let f: Vec<&str> = user.split(':').collect();
    assert_eq!(
        (f[1], f[2], f[3], f[5], f[6]),
        ("x", "1000", "1000", "/home/user", "/bin/bash"),
        "{user}"
    );
    let group = fs::read_to_string(r.join("etc/group")).unwrap();
    let sudo = group.lines().find(|l| l.starts_with("sudo:")).unwrap();
    assert!(sudo
        .split(':')
        .nth(3)
        .unwrap()
        .split(',')
        .any(|u| u == "user"));

    let sudoers = r.join("etc/sudoers.d/user");
    let m = lstat(&sudoers);
    assert_eq!(m.permissions().mode() & 0o777, 0o440);
    assert!(fs::read_to_string(&sudoers)
        .unwrap()
        .contains("user ALL=(ALL:ALL) NOPASSWD: ALL"));

    let home = lstat(&r.join("home/user"));
    assert!(home.is_dir());
    assert_eq!(
        (home.uid(), home.gid()),
        (uid_map::HOST_BASE + 1000, uid_map::HOST_BASE + 1000)
    );
}

#[test]
fn is_trimmed() {
    let r = base().rootfs;
    let entries = |p: &str| -> Vec<String> {
        fs::read_dir(r.join(p))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(entries("var/lib/apt/lists").is_empty(), "apt lists left");
    assert!(entries("usr/share/man").is_empty(), "manuals left");
    assert!(entries("usr/share/locale").is_empty(), "translations left");
    assert!(entries("var/cache/apt/archives")
        .iter()
        .all(|n| !n.ends_with(".deb")));
    // Only copyright files are left in /usr/share/doc.
    for pkg in entries("usr/share/doc") {
        for f in entries(&format!("usr/share/doc/{pkg}")) {
            assert_eq!(f, "copyright", "usr/share/doc/{pkg}/{f} left");
        }
    }
    let dpkg = fs::read_to_string(r.join("etc/dpkg/dpkg.cfg.d/cubicle-trim")).unwrap();
    assert!(dpkg.contains("path-exclude /usr/share/doc/*"));
}

#[test]
fn every_file_is_owned_by_the_shifted_range() {
    let t = base();
    let shift = t.meta.uid_shift;
    let mut stack = vec![t.rootfs.clone()];
    let mut seen = 0u64;
    while let Some(p) = stack.pop() {
        let m = lstat(&p);
        seen += 1;
        assert!(
            m.uid() >= shift && m.gid() >= shift,
            "{} is owned by {}:{}, below the uid shift {shift}",
            p.display(),
            m.uid(),
            m.gid()
        );
        assert!(m.uid() - shift < uid_map::RANGE && m.gid() - shift < uid_map::RANGE);
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert_eq!(seen, t.meta.file_count + 1, "file count in template.json");
}

#[test]
fn host_identity_is_not_copied() {
    let r = base().rootfs;
    assert_eq!(
        fs::read_to_string(r.join("etc/hostname")).unwrap(),
        "sandbox\n"
    );
    let hosts = fs::read_to_string(r.join("etc/hosts")).unwrap();
    assert!(hosts.contains("127.0.0.1\tlocalhost"));
    let resolv = fs::read_to_string(r.join("etc/resolv.conf")).unwrap();
    assert!(
        !resolv.contains("nameserver"),
        "host DNS config copied: {resolv}"
    );
}
