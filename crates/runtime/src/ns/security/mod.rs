//! The last line of defence of `ns` sandboxes: the seccomp filter and the capability
//! sets that user code runs with.
//!
//! This module owns
//! - the seccomp policy ([`seccomp::DEFAULT_POLICY`], the reviewable text file
//!   `default.policy`), its parser ([`SeccompPolicy`]) and our own classic-BPF generator
//!   ([`BpfProgram`]), x86_64 only;
//! - the capability set root inside a sandbox keeps ([`caps::SANDBOX_CAPS`]) and the
//!   wrappers that drop everything else ([`caps::restrict_to`]).
//!
//! It does not create namespaces, mounts or cgroups; those are set up before anything
//! here runs, because afterwards the filter forbids them.
//!
//! # Order in the sandbox init
//!
//! The init (single-threaded, uid 0 in the sandbox's user namespace, all capabilities
//! there) applies, right before it executes user code:
//!
//! 1. `let program = SeccompPolicy::default_policy()?.compile()?;` (may be done early,
//!    even before `fork`: it only allocates);
//! 2. [`caps::drop_bounding_set`]`(SANDBOX_CAPS)`: nothing executed later can regain a
//!    dropped capability, not even a setuid-root binary;
//! 3. `program.install()`: from here on every syscall of this process and all its
//!    descendants passes the filter;
//! 4. [`caps::restrict_to`]`(SANDBOX_CAPS)`: clears ambient and inheritable and lowers
//!    effective/permitted (re-checking the bounding set, a no-op after step 2); `prctl`
//!    and `capset` are allowed by the policy;
//! 5. `execve` of the user program (as root it gets exactly `SANDBOX_CAPS`; as another
//!    uid, none).
//!
//! Step 4 must come after step 3: installing a filter without `no_new_privs` needs
//! `CAP_SYS_ADMIN` in the caller's user namespace, and step 4 removes it. Step 2 is
//! optional (step 4 does it too) but narrows the window in which the bounding set is
//! still full.
//!
//! # Why `install` does not set `no_new_privs`
//!
//! `no_new_privs` would make every later `execve` ignore setuid bits and file
//! capabilities, so passwordless `sudo` (and `su`, `ping`, …) inside a sandbox would stop
//! working. The kernel only insists on `no_new_privs` for unprivileged filter
//! installation, to stop a filter from misleading a setuid program; a task with
//! `CAP_SYS_ADMIN` in its user namespace may install filters without it, and the sandbox
//! init has that capability in the sandbox's user namespace. The filter is inherited
//! across `fork` and `execve` (setuid ones included) and cannot be removed, and setuid
//! root only yields `SANDBOX_CAPS` because of the bounding set.

pub mod caps;
#[cfg(target_arch = "x86_64")]
pub mod seccomp;
#[cfg(target_arch = "x86_64")]
mod syscalls;

#[cfg(all(test, target_arch = "x86_64"))]
mod bpf_tests;
#[cfg(all(test, target_arch = "x86_64"))]
mod kernel_tests;

pub use caps::{Cap, CapsError, SANDBOX_CAPS};
#[cfg(target_arch = "x86_64")]
pub use seccomp::{Action, BpfProgram, PolicyError, SeccompError, SeccompPolicy};
