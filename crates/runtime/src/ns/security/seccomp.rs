//! The seccomp policy (parsed from a text file) and our own classic-BPF generator.
//!
//! # Policy files
//!
//! A policy is line-oriented text; `#` starts a comment. Every statement names
//! syscalls by their x86_64 name (`openat`, `clone3`, …); an unknown name is an error.
//!
//! ```text
//! allow  NAME...                     # the syscalls are allowed
//! deny   NAME...                     # the syscalls fail with EPERM
//! errno  ERRNO NAME...               # the syscalls fail with the given errno (e.g. ENOSYS)
//! allow  NAME if COND [and COND]...  # allowed when all conditions hold, else EPERM
//! ```
//!
//! A condition is `argN OP VALUE` or `argN & MASK OP VALUE`, with `N` in `0..=5` and `OP`
//! `==` or `!=`. Conditions compare the **low 32 bits** of the argument only: use them for
//! arguments the kernel declares as `int`/`unsigned int` (or truncates to 32 bits, like
//! `clone` flags), never for pointers or lengths. Values are decimal, `0x` hex, or
//! constant names ([`constant`]), joined with `|` without spaces
//! (`CLONE_NEWNS|CLONE_NEWUSER`). Several `allow NAME if …` lines for the same syscall
//! are alternatives (any may match). Each syscall may appear in one statement kind only.
//!
//! Syscalls the policy does not name fail with `EPERM`. Regardless of the policy, the
//! generated program kills the process for a foreign architecture, answers `EPERM` for
//! x32 syscall numbers and `ENOSYS` for numbers beyond the largest one the syscall table
//! knows.
//!
//! # Program layout
//!
//! The generated program is a binary decision tree over syscall-number ranges:
//! consecutive numbers with the same action share one leaf. Conditional jumps only ever
//! skip a handful of instructions; where a subtree is longer than a classic-BPF
//! conditional jump can reach (255), an unconditional `ja` (32-bit offset) bridges it.

use std::collections::BTreeMap;
use std::fmt;

use cubicle_core::ErrorKind;
use nix::errno::Errno;

use super::syscalls;

/// The shipped default policy (see the file for the reasoning behind each group).
pub const DEFAULT_POLICY: &str = include_str!("default.policy");

/// `AUDIT_ARCH_X86_64`: `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
pub(crate) const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// Syscall numbers with this bit set are x32 syscalls.
pub(crate) const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel's limit on the length of one classic-BPF program.
const MAX_INSNS: usize = libc::BPF_MAXINSNS as usize;
/// The most conditions one `allow NAME if …` alternative may have; keeps every
/// conditional jump inside an alternative far below the 255-instruction reach.
const MAX_CONDITIONS: usize = 16;

/// Offsets in `struct seccomp_data` (little-endian x86_64).
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// Offset of the low 32 bits of argument `index`.
fn offset_arg_low(index: u8) -> u32 {
    16 + 8 * u32::from(index)
}

/// What the filter does with one syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the syscall run.
    Allow,
    /// Fail the syscall with this errno without running it.
    Errno(u16),
    /// Kill the whole process (used for a foreign architecture only).
    KillProcess,
}

impl Action {
    /// Fail with `EPERM`: the answer for anything the policy does not allow.
    pub const EPERM: Action = Action::Errno(libc::EPERM as u16);
    /// Fail with `ENOSYS`: "this kernel has no such syscall", so libcs fall back.
    pub const ENOSYS: Action = Action::Errno(libc::ENOSYS as u16);

    /// The `SECCOMP_RET_*` value a filter returns for this action.
    pub fn ret_value(self) -> u32 {
        match self {
            Action::Allow => libc::SECCOMP_RET_ALLOW,
            Action::Errno(errno) => libc::SECCOMP_RET_ERRNO | u32::from(errno),
            Action::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Allow => f.write_str("allow"),
            Action::Errno(errno) => match errno_name(*errno) {
                Some(name) => write!(f, "errno {name}"),
                None => write!(f, "errno {errno}"),
            },
            Action::KillProcess => f.write_str("kill process"),
        }
    }
}

/// How one condition compares the (masked) low 32 bits of an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
}

/// `(arg & mask) OP value`, on the low 32 bits of argument `arg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) arg: u8,
    pub(crate) mask: Option<u32>,
    pub(crate) op: Op,
    pub(crate) value: u32,
}

impl Condition {
    /// Whether the condition holds for these arguments.
    pub(crate) fn holds(&self, args: &[u64; 6]) -> bool {
        // Truncation intended: conditions look at the low 32 bits only.
        let low = args[usize::from(self.arg)] as u32;
        let masked = low & self.mask.unwrap_or(u32::MAX);
        match self.op {
            Op::Eq => masked == self.value,
            Op::Ne => masked != self.value,
        }
    }
}

/// What the policy says about one syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Always this action.
    Fixed(Action),
    /// Allowed when any alternative (a conjunction of conditions) holds, else `EPERM`.
    AllowIf(Vec<Vec<Condition>>),
}

/// Why a policy text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The first word is not `allow`, `deny` or `errno`.
    #[error("unknown statement {0:?}; expected allow, deny or errno")]
    UnknownStatement(String),
    /// A statement lacks a part.
    #[error("{0}")]
    Syntax(&'static str),
    /// The syscall table has no such name.
    #[error("unknown syscall {0:?}")]
    UnknownSyscall(String),
    /// Not an errno name this parser knows.
    #[error("unknown errno {0:?}")]
    UnknownErrno(String),
    /// A value term is neither a number nor a known constant.
    #[error("unknown constant or malformed number {0:?}")]
    UnknownConstant(String),
    /// A value does not fit in 32 bits.
    #[error("value {0:?} does not fit in 32 bits")]
    ValueTooLarge(String),
    /// Not `arg0` … `arg5`.
    #[error("expected an argument arg0..arg5, found {0:?}")]
    BadArgument(String),
    /// Not `==` or `!=`.
    #[error("expected == or !=, found {0:?}")]
    BadOperator(String),
    /// An alternative has more than the supported number of conditions.
    #[error("more than {MAX_CONDITIONS} conditions in one rule")]
    TooManyConditions,
    /// The syscall already has a rule of another kind, or is listed twice.
    #[error("syscall {name:?} already has a rule on line {first_line}")]
    Duplicate {
        /// The syscall.
        name: String,
        /// Where its first rule is.
        first_line: usize,
    },
}

/// Errors of parsing, compiling and installing seccomp filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy text is malformed.
    #[error("seccomp policy line {line}: {reason}")]
    Policy {
        /// 1-based line number in the policy text.
        line: usize,
        /// What is wrong with it.
        reason: PolicyError,
    },
    /// The compiled program is longer than the kernel accepts.
    #[error("seccomp program has {len} instructions; the kernel accepts at most {MAX_INSNS}")]
    TooLong {
        /// Instructions generated.
        len: usize,
    },
    /// The generator produced a jump out of range (a bug).
    #[error("generated seccomp program is malformed at instruction {index}: {what}")]
    Malformed {
        /// The offending instruction.
        index: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The kernel refused the filter.
    #[error("installing the seccomp filter failed: {0}")]
    Install(Errno),
}

impl SeccompError {
    /// The kind of failure, for mapping at the edges.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SeccompError::Policy { .. } | SeccompError::TooLong { .. } => ErrorKind::InvalidInput,
            SeccompError::Malformed { .. } => ErrorKind::Internal,
            // EACCES: neither no_new_privs nor CAP_SYS_ADMIN in the user namespace.
            SeccompError::Install(Errno::EACCES | Errno::EPERM) => ErrorKind::PermissionDenied,
            // EINVAL/ENOSYS: a kernel without seccomp filters or SECCOMP_RET_KILL_PROCESS.
            SeccompError::Install(Errno::EINVAL | Errno::ENOSYS) => ErrorKind::Unavailable,
            SeccompError::Install(_) => ErrorKind::Internal,
        }
    }
}

impl From<SeccompError> for std::io::Error {
    /// Keeps the message and the error as source; the kind follows the errno for install
    /// failures and is `InvalidData` for bad policies.
    fn from(err: SeccompError) -> std::io::Error {
        let kind = match &err {
            SeccompError::Install(errno) => std::io::Error::from(*errno).kind(),
            SeccompError::Policy { .. } | SeccompError::TooLong { .. } => {
                std::io::ErrorKind::InvalidData
            }
            SeccompError::Malformed { .. } => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, err)
    }
}

/// A parsed seccomp policy: an action (or allow-conditions) per syscall number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompPolicy {
    /// Rules by syscall number, with the line of their first statement.
    pub(crate) rules: BTreeMap<u32, (Rule, usize)>,
    /// Syscall numbers above this get `ENOSYS`.
    pub(crate) max_nr: u32,
}

impl SeccompPolicy {
    /// The shipped policy, [`DEFAULT_POLICY`]: an allow-list modelled on Docker's default
    /// profile (a unit test guarantees that it parses).
    pub fn default_policy() -> Result<SeccompPolicy, SeccompError> {
        SeccompPolicy::parse(DEFAULT_POLICY)
    }

    /// Parses a policy text (format in the [module docs](self)).
    pub fn parse(text: &str) -> Result<SeccompPolicy, SeccompError> {
        let mut policy = SeccompPolicy {
            rules: BTreeMap::new(),
            max_nr: syscalls::max_number(),
        };
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            policy
                .parse_line(raw, line)
                .map_err(|reason| SeccompError::Policy { line, reason })?;
        }
        Ok(policy)
    }

    fn parse_line(&mut self, raw: &str, line: usize) -> Result<(), PolicyError> {
        let code = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = code.split_whitespace().collect();
        let Some((&verb, rest)) = words.split_first() else {
            return Ok(());
        };
        match verb {
            "allow" if rest.get(1) == Some(&"if") => {
                let nr = syscall(rest[0])?;
                let conditions = parse_conditions(&rest[2..])?;
                match self.rules.get_mut(&nr) {
                    None => {
                        self.rules
                            .insert(nr, (Rule::AllowIf(vec![conditions]), line));
                    }
                    Some((Rule::AllowIf(alternatives), _)) => alternatives.push(conditions),
                    Some((Rule::Fixed(_), first_line)) => {
                        return Err(PolicyError::Duplicate {
                            name: rest[0].to_owned(),
                            first_line: *first_line,
                        })
                    }
                }
                Ok(())
            }
            "allow" => self.fixed(rest, Action::Allow, line),
            "deny" => self.fixed(rest, Action::EPERM, line),
            "errno" => {
                let (&errno, names) = rest
                    .split_first()
                    .ok_or(PolicyError::Syntax("errno needs an errno name"))?;
                let errno =
                    errno_number(errno).ok_or_else(|| PolicyError::UnknownErrno(errno.into()))?;
                self.fixed(names, Action::Errno(errno), line)
            }
            other => Err(PolicyError::UnknownStatement(other.to_owned())),
        }
    }

    /// Records `action` for every syscall in `names`.
    fn fixed(&mut self, names: &[&str], action: Action, line: usize) -> Result<(), PolicyError> {
        if names.is_empty() {
            return Err(PolicyError::Syntax("statement names no syscall"));
        }
        if names.contains(&"if") {
            return Err(PolicyError::Syntax(
                "a conditional rule is `allow NAME if COND`, with exactly one syscall",
            ));
        }
        for &name in names {
            let nr = syscall(name)?;
            if let Some((_, first_line)) = self.rules.get(&nr) {
                return Err(PolicyError::Duplicate {
                    name: name.to_owned(),
                    first_line: *first_line,
                });
            }
            self.rules.insert(nr, (Rule::Fixed(action), line));
        }
        Ok(())
    }

    /// What the filter compiled from this policy does with a syscall: the reference
    /// semantics the generated program is tested against.
    pub fn action_for(&self, arch: u32, nr: u32, args: &[u64; 6]) -> Action {
        if arch != AUDIT_ARCH_X86_64 {
            return Action::KillProcess;
        }
        if nr & X32_SYSCALL_BIT != 0 {
            return Action::EPERM;
        }
        if nr > self.max_nr {
            return Action::ENOSYS;
        }
        match self.rules.get(&nr) {
            None => Action::EPERM,
            Some((Rule::Fixed(action), _)) => *action,
            Some((Rule::AllowIf(alternatives), _)) => {
                if alternatives
                    .iter()
                    .any(|all| all.iter().all(|c| c.holds(args)))
                {
                    Action::Allow
                } else {
                    Action::EPERM
                }
            }
        }
    }

    /// Compiles the policy to a classic-BPF seccomp program.
    pub fn compile(&self) -> Result<BpfProgram, SeccompError> {
        let mut program = vec![
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, OFFSET_ARCH),
            jump(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
            ret(Action::KillProcess),
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, OFFSET_NR),
            jump(libc::BPF_JSET, X32_SYSCALL_BIT, 0, 1),
            ret(Action::EPERM),
            jump(libc::BPF_JGT, self.max_nr, 0, 1),
            ret(Action::ENOSYS),
        ];
        program.extend(tree(&self.leaves()));
        verify(&program)?;
        Ok(BpfProgram { filter: program })
    }

    /// Splits `0..=max_nr` into maximal ranges with the same leaf.
    fn leaves(&self) -> Vec<(u32, Leaf<'_>)> {
        let mut ranges: Vec<(u32, Leaf<'_>)> = Vec::new();
        for nr in 0..=self.max_nr {
            let leaf = match self.rules.get(&nr) {
                None => Leaf::Ret(Action::EPERM),
                Some((Rule::Fixed(action), _)) => Leaf::Ret(*action),
                Some((Rule::AllowIf(alternatives), _)) => Leaf::AllowIf(alternatives),
            };
            match (ranges.last(), &leaf) {
                (Some((_, Leaf::Ret(previous))), Leaf::Ret(action)) if previous == action => {}
                _ => ranges.push((nr, leaf)),
            }
        }
        ranges
    }
}

/// Code for a sorted list of `(first number, leaf)` ranges; the syscall number is in
/// the accumulator on entry, and every path ends in a `ret`.
fn tree(ranges: &[(u32, Leaf<'_>)]) -> Vec<libc::sock_filter> {
    if let [(_, leaf)] = ranges {
        return leaf.code();
    }
    let mid = ranges.len() / 2;
    let (left, right) = (tree(&ranges[..mid]), tree(&ranges[mid..]));
    let pivot = ranges[mid].0;
    let mut code = Vec::with_capacity(left.len() + right.len() + 2);
    match u8::try_from(left.len()) {
        // nr >= pivot: skip the left subtree; else fall into it.
        Ok(skip) => code.push(jump(libc::BPF_JGE, pivot, skip, 0)),
        // Too far for a conditional jump: go through a `ja` trampoline.
        Err(_) => {
            code.push(jump(libc::BPF_JGE, pivot, 0, 1));
            code.push(stmt(libc::BPF_JMP | libc::BPF_JA, left.len() as u32));
        }
    }
    code.extend(left);
    code.extend(right);
    code
}

/// The code at the end of one branch of the number tree.
#[derive(Debug, Clone, Copy)]
enum Leaf<'a> {
    Ret(Action),
    AllowIf(&'a [Vec<Condition>]),
}

impl Leaf<'_> {
    fn code(&self) -> Vec<libc::sock_filter> {
        let alternatives = match self {
            Leaf::Ret(action) => return vec![ret(*action)],
            Leaf::AllowIf(alternatives) => alternatives,
        };
        let mut code = Vec::new();
        for conditions in alternatives.iter() {
            // Each alternative: load/mask/compare per condition; a failed comparison
            // jumps past this alternative's final `ret allow` to the next alternative.
            let mut block = Vec::new();
            let mut compares = Vec::new();
            let mut loaded = None;
            for condition in conditions {
                if condition.mask.is_some() || loaded != Some(condition.arg) {
                    block.push(stmt(
                        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                        offset_arg_low(condition.arg),
                    ));
                    loaded = Some(condition.arg);
                }
                if let Some(mask) = condition.mask {
                    block.push(stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, mask));
                    loaded = None;
                }
                compares.push((block.len(), condition.op));
                block.push(jump(libc::BPF_JEQ, condition.value, 0, 0));
            }
            block.push(ret(Action::Allow));
            for (index, op) in compares {
                // At most MAX_CONDITIONS * 3 instructions: always fits (checked again by
                // `verify`).
                let skip = u8::try_from(block.len() - index - 1).unwrap_or(u8::MAX);
                match op {
                    Op::Eq => block[index].jf = skip,
                    Op::Ne => block[index].jt = skip,
                }
            }
            code.extend(block);
        }
        code.push(ret(Action::EPERM));
        code
    }
}

/// A compiled, verified classic-BPF seccomp program.
#[derive(Debug, Clone)]
pub struct BpfProgram {
    filter: Vec<libc::sock_filter>,
}

impl BpfProgram {
    /// The instructions.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.filter
    }

    /// The number of instructions.
    pub fn len(&self) -> usize {
        self.filter.len()
    }

    /// Whether the program is empty (never true for a compiled policy).
    pub fn is_empty(&self) -> bool {
        self.filter.is_empty()
    }

    /// Installs the program as a seccomp filter of the calling thread, inherited by every
    /// process it forks or executes, and irremovable.
    ///
    /// Does **not** set `no_new_privs` (setuid binaries such as `sudo` must keep
    /// working in the sandbox): the kernel then requires `CAP_SYS_ADMIN` in the caller's
    /// user namespace, which the sandbox init has until it calls
    /// [`caps::restrict_to`](super::caps::restrict_to). Applies to the calling thread
    /// only (no `TSYNC`): call it in the single-threaded init right before `execve`.
    pub fn install(&self) -> Result<(), SeccompError> {
        let len = u16::try_from(self.filter.len()).map_err(|_| SeccompError::TooLong {
            len: self.filter.len(),
        })?;
        let fprog = libc::sock_fprog {
            len,
            filter: self.filter.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` describes `self.filter`, a verified program of `len` valid
        // instructions that stays alive and unmodified for the whole call; the kernel
        // copies the program before returning and never writes through the pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
                0 as libc::c_ulong,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(SeccompError::Install(Errno::last()))
        }
    }
}

/// Checks what the kernel checks (length, jump targets, terminating `ret`), so that a
/// generator bug surfaces as an error at compile time rather than at install time.
fn verify(program: &[libc::sock_filter]) -> Result<(), SeccompError> {
    if program.len() > MAX_INSNS {
        return Err(SeccompError::TooLong { len: program.len() });
    }
    let in_range = |index: usize, skip: usize| index + 1 + skip < program.len();
    for (index, insn) in program.iter().enumerate() {
        let class = u32::from(insn.code) & 0x07;
        if class != libc::BPF_JMP {
            continue;
        }
        let ok = if u32::from(insn.code) & 0xf0 == libc::BPF_JA {
            in_range(index, insn.k as usize)
        } else {
            in_range(index, insn.jt.into()) && in_range(index, insn.jf.into())
        };
        if !ok {
            return Err(SeccompError::Malformed {
                index,
                what: "jump target beyond the end",
            });
        }
    }
    match program.last() {
        Some(last) if u32::from(last.code) & 0x07 == libc::BPF_RET => Ok(()),
        _ => Err(SeccompError::Malformed {
            index: program.len().saturating_sub(1),
            what: "program does not end in ret",
        }),
    }
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn ret(action: Action) -> libc::sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, action.ret_value())
}

fn syscall(name: &str) -> Result<u32, PolicyError> {
    syscalls::number(name).ok_or_else(|| PolicyError::UnknownSyscall(name.to_owned()))
}

/// Parses `COND [and COND]...`.
fn parse_conditions(words: &[&str]) -> Result<Vec<Condition>, PolicyError> {
    let conditions = words
        .split(|&word| word == "and")
        .map(parse_condition)
        .collect::<Result<Vec<_>, _>>()?;
    if conditions.len() > MAX_CONDITIONS {
        return Err(PolicyError::TooManyConditions);
    }
    Ok(conditions)
}

/// Parses `argN OP VALUE` or `argN & MASK OP VALUE`.
fn parse_condition(words: &[&str]) -> Result<Condition, PolicyError> {
    let (arg, mask, op, value) = match *words {
        [arg, op, value] => (arg, None, op, value),
        [arg, "&", mask, op, value] => (arg, Some(parse_value(mask)?), op, value),
        _ => {
            return Err(PolicyError::Syntax(
                "expected a condition `argN OP VALUE` or `argN & MASK OP VALUE`",
            ))
        }
    };
    let arg = arg
        .strip_prefix("arg")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| *n <= 5)
        .ok_or_else(|| PolicyError::BadArgument(arg.to_owned()))?;
    let op = match op {
        "==" => Op::Eq,
        "!=" => Op::Ne,
        other => return Err(PolicyError::BadOperator(other.to_owned())),
    };
    Ok(Condition {
        arg,
        mask,
        op,
        value: parse_value(value)?,
    })
}

/// Parses `TERM[|TERM]...` where a term is a decimal or `0x` hex number or a constant.
fn parse_value(text: &str) -> Result<u32, PolicyError> {
    let mut value: u64 = 0;
    for term in text.split('|') {
        let parsed = if let Some(hex) = term.strip_prefix("0x") {
            u64::from_str_radix(hex, 16).ok()
        } else if term.starts_with(|c: char| c.is_ascii_digit()) {
            term.parse::<u64>().ok()
        } else {
            constant(term)
        };
        value |= parsed.ok_or_else(|| PolicyError::UnknownConstant(term.to_owned()))?;
    }
    u32::try_from(value).map_err(|_| PolicyError::ValueTooLarge(text.to_owned()))
}

/// The named constants a policy may use in conditions.
pub fn constant(name: &str) -> Option<u64> {
    // Kernel ABI values from <linux/personality.h>; not exported by the libc crate.
    const PER_LINUX: u64 = 0x0000;
    const PER_LINUX32: u64 = 0x0008;
    let signed = |v: libc::c_int| u64::from(v as u32);
    Some(match name {
        "CLONE_NEWNS" => signed(libc::CLONE_NEWNS),
        "CLONE_NEWUTS" => signed(libc::CLONE_NEWUTS),
        "CLONE_NEWIPC" => signed(libc::CLONE_NEWIPC),
        "CLONE_NEWUSER" => signed(libc::CLONE_NEWUSER),
        "CLONE_NEWPID" => signed(libc::CLONE_NEWPID),
        "CLONE_NEWNET" => signed(libc::CLONE_NEWNET),
        "CLONE_NEWCGROUP" => signed(libc::CLONE_NEWCGROUP),
        "CLONE_NEWTIME" => signed(libc::CLONE_NEWTIME),
        "TIOCSTI" => libc::TIOCSTI,
        "TIOCLINUX" => libc::TIOCLINUX,
        "AF_VSOCK" => signed(libc::AF_VSOCK),
        "PER_LINUX" => PER_LINUX,
        "PER_LINUX32" => PER_LINUX32,
        "UNAME26" => signed(libc::UNAME26),
        _ => return None,
    })
}

/// Errno names accepted by `errno` statements.
const ERRNOS: &[(&str, libc::c_int)] = &[
    ("EPERM", libc::EPERM),
    ("ENOSYS", libc::ENOSYS),
    ("EACCES", libc::EACCES),
    ("EINVAL", libc::EINVAL),
    ("EAFNOSUPPORT", libc::EAFNOSUPPORT),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
];

fn errno_number(name: &str) -> Option<u16> {
    ERRNOS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, errno)| errno as u16)
}

fn errno_name(errno: u16) -> Option<&'static str> {
    ERRNOS
        .iter()
        .find(|&&(_, e)| e as u16 == errno)
        .map(|(name, _)| *name)
}
