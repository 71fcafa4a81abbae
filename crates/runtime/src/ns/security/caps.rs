//! Linux capabilities of the sandbox init: which ones root in a sandbox keeps, and the
//! small syscall wrappers that drop the rest.
//!
//! Capability sets are per thread. Everything here acts on the calling thread only, so
//! call it from the single-threaded sandbox init (before `execve`).

use std::fmt;

use cubicle_core::ErrorKind;
use nix::errno::Errno;

/// Declares [`Cap`] with the kernel's numbering (`<linux/capability.h>`).
macro_rules! capabilities {
    ($($(#[$doc:meta])* $variant:ident = $bit:literal => $name:literal,)*) => {
        /// One Linux capability.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Cap {
            $($(#[$doc])* $variant = $bit,)*
        }

        impl Cap {
            /// Every capability this module knows, in kernel order.
            pub const ALL: &'static [Cap] = &[$(Cap::$variant,)*];

            /// The kernel's name, e.g. `CAP_CHOWN`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Cap::$variant => $name,)*
                }
            }
        }
    };
}

capabilities! {
    /// Change file owners.
    Chown = 0 => "CAP_CHOWN",
    /// Bypass file permission checks.
    DacOverride = 1 => "CAP_DAC_OVERRIDE",
    /// Bypass read and search permission checks; open files by handle.
    DacReadSearch = 2 => "CAP_DAC_READ_SEARCH",
    /// Bypass checks that require owning the file.
    Fowner = 3 => "CAP_FOWNER",
    /// Keep setuid/setgid bits when modifying files.
    Fsetid = 4 => "CAP_FSETID",
    /// Send signals to any process.
    Kill = 5 => "CAP_KILL",
    /// Change group ids.
    Setgid = 6 => "CAP_SETGID",
    /// Change user ids.
    Setuid = 7 => "CAP_SETUID",
    /// Change capability sets (bounding, inheritable) and securebits.
    Setpcap = 8 => "CAP_SETPCAP",
    /// Set the immutable and append-only file attributes.
    LinuxImmutable = 9 => "CAP_LINUX_IMMUTABLE",
    /// Bind ports below 1024.
    NetBindService = 10 => "CAP_NET_BIND_SERVICE",
    /// Broadcast and multicast.
    NetBroadcast = 11 => "CAP_NET_BROADCAST",
    /// Network administration.
    NetAdmin = 12 => "CAP_NET_ADMIN",
    /// Raw and packet sockets.
    NetRaw = 13 => "CAP_NET_RAW",
    /// Lock memory beyond limits.
    IpcLock = 14 => "CAP_IPC_LOCK",
    /// Bypass IPC permission checks.
    IpcOwner = 15 => "CAP_IPC_OWNER",
    /// Load kernel modules.
    SysModule = 16 => "CAP_SYS_MODULE",
    /// Raw I/O (ioperm, /dev/mem).
    SysRawio = 17 => "CAP_SYS_RAWIO",
    /// chroot.
    SysChroot = 18 => "CAP_SYS_CHROOT",
    /// Trace any process.
    SysPtrace = 19 => "CAP_SYS_PTRACE",
    /// Process accounting.
    SysPacct = 20 => "CAP_SYS_PACCT",
    /// Mounts, namespaces and much more.
    SysAdmin = 21 => "CAP_SYS_ADMIN",
    /// Reboot and kexec.
    SysBoot = 22 => "CAP_SYS_BOOT",
    /// Raise priorities, NUMA placement.
    SysNice = 23 => "CAP_SYS_NICE",
    /// Override resource limits.
    SysResource = 24 => "CAP_SYS_RESOURCE",
    /// Set the clock.
    SysTime = 25 => "CAP_SYS_TIME",
    /// Configure terminals (vhangup).
    SysTtyConfig = 26 => "CAP_SYS_TTY_CONFIG",
    /// Create device nodes.
    Mknod = 27 => "CAP_MKNOD",
    /// File leases.
    Lease = 28 => "CAP_LEASE",
    /// Write the audit log.
    AuditWrite = 29 => "CAP_AUDIT_WRITE",
    /// Configure auditing.
    AuditControl = 30 => "CAP_AUDIT_CONTROL",
    /// Set file capabilities.
    Setfcap = 31 => "CAP_SETFCAP",
    /// Override mandatory access control.
    MacOverride = 32 => "CAP_MAC_OVERRIDE",
    /// Configure mandatory access control.
    MacAdmin = 33 => "CAP_MAC_ADMIN",
    /// Read the kernel log.
    Syslog = 34 => "CAP_SYSLOG",
    /// Wake the system with alarms.
    WakeAlarm = 35 => "CAP_WAKE_ALARM",
    /// Block system suspend.
    BlockSuspend = 36 => "CAP_BLOCK_SUSPEND",
    /// Read the audit log via multicast netlink.
    AuditRead = 37 => "CAP_AUDIT_READ",
    /// Performance monitoring.
    Perfmon = 38 => "CAP_PERFMON",
    /// BPF programs and maps.
    Bpf = 39 => "CAP_BPF",
    /// Checkpoint/restore (set PIDs of new processes).
    CheckpointRestore = 40 => "CAP_CHECKPOINT_RESTORE",
}

impl Cap {
    /// The kernel's number of the capability.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The capability's bit in a 64-bit capability mask.
    pub fn bit(self) -> u64 {
        1 << self.index()
    }

    /// The 64-bit mask of a list of capabilities (the format of `CapEff:` and friends in
    /// `/proc/<pid>/status`).
    pub fn mask(caps: &[Cap]) -> u64 {
        caps.iter().fold(0, |mask, cap| mask | cap.bit())
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What root inside a sandbox keeps: Docker's default set minus `CAP_MKNOD` (device
/// nodes are the host's business; `mknod` of FIFOs needs no capability),
/// `CAP_SYS_CHROOT` (the seccomp policy denies `chroot` anyway) and `CAP_AUDIT_WRITE`
/// (the kernel refuses audit messages from non-initial user namespaces, so it would be
/// dead weight).
///
/// These are what package managers, `sudo`, `chown -R`, `ping` and servers on port 80
/// need. Everything else (notably `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE`, `CAP_NET_ADMIN`,
/// `CAP_SYS_MODULE`, `CAP_SYS_RAWIO`, `CAP_DAC_READ_SEARCH`, `CAP_BPF`, `CAP_PERFMON`)
/// is dropped from every set, including the bounding set.
pub const SANDBOX_CAPS: &[Cap] = &[
    Cap::Chown,
    Cap::DacOverride,
    Cap::Fowner,
    Cap::Fsetid,
    Cap::Kill,
    Cap::Setgid,
    Cap::Setuid,
    Cap::Setpcap,
    Cap::NetBindService,
    Cap::NetRaw,
    Cap::Setfcap,
];

/// Where [`last_cap`] reads the highest capability number the kernel knows.
const CAP_LAST_CAP_PATH: &str = "/proc/sys/kernel/cap_last_cap";
/// The highest capability representable in the 64-bit (version 3) interface; used
/// when `/proc` is not mounted.
const CAP_LAST_REPRESENTABLE: u32 = 63;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Errors of reading and changing capability sets.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// `/proc/sys/kernel/cap_last_cap` exists but could not be read or parsed.
    #[error("reading {CAP_LAST_CAP_PATH} failed: {0}")]
    LastCap(std::io::Error),
    /// `prctl(PR_CAPBSET_READ)` failed.
    #[error("reading {cap_name} from the bounding set failed: {errno}")]
    BoundingRead {
        /// The capability's number.
        cap: u32,
        /// Its name, or the number if it is newer than this module.
        cap_name: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// `prctl(PR_CAPBSET_DROP)` failed (`EPERM`: no `CAP_SETPCAP`).
    #[error("dropping {cap_name} from the bounding set failed: {errno}")]
    BoundingDrop {
        /// The capability's number.
        cap: u32,
        /// Its name, or the number if it is newer than this module.
        cap_name: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)` failed.
    #[error("clearing the ambient capabilities failed: {0}")]
    AmbientClear(Errno),
    /// Changing user while keeping capabilities failed (`setresuid`, `PR_SET_KEEPCAPS`
    /// or `PR_CAP_AMBIENT_RAISE`).
    #[error("becoming an unprivileged user with capabilities failed: {0}")]
    BecomeUser(Errno),
    /// `capget` failed.
    #[error("reading the capability sets failed: {0}")]
    Get(Errno),
    /// `capset` failed.
    #[error("setting the capability sets failed: {0}")]
    Set(Errno),
}

impl CapsError {
    /// The kind of failure, for mapping at the edges.
    pub fn kind(&self) -> ErrorKind {
        let errno = match self {
            CapsError::LastCap(_) => return ErrorKind::Unavailable,
            CapsError::BoundingRead { errno, .. }
            | CapsError::BoundingDrop { errno, .. }
            | CapsError::AmbientClear(errno)
            | CapsError::BecomeUser(errno)
            | CapsError::Get(errno)
            | CapsError::Set(errno) => *errno,
        };
        match errno {
            Errno::EPERM | Errno::EACCES => ErrorKind::PermissionDenied,
            Errno::EINVAL | Errno::ENOSYS => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

impl From<CapsError> for std::io::Error {
    /// Keeps the message and the error as source; the kind follows the errno.
    fn from(err: CapsError) -> std::io::Error {
        let kind = match &err {
            CapsError::LastCap(io) => io.kind(),
            CapsError::BoundingRead { errno, .. }
            | CapsError::BoundingDrop { errno, .. }
            | CapsError::AmbientClear(errno)
            | CapsError::BecomeUser(errno)
            | CapsError::Get(errno)
            | CapsError::Set(errno) => std::io::Error::from(*errno).kind(),
        };
        std::io::Error::new(kind, err)
    }
}

/// The effective, permitted and inheritable sets of the calling thread, as 64-bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSets {
    /// Capabilities in force.
    pub effective: u64,
    /// Capabilities the thread may make effective.
    pub permitted: u64,
    /// Capabilities preserved across `execve` for files with inheritable capabilities.
    pub inheritable: u64,
}

impl CapSets {
    /// Reads the calling thread's sets (`capget`).
    pub fn current() -> Result<CapSets, CapsError> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: `header` is a valid version-3 header for the calling thread (pid 0) and
        // `data` has the two elements version 3 writes; both outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(CapsError::Get(Errno::last()));
        }
        let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
        Ok(CapSets {
            effective: join(data[0].effective, data[1].effective),
            permitted: join(data[0].permitted, data[1].permitted),
            inheritable: join(data[0].inheritable, data[1].inheritable),
        })
    }

    /// Replaces the calling thread's sets (`capset`). The kernel only allows lowering
    /// `permitted`, keeping `effective` within `permitted`, and (without `CAP_SETPCAP`)
    /// keeping `inheritable` within `permitted`.
    pub fn apply(&self) -> Result<(), CapsError> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let split = |mask: u64| (mask as u32, (mask >> 32) as u32);
        let (eff, perm, inh) = (
            split(self.effective),
            split(self.permitted),
            split(self.inheritable),
        );
        let data = [
            CapData {
                effective: eff.0,
                permitted: perm.0,
                inheritable: inh.0,
            },
            CapData {
                effective: eff.1,
                permitted: perm.1,
                inheritable: inh.1,
            },
        ];
        // SAFETY: `header` is a valid version-3 header for the calling thread and `data`
        // holds the two elements version 3 reads; both outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(CapsError::Set(Errno::last()))
        }
    }
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
#[derive(Debug)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability number the running kernel knows, from
/// `/proc/sys/kernel/cap_last_cap`; 63 (the most the interface can express) when `/proc`
/// is not mounted, in which case dropping unknown capabilities fails with `EINVAL`, which
/// [`drop_bounding_set`] ignores.
pub fn last_cap() -> Result<u32, CapsError> {
    match std::fs::read_to_string(CAP_LAST_CAP_PATH) {
        Ok(text) => text.trim().parse::<u32>().map_err(|err| {
            CapsError::LastCap(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(CAP_LAST_REPRESENTABLE),
        Err(err) => Err(CapsError::LastCap(err)),
    }
}

/// Whether `cap` (a number, possibly newer than [`Cap`]) is in the calling thread's
/// bounding set.
pub fn in_bounding_set(cap: u32) -> Result<bool, CapsError> {
    // SAFETY: PR_CAPBSET_READ takes a capability number and no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAPBSET_READ,
            libc::c_ulong::from(cap),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    match rc {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(CapsError::BoundingRead {
            cap,
            cap_name: cap_name(cap),
            errno: Errno::last(),
        }),
    }
}

/// Drops every capability except `keep` from the calling thread's bounding set, so that
/// no later `execve` (not even of a setuid-root binary, or as uid 0) can regain it.
///
/// Needs `CAP_SETPCAP` in the effective set for every capability still present;
/// capabilities already absent are skipped, which makes the call idempotent.
/// Capabilities the kernel does not know (`EINVAL`) are ignored.
pub fn drop_bounding_set(keep: &[Cap]) -> Result<(), CapsError> {
    let keep = Cap::mask(keep);
    for cap in 0..=last_cap()?.min(CAP_LAST_REPRESENTABLE) {
        if keep & (1 << cap) != 0 {
            continue;
        }
        match in_bounding_set(cap) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(CapsError::BoundingRead {
                errno: Errno::EINVAL,
                ..
            }) => continue,
            Err(err) => return Err(err),
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                libc::c_ulong::from(cap),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            match Errno::last() {
                Errno::EINVAL => {}
                errno => {
                    return Err(CapsError::BoundingDrop {
                        cap,
                        cap_name: cap_name(cap),
                        errno,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Empties the calling thread's ambient set.
pub fn clear_ambient() -> Result<(), CapsError> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no further arguments (they must be zero)
    // and no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(CapsError::AmbientClear(Errno::last()))
    }
}

/// Restricts the calling thread to `keep`, in this order:
///
/// 1. drops every other capability from the bounding set ([`drop_bounding_set`]);
/// 2. clears the ambient set;
/// 3. sets inheritable to empty and effective = permitted = `keep` ∩ current permitted
///    (capabilities cannot be gained, only kept).
///
/// After a later `execve` as uid 0 the process then has exactly `keep` (root's new
/// permitted set is the bounding set plus the inheritable set), and as any other uid
/// nothing but what file capabilities grant within `keep`.
///
/// This removes `CAP_SYS_ADMIN` from the effective set, so a seccomp filter installed
/// without `no_new_privs` must be installed **before** this call (see the
/// [module order](super)); `prctl` and `capset` stay allowed by the default policy.
pub fn restrict_to(keep: &[Cap]) -> Result<(), CapsError> {
    drop_bounding_set(keep)?;
    clear_ambient()?;
    let permitted = CapSets::current()?.permitted & Cap::mask(keep);
    CapSets {
        effective: permitted,
        permitted,
        inheritable: 0,
    }
    .apply()
}

/// Becomes `uid`/`gid` (with `groups`) keeping exactly `keep` (within the current
/// permitted set), as ambient capabilities so that they survive the next `execve` of an
/// ordinary program: how a program runs as an unprivileged user with a few capabilities.
pub fn become_user_keeping(
    uid: u32,
    gid: u32,
    groups: &[u32],
    keep: &[Cap],
) -> Result<(), CapsError> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let keep_caps = |on: libc::c_ulong| {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_KEEPCAPS,
                on,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(CapsError::BecomeUser(Errno::last()))
        }
    };
    keep_caps(1)?;
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(CapsError::BecomeUser)?;
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
        .map_err(CapsError::BecomeUser)?;
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
        .map_err(CapsError::BecomeUser)?;
    keep_caps(0)?;
    let mask = CapSets::current()?.permitted & Cap::mask(keep);
    CapSets {
        effective: mask,
        permitted: mask,
        inheritable: mask,
    }
    .apply()?;
    for cap in keep.iter().filter(|c| mask & c.bit() != 0) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(cap.index()),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            return Err(CapsError::BecomeUser(Errno::last()));
        }
    }
    Ok(())
}

/// `CAP_CHOWN`, or the number for capabilities newer than [`Cap`].
fn cap_name(cap: u32) -> String {
    Cap::ALL
        .iter()
        .find(|c| c.index() == cap)
        .map_or_else(|| format!("capability {cap}"), |c| c.name().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_is_dense_and_matches_the_kernel() {
        for (index, cap) in Cap::ALL.iter().enumerate() {
            assert_eq!(cap.index() as usize, index, "{cap}");
        }
        assert_eq!(Cap::SysAdmin.index(), 21);
        assert_eq!(Cap::Setfcap.index(), 31);
        assert_eq!(Cap::CheckpointRestore.index(), 40);
    }

    #[test]
    fn sandbox_mask() {
        // Docker's default set is 0xa80425fb; we drop MKNOD (27), SYS_CHROOT (18) and
        // AUDIT_WRITE (29).
        let docker = 0xa804_25fb_u64;
        let dropped = Cap::Mknod.bit() | Cap::SysChroot.bit() | Cap::AuditWrite.bit();
        assert_eq!(Cap::mask(SANDBOX_CAPS), docker & !dropped);
        assert_eq!(Cap::mask(SANDBOX_CAPS), 0x8000_25fb);
    }

    #[test]
    fn sandbox_never_keeps_dangerous_caps() {
        let never = [
            Cap::SysAdmin,
            Cap::SysPtrace,
            Cap::SysModule,
            Cap::SysRawio,
            Cap::Mknod,
            Cap::SysBoot,
            Cap::SysTime,
            Cap::NetAdmin,
            Cap::SysResource,
            Cap::DacReadSearch,
            Cap::Bpf,
            Cap::Perfmon,
            Cap::CheckpointRestore,
            Cap::SysChroot,
            Cap::AuditWrite,
            Cap::AuditControl,
            Cap::MacAdmin,
            Cap::MacOverride,
            Cap::Syslog,
            Cap::LinuxImmutable,
            Cap::SysPacct,
            Cap::SysNice,
            Cap::IpcLock,
            Cap::IpcOwner,
            Cap::Lease,
            Cap::SysTtyConfig,
            Cap::NetBroadcast,
            Cap::WakeAlarm,
            Cap::BlockSuspend,
            Cap::AuditRead,
        ];
        assert_eq!(Cap::mask(SANDBOX_CAPS) & Cap::mask(&never), 0);
        // Every capability is classified.
        assert_eq!(
            Cap::mask(SANDBOX_CAPS) | Cap::mask(&never),
            Cap::mask(Cap::ALL)
        );
    }

    #[test]
    fn names_and_kinds() {
        assert_eq!(Cap::NetRaw.to_string(), "CAP_NET_RAW");
        assert_eq!(cap_name(21), "CAP_SYS_ADMIN");
        assert_eq!(cap_name(55), "capability 55");
        let err = CapsError::BoundingDrop {
            cap: 21,
            cap_name: cap_name(21),
            errno: Errno::EPERM,
        };
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert!(err.to_string().starts_with("dropping CAP_SYS_ADMIN"));
        assert_eq!(CapsError::Set(Errno::EFAULT).kind(), ErrorKind::Internal);
        let io = std::io::Error::from(err);
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(io.to_string().starts_with("dropping CAP_SYS_ADMIN"), "{io}");
    }

    #[test]
    fn reads_current_sets() {
        let sets = CapSets::current().expect("capget");
        assert_eq!(sets.effective & !sets.permitted, 0);
        assert!(last_cap().expect("cap_last_cap") >= 40);
    }
}
