//! The writable-layer limit (`--writable-layer-size`): owns the filesystems that hold
//! limited sandboxes' writable layers — their image files, loop devices and mounts.
//!
//! Why a filesystem per sandbox: the data dir's own filesystem (ext4 here) has no
//! project quotas and cannot be remounted with them; this kernel has no XFS quota support
//! (`CONFIG_XFS_QUOTA` is off: `prjquota` mounts fail); ext4 project quotas and btrfs
//! qgroups answer an exceeded limit with EDQUOT ("Disk quota exceeded"), not the ENOSPC a
//! full disk gives; a tmpfs would hold the layer in RAM. A filesystem of exactly the
//! limit's size answers ENOSPC by itself, for root inside too (no reserved blocks), and
//! it can only hold what fits in it.
//!
//! A sandbox with a limit gets `sandboxes/<id>/layer.img`, a sparse copy of a blank ext4
//! image of that size (formatted once per size with `mkfs.ext4` into
//! `<data>/volumes/blank-<MiB>.ext4`, ~140 KiB written; no journal, since a layer does
//! not outlive its sandbox and checkpoints copy it out), attached to a loop device with
//! AUTOCLEAR and mounted with `discard` at `sandboxes/<id>/layer`, which holds the
//! overlay's `upper/` and `work/`. The image is sparse, so the host pays for what the
//! sandbox wrote, never more than the limit; `discard` punches deleted files' blocks out
//! of the image again. The sandbox cannot grow or remount it: it has no capability over
//! the host's mount namespace or the loop device. Destroying the sandbox detaches the
//! mount (lazily: its own mount namespace may still be going away), and the loop device
//! clears itself when the last mount of it is gone.
//!
//! This is the one mount a sandbox has in the host's mount namespace. It is made before
//! the sandbox's namespaces are cloned, so they (and a restore's) see it; a template
//! zygote's private mount namespace does not, so limited code-interpreter sandboxes are
//! started the ordinary way. Sandboxes without a limit never touch any of this.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cubicle_core::DataDir;

/// Smallest accepted limit (MiB).
pub const MIN_LIMIT_MIB: u64 = cubicle_core::Limits::WRITABLE_LAYER_MIB.0;
/// Largest accepted limit (MiB; 16 TiB is ext4's limit with 4 KiB blocks).
pub const MAX_LIMIT_MIB: u64 = cubicle_core::Limits::WRITABLE_LAYER_MIB.1;
/// Bytes per inode of a layer filesystem (files it can hold: 64 per MiB).
const BYTES_PER_INODE: u64 = 16 * 1024;

/// Why a sandbox's limited layer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The limit is outside what is accepted.
    #[error(
        "writable layer size {0} MiB is out of range ({MIN_LIMIT_MIB} MiB to {MAX_LIMIT_MIB} MiB)"
    )]
    Limit(u64),
    /// `mkfs.ext4` is missing or failed.
    #[error(
        "format the blank layer image {path} with mkfs.ext4 (Debian package e2fsprogs): {message}"
    )]
    Format {
        /// The image file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A system call on the layer's image, loop device or mount failed.
    #[error("writable layer: {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> QuotaError + 'a {
    move |source| QuotaError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Checks a writable-layer limit in MiB.
pub fn check_limit(mib: u64) -> Result<(), QuotaError> {
    cubicle_core::Limits::check_writable_layer_mib(mib).map_err(|_| QuotaError::Limit(mib))
}

/// A limited sandbox's layer filesystem, by the sandbox's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFs {
    /// `sandboxes/<id>/layer.img`.
    pub image: PathBuf,
    /// `sandboxes/<id>/layer`, where it is mounted.
    pub mount: PathBuf,
}

impl LayerFs {
    /// Where a sandbox directory's layer filesystem is (whether or not it has one).
    pub fn of(sandbox_dir: &Path) -> LayerFs {
        LayerFs {
            image: sandbox_dir.join("layer.img"),
            mount: sandbox_dir.join("layer"),
        }
    }

    /// Whether the sandbox has one (its image exists).
    pub fn exists(&self) -> bool {
        self.image.exists()
    }

    /// The overlay's writable layer on it.
    pub fn upper(&self) -> PathBuf {
        self.mount.join("upper")
    }

    /// The overlay's work directory on it.
    pub fn work(&self) -> PathBuf {
        self.mount.join("work")
    }

    /// Makes the filesystem (`limit_mib` MiB, from the data dir's blank image of that
    /// size), mounts it and creates `upper/` and `work/` owned by the sandbox's root (host
    /// uid `shift`). On error, whatever was made is undone.
    pub fn create(&self, data: &DataDir, limit_mib: u64, shift: u32) -> Result<(), QuotaError> {
        check_limit(limit_mib)?;
        let blank = blank_image(data, limit_mib)?;
        let made = self.create_from(&blank, shift);
        if made.is_err() {
            self.remove();
        }
        made
    }

    fn create_from(&self, blank: &Path, shift: u32) -> Result<(), QuotaError> {
        copy_sparse(blank, &self.image).map_err(io_err("copy", blank))?;
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&self.mount)
            .map_err(io_err("create", &self.mount))?;
        let (device, fd) = raw::loop_attach(&self.image)
            .map_err(io_err("attach a loop device to", &self.image))?;
        nix::mount::mount(
            Some(&device),
            &self.mount,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            Some("discard,noinit_itable"),
        )
        .map_err(|e| io_err("mount", &self.mount)(e.into()))?;
        // The mount holds the device now; closing ours leaves AUTOCLEAR to the unmount.
        drop(fd);
        let perms = std::os::unix::fs::PermissionsExt::from_mode(0o711);
        std::fs::set_permissions(&self.mount, perms).map_err(io_err("chmod", &self.mount))?;
        for sub in [self.upper(), self.work()] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&sub)
                .map_err(io_err("create", &sub))?;
            std::os::unix::fs::chown(&sub, Some(shift), Some(shift))
                .map_err(io_err("chown", &sub))?;
        }
        Ok(())
    }

    /// Detaches the mount (if mounted) and removes the image; the loop device clears
    /// itself once no mount of it is left. Best effort, logged.
    pub fn remove(&self) {
        match nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {}
            // Not mounted (a failed create, or after a reboot), or already gone.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                tracing::warn!(mount = %self.mount.display(), error = %e, "unmounting a writable layer")
            }
        }
        for result in [
            std::fs::remove_dir(&self.mount),
            std::fs::remove_file(&self.image),
        ] {
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %self.mount.display(), error = %e, "removing a writable layer")
                }
            }
        }
    }

    /// Bytes in use and total bytes of the mounted filesystem.
    pub fn usage(&self) -> io::Result<(u64, u64)> {
        let s = nix::sys::statvfs::statvfs(&self.mount)?;
        let frag = s.fragment_size() as u64;
        let total = s.blocks() as u64 * frag;
        Ok((total - s.blocks_free() as u64 * frag, total))
    }
}

/// Ready-made layer filesystems per (size, owner), so that a limited create takes one
/// (a rename and an `MS_MOVE`, ~0.1 ms) instead of making one (~10–20 ms here: setting
/// up a loop device and mounting ext4 each wait for the kernel's RCU and per-CPU
/// drains); and the slow end of a limited sandbox's layer (unmount, loop tear-down,
/// ~40 ms), which a destroy hands to a background thread after moving the mount out of
/// the sandbox's directory.
///
/// Both live under `<data>/volumes/`: `pool/<pid>-<token>-<MiB>-<n>/` (a ready layer)
/// and `trash/<pid>-<token>-<n>/` (one being removed), named by the process and the
/// pool, so a new pool removes only what a dead process left. [`LayerPool::drain`]
/// removes a pool's own entries and waits for its background work (tests and
/// shut-downs); a pool keeps at most [`POOL_DEPTH`] layers of each size it was asked
/// for.
#[derive(Debug)]
pub struct LayerPool {
    data: DataDir,
    prefix: String,
    state: std::sync::Mutex<PoolState>,
    idle: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Ready layers by (MiB, owner uid): their slot directories.
    ready: std::collections::HashMap<(u64, u32), Vec<PathBuf>>,
    /// Layers being made, by (MiB, owner uid).
    filling: std::collections::HashMap<(u64, u32), usize>,
    /// Background jobs running (fills and removals).
    busy: usize,
    /// Set by `drain`: no more fills.
    closed: bool,
    /// For unique slot names.
    next: u64,
}

/// Ready layers a pool keeps per size.
pub const POOL_DEPTH: usize = 2;

impl LayerPool {
    /// A pool for the data dir; removes what dead processes' pools left there.
    pub fn new(data: DataDir) -> LayerPool {
        let token = raw::random_u32().unwrap_or_else(|_| std::process::id());
        let pool = LayerPool {
            prefix: format!("{}-{token:08x}", std::process::id()),
            data,
            state: Default::default(),
            idle: Default::default(),
        };
        for dir in [pool.pool_dir(), pool.trash_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let pid = name
                    .to_str()
                    .and_then(|n| n.split('-').next()?.parse::<u32>().ok());
                if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    remove_slot(&entry.path());
                }
            }
        }
        pool
    }

    fn pool_dir(&self) -> PathBuf {
        self.data.root().join("volumes/pool")
    }

    fn trash_dir(&self) -> PathBuf {
        self.data.root().join("volumes/trash")
    }

    fn slot_name(&self, state: &mut PoolState, what: &str) -> String {
        state.next += 1;
        format!("{}-{what}{}", self.prefix, state.next)
    }

    /// Gives `layer` a filesystem of `mib` MiB whose `upper`/`work` belong to `shift`:
    /// a ready one if the pool has one, else a new one. The caller tops the pool up
    /// ([`LayerPool::top_up`]) once its sandbox runs: making a layer while a sandbox
    /// starts slows the start down (both take the kernel's mount locks).
    pub fn provide(
        self: &std::sync::Arc<Self>,
        layer: &LayerFs,
        mib: u64,
        shift: u32,
    ) -> Result<(), QuotaError> {
        check_limit(mib)?;
        let key = (mib, shift);
        let slot = self
            .state
            .lock()
            .expect("layer pool")
            .ready
            .get_mut(&key)
            .and_then(Vec::pop);
        let provided = match slot {
            Some(slot) => match adopt(&slot, layer) {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(slot = %slot.display(), error = %e, "a ready layer could not be used; making one");
                    remove_slot(&slot);
                    layer.create(&self.data, mib, shift)
                }
            },
            None => layer.create(&self.data, mib, shift),
        };
        provided
    }

    /// Starts making layers of `mib` MiB for `shift` in the background until the pool
    /// holds [`POOL_DEPTH`] of them.
    pub fn top_up(self: &std::sync::Arc<Self>, mib: u64, shift: u32) {
        let key = (mib, shift);
        let mut state = self.state.lock().expect("layer pool");
        if state.closed {
            return;
        }
        let have = state.ready.get(&key).map_or(0, Vec::len)
            + state.filling.get(&key).copied().unwrap_or(0);
        for _ in have..POOL_DEPTH {
            let slot = self
                .pool_dir()
                .join(self.slot_name(&mut state, &format!("{}-", key.0)));
            *state.filling.entry(key).or_default() += 1;
            state.busy += 1;
            let pool = self.clone();
            self.background(move || {
                let made = pool.make_slot(&slot, key);
                let mut state = pool.state.lock().expect("layer pool");
                *state.filling.entry(key).or_default() -= 1;
                match made {
                    Ok(()) if !state.closed => state.ready.entry(key).or_default().push(slot),
                    Ok(()) => remove_slot(&slot),
                    Err(e) => {
                        tracing::warn!(error = %e, "making a ready writable layer");
                        remove_slot(&slot);
                    }
                }
                state.busy -= 1;
                pool.idle.notify_all();
            });
        }
    }

    fn make_slot(&self, slot: &Path, (mib, shift): (u64, u32)) -> Result<(), QuotaError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(slot)
            .map_err(io_err("create", slot))?;
        LayerFs::of(slot).create(&self.data, mib, shift)
    }

    /// Ends a sandbox's layer: its mount and image move out of the sandbox's directory
    /// at once (so that can be removed), the slow unmount runs in the background.
    pub fn discard(self: &std::sync::Arc<Self>, layer: &LayerFs) {
        let slot = {
            let mut state = self.state.lock().expect("layer pool");
            let name = self.slot_name(&mut state, "t");
            state.busy += 1;
            self.trash_dir().join(name)
        };
        let moved = (|| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&slot)?;
            let target = LayerFs::of(&slot);
            std::fs::create_dir(&target.mount)?;
            nix::mount::mount(
                Some(&layer.mount),
                &target.mount,
                None::<&str>,
                nix::mount::MsFlags::MS_MOVE,
                None::<&str>,
            )?;
            std::fs::rename(&layer.image, &target.image)?;
            let _ = std::fs::remove_dir(&layer.mount);
            Ok::<_, io::Error>(())
        })();
        if moved.is_err() {
            // Not mounted (a failed create) or already gone: nothing slow to do.
            layer.remove();
        }
        let pool = self.clone();
        self.background(move || {
            remove_slot(&slot);
            let mut state = pool.state.lock().expect("layer pool");
            state.busy -= 1;
            pool.idle.notify_all();
        });
    }

    /// Removes the pool's ready layers and waits until its background work is done; no
    /// more are made. Sandboxes can still be given (new) layers.
    pub fn drain(&self) {
        let mut state = self.state.lock().expect("layer pool");
        state.closed = true;
        for slot in state.ready.drain().flat_map(|(_, slots)| slots) {
            remove_slot(&slot);
        }
        while state.busy > 0 {
            state = self.idle.wait(state).expect("layer pool");
        }
    }

    /// Runs `job` on a thread of its own (not tokio's blocking pool: `drain` waits for
    /// it, possibly while a tokio runtime shuts down).
    fn background(&self, job: impl FnOnce() + Send + 'static) {
        let job = std::sync::Arc::new(std::sync::Mutex::new(Some(job)));
        let run = {
            let job = job.clone();
            move || {
                if let Some(job) = job.lock().expect("job").take() {
                    job();
                }
            }
        };
        if std::thread::Builder::new()
            .name("cubicle-layer".into())
            .spawn(run)
            .is_err()
        {
            if let Some(job) = job.lock().expect("job").take() {
                job();
            }
        }
    }
}

/// Moves the ready layer in `slot` to `layer` (image renamed, mount moved).
fn adopt(slot: &Path, layer: &LayerFs) -> io::Result<()> {
    let ready = LayerFs::of(slot);
    std::fs::rename(&ready.image, &layer.image)?;
    let moved = std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&layer.mount)
        .and_then(|()| {
            nix::mount::mount(
                Some(&ready.mount),
                &layer.mount,
                None::<&str>,
                nix::mount::MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(io::Error::from)
        });
    if let Err(e) = moved {
        let _ = std::fs::rename(&layer.image, &ready.image);
        let _ = std::fs::remove_dir(&layer.mount);
        return Err(e);
    }
    let _ = std::fs::remove_dir(&ready.mount);
    let _ = std::fs::remove_dir(slot);
    Ok(())
}

/// Removes a pool or trash slot: its layer (unmounted) and the directory.
fn remove_slot(slot: &Path) {
    LayerFs::of(slot).remove();
    if let Err(e) = std::fs::remove_dir(slot) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(slot = %slot.display(), error = %e, "removing a layer slot");
        }
    }
}

/// The data dir's blank layer image of `mib` MiB, formatted on first use (under a
/// temporary name, then renamed: concurrent creates may both format, and either result
/// is a valid blank image).
fn blank_image(data: &DataDir, mib: u64) -> Result<PathBuf, QuotaError> {
    let dir = data.root().join("volumes");
    let image = dir.join(format!("blank-{mib}.ext4"));
    if image.exists() {
        return Ok(image);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err("create", &dir))?;
    let tmp = dir.join(format!(
        ".blank-{mib}.{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    file.set_len(mib << 20).map_err(io_err("size", &tmp))?;
    drop(file);
    let started = std::time::Instant::now();
    let inodes = ((mib << 20) / BYTES_PER_INODE).to_string();
    let out = std::process::Command::new("mkfs.ext4")
        // No journal (a layer dies with its sandbox), no reserved blocks (root inside
        // gets exactly the limit), 4 KiB blocks, no discard of the fresh sparse file, and
        // inode tables left unwritten: they are holes of the image, which read as the
        // zeros they would be filled with (the mount's `noinit_itable` keeps the kernel
        // from writing them later), so a blank image is ~150 KiB whatever its size.
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-b",
            "4096",
            "-N",
        ])
        .arg(&inodes)
        .args(["-E", "nodiscard,lazy_itable_init=1"])
        .arg(&tmp)
        .output();
    let failed = |message: String| {
        let _ = std::fs::remove_file(&tmp);
        QuotaError::Format {
            path: image.clone(),
            message,
        }
    };
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(failed(format!(
                "{}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )))
        }
        Err(e) => return Err(failed(e.to_string())),
    }
    std::fs::rename(&tmp, &image).map_err(io_err("rename", &tmp))?;
    tracing::info!(image = %image.display(), took = ?started.elapsed(), "blank layer image formatted");
    Ok(image)
}

/// Copies `from` to `to` (which must not exist) keeping holes: only the data extents
/// are copied (in the kernel), the rest stays unallocated.
fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    let mut source = File::open(from)?;
    let len = source.metadata()?.len();
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    target.set_len(len)?;
    let fd = source.as_raw_fd();
    let mut offset: i64 = 0;
    while (offset as u64) < len {
        let data = match nix::unistd::lseek(fd, offset, nix::unistd::Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = nix::unistd::lseek(fd, data, nix::unistd::Whence::SeekHole)?;
        source.seek(SeekFrom::Start(data as u64))?;
        target.seek(SeekFrom::Start(data as u64))?;
        io::copy(&mut (&mut source).take((hole - data) as u64), &mut target)?;
        offset = hole;
    }
    Ok(())
}

/// The raw system calls: loop devices.
mod raw {
    use super::*;

    /// `struct loop_info64` (linux/loop.h).
    #[repr(C)]
    struct LoopInfo64 {
        lo_device: u64,
        lo_inode: u64,
        lo_rdevice: u64,
        lo_offset: u64,
        lo_sizelimit: u64,
        lo_number: u32,
        lo_encrypt_type: u32,
        lo_encrypt_key_size: u32,
        lo_flags: u32,
        lo_file_name: [u8; 64],
        lo_crypt_name: [u8; 64],
        lo_encrypt_key: [u8; 32],
        lo_init: [u64; 2],
    }

    /// `struct loop_config` (linux/loop.h).
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: LoopInfo64,
        reserved: [u64; 8],
    }

    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    const LO_FLAGS_AUTOCLEAR: u32 = 4;
    /// The loop device's logical block size: the filesystem's, so mounting it does not
    /// change the device's block size (which drains every CPU's page lists).
    const BLOCK_SIZE: u32 = 4096;

    fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
        if ret == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// A block device opened read-write.
    pub struct Device(pub OwnedFd);

    pub fn open_rw(path: &Path) -> io::Result<Device> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(Device(file.into()))
    }

    /// Attaches `image` to a free loop device with AUTOCLEAR; returns its path and the
    /// device, open (the loop clears itself at the last close after that).
    pub fn loop_attach(image: &Path) -> io::Result<(PathBuf, Device)> {
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)?;
        let control = open_rw(Path::new("/dev/loop-control"))?;
        let mut last = io::Error::other("no free loop device");
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = check(unsafe {
                libc::ioctl(control.0.as_raw_fd(), LOOP_CTL_GET_FREE as _) as libc::c_long
            })?;
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let device = open_rw(&path)?;
            let mut name = [0u8; 64];
            let bytes = image.as_os_str().as_bytes();
            let len = bytes.len().min(63);
            name[..len].copy_from_slice(&bytes[..len]);
            let config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: BLOCK_SIZE,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR,
                    lo_file_name: name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is
            // (repr(C), same layout), alive for the call; `fd` is open.
            let ret = unsafe {
                libc::ioctl(
                    device.0.as_raw_fd(),
                    LOOP_CONFIGURE as _,
                    &config as *const LoopConfig,
                )
            };
            match check(ret as libc::c_long) {
                Ok(_) => return Ok((path, device)),
                // Taken by someone else between GET_FREE and CONFIGURE: the next one.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// A random number from the kernel.
    pub fn random_u32() -> io::Result<u32> {
        let mut buf = [0u8; 4];
        // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n != 4 {
            return Err(io::Error::last_os_error());
        }
        Ok(u32::from_ne_bytes(buf))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn kernel_structs_have_the_kernels_sizes() {
            assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
            assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked() {
        assert!(check_limit(MIN_LIMIT_MIB).is_ok());
        assert!(check_limit(64).is_ok());
        let err = check_limit(1).unwrap_err().to_string();
        assert!(err.contains("1 MiB is out of range"), "{err}");
        assert!(check_limit(MAX_LIMIT_MIB + 1).is_err());
    }

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("from");
        let mut f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let to = tmp.path().join("to");
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        assert!(std::fs::metadata(&to).unwrap().blocks() * 512 < 1 << 20);
        assert!(
            copy_sparse(&from, &to).is_err(),
            "overwrote an existing file"
        );
    }
}
