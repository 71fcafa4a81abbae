//! Building a layered template: the recipe's packages installed with `apt-get` into an
//! overlay of the parent's layers, keeping only the overlay's upper directory (the
//! delta), with owners shifted like the parent's.
//!
//! Each phase (install, configure, trim) runs [`DRIVER`] with `unshare --mount --pid
//! --fork`: it mounts
//!
//! ```text
//! overlay  lowerdir=<parent layers, top first>,upperdir=<build>/rootfs,
//!          workdir=<build>/work,userxattr          on <build>/merged
//! proc, /dev (rbind), the host's resolv.conf (read-only bind), the .deb cache
//! ```
//!
//! and runs the phase's script in `chroot <build>/merged`. `userxattr` matters: sandboxes
//! mount their overlay inside a user namespace, where overlayfs reads only `user.overlay.*`
//! attributes, so the opaque directories and whiteouts of the delta must be recorded in
//! that namespace. Nothing is mounted on the host: the mounts live in the namespace, are
//! unmounted before the driver exits, and every process left in the pid namespace is
//! killed.
//!
//! The scripts run as host root on lower layers whose files are owned by shifted ids
//! (root = 1 000 000 000). New files get small ids (0 for root, 1000 for `user`); files
//! copied up from the parent keep their shifted ids. [`shift_layer_ownership`] then shifts
//! only the small ones.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::build::{
    find_tool, join_tail, run_streamed, step, BuildEvent, BuildOptions, BuildOutcome, Tools,
    CHILD_PATH,
};
use crate::error::{IoContext, TemplateError};
use crate::meta::{now_unix, rfc3339_utc, TemplateMeta};
use crate::mirror::{host_mirror, validate_mirror};
use crate::recipe::{Recipe, LAYER_INSTALL_SCRIPT};
use crate::shift::shift_layer_ownership;
use crate::store::{remove_tree, TemplateStore, ROOTFS_DIR};

/// The overlay's work directory inside a build directory (removed before install).
const WORK_DIR: &str = "work";
/// Where the overlay is mounted inside a build directory (removed before install).
const MERGED_DIR: &str = "merged";

/// Host-side shell script (`sh -eu`) run as pid 1 of fresh mount and pid namespaces:
/// mounts the overlay and what the chroot needs, runs the script, unmounts everything.
/// Arguments: merged upper work lowerdir cache script (cache may be empty).
const DRIVER: &str = r#"umask 022
merged=$1 upper=$2 work=$3 lower=$4 cache=$5 script=$6
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work,userxattr" "$merged"
mount -t proc -o nosuid,nodev,noexec proc "$merged/proc"
mount --rbind /dev "$merged/dev"
# Name resolution for apt: the host's file, bound read-only over the parent's placeholder
# (a copy would end up in the layer, deleting it would leave a whiteout there).
if [ -e /etc/resolv.conf ] && [ -f "$merged/etc/resolv.conf" ] && [ ! -L "$merged/etc/resolv.conf" ]; then
    mount --bind /etc/resolv.conf "$merged/etc/resolv.conf"
    mount -o remount,bind,ro "$merged/etc/resolv.conf"
else
    echo "note: no /etc/resolv.conf on the host or in the parent; name resolution may fail"
fi
if [ -n "$cache" ]; then
    mount --bind "$cache" "$merged/var/cache/apt/archives"
fi
status=0
chroot "$merged" /bin/sh -eu -c "$script" sh || status=$?
# Whatever the script left running goes now (we are pid 1 of our own pid namespace, so
# this reaches only its processes), then every mount, before the caller touches the layer.
if [ "$$" -eq 1 ]; then
    kill -s KILL -- -1 2>/dev/null || true
fi
umount -R "$merged" || { sleep 1; umount -R "$merged"; }
exit "$status"
"#;

/// Builds the layered template of `recipe` on the template of `parent` (its
/// `recipe.parent`), building the parent first if it is missing or outdated.
pub(crate) fn build_layer(
    store: &TemplateStore,
    recipe: &Recipe,
    parent: &'static Recipe,
    opts: &BuildOptions,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, TemplateError> {
    let name = recipe.template_name()?;
    let hash = recipe.hash(opts.uid_shift);
    if !opts.rebuild {
        if let Some(t) = store.current(&name, &hash, opts.uid_shift) {
            return Ok(BuildOutcome::UpToDate(t));
        }
    }
    if recipe.suite != parent.suite {
        return Err(TemplateError::StepFailed {
            step: format!("checking the recipe of '{}'", recipe.name),
            status: "refused".into(),
            tail: format!(
                "  its suite {} differs from its parent's ({})",
                recipe.suite, parent.suite
            ),
        });
    }

    // The parent first, when it is missing or outdated (--rebuild forces only the
    // template asked for, never its parent).
    let parent_name = parent.template_name()?;
    let parent_opts = BuildOptions {
        rebuild: false,
        ..opts.clone()
    };
    if store
        .current(&parent_name, &parent.hash(opts.uid_shift), opts.uid_shift)
        .is_none()
    {
        on_event(BuildEvent::Log(format!(
            "building '{}' first, the parent of '{}'",
            parent.name, recipe.name
        )));
    }
    let parent_built = crate::build::build(store, parent, &parent_opts, on_event)?;
    if let BuildOutcome::Built(p) = &parent_built {
        on_event(BuildEvent::Log(format!(
            "built '{}'; now building '{}' on it",
            p.name, recipe.name
        )));
    }

    let started = Instant::now();
    step(on_event, 1, "checking requirements");
    let tools = Tools::find()?;
    find_tool("mount", "mount")?;
    find_tool("umount", "mount")?;
    let mirror = match &opts.mirror {
        Some(m) => validate_mirror(m)?,
        None => host_mirror(recipe.suite)?,
    };
    on_event(BuildEvent::Log(format!("mirror: {mirror}")));
    let cache = store.data_dir().cache().join("apt").join(recipe.suite);
    fs::create_dir_all(cache.join("partial")).ctx("create directory", &cache)?;

    store.install(
        &name,
        &hash,
        opts.uid_shift,
        opts.rebuild,
        on_event,
        &mut |dir, on_event| {
            // Under the store lock: the parent cannot be replaced while we build on it.
            let parent_t = store.get_by_name(&parent_name)?;
            if parent_t.meta.recipe_hash != parent.hash(opts.uid_shift)
                || parent_t.meta.uid_shift != opts.uid_shift
            {
                return Err(TemplateError::BrokenParent {
                    name: recipe.name.to_owned(),
                    parent: parent.name.to_owned(),
                    reason: "it was replaced by another build meanwhile".into(),
                });
            }
            let lower = parent_t.layers(store)?;
            let upper = dir.join(ROOTFS_DIR);
            let work = dir.join(WORK_DIR);
            let merged = dir.join(MERGED_DIR);
            for (d, mode) in [(&upper, 0o755), (&work, 0o700), (&merged, 0o755)] {
                DirBuilder::new()
                    .mode(mode)
                    .create(d)
                    .ctx("create directory", d)?;
                fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .ctx("chmod", d)?;
            }
            let overlay = Overlay::new(&tools, &lower, &upper, &work, &merged)?
                .env("CUBICLE_MIRROR", &mirror)
                .env("CUBICLE_SUITE", recipe.suite)
                .env("CUBICLE_STUBS", &recipe.stub_packages.join(" "))
                .env("CUBICLE_PACKAGES", &recipe.packages.join(" "));
            on_event(BuildEvent::Log(format!(
                "layers below: {}",
                lower
                    .iter()
                    .map(|l| l.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));

            step(
                on_event,
                2,
                &format!("installing packages (apt-get, on '{}')", parent.name),
            );
            overlay.run(
                LAYER_INSTALL_SCRIPT,
                Some(&cache),
                "installing packages",
                on_event,
            )?;
            step(on_event, 3, "configuring");
            overlay.run(recipe.configure_script, None, "configuring", on_event)?;
            step(on_event, 4, "trimming");
            overlay.run(recipe.trim_script, None, "trimming", on_event)?;
            // remove_tree refuses if anything is still mounted there.
            remove_tree(&merged)?;
            remove_tree(&work)?;

            step(
                on_event,
                5,
                &format!("shifting owners of new files by {}", opts.uid_shift),
            );
            let stats = shift_layer_ownership(&upper, opts.uid_shift)?;
            on_event(BuildEvent::Log(format!(
                "layer: {} entries, {} inodes shifted, {} copied up from below, {} whiteouts, {} opaque directories",
                stats.tree.entries, stats.shifted, stats.kept, stats.whiteouts, stats.opaque_dirs
            )));
            step(on_event, 6, "installing");
            Ok(TemplateMeta {
                format_version: TemplateMeta::format_version_for(Some(parent.name)),
                recipe: recipe.name.to_owned(),
                recipe_hash: hash.clone(),
                uid_shift: opts.uid_shift,
                built_at: rfc3339_utc(now_unix()),
                size_bytes: stats.tree.bytes,
                file_count: stats.tree.entries,
                build_seconds: crate::build::build_seconds(started),
                mirror: mirror.clone(),
                parent: Some(parent.name.to_owned()),
                parent_built_at: Some(parent_t.meta.built_at.clone()),
                aliases: recipe.aliases.iter().map(|a| a.to_string()).collect(),
                code_interpreter: recipe.code_interpreter,
                image: None,
                sandbox: Default::default(),
            })
        },
    )
}

/// The overlay of one layer build.
#[derive(Debug)]
struct Overlay<'a> {
    tools: &'a Tools,
    lowerdir: String,
    upper: &'a Path,
    work: &'a Path,
    merged: &'a Path,
    env: Vec<(String, String)>,
}

impl<'a> Overlay<'a> {
    fn new(
        tools: &'a Tools,
        lower: &[PathBuf],
        upper: &'a Path,
        work: &'a Path,
        merged: &'a Path,
    ) -> Result<Self, TemplateError> {
        for p in lower
            .iter()
            .map(PathBuf::as_path)
            .chain([upper, work, merged])
        {
            check_overlay_path(p)?;
        }
        Ok(Overlay {
            tools,
            lowerdir: lowerdir(lower)?,
            upper,
            work,
            merged,
            env: Vec::new(),
        })
    }

    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs `script` (`/bin/sh -eu`) as root in the chroot of the mounted overlay; with
    /// `cache`, that directory is the chroot's `/var/cache/apt/archives`.
    fn run(
        &self,
        script: &str,
        cache: Option<&Path>,
        what: &str,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), TemplateError> {
        let mut cmd = Command::new(&self.tools.unshare);
        cmd.args(["--mount", "--propagation", "private", "--pid", "--fork"])
            .args(["--kill-child", "--", "/bin/sh", "-eu", "-c", DRIVER, "sh"])
            .arg(self.merged)
            .arg(self.upper)
            .arg(self.work)
            .arg(&self.lowerdir)
            .arg(cache.unwrap_or(Path::new("")))
            .arg(script)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .env("HOME", "/root")
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let run = run_streamed(cmd, on_event).ctx("run", &self.tools.unshare)?;
        if run.status.success() {
            return Ok(());
        }
        Err(TemplateError::StepFailed {
            step: what.to_owned(),
            status: run.status.to_string(),
            tail: join_tail(&run.tail),
        })
    }
}

/// overlayfs' `lowerdir` value for layers given top first.
pub(crate) fn lowerdir(layers: &[PathBuf]) -> Result<String, TemplateError> {
    if layers.is_empty() {
        return Err(TemplateError::io(
            "mount",
            "overlay",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no lower layer"),
        ));
    }
    let mut parts = Vec::with_capacity(layers.len());
    for l in layers {
        check_overlay_path(l)?;
        parts.push(l.to_str().expect("checked to be UTF-8"));
    }
    Ok(parts.join(":"))
}

/// Refuses paths overlayfs' option string cannot carry: relative, not UTF-8, or with
/// `:`, `,` or a newline.
fn check_overlay_path(p: &Path) -> Result<(), TemplateError> {
    let ok = p.is_absolute()
        && p.to_str()
            .is_some_and(|s| !s.contains([':', ',', '\n', '\\']));
    if ok {
        return Ok(());
    }
    Err(TemplateError::io(
        "mount an overlay with",
        p,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "overlay layers must be absolute UTF-8 paths without ':', ',', '\\' or newlines",
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_joins_top_first_and_refuses_bad_paths() {
        let layers = [
            PathBuf::from("/d/templates/code-interpreter/rootfs"),
            PathBuf::from("/d/templates/base/rootfs"),
        ];
        assert_eq!(
            lowerdir(&layers).unwrap(),
            "/d/templates/code-interpreter/rootfs:/d/templates/base/rootfs"
        );
        assert!(lowerdir(&[]).is_err());
        for bad in ["relative/rootfs", "/a:b", "/a,b", "/a\nb", "/a\\b"] {
            assert!(lowerdir(&[PathBuf::from(bad)]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn driver_is_valid_shell() {
        let out = Command::new("/bin/sh")
            .args(["-n", "-c", DRIVER])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for script in [
            LAYER_INSTALL_SCRIPT,
            crate::recipe::CODE_INTERPRETER.configure_script,
            crate::recipe::CODE_INTERPRETER.trim_script,
        ] {
            let out = Command::new("/bin/sh")
                .args(["-n", "-c", script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
