//! Unit tests of the policy parser and the BPF generator, running generated programs
//! through a small classic-BPF interpreter over synthetic `seccomp_data`.

use super::seccomp::{
    Action, PolicyError, Rule, SeccompError, SeccompPolicy, AUDIT_ARCH_X86_64, DEFAULT_POLICY,
    X32_SYSCALL_BIT,
};
use super::syscalls;

/// `AUDIT_ARCH_I386`: what a 64-bit process's `int 0x80` reports.
const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;

/// Runs a classic-BPF seccomp program over `struct seccomp_data { nr, arch,
/// instruction_pointer, args[6] }` and returns what it returns. Panics on anything the
/// kernel would reject (out-of-range jumps or loads, unknown opcodes).
fn run(program: &[libc::sock_filter], arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_le_bytes());
    data.extend_from_slice(&arch.to_le_bytes());
    data.extend_from_slice(&0x7f00_dead_beef_u64.to_le_bytes());
    for arg in args {
        data.extend_from_slice(&arg.to_le_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    loop {
        let insn = program
            .get(pc)
            .unwrap_or_else(|| panic!("pc {pc} ran off the end"));
        let code = u32::from(insn.code);
        let next = pc + 1;
        pc = match code {
            c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                let at = insn.k as usize;
                assert!(at % 4 == 0 && at + 4 <= data.len(), "bad load offset {at}");
                acc = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                next
            }
            c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => {
                acc &= insn.k;
                next
            }
            c if c == libc::BPF_JMP | libc::BPF_JA => next + insn.k as usize,
            c if c & 0x07 == libc::BPF_JMP && c & 0x08 == libc::BPF_K => {
                let taken = match c & 0xf0 {
                    op if op == libc::BPF_JEQ => acc == insn.k,
                    op if op == libc::BPF_JGT => acc > insn.k,
                    op if op == libc::BPF_JGE => acc >= insn.k,
                    op if op == libc::BPF_JSET => acc & insn.k != 0,
                    op => panic!("unsupported jump {op:#x}"),
                };
                next + usize::from(if taken { insn.jt } else { insn.jf })
            }
            c if c == libc::BPF_RET | libc::BPF_K => return insn.k,
            c => panic!("unsupported opcode {c:#x} at {pc}"),
        };
    }
}

fn policy() -> SeccompPolicy {
    SeccompPolicy::default_policy().expect("the shipped policy parses")
}

fn nr(name: &str) -> u32 {
    syscalls::number(name).unwrap_or_else(|| panic!("unknown syscall {name}"))
}

/// What the compiled default program returns for `name(args…)` on x86_64.
fn verdict(name: &str, args: &[u64]) -> Action {
    let mut all = [0u64; 6];
    all[..args.len()].copy_from_slice(args);
    let program = policy().compile().unwrap();
    from_ret(run(
        program.instructions(),
        AUDIT_ARCH_X86_64,
        nr(name),
        &all,
    ))
}

fn from_ret(value: u32) -> Action {
    match value & libc::SECCOMP_RET_ACTION_FULL {
        libc::SECCOMP_RET_ALLOW => Action::Allow,
        libc::SECCOMP_RET_ERRNO => Action::Errno((value & libc::SECCOMP_RET_DATA) as u16),
        libc::SECCOMP_RET_KILL_PROCESS => Action::KillProcess,
        other => panic!("unexpected return {other:#x}"),
    }
}

#[test]
fn shipped_policy_parses_and_compiles_small() {
    let program = policy().compile().unwrap();
    assert!(program.len() < 1024, "{} instructions", program.len());
    assert!(!program.is_empty());
    eprintln!("default program: {} instructions", program.len());
}

#[test]
fn every_known_syscall_has_an_explicit_decision() {
    let policy = policy();
    let missing: Vec<_> = syscalls::all()
        .filter(|(_, nr)| !policy.rules.contains_key(nr))
        .map(|(name, _)| name)
        .collect();
    assert!(missing.is_empty(), "no decision for {missing:?}");
}

#[test]
fn foreign_architecture_kills() {
    let program = policy().compile().unwrap();
    for arch in [AUDIT_ARCH_I386, 0, 0xc000_00b7 /* aarch64 */] {
        let ret = run(program.instructions(), arch, 0, &[0; 6]);
        assert_eq!(ret, libc::SECCOMP_RET_KILL_PROCESS, "arch {arch:#x}");
    }
}

#[test]
fn x32_numbers_fail_with_eperm() {
    let program = policy().compile().unwrap();
    for nr in [
        X32_SYSCALL_BIT,
        X32_SYSCALL_BIT | nr("read"),
        X32_SYSCALL_BIT | 512,
        u32::MAX,
    ] {
        let ret = run(program.instructions(), AUDIT_ARCH_X86_64, nr, &[0; 6]);
        assert_eq!(from_ret(ret), Action::EPERM, "nr {nr:#x}");
    }
}

#[test]
fn numbers_beyond_the_table_fail_with_enosys() {
    let policy = policy();
    let program = policy.compile().unwrap();
    for nr in [policy.max_nr + 1, 468, 470, 512, 1000, X32_SYSCALL_BIT - 1] {
        let ret = run(program.instructions(), AUDIT_ARCH_X86_64, nr, &[0; 6]);
        assert_eq!(from_ret(ret), Action::ENOSYS, "nr {nr}");
    }
}

#[test]
fn basic_verdicts() {
    assert_eq!(verdict("read", &[]), Action::Allow);
    assert_eq!(verdict("mount", &[]), Action::EPERM);
    assert_eq!(verdict("clone3", &[]), Action::ENOSYS);
    assert_eq!(verdict("execve", &[]), Action::Allow);
}

#[test]
fn clone_namespaces_are_refused() {
    let thread = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u64;
    assert_eq!(verdict("clone", &[thread]), Action::Allow);
    let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
    assert_eq!(verdict("clone", &[fork]), Action::Allow);
    let vfork = (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64;
    assert_eq!(verdict("clone", &[vfork]), Action::Allow);
    // Bits above 32 are ignored by the kernel and by the filter.
    assert_eq!(verdict("clone", &[fork | 1 << 40]), Action::Allow);
    for ns in [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWTIME,
    ] {
        let ns = ns as u64;
        assert_eq!(verdict("clone", &[ns]), Action::EPERM, "{ns:#x}");
        assert_eq!(verdict("clone", &[fork | ns]), Action::EPERM, "{ns:#x}");
        assert_eq!(verdict("clone", &[ns | 1 << 40]), Action::EPERM, "{ns:#x}");
    }
    assert_eq!(
        verdict("unshare", &[libc::CLONE_NEWUSER as u64]),
        Action::EPERM
    );
    assert_eq!(verdict("unshare", &[0]), Action::EPERM);
}

#[test]
fn ioctl_terminal_injection_is_refused() {
    let tiocsti = libc::TIOCSTI;
    let tioclinux = libc::TIOCLINUX;
    assert_eq!(verdict("ioctl", &[0, tiocsti]), Action::EPERM);
    assert_eq!(verdict("ioctl", &[0, tioclinux]), Action::EPERM);
    // The kernel takes `unsigned int cmd`: high bits must not smuggle TIOCSTI through.
    assert_eq!(verdict("ioctl", &[0, tiocsti | 1 << 32]), Action::EPERM);
    assert_eq!(
        verdict("ioctl", &[0, 0xffff_ffff_0000_0000 | tiocsti]),
        Action::EPERM
    );
    assert_eq!(verdict("ioctl", &[0, libc::TCGETS]), Action::Allow);
    assert_eq!(verdict("ioctl", &[0, libc::TIOCGWINSZ]), Action::Allow);
    assert_eq!(verdict("ioctl", &[tiocsti, libc::FIONREAD]), Action::Allow);
}

#[test]
fn personality_values() {
    for allowed in [0, 8, 0x20000, 0x20008, 0xffff_ffff] {
        assert_eq!(
            verdict("personality", &[allowed]),
            Action::Allow,
            "{allowed:#x}"
        );
    }
    for refused in [
        libc::ADDR_NO_RANDOMIZE as u64,
        0x0400000, /* READ_IMPLIES_EXEC */
        1,
    ] {
        assert_eq!(
            verdict("personality", &[refused]),
            Action::EPERM,
            "{refused:#x}"
        );
    }
}

#[test]
fn socket_families() {
    for family in [
        libc::AF_UNIX,
        libc::AF_INET,
        libc::AF_INET6,
        libc::AF_NETLINK,
        libc::AF_PACKET,
    ] {
        assert_eq!(
            verdict("socket", &[family as u64, 1]),
            Action::Allow,
            "{family}"
        );
    }
    assert_eq!(verdict("socket", &[libc::AF_VSOCK as u64]), Action::EPERM);
}

#[test]
fn required_denials() {
    for name in [
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "keyctl",
        "add_key",
        "request_key",
        "open_by_handle_at",
        "name_to_handle_at",
        "lookup_dcookie",
        "acct",
        "swapon",
        "swapoff",
        "reboot",
        "syslog",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "adjtimex",
        "iopl",
        "ioperm",
        "quotactl",
        "nfsservctl",
        "vhangup",
        "uselib",
        "ustat",
        "sysfs",
        "_sysctl",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "fanotify_init",
        "kcmp",
        "pidfd_getfd",
        "lsm_set_self_attr",
    ] {
        assert_eq!(verdict(name, &[]), Action::EPERM, "{name}");
    }
}

#[test]
fn required_allowances() {
    for name in [
        "setuid",
        "setgid",
        "setgroups",
        "setresuid",
        "capget",
        "capset",
        "prctl",
        "futex",
        "rseq",
        "set_robust_list",
        "epoll_wait",
        "poll",
        "select",
        "inotify_add_watch",
        "eventfd2",
        "timerfd_create",
        "signalfd4",
        "memfd_create",
        "ptrace",
        "pidfd_open",
        "pidfd_send_signal",
        "close_range",
        "faccessat2",
        "openat2",
        "statx",
        "copy_file_range",
        "getrandom",
        "landlock_create_ruleset",
        "seccomp",
        "map_shadow_stack",
        "vfork",
        "wait4",
        "arch_prctl",
    ] {
        assert_eq!(verdict(name, &[]), Action::Allow, "{name}");
    }
}

#[test]
fn every_listed_syscall_gets_its_listed_action() {
    let policy = policy();
    let program = policy.compile().unwrap();
    for (&nr, (rule, line)) in &policy.rules {
        let expected = match rule {
            Rule::Fixed(action) => *action,
            Rule::AllowIf(_) => continue,
        };
        let ret = run(program.instructions(), AUDIT_ARCH_X86_64, nr, &[0; 6]);
        let name = syscalls::name(nr).unwrap();
        assert_eq!(from_ret(ret), expected, "{name} (line {line})");
    }
}

/// Argument vectors that exercise the conditions of the default policy.
fn interesting_args() -> Vec<[u64; 6]> {
    let values = [
        0,
        1,
        8,
        0x20000,
        0x20008,
        0xffff_ffff,
        u64::MAX,
        libc::TIOCSTI,
        libc::TIOCLINUX,
        libc::TCGETS,
        libc::AF_VSOCK as u64,
        libc::AF_INET as u64,
        libc::CLONE_NEWUSER as u64,
        libc::CLONE_NEWTIME as u64,
        (libc::CLONE_VM | libc::CLONE_THREAD) as u64,
        1 << 32 | libc::TIOCSTI,
    ];
    let mut out = Vec::new();
    for &a in &values {
        for &b in &values {
            out.push([a, b, 0, 0, 0, 0]);
        }
    }
    out
}

/// Checks `program` against the policy's reference semantics for every syscall number
/// up to past the table, a few special numbers, and `args`.
fn assert_agrees(policy: &SeccompPolicy, args: &[[u64; 6]]) {
    let program = policy.compile().unwrap();
    let numbers = (0..=policy.max_nr + 3).chain([
        1000,
        X32_SYSCALL_BIT - 1,
        X32_SYSCALL_BIT,
        X32_SYSCALL_BIT | 1,
        0x8000_0000,
        u32::MAX,
    ]);
    for nr in numbers {
        for args in args {
            for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
                let got = run(program.instructions(), arch, nr, args);
                let want = policy.action_for(arch, nr, args).ret_value();
                assert_eq!(got, want, "nr {nr} arch {arch:#x} args {args:x?}");
            }
        }
    }
}

#[test]
fn program_agrees_with_policy_everywhere() {
    assert_agrees(&policy(), &interesting_args());
}

#[test]
fn long_jumps_use_trampolines() {
    // Every syscall conditional with many conditions: leaves are long, so the tree's
    // subtrees are far beyond the 255 instructions a conditional jump can skip.
    let mut text = String::new();
    for (i, (name, _)) in syscalls::all().enumerate() {
        if i % 2 == 1 {
            text.push_str(&format!("deny {name}\n"));
            continue;
        }
        text.push_str(&format!(
            "allow {name} if arg0 != 1 and arg0 != 2 and arg1 & 0xff0 == 0 and arg2 == 7\n"
        ));
        if i % 4 == 0 {
            text.push_str(&format!("allow {name} if arg3 == 0x1234\n"));
        }
    }
    let policy = SeccompPolicy::parse(&text).unwrap();
    let program = policy.compile().unwrap();
    assert!(program.len() > 2000, "{} instructions", program.len());
    let has_trampoline = program
        .instructions()
        .iter()
        .any(|i| u32::from(i.code) == libc::BPF_JMP | libc::BPF_JA && i.k > 255);
    assert!(has_trampoline);
    let args = [
        [0, 0, 7, 0, 0, 0],
        [1, 0, 7, 0, 0, 0],
        [3, 0x10, 7, 0, 0, 0],
        [3, 0x1000, 7, 0, 0, 0],
        [1, 0, 0, 0x1234, 0, 0],
        [0, 0, 8, 0, 0, 0],
    ];
    assert_agrees(&policy, &args);
}

#[test]
fn alternating_actions_make_a_deep_tree() {
    let mut text = String::new();
    for (i, (name, _)) in syscalls::all().enumerate() {
        let verb = ["allow", "deny", "errno EACCES", "errno ENOSYS"][i % 4];
        text.push_str(&format!("{verb} {name}\n"));
    }
    let policy = SeccompPolicy::parse(&text).unwrap();
    assert_agrees(&policy, &[[0; 6]]);
}

#[test]
fn empty_policy_denies_everything() {
    let policy = SeccompPolicy::parse("# nothing\n\n").unwrap();
    let program = policy.compile().unwrap();
    assert_eq!(
        from_ret(run(program.instructions(), AUDIT_ARCH_X86_64, 0, &[0; 6])),
        Action::EPERM
    );
    assert_agrees(&policy, &[[0; 6]]);
}

#[test]
fn too_long_programs_are_refused() {
    let mut text = String::new();
    let conditions = vec!["arg0 != 1"; 16].join(" and ");
    for (name, _) in syscalls::all() {
        text.push_str(&format!("allow {name} if {conditions}\n"));
    }
    let err = SeccompPolicy::parse(&text).unwrap().compile().unwrap_err();
    assert!(matches!(err, SeccompError::TooLong { .. }), "{err}");
    assert_eq!(err.kind(), cubicle_core::ErrorKind::InvalidInput);
}

fn parse_error(text: &str) -> (usize, PolicyError) {
    match SeccompPolicy::parse(text) {
        Err(SeccompError::Policy { line, reason }) => (line, reason),
        other => panic!("expected a policy error for {text:?}, got {other:?}"),
    }
}

#[test]
fn parse_errors_are_typed_with_line_numbers() {
    let cases: &[(&str, usize, PolicyError)] = &[
        (
            "allow read\nallow nosuchcall\n",
            2,
            PolicyError::UnknownSyscall("nosuchcall".into()),
        ),
        (
            "permit read\n",
            1,
            PolicyError::UnknownStatement("permit".into()),
        ),
        (
            "allow read\n# c\ndeny read\n",
            3,
            PolicyError::Duplicate {
                name: "read".into(),
                first_line: 1,
            },
        ),
        (
            "allow ioctl if arg1 != 1\nallow ioctl\n",
            2,
            PolicyError::Duplicate {
                name: "ioctl".into(),
                first_line: 1,
            },
        ),
        (
            "deny ioctl\nallow ioctl if arg1 != 1\n",
            2,
            PolicyError::Duplicate {
                name: "ioctl".into(),
                first_line: 1,
            },
        ),
        (
            "errno EWHAT read\n",
            1,
            PolicyError::UnknownErrno("EWHAT".into()),
        ),
        (
            "allow ioctl if arg1 != TIOCNOPE\n",
            1,
            PolicyError::UnknownConstant("TIOCNOPE".into()),
        ),
        (
            "allow ioctl if arg6 != 1\n",
            1,
            PolicyError::BadArgument("arg6".into()),
        ),
        (
            "allow ioctl if arg1 < 1\n",
            1,
            PolicyError::BadOperator("<".into()),
        ),
        (
            "allow ioctl if arg1 == 0x100000000\n",
            1,
            PolicyError::ValueTooLarge("0x100000000".into()),
        ),
        (
            "allow ioctl if arg1 ==\n",
            1,
            PolicyError::Syntax("expected a condition `argN OP VALUE` or `argN & MASK OP VALUE`"),
        ),
        (
            "allow read write if arg0 == 1\n",
            1,
            PolicyError::Syntax(
                "a conditional rule is `allow NAME if COND`, with exactly one syscall",
            ),
        ),
        (
            "deny\n",
            1,
            PolicyError::Syntax("statement names no syscall"),
        ),
        (
            "allow ioctl if arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 \
             and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 \
             and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1 and arg0 == 1\n",
            1,
            PolicyError::TooManyConditions,
        ),
    ];
    for (text, line, reason) in cases {
        assert_eq!(parse_error(text), (*line, reason.clone()), "{text:?}");
    }
    let err = SeccompPolicy::parse("allow x\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "seccomp policy line 1: unknown syscall \"x\""
    );
    assert_eq!(err.kind(), cubicle_core::ErrorKind::InvalidInput);
    let io = std::io::Error::from(err);
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(
        io.to_string(),
        "seccomp policy line 1: unknown syscall \"x\""
    );
    let install = std::io::Error::from(SeccompError::Install(nix::errno::Errno::EACCES));
    assert_eq!(install.kind(), std::io::ErrorKind::PermissionDenied);
}

#[test]
fn values_combine_constants_and_numbers() {
    let policy =
        SeccompPolicy::parse("allow clone if arg0 & CLONE_NEWNS|0x10|8 == 0 # comment\n").unwrap();
    let (rule, _) = &policy.rules[&nr("clone")];
    let Rule::AllowIf(alternatives) = rule else {
        panic!("{rule:?}")
    };
    assert_eq!(alternatives[0][0].mask, Some(0x20018));
}

#[test]
fn shipped_policy_is_the_included_file() {
    assert!(DEFAULT_POLICY.contains("allow clone if"));
    assert_eq!(
        SeccompPolicy::parse(DEFAULT_POLICY).unwrap(),
        SeccompPolicy::default_policy().unwrap()
    );
}
