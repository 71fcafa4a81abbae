//! What a template's sandboxes run and with which environment: the image config's
//! `Entrypoint`/`Cmd`/`Env`/`WorkingDir`/`User`/`ExposedPorts` with the overrides of
//! `tpl create-from-image` applied ([`resolve`], pure), and the checks a build makes
//! against the unpacked root filesystem before it installs anything ([`validate`]).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::from_image::RunOverrides;
use crate::meta::{Probe, SandboxDefaults, Service};
use crate::oci::{resolve_in_root, ImageConfig};

/// The agent's envd port: every sandbox has it, no service may take it.
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port, taken in templates that run it.
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// `PATH` when the image's environment has none (the agent's default as well).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A service, environment or port the build refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunConfigError {
    /// The user the service should run as is not in the image.
    #[error("the service's user {user:?} is not in the image's /etc/passwd (give --user with a name from it, or a numeric uid[:gid])")]
    UnknownUser {
        /// The user asked for.
        user: String,
    },
    /// The group part of `user:group` is not in the image.
    #[error("the service's group {group:?} is not in the image's /etc/group (give a name from it or a numeric gid)")]
    UnknownGroup {
        /// The group asked for.
        group: String,
    },
    /// A numeric id outside what a sandbox maps.
    #[error("the service's {what} {id} is not below 65536, the ids a sandbox has")]
    IdOutOfRange {
        /// `uid` or `gid`.
        what: &'static str,
        /// The id.
        id: u64,
    },
    /// The working directory is relative.
    #[error(
        "the service's working directory {workdir:?} is not absolute (--workdir must start with /)"
    )]
    RelativeWorkdir {
        /// The directory given.
        workdir: String,
    },
    /// The working directory cannot be used.
    #[error("the service's working directory {workdir:?}: {reason}")]
    BadWorkdir {
        /// The directory given.
        workdir: String,
        /// Why.
        reason: String,
    },
    /// The program is not in the image.
    #[error("the service's program {program:?} {reason}")]
    NoProgram {
        /// `argv[0]`.
        program: String,
        /// Where it was looked for.
        reason: String,
    },
    /// A probe without anything to probe.
    #[error("--probe {port} needs a service, but the image has no entrypoint or cmd; give one with --cmd")]
    ProbeWithoutService {
        /// The probe's port.
        port: u16,
    },
    /// A port that cannot be used.
    #[error("{what} {port}: {reason}")]
    BadPort {
        /// `--probe` or `--expose-port`.
        what: &'static str,
        /// The port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// A probe path that is not a path.
    #[error("--probe-path {path:?} must start with / and contain no spaces or control characters")]
    BadProbePath {
        /// The path given.
        path: String,
    },
    /// A probe that can never succeed.
    #[error("--probe-timeout must be at least 1 second")]
    ZeroProbeTimeout,
    /// An environment variable no program could get.
    #[error("environment variable {name:?} is invalid: names are non-empty without '=' or NUL, values without NUL")]
    BadEnv {
        /// Its name.
        name: String,
    },
}

/// The environment and service of a template's sandboxes, from its image config and
/// the overrides (no file system access).
///
/// - env: the image's `Env` (`K=V`; an entry without `=` is ignored), then each
///   `--env K=V` in order, adding or replacing.
/// - argv: `--cmd` replaces the `Entrypoint` and drops the image's `Cmd`; `--arg`s (if
///   any) replace the `Cmd`; the service is `Entrypoint ++ Cmd`, none when that is empty.
/// - `--workdir` and `--user` replace `WorkingDir` and `User`; empty values mean unset.
pub fn resolve(
    config: &ImageConfig,
    overrides: &RunOverrides,
) -> (BTreeMap<String, String>, Option<Service>) {
    let mut env = BTreeMap::new();
    for entry in &config.env {
        if let Some((k, v)) = entry.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    for (k, v) in &overrides.env {
        env.insert(k.clone(), v.clone());
    }
    let entrypoint = match &overrides.cmd {
        Some(cmd) => vec![cmd.clone()],
        None => config.entrypoint.clone(),
    };
    let cmd = if !overrides.args.is_empty() {
        overrides.args.clone()
    } else if overrides.cmd.is_some() {
        Vec::new()
    } else {
        config.cmd.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    let non_empty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
    let service = (!argv.is_empty()).then(|| Service {
        argv,
        workdir: non_empty(overrides.workdir.as_ref().or(config.working_dir.as_ref())),
        user: non_empty(overrides.user.as_ref().or(config.user.as_ref())),
    });
    (env, service)
}

/// The TCP ports of the image's `ExposedPorts` (`8080/tcp`, `8080`; other protocols
/// and the agent's own ports are left out), sorted.
pub fn image_ports(config: &ImageConfig, code_interpreter: bool) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .exposed_ports
        .iter()
        .filter_map(|p| match p.split_once('/') {
            Some((port, proto)) if proto.eq_ignore_ascii_case("tcp") => port.parse().ok(),
            Some(_) => None,
            None => p.parse().ok(),
        })
        .filter(|p| *p != 0 && agent_port(*p, code_interpreter).is_none())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Why `port` belongs to the agent, if it does.
fn agent_port(port: u16, code_interpreter: bool) -> Option<&'static str> {
    match port {
        ENVD_PORT => Some("is the agent's envd port, which every sandbox has already"),
        CODE_INTERPRETER_PORT if code_interpreter => {
            Some("is the code interpreter's port in this template")
        }
        _ => None,
    }
}

/// Checks what needs no root filesystem: the env, the exposed ports (not 0, not the
/// agent's) and the probe (a port as those, a path, a timeout; only with a service).
pub fn check(defaults: &SandboxDefaults, code_interpreter: bool) -> Result<(), RunConfigError> {
    for (k, v) in &defaults.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(RunConfigError::BadEnv { name: k.clone() });
        }
    }
    let port_ok = |what: &'static str, port: u16| {
        if port == 0 {
            return Err(RunConfigError::BadPort {
                what,
                port,
                reason: "ports are 1 to 65535".into(),
            });
        }
        match agent_port(port, code_interpreter) {
            Some(reason) => Err(RunConfigError::BadPort {
                what,
                port,
                reason: reason.into(),
            }),
            None => Ok(()),
        }
    };
    for port in &defaults.expose_ports {
        port_ok("--expose-port", *port)?;
    }
    if let Some(Probe {
        port,
        path,
        timeout_secs,
    }) = &defaults.probe
    {
        port_ok("--probe", *port)?;
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(RunConfigError::BadProbePath { path: path.clone() });
        }
        if *timeout_secs == 0 {
            return Err(RunConfigError::ZeroProbeTimeout);
        }
        if defaults.service.is_none() {
            return Err(RunConfigError::ProbeWithoutService { port: *port });
        }
    }
    Ok(())
}

/// Checks the service against the unpacked root filesystem `rootfs` (ids before the
/// uid shift): its user exists (or is numeric), its working directory is absolute
/// (created, as a container runtime would, when missing), its program exists and is
/// executable (looked up in the env's `PATH` when it has no `/`). Returns lines for the
/// build log.
pub fn validate(rootfs: &Path, defaults: &SandboxDefaults) -> Result<Vec<String>, RunConfigError> {
    let Some(service) = &defaults.service else {
        return Ok(Vec::new());
    };
    let mut log = Vec::new();
    if let Some(user) = &service.user {
        check_user(rootfs, user)?;
    }
    let workdir = service.workdir.as_deref().unwrap_or("/");
    if !workdir.starts_with('/') {
        return Err(RunConfigError::RelativeWorkdir {
            workdir: workdir.to_owned(),
        });
    }
    let bad_workdir = |reason: String| RunConfigError::BadWorkdir {
        workdir: workdir.to_owned(),
        reason,
    };
    let rel = Path::new(workdir.trim_start_matches('/'));
    let existed = resolve_in_root(rootfs, rel, false)
        .map_err(bad_workdir)?
        .is_some();
    let dir = resolve_in_root(rootfs, rel, true)
        .map_err(bad_workdir)?
        .unwrap_or_else(|| rootfs.join(rel));
    if !dir.is_dir() {
        return Err(bad_workdir("is not a directory in the image".into()));
    }
    if !existed {
        log.push(format!("created the service's working directory {workdir}"));
    }
    let program = &service.argv[0];
    let path = defaults
        .env
        .get("PATH")
        .map_or(DEFAULT_PATH, String::as_str);
    let found = if program.contains('/') {
        let full = if program.starts_with('/') {
            program.clone()
        } else {
            format!("{workdir}/{program}")
        };
        executable_in(rootfs, &full)?.then_some(full)
    } else {
        let mut found = None;
        for dir in path.split(':').filter(|d| d.starts_with('/')) {
            let full = format!("{}/{program}", dir.trim_end_matches('/'));
            if executable_in(rootfs, &full)? {
                found = Some(full);
                break;
            }
        }
        found
    };
    let Some(found) = found else {
        return Err(RunConfigError::NoProgram {
            program: program.clone(),
            reason: if program.contains('/') {
                "is not an executable file in the image".into()
            } else {
                format!("is not in the image (searched PATH={path})")
            },
        });
    };
    log.push(format!(
        "service: {} (program {found}) as {} in {workdir}",
        shell_words(&service.argv),
        service.user.as_deref().unwrap_or("root"),
    ));
    Ok(log)
}

/// Whether `path` (absolute, in the sandbox) is an executable regular file of `rootfs`.
fn executable_in(rootfs: &Path, path: &str) -> Result<bool, RunConfigError> {
    let host =
        resolve_in_root(rootfs, Path::new(path.trim_start_matches('/')), false).map_err(|reason| {
            RunConfigError::NoProgram {
                program: path.to_owned(),
                reason,
            }
        });
    // A component that is not a directory just means "not here".
    let Ok(Some(host)) = host else {
        return Ok(false);
    };
    Ok(std::fs::metadata(&host).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `user`, `uid`, `user:group`, `uid:gid` (as Docker's `User`).
fn check_user(rootfs: &Path, spec: &str) -> Result<(), RunConfigError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let read = |file: &str| {
        resolve_in_root(rootfs, Path::new(file), false)
            .ok()
            .flatten()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    };
    let numeric = |what: &'static str, s: &str| -> Result<Option<u32>, RunConfigError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(None);
        }
        let id: u64 = s.parse().unwrap_or(u64::MAX);
        if id >= 65536 {
            return Err(RunConfigError::IdOutOfRange { what, id });
        }
        Ok(Some(id as u32))
    };
    let has_name = |db: &str, name: &str| db.lines().any(|l| l.split(':').next() == Some(name));
    if numeric("uid", user)?.is_none() && !has_name(&read("etc/passwd"), user) {
        return Err(RunConfigError::UnknownUser {
            user: user.to_owned(),
        });
    }
    if let Some(group) = group {
        if numeric("gid", group)?.is_none() && !has_name(&read("etc/group"), group) {
            return Err(RunConfigError::UnknownGroup {
                group: group.to_owned(),
            });
        }
    }
    Ok(())
}

/// argv as a shell would need it quoted, for logs.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn config() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin".into(),
                "A=1".into(),
                "NOEQUALS".into(),
            ],
            working_dir: Some("/srv".into()),
            user: Some("www".into()),
            exposed_ports: vec!["80/tcp".into(), "53/udp".into(), "8080".into()],
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_image_config_alone() {
        let (env, service) = resolve(&config(), &RunOverrides::default());
        assert_eq!(env.len(), 2);
        assert_eq!(env["A"], "1");
        let service = service.unwrap();
        assert_eq!(
            service.argv,
            s(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])
        );
        assert_eq!(service.workdir.as_deref(), Some("/srv"));
        assert_eq!(service.user.as_deref(), Some("www"));
        assert_eq!(image_ports(&config(), false), vec![80, 8080]);
    }

    #[test]
    fn cmd_replaces_the_entrypoint_and_drops_the_cmd() {
        let o = RunOverrides {
            cmd: Some("python3".into()),
            ..Default::default()
        };
        assert_eq!(resolve(&config(), &o).1.unwrap().argv, s(&["python3"]));
        let o = RunOverrides {
            cmd: Some("python3".into()),
            args: s(&["-m", "http.server"]),
            ..Default::default()
        };
        assert_eq!(
            resolve(&config(), &o).1.unwrap().argv,
            s(&["python3", "-m", "http.server"])
        );
        // --arg alone keeps the entrypoint.
        let o = RunOverrides {
            args: s(&["httpd"]),
            ..Default::default()
        };
        assert_eq!(
            resolve(&config(), &o).1.unwrap().argv,
            s(&["/docker-entrypoint.sh", "httpd"])
        );
    }

    #[test]
    fn env_workdir_and_user_overrides() {
        let o = RunOverrides {
            env: vec![("A".into(), "2".into()), ("B".into(), "x=y".into())],
            workdir: Some("/app".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        let (env, service) = resolve(&config(), &o);
        assert_eq!(env["A"], "2");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["PATH"], "/usr/local/bin:/usr/bin:/bin");
        let service = service.unwrap();
        assert_eq!(service.workdir.as_deref(), Some("/app"));
        assert_eq!(service.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn no_argv_no_service() {
        let c = ImageConfig {
            working_dir: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(resolve(&c, &RunOverrides::default()).1, None);
        // Args alone make a service, as `docker run image args` does.
        let o = RunOverrides {
            args: s(&["/bin/true"]),
            ..Default::default()
        };
        let service = resolve(&c, &o).1.unwrap();
        assert_eq!(service.argv, s(&["/bin/true"]));
        assert_eq!(service.workdir, None);
    }

    fn with_service(argv: &[&str]) -> SandboxDefaults {
        SandboxDefaults {
            service: Some(Service {
                argv: s(argv),
                workdir: None,
                user: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ports_and_probes_are_checked() {
        let mut d = with_service(&["x"]);
        d.expose_ports = vec![8080, 49999];
        assert_eq!(check(&d, false), Ok(()));
        let err = check(&d, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--expose-port 49999: is the code interpreter's port in this template"
        );
        d.expose_ports = vec![49983];
        assert!(check(&d, false)
            .unwrap_err()
            .to_string()
            .contains("--expose-port 49983: is the agent's envd port"));
        d.expose_ports = vec![0];
        assert!(check(&d, false)
            .unwrap_err()
            .to_string()
            .contains("1 to 65535"));
        d.expose_ports = vec![];
        let probe = |port, path: &str, timeout_secs| Probe {
            port,
            path: path.into(),
            timeout_secs,
        };
        d.probe = Some(probe(8080, "/health", 5));
        assert_eq!(check(&d, false), Ok(()));
        d.probe = Some(probe(49983, "/", 5));
        assert!(check(&d, false)
            .unwrap_err()
            .to_string()
            .starts_with("--probe 49983"));
        d.probe = Some(probe(8080, "health", 5));
        assert_eq!(
            check(&d, false).unwrap_err(),
            RunConfigError::BadProbePath {
                path: "health".into()
            }
        );
        d.probe = Some(probe(8080, "/a b", 5));
        assert!(check(&d, false).is_err());
        d.probe = Some(probe(8080, "/", 0));
        assert_eq!(check(&d, false), Err(RunConfigError::ZeroProbeTimeout));
        d.probe = Some(probe(8080, "/", 5));
        d.service = None;
        assert_eq!(
            check(&d, false).unwrap_err().to_string(),
            "--probe 8080 needs a service, but the image has no entrypoint or cmd; give one with --cmd"
        );
        let mut d = with_service(&["x"]);
        d.env.insert("A=B".into(), "1".into());
        assert!(matches!(
            check(&d, false),
            Err(RunConfigError::BadEnv { .. })
        ));
        // Image ports that are the agent's are dropped, not refused.
        let c = ImageConfig {
            exposed_ports: vec!["49983/tcp".into(), "49999/tcp".into()],
            ..Default::default()
        };
        assert_eq!(image_ports(&c, false), vec![49999]);
        assert_eq!(image_ports(&c, true), Vec::<u16>::new());
    }

    fn rootfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["usr/bin", "usr/local/bin", "etc", "srv"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        symlink("usr/bin", r.join("bin")).unwrap();
        for (f, mode) in [("usr/bin/python3", 0o755), ("usr/bin/data", 0o644)] {
            std::fs::write(r.join(f), b"").unwrap();
            std::fs::set_permissions(r.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:33::/var/www:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nwww:x:33:\n").unwrap();
        t
    }

    #[test]
    fn programs_are_found_through_path_and_symlinks() {
        let t = rootfs();
        let mut d = with_service(&["python3", "-m", "http.server"]);
        let log = validate(t.path(), &d).unwrap();
        assert_eq!(
            log,
            vec!["service: python3 -m http.server (program /usr/bin/python3) as root in /"]
        );
        d.env.insert("PATH".into(), "/opt/bin:/bin".into());
        let log = validate(t.path(), &d).unwrap();
        assert!(log[0].contains("(program /bin/python3)"), "{log:?}");
        d.env.insert("PATH".into(), "/opt/bin".into());
        assert_eq!(
            validate(t.path(), &d).unwrap_err().to_string(),
            "the service's program \"python3\" is not in the image (searched PATH=/opt/bin)"
        );
        let d = with_service(&["/bin/python3"]);
        assert!(validate(t.path(), &d).is_ok());
        for missing in ["/bin/nope", "/usr/bin/data", "/etc/passwd/x"] {
            let d = with_service(&[missing]);
            assert!(
                validate(t.path(), &d)
                    .unwrap_err()
                    .to_string()
                    .contains("is not an executable file in the image"),
                "{missing}"
            );
        }
    }

    #[test]
    fn users_and_workdirs_are_checked() {
        let t = rootfs();
        let mut d = with_service(&["python3"]);
        for ok in ["www", "33", "www:www", "1000:1000", "www:33", "0"] {
            d.service.as_mut().unwrap().user = Some(ok.into());
            assert!(validate(t.path(), &d).is_ok(), "{ok}");
        }
        let cases = [
            (
                "nobody",
                "the service's user \"nobody\" is not in the image's /etc/passwd",
            ),
            (
                "www:staff",
                "the service's group \"staff\" is not in the image's /etc/group",
            ),
            ("70000", "the service's uid 70000 is not below 65536"),
        ];
        for (user, message) in cases {
            d.service.as_mut().unwrap().user = Some(user.into());
            let err = validate(t.path(), &d).unwrap_err().to_string();
            assert!(err.starts_with(message), "{err}");
        }
        let svc = d.service.as_mut().unwrap();
        svc.user = None;
        svc.workdir = Some("srv".into());
        assert_eq!(
            validate(t.path(), &d).unwrap_err(),
            RunConfigError::RelativeWorkdir {
                workdir: "srv".into()
            }
        );
        d.service.as_mut().unwrap().workdir = Some("/app/data".into());
        let log = validate(t.path(), &d).unwrap();
        assert_eq!(log[0], "created the service's working directory /app/data");
        assert!(t.path().join("app/data").is_dir());
        d.service.as_mut().unwrap().workdir = Some("/etc/passwd".into());
        assert!(validate(t.path(), &d)
            .unwrap_err()
            .to_string()
            .contains("is not a directory"));
    }

    #[test]
    fn shell_words_quote_what_needs_it() {
        assert_eq!(
            shell_words(&s(&["nginx", "-g", "daemon off;", "it's"])),
            r"nginx -g 'daemon off;' 'it'\''s'"
        );
    }
}
