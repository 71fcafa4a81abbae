//! Templates on disk: lookup, listing, removal, and the atomic installation of a build.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cubicle_core::{DataDir, TemplateName};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::build::{BuildEvent, BuildOutcome};
use crate::error::{IoContext, TemplateError};
use crate::meta::{Template, TemplateMeta};

/// File name of a template's metadata, inside its directory.
pub const META_FILE: &str = "template.json";
/// Directory name of a template's root filesystem, inside its directory.
pub const ROOTFS_DIR: &str = "rootfs";
/// Lock file serializing builds and removals, inside the templates directory.
pub const LOCK_FILE: &str = ".lock";
/// Prefix of a build in progress: `.build-<name>-<random>`.
pub const BUILD_PREFIX: &str = ".build-";
/// Prefix of a replaced or removed template being deleted: `.old-<name>-<random>`.
pub const OLD_PREFIX: &str = ".old-";

/// The part of a build that fills a fresh build directory (given first) with `rootfs/`
/// and returns the metadata to record, reporting progress through the second argument.
pub(crate) type BuildStep<'a> =
    dyn FnMut(&Path, &mut dyn FnMut(BuildEvent)) -> Result<TemplateMeta, TemplateError> + 'a;

/// The templates of one data directory.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    data: DataDir,
    /// Whether replaced and removed templates are deleted on a thread of their own
    /// (see [`TemplateStore::deleting_in_background`]).
    background_deletes: bool,
    /// The `.old-*` directories such threads are deleting now (no leftovers: a build
    /// leaves them to their thread).
    deleting: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
}

impl TemplateStore {
    /// The store in `data` (nothing is touched until used).
    pub fn new(data: DataDir) -> Self {
        TemplateStore {
            data,
            background_deletes: false,
            deleting: Default::default(),
        }
    }

    /// The same store, but a replaced or removed template (already renamed aside to
    /// `.old-*`, so gone for everyone) is deleted on a thread of its own instead of
    /// before [`TemplateStore::remove`] or a rebuild returns. For a long-lived process
    /// (the daemon): deleting a rootfs of thousands of files can take many seconds (on
    /// a filesystem mounted with `discard`, 15 s for 180 MiB here). A process that exits
    /// first leaves the `.old-*` directory to the next build or daemon start.
    pub fn deleting_in_background(mut self) -> Self {
        self.background_deletes = true;
        self
    }

    /// Deletes `old`, a template renamed aside (now, or on a thread of its own).
    fn delete_aside(&self, old: PathBuf) -> Result<(), TemplateError> {
        if !self.background_deletes {
            return remove_tree(&old);
        }
        let deleting = self.deleting.clone();
        lock_set(&deleting).insert(old.clone());
        let spawned = std::thread::Builder::new()
            .name("template-delete".into())
            .spawn({
                let old = old.clone();
                let deleting = deleting.clone();
                move || {
                    if let Err(e) = remove_tree(&old) {
                        // The next build or daemon start deletes what is left.
                        tracing::warn!("cannot delete {}: {e}", old.display());
                    }
                    lock_set(&deleting).remove(&old);
                }
            });
        spawned.map(|_| ()).map_err(|e| {
            lock_set(&deleting).remove(&old);
            TemplateError::io("start a thread to delete", self.dir(), e)
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &DataDir {
        &self.data
    }

    /// `<data>/templates`.
    pub fn dir(&self) -> PathBuf {
        self.data.templates()
    }

    /// The installed template called `name`, or else the one that lists `name` among
    /// its aliases. Names take precedence: an alias never hides a template of that name,
    /// not even a corrupt one. If several templates claim the alias, the first by name
    /// wins.
    ///
    /// [`TemplateError::NotFound`] if neither exists; [`TemplateError::Corrupt`] as for
    /// [`TemplateStore::get_by_name`].
    pub fn get(&self, name: &TemplateName) -> Result<Template, TemplateError> {
        match self.get_by_name(name) {
            Err(TemplateError::NotFound { .. }) => {}
            found => return found,
        }
        let mut claims = self
            .list()?
            .into_iter()
            .filter(|t| t.meta.aliases.iter().any(|a| a == name.as_str()));
        let found = claims.next().ok_or_else(|| TemplateError::NotFound {
            name: name.to_string(),
        })?;
        if let Some(other) = claims.next() {
            tracing::warn!(
                alias = %name,
                "templates '{}' and '{}' both claim the alias; using the first",
                found.name,
                other.name
            );
        }
        Ok(found)
    }

    /// The installed template `name`, by name only (aliases are not considered).
    ///
    /// [`TemplateError::NotFound`] if there is no such directory or it has no
    /// `template.json`; [`TemplateError::Corrupt`] if `template.json` is unreadable,
    /// of a format version this crate does not read, or the root filesystem is missing.
    pub fn get_by_name(&self, name: &TemplateName) -> Result<Template, TemplateError> {
        let dir = self.data.template(name);
        let not_found = || TemplateError::NotFound {
            name: name.to_string(),
        };
        let corrupt = |reason: String| TemplateError::Corrupt {
            name: name.to_string(),
            reason,
        };
        let meta_path = dir.join(META_FILE);
        let text = match fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(corrupt(format!("cannot read {}: {e}", meta_path.display()))),
        };
        let meta: TemplateMeta = serde_json::from_str(&text)
            .map_err(|e| corrupt(format!("{} is not valid: {e}", meta_path.display())))?;
        if let Some(why) = meta.unsupported() {
            return Err(corrupt(format!("{} {why}", meta_path.display())));
        }
        let rootfs = dir.join(ROOTFS_DIR);
        if !fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
            return Err(corrupt(format!("{} is missing", rootfs.display())));
        }
        Ok(Template {
            name: name.clone(),
            dir,
            rootfs,
            meta,
        })
    }

    /// All installed templates, sorted by name. Directories that are not valid
    /// templates (and builds in progress) are skipped with a warning.
    pub fn list(&self) -> Result<Vec<Template>, TemplateError> {
        let dir = self.dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TemplateError::io("read directory", dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.ctx("read directory", &dir)?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name: TemplateName = match file_name.parse() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("ignoring {}: {e}", entry.path().display());
                    continue;
                }
            };
            match self.get_by_name(&name) {
                Ok(t) => out.push(t),
                Err(e) => tracing::warn!("ignoring {}: {e}", entry.path().display()),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes the template `name` (by name, not alias), valid or not. Waits for a build
    /// in progress. Refuses ([`TemplateError::HasChildren`]) while other installed
    /// templates are layers on it.
    ///
    /// The template disappears atomically (renamed aside, then deleted). Sandboxes still
    /// using it as one of their layers must be gone first; that is the caller's concern.
    pub fn remove(&self, name: &TemplateName) -> Result<(), TemplateError> {
        let dir = self.data.template(name);
        if fs::symlink_metadata(&dir).is_err() {
            return Err(TemplateError::NotFound {
                name: name.to_string(),
            });
        }
        let _lock = self.lock(&mut |_| {})?;
        let children: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|t| t.parent() == Some(name.as_str()))
            .map(|t| format!("'{}'", t.name))
            .collect();
        if !children.is_empty() {
            return Err(TemplateError::HasChildren {
                name: name.to_string(),
                children: children.join(", "),
            });
        }
        let aside = self
            .dir()
            .join(format!("{OLD_PREFIX}{name}-{}", random_suffix()));
        match fs::rename(&dir, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::NotFound {
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(TemplateError::io("rename", dir, e)),
        }
        self.delete_aside(aside)
    }

    /// Deletes what interrupted builds and removals left (`.build-*`, `.old-*`), unless a
    /// build or removal is running now (then it is theirs, and the next build cleans
    /// up). Returns the paths removed. The daemon calls this on start, after a restart
    /// cut a build short.
    pub fn remove_leftovers(&self) -> Result<Vec<PathBuf>, TemplateError> {
        let dir = self.dir();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .ctx("open", &path)?;
        let _lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(Vec::new()),
            Err((_, e)) => return Err(TemplateError::io("lock", path, e.into())),
        };
        let mut removed = Vec::new();
        self.remove_stale(&mut |e| {
            if let BuildEvent::Log(line) = e {
                removed.push(PathBuf::from(line.trim_start_matches("removing leftover ")));
            }
        })?;
        Ok(removed)
    }

    /// Takes the store's exclusive lock, waiting (and saying so) if another build or
    /// removal holds it. Released when the returned value is dropped.
    pub(crate) fn lock(
        &self,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<Flock<File>, TemplateError> {
        let dir = self.dir();
        create_dirs(&dir)?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .ctx("open", &path)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((file, Errno::EWOULDBLOCK)) => file,
            Err((_, e)) => return Err(TemplateError::io("lock", path, e.into())),
        };
        on_event(BuildEvent::Log(format!(
            "waiting for another template build or removal to finish (lock {})",
            path.display()
        )));
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| TemplateError::io("lock", path, e.into()))
    }

    /// The installed template `name` if it was built with `recipe_hash` and
    /// `uid_shift` and, for a layer, still fits its parents ([`Template::layers`]);
    /// `None` if it is missing, corrupt, from another recipe or on a rebuilt parent.
    pub(crate) fn current(
        &self,
        name: &TemplateName,
        recipe_hash: &str,
        uid_shift: u32,
    ) -> Option<Template> {
        self.get_by_name(name).ok().filter(|t| {
            t.meta.recipe_hash == recipe_hash
                && t.meta.uid_shift == uid_shift
                && (t.parent().is_none() || t.layers(self).is_ok())
        })
    }

    /// Builds and installs the template `name` atomically.
    ///
    /// Under the store lock: unless `rebuild`, returns the installed template if it is
    /// current; removes stale `.build-*`/`.old-*` directories; runs `build` on a fresh
    /// `.build-<name>-<random>/` directory (which must leave `rootfs/` in it and return
    /// the metadata); writes `template.json` last and renames the directory into place,
    /// replacing (then deleting) an existing template. On any failure the build
    /// directory is removed.
    pub(crate) fn install(
        &self,
        name: &TemplateName,
        recipe_hash: &str,
        uid_shift: u32,
        rebuild: bool,
        on_event: &mut dyn FnMut(BuildEvent),
        build: &mut BuildStep<'_>,
    ) -> Result<BuildOutcome, TemplateError> {
        let _lock = self.lock(on_event)?;
        if !rebuild {
            // Another build may have finished while we waited for the lock.
            if let Some(t) = self.current(name, recipe_hash, uid_shift) {
                return Ok(BuildOutcome::UpToDate(t));
            }
        }
        self.install_locked(name, on_event, build)
            .map(BuildOutcome::Built)
    }

    /// Like [`TemplateStore::install`], but only if no template `name` exists: checked
    /// under the store lock, so two builds cannot both take the name.
    pub(crate) fn install_new(
        &self,
        name: &TemplateName,
        on_event: &mut dyn FnMut(BuildEvent),
        build: &mut BuildStep<'_>,
    ) -> Result<Template, TemplateError> {
        let _lock = self.lock(on_event)?;
        if fs::symlink_metadata(self.data.template(name)).is_ok() {
            return Err(TemplateError::Exists {
                name: name.to_string(),
                reason: format!("exists already; remove it first with `cubicle tpl rm {name}`"),
            });
        }
        self.install_locked(name, on_event, build)
    }

    /// The part of an install after the lock is taken and the decision to build made.
    fn install_locked(
        &self,
        name: &TemplateName,
        on_event: &mut dyn FnMut(BuildEvent),
        build: &mut BuildStep<'_>,
    ) -> Result<Template, TemplateError> {
        self.remove_stale(on_event)?;

        let templates = self.dir();
        let build_dir = templates.join(format!("{BUILD_PREFIX}{name}-{}", random_suffix()));
        DirBuilder::new()
            .mode(0o755)
            .create(&build_dir)
            .ctx("create directory", &build_dir)?;
        let guard = RemoveOnDrop(Some(build_dir.clone()));
        // Explicitly, whatever the umask: sandboxes' root (an unprivileged host uid)
        // must be able to traverse into the template.
        set_mode(&build_dir, 0o755)?;

        let meta = build(&build_dir, on_event)?;
        let rootfs = build_dir.join(ROOTFS_DIR);
        if !fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
            return Err(TemplateError::io(
                "find",
                rootfs,
                std::io::Error::new(std::io::ErrorKind::NotFound, "the build left no rootfs"),
            ));
        }
        // The root filesystem must be on disk before template.json says it is complete,
        // or a crash could leave a "valid" template with truncated files.
        on_event(BuildEvent::Log(
            "syncing the root filesystem to disk".to_owned(),
        ));
        sync_fs(&rootfs)?;
        write_meta(&build_dir.join(META_FILE), &meta)?;

        let target = self.data.template(name);
        let old = if fs::symlink_metadata(&target).is_ok() {
            let aside = templates.join(format!("{OLD_PREFIX}{name}-{}", random_suffix()));
            fs::rename(&target, &aside).ctx("rename", &target)?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = fs::rename(&build_dir, &target) {
            if let Some(old) = &old {
                if let Err(e2) = fs::rename(old, &target) {
                    tracing::error!("cannot restore {}: {e2}", target.display());
                }
            }
            return Err(TemplateError::io("rename", build_dir, e));
        }
        guard.disarm();
        sync_dir(&templates);
        if let Some(old) = old {
            if let Err(e) = self.delete_aside(old) {
                // The new template is in place; the leftover goes with the next build.
                tracing::warn!("cannot delete the previous template: {e}");
            }
        }
        self.get_by_name(name)
    }

    /// Deletes `.build-*` and `.old-*` directories. Only call with the lock held: then
    /// they are leftovers of crashed or interrupted builds.
    fn remove_stale(&self, on_event: &mut dyn FnMut(BuildEvent)) -> Result<(), TemplateError> {
        let dir = self.dir();
        for entry in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let entry = entry.ctx("read directory", &dir)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let being_deleted = lock_set(&self.deleting).contains(&entry.path());
            if (name.starts_with(BUILD_PREFIX) || name.starts_with(OLD_PREFIX)) && !being_deleted {
                on_event(BuildEvent::Log(format!(
                    "removing leftover {}",
                    entry.path().display()
                )));
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// The set of directories being deleted (a panic while it was held leaves it usable).
fn lock_set(
    set: &std::sync::Mutex<std::collections::HashSet<PathBuf>>,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<PathBuf>> {
    set.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Creates `dir` and its parents with mode 0755 (sandboxes' root must be able to
/// traverse them to reach a template's root filesystem).
fn create_dirs(dir: &Path) -> Result<(), TemplateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .ctx("create directory", dir)?;
    set_mode(dir, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TemplateError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx("chmod", path)
}

fn write_meta(path: &Path, meta: &TemplateMeta) -> Result<(), TemplateError> {
    let mut json = serde_json::to_vec_pretty(meta)
        .map_err(|e| TemplateError::io("serialize", path, std::io::Error::other(e.to_string())))?;
    json.push(b'\n');
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o644)
        .open(path)
        .ctx("create", path)?;
    f.write_all(&json).ctx("write", path)?;
    f.sync_all().ctx("sync", path)?;
    set_mode(path, 0o644)
}

/// `syncfs(2)` on the file system holding `path`.
fn sync_fs(path: &Path) -> Result<(), TemplateError> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path).ctx("open", path)?;
    nix::unistd::syncfs(dir.as_raw_fd()).map_err(|e| TemplateError::io("sync", path, e.into()))
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!("cannot sync {}: {e}", dir.display());
    }
}

/// A short random-enough suffix for sibling directory names. Uniqueness matters only
/// among leftovers, as builds are serialized by the lock.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Deletes a directory tree, refusing if anything is mounted at or below it (a leaked
/// mount would otherwise let the deletion reach into the host's file systems).
pub(crate) fn remove_tree(path: &Path) -> Result<(), TemplateError> {
    if let Some(mount) = mount_below(path) {
        return Err(TemplateError::MountedInside {
            path: path.to_path_buf(),
            mount,
        });
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TemplateError::io("delete", path, e)),
    }
}

/// The first mount point of this thread's mount namespace at or below `path`.
fn mount_below(path: &Path) -> Option<PathBuf> {
    let path = fs::canonicalize(path).ok()?;
    let text = fs::read_to_string("/proc/thread-self/mountinfo")
        .or_else(|_| fs::read_to_string("/proc/self/mountinfo"))
        .ok()?;
    let found = mount_points(&text).find(|m| m.starts_with(&path));
    found
}

/// Mount points listed in a `/proc/self/mountinfo` text (field 5, octal-unescaped).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_octal(m)))
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .try_fold(0u16, |acc, c| {
                    (b'0'..=b'7')
                        .contains(c)
                        .then(|| acc * 8 + u16::from(c - b'0'))
                })
                .and_then(|v| u8::try_from(v).ok())
        });
        if let (b'\\', Some(byte)) = (b[i], octal) {
            out.push(byte);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deletes a directory when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = remove_tree(&path) {
                tracing::error!("cannot delete the failed build {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::mpsc;
    use std::time::Duration;

    fn store() -> (tempfile::TempDir, TemplateStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(DataDir::new(tmp.path().join("data")));
        (tmp, store)
    }

    fn name(s: &str) -> TemplateName {
        s.parse().unwrap()
    }

    fn meta(hash: &str) -> TemplateMeta {
        TemplateMeta {
            format_version: TemplateMeta::FORMAT_VERSION,
            recipe: "base".into(),
            recipe_hash: hash.into(),
            uid_shift: 7,
            built_at: "2026-05-20T14:31:02Z".into(),
            size_bytes: 10,
            file_count: 2,
            build_seconds: 0.1,
            mirror: "http://deb.debian.org/debian".into(),
            parent: None,
            parent_built_at: None,
            aliases: Vec::new(),
            code_interpreter: false,
            image: None,
            sandbox: Default::default(),
        }
    }

    /// Installs a hand-made template directory (no build involved).
    fn put(store: &TemplateStore, n: &str, json: Option<&str>, rootfs: bool) -> PathBuf {
        let dir = store.dir().join(n);
        fs::create_dir_all(&dir).unwrap();
        if rootfs {
            fs::create_dir_all(dir.join(ROOTFS_DIR)).unwrap();
        }
        if let Some(json) = json {
            fs::write(dir.join(META_FILE), json).unwrap();
        }
        dir
    }

    fn valid_json(hash: &str) -> String {
        serde_json::to_string(&meta(hash)).unwrap()
    }

    /// A fake build: writes `marker` into rootfs/ in milliseconds.
    fn fake_build<'a>(
        marker: &'static str,
        calls: &'a Cell<u32>,
    ) -> impl FnMut(&Path, &mut dyn FnMut(BuildEvent)) -> Result<TemplateMeta, TemplateError> + 'a
    {
        move |dir, on_event| {
            calls.set(calls.get() + 1);
            on_event(BuildEvent::Log(format!("building in {}", dir.display())));
            fs::create_dir(dir.join(ROOTFS_DIR)).unwrap();
            fs::write(dir.join(ROOTFS_DIR).join("marker"), marker).unwrap();
            Ok(meta(marker))
        }
    }

    fn leftovers(store: &TemplateStore) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(BUILD_PREFIX) || n.starts_with(OLD_PREFIX))
            .collect();
        v.sort();
        v
    }

    fn marker(t: &Template) -> String {
        fs::read_to_string(t.rootfs.join("marker")).unwrap()
    }

    #[test]
    fn get_reports_missing_and_corrupt_templates() {
        let (_tmp, store) = store();
        let err = store.get(&name("base")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "template 'base' is not built; run `cubicle tpl build base`"
        );
        assert_eq!(err.kind(), cubicle_core::ErrorKind::NotFound);

        put(&store, "nojson", None, true);
        assert!(matches!(
            store.get(&name("nojson")),
            Err(TemplateError::NotFound { .. })
        ));

        put(&store, "garbage", Some("{not json"), true);
        let err = store.get(&name("garbage")).unwrap_err();
        assert!(matches!(err, TemplateError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains("template.json is not valid"),
            "{err}"
        );

        let mut m = meta("h");
        m.format_version = 99;
        put(
            &store,
            "future",
            Some(&serde_json::to_string(&m).unwrap()),
            true,
        );
        let err = store.get(&name("future")).unwrap_err();
        assert!(err.to_string().contains("format version 99"), "{err}");

        put(&store, "norootfs", Some(&valid_json("h")), false);
        let err = store.get(&name("norootfs")).unwrap_err();
        assert!(err.to_string().contains("rootfs is missing"), "{err}");

        put(&store, "good", Some(&valid_json("h")), true);
        let t = store.get(&name("good")).unwrap();
        assert_eq!(t.meta, meta("h"));
        assert_eq!(t.rootfs, store.dir().join("good/rootfs"));
    }

    #[test]
    fn list_is_sorted_and_skips_non_templates() {
        let (_tmp, store) = store();
        assert!(store.list().unwrap().is_empty(), "no templates dir yet");
        put(&store, "zeta", Some(&valid_json("z")), true);
        put(&store, "alpha", Some(&valid_json("a")), true);
        put(&store, "broken", Some("[]"), true);
        put(&store, "half", None, true);
        put(&store, ".build-base-123abc", Some(&valid_json("b")), true);
        put(&store, "Upper", Some(&valid_json("u")), true);
        fs::write(store.dir().join(".lock"), b"").unwrap();
        fs::write(store.dir().join("file"), b"").unwrap();
        let names: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        assert_eq!(names, ["alpha", "zeta"]);
    }

    #[test]
    fn remove_deletes_valid_and_corrupt_templates() {
        let (_tmp, store) = store();
        put(&store, "good", Some(&valid_json("h")), true);
        put(&store, "broken", Some("nope"), true);
        store.remove(&name("good")).unwrap();
        store.remove(&name("broken")).unwrap();
        assert!(!store.dir().join("good").exists());
        assert!(!store.dir().join("broken").exists());
        assert!(leftovers(&store).is_empty());
        assert!(matches!(
            store.remove(&name("good")),
            Err(TemplateError::NotFound { .. })
        ));
    }

    #[test]
    fn install_builds_then_is_up_to_date_then_rebuilds() {
        let (_tmp, store) = store();
        let n = name("base");
        let calls = Cell::new(0);
        let mut events = Vec::new();

        let out = store
            .install(
                &n,
                "one",
                7,
                false,
                &mut |e| events.push(e),
                &mut fake_build("one", &calls),
            )
            .unwrap();
        let BuildOutcome::Built(t) = out else {
            panic!("expected Built, got {out:?}")
        };
        assert_eq!(marker(&t), "one");
        assert_eq!(t.meta.recipe_hash, "one");
        assert_eq!(store.get(&n).unwrap(), t);
        assert!(leftovers(&store).is_empty());
        assert!(matches!(&events[0], BuildEvent::Log(l) if l.contains("/.build-base-")));

        // Same hash: nothing is built.
        let out = store
            .install(
                &n,
                "one",
                7,
                false,
                &mut |_| {},
                &mut fake_build("x", &calls),
            )
            .unwrap();
        assert!(matches!(out, BuildOutcome::UpToDate(_)));
        assert_eq!(calls.get(), 1);
        // Another uid shift is not current.
        assert!(store.current(&n, "one", 8).is_none());

        // rebuild: replaced, the old one deleted.
        let out = store
            .install(
                &n,
                "one",
                7,
                true,
                &mut |_| {},
                &mut fake_build("two", &calls),
            )
            .unwrap();
        assert!(matches!(out, BuildOutcome::Built(_)));
        assert_eq!(marker(&store.get(&n).unwrap()), "two");
        assert!(leftovers(&store).is_empty());

        // A changed recipe hash rebuilds without --rebuild.
        let out = store
            .install(
                &n,
                "three",
                7,
                false,
                &mut |_| {},
                &mut fake_build("three", &calls),
            )
            .unwrap();
        assert!(matches!(out, BuildOutcome::Built(_)));
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn failed_build_leaves_nothing_and_keeps_the_old_template() {
        let (_tmp, store) = store();
        let n = name("base");
        let calls = Cell::new(0);
        store
            .install(
                &n,
                "one",
                7,
                false,
                &mut |_| {},
                &mut fake_build("one", &calls),
            )
            .unwrap();

        let mut failing = |dir: &Path, _: &mut dyn FnMut(BuildEvent)| {
            fs::create_dir_all(dir.join("rootfs/usr/bin")).unwrap();
            fs::write(dir.join("rootfs/usr/bin/half"), b"x").unwrap();
            Err(TemplateError::StepFailed {
                step: "configuring".into(),
                status: "exit status: 1".into(),
                tail: "  boom".into(),
            })
        };
        let err = store
            .install(&n, "two", 7, true, &mut |_| {}, &mut failing)
            .unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        assert_eq!(marker(&store.get(&n).unwrap()), "one");

        // A build that "succeeds" without producing a rootfs is refused, and cleaned.
        let mut empty = |_: &Path, _: &mut dyn FnMut(BuildEvent)| Ok(meta("x"));
        let err = store
            .install(&name("other"), "x", 7, false, &mut |_| {}, &mut empty)
            .unwrap_err();
        assert!(err.to_string().contains("left no rootfs"), "{err}");
        assert!(leftovers(&store).is_empty());
        assert!(!store.dir().join("other").exists());
    }

    #[test]
    fn stale_build_dirs_are_removed_by_the_next_build() {
        let (_tmp, store) = store();
        let stale = put(&store, ".build-base-deadbeef", None, true);
        fs::write(stale.join("rootfs/file"), b"x").unwrap();
        put(&store, ".old-base-feedface", Some(&valid_json("o")), true);
        let calls = Cell::new(0);
        let mut events = Vec::new();
        store
            .install(
                &name("base"),
                "one",
                7,
                false,
                &mut |e| events.push(e),
                &mut fake_build("one", &calls),
            )
            .unwrap();
        assert!(leftovers(&store).is_empty());
        let removed = events
            .iter()
            .filter(|e| matches!(e, BuildEvent::Log(l) if l.starts_with("removing leftover")))
            .count();
        assert_eq!(removed, 2);
        // A half-built directory is never listed.
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn background_deletes_finish_on_their_own_and_are_no_leftovers() {
        let (_tmp, store) = store();
        let store = store.deleting_in_background();
        put(&store, "gone", Some(&valid_json("g")), true);
        store.remove(&name("gone")).unwrap();
        assert!(!store.dir().join("gone").exists(), "removed at once");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !leftovers(&store).is_empty() {
            assert!(std::time::Instant::now() < deadline, "never deleted");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(lock_set(&store.deleting).is_empty());
        // A directory a thread is deleting is not a build's leftover to remove.
        let busy = put(&store, ".old-busy-0123", None, true);
        lock_set(&store.deleting).insert(busy.clone());
        store.remove_stale(&mut |_| {}).unwrap();
        assert!(busy.exists());
        lock_set(&store.deleting).clear();
        store.remove_stale(&mut |_| {}).unwrap();
        assert!(!busy.exists());
    }

    #[test]
    fn leftovers_are_removed_at_start_unless_a_build_runs() {
        let (_tmp, store) = store();
        // No templates directory at all: nothing to do.
        assert!(store.remove_leftovers().unwrap().is_empty());
        put(&store, ".build-x-0123", None, true);
        put(&store, ".old-y-4567", None, false);
        put_meta(&store, "kept", &meta("k"));
        // A build holds the lock: its directory is not touched.
        let held = store.lock(&mut |_| {}).unwrap();
        assert!(store.remove_leftovers().unwrap().is_empty());
        assert!(store.dir().join(".build-x-0123").exists());
        drop(held);
        let mut removed = store.remove_leftovers().unwrap();
        removed.sort();
        assert_eq!(
            removed,
            [
                store.dir().join(".build-x-0123"),
                store.dir().join(".old-y-4567")
            ]
        );
        assert!(leftovers(&store).is_empty());
        assert!(store.get(&name("kept")).is_ok());
    }

    #[test]
    fn concurrent_builds_wait_for_the_lock() {
        let (_tmp, store) = store();
        let held = store.lock(&mut |_| {}).unwrap();
        let (tx, rx) = mpsc::channel();
        let store2 = store.clone();
        let waiter = std::thread::spawn(move || {
            let calls = Cell::new(0);
            let out = store2.install(
                &name("base"),
                "one",
                7,
                false,
                &mut |e| {
                    let _ = tx.send(e);
                },
                &mut fake_build("one", &calls),
            );
            (
                out.map(|o| matches!(o, BuildOutcome::Built(_))),
                calls.get(),
            )
        });
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(&first, BuildEvent::Log(l) if l.starts_with("waiting for another")),
            "{first:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(!store.dir().join("base").exists(), "built while locked");
        drop(held);
        let (built, calls) = waiter.join().unwrap();
        assert!(built.unwrap());
        assert_eq!(calls, 1);
    }

    /// Installs a hand-made template from `meta` (with an empty rootfs/).
    fn put_meta(store: &TemplateStore, n: &str, meta: &TemplateMeta) -> PathBuf {
        put(store, n, Some(&serde_json::to_string(meta).unwrap()), true)
    }

    /// Metadata of a layer on `parent`, built on the parent's build of `parent_built_at`.
    fn layer_meta(parent: &str, parent_built_at: &str) -> TemplateMeta {
        TemplateMeta {
            format_version: 2,
            parent: Some(parent.into()),
            parent_built_at: Some(parent_built_at.into()),
            ..meta("layer")
        }
    }

    const BUILT: &str = "2026-05-20T14:31:02Z";

    #[test]
    fn layers_are_resolved_top_first() {
        let (_tmp, store) = store();
        put_meta(&store, "base", &meta("b"));
        put_meta(&store, "mid", &layer_meta("base", BUILT));
        put_meta(&store, "top", &layer_meta("mid", BUILT));
        let rootfs = |n: &str| store.dir().join(n).join(ROOTFS_DIR);

        let base = store.get(&name("base")).unwrap();
        assert_eq!(base.parent(), None);
        assert_eq!(base.layers(&store).unwrap(), [rootfs("base")]);
        let mid = store.get(&name("mid")).unwrap();
        assert_eq!(mid.parent(), Some("base"));
        assert_eq!(mid.layers(&store).unwrap(), [rootfs("mid"), rootfs("base")]);
        let top = store.get(&name("top")).unwrap();
        assert_eq!(
            top.layers(&store).unwrap(),
            [rootfs("top"), rootfs("mid"), rootfs("base")]
        );
    }

    #[test]
    fn broken_parents_are_clear_errors() {
        let (_tmp, store) = store();
        let broken = |n: &str| {
            let err = store.get(&name(n)).unwrap().layers(&store).unwrap_err();
            assert!(matches!(err, TemplateError::BrokenParent { .. }), "{err}");
            assert_eq!(err.kind(), cubicle_core::ErrorKind::NotFound);
            err.to_string()
        };

        put_meta(&store, "orphan", &layer_meta("gone", BUILT));
        assert_eq!(
            broken("orphan"),
            "template 'orphan' cannot be used: its parent 'gone': it is not built; \
             rebuild it with `cubicle tpl build orphan`"
        );

        put(&store, "garbage", Some("{"), true);
        put_meta(&store, "on-garbage", &layer_meta("garbage", BUILT));
        let msg = broken("on-garbage");
        assert!(
            msg.contains("its parent 'garbage'") && msg.contains("corrupt"),
            "{msg}"
        );

        put_meta(&store, "base", &meta("b"));
        put_meta(&store, "stale", &layer_meta("base", "2026-01-01T00:00:00Z"));
        let msg = broken("stale");
        assert!(
            msg.contains("has been rebuilt since (2026-05-20T14:31:02Z)"),
            "{msg}"
        );
        put_meta(
            &store,
            "unknown-build",
            &TemplateMeta {
                parent_built_at: None,
                ..layer_meta("base", BUILT)
            },
        );
        assert!(broken("unknown-build").contains("an unknown time"));

        put_meta(
            &store,
            "shifted",
            &TemplateMeta {
                uid_shift: 8,
                ..layer_meta("base", BUILT)
            },
        );
        assert!(broken("shifted").contains("uid shift is 7"));

        // Loops cannot come from built-in recipes, but template.json files can say so.
        put_meta(&store, "a", &layer_meta("b", BUILT));
        put_meta(&store, "b", &layer_meta("a", BUILT));
        assert!(broken("a").contains("the parent chain loops: a -> b -> a"));
        put_meta(&store, "self", &layer_meta("self", BUILT));
        assert!(broken("self").contains("self -> self"));

        // Too deep: l0 <- l1 <- ... <- l9.
        put_meta(&store, "l0", &meta("b"));
        for i in 1..=crate::recipe::MAX_LAYERS + 1 {
            put_meta(
                &store,
                &format!("l{i}"),
                &layer_meta(&format!("l{}", i - 1), BUILT),
            );
        }
        let deepest = format!("l{}", crate::recipe::MAX_LAYERS - 1);
        assert_eq!(
            store
                .get(&name(&deepest))
                .unwrap()
                .layers(&store)
                .unwrap()
                .len(),
            crate::recipe::MAX_LAYERS
        );
        let too_deep = format!("l{}", crate::recipe::MAX_LAYERS);
        assert!(broken(&too_deep).contains("more than 8 layers"));
    }

    #[test]
    fn aliases_find_templates_but_names_come_first() {
        let (_tmp, store) = store();
        let with_aliases = |aliases: &[&str]| TemplateMeta {
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            ..meta("h")
        };
        put_meta(
            &store,
            "code-interpreter",
            &with_aliases(&["code-interpreter-v1"]),
        );
        let t = store.get(&name("code-interpreter-v1")).unwrap();
        assert_eq!(t.name.as_str(), "code-interpreter");
        assert_eq!(t.dir, store.dir().join("code-interpreter"));
        // Only by name: aliases are not names.
        assert!(matches!(
            store.get_by_name(&name("code-interpreter-v1")),
            Err(TemplateError::NotFound { .. })
        ));
        assert!(matches!(
            store.get(&name("nope")),
            Err(TemplateError::NotFound { .. })
        ));

        // A template named like another's alias wins.
        put_meta(&store, "alpha", &with_aliases(&["beta", "shared"]));
        put_meta(&store, "beta", &meta("h"));
        assert_eq!(store.get(&name("beta")).unwrap().name.as_str(), "beta");
        // Even a corrupt one: the alias does not paper over it.
        put_meta(&store, "zeta", &with_aliases(&["gamma", "shared"]));
        put(&store, "gamma", Some("{"), true);
        assert!(matches!(
            store.get(&name("gamma")),
            Err(TemplateError::Corrupt { .. })
        ));
        // Claimed twice: the first by name.
        assert_eq!(store.get(&name("shared")).unwrap().name.as_str(), "alpha");
        // Removal is by name only.
        assert!(matches!(
            store.remove(&name("code-interpreter-v1")),
            Err(TemplateError::NotFound { .. })
        ));
    }

    #[test]
    fn a_layer_is_current_only_on_the_parent_it_was_built_on() {
        let (_tmp, store) = store();
        put_meta(&store, "base", &meta("b"));
        put_meta(&store, "child", &layer_meta("base", BUILT));
        assert!(store.current(&name("child"), "layer", 7).is_some());
        assert!(store.current(&name("child"), "other", 7).is_none());
        // The parent is rebuilt: same recipe, another build.
        put_meta(
            &store,
            "base",
            &TemplateMeta {
                built_at: "2026-06-01T00:00:00Z".into(),
                ..meta("b")
            },
        );
        assert!(store.current(&name("child"), "layer", 7).is_none());
        // Without its parent it is not current either.
        fs::remove_dir_all(store.dir().join("base")).unwrap();
        assert!(store.current(&name("child"), "layer", 7).is_none());
    }

    #[test]
    fn a_parent_is_not_removed_under_its_children() {
        let (_tmp, store) = store();
        put_meta(&store, "base", &meta("b"));
        put_meta(&store, "child", &layer_meta("base", BUILT));
        let err = store.remove(&name("base")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "template 'base' is the parent of 'child'; remove it first"
        );
        assert_eq!(err.kind(), cubicle_core::ErrorKind::Conflict);
        assert!(store.get(&name("base")).is_ok());
        store.remove(&name("child")).unwrap();
        store.remove(&name("base")).unwrap();
    }

    #[test]
    fn mountinfo_parsing() {
        let text = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /var/lib/with\\040space rw - tmpfs tmpfs rw
31 22 0:26 / /proc rw - proc proc rw
";
        let points: Vec<PathBuf> = mount_points(text).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/"),
                PathBuf::from("/var/lib/with space"),
                PathBuf::from("/proc")
            ]
        );
        assert_eq!(unescape_octal("a\\134b\\7"), "a\\b\\7");
    }

    #[test]
    fn remove_tree_refuses_mounts_inside() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mounting a tmpfs needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir_all(victim.join("mnt")).unwrap();
        let v2 = victim.clone();
        let (refused, still_there) = std::thread::spawn(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let none = None::<&str>;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
            let mnt = v2.join("mnt");
            mount(Some("tmpfs"), &mnt, Some("tmpfs"), MsFlags::empty(), none).unwrap();
            fs::write(mnt.join("precious"), b"x").unwrap();
            let err = remove_tree(&v2).unwrap_err();
            (
                matches!(err, TemplateError::MountedInside { .. }),
                mnt.join("precious").exists(),
            )
        })
        .join()
        .unwrap();
        assert!(refused && still_there);
        remove_tree(&victim).unwrap();
        assert!(!victim.exists());
    }
}
