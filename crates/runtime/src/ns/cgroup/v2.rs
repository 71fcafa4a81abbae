//! cgroup v2: the unified hierarchy.

use std::path::{Path, PathBuf};

use cubicle_core::Limits;

use super::{
    list_dirs, make_dir, read_pids, read_text, read_u64, remove_dir, stat_field, write_file,
    CgroupError, CgroupManager, CgroupStats, FreezerState, Join, CPU_PERIOD_US,
};

/// Controllers sandboxes need.
const REQUIRED: [&str; 3] = ["memory", "cpu", "pids"];

/// Sandbox cgroups in the unified hierarchy.
#[derive(Debug)]
pub struct CgroupV2 {
    mount: PathBuf,
    parent: String,
}

impl CgroupV2 {
    /// Sandbox cgroups under `<mount>/<parent>/`.
    pub fn new(mount: PathBuf, parent: &str) -> Self {
        CgroupV2 {
            mount,
            parent: parent.to_owned(),
        }
    }

    /// Whether the hierarchy at `mount` offers memory, cpu and pids.
    pub fn has_required_controllers(mount: &Path) -> bool {
        std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map(|c| {
                REQUIRED
                    .iter()
                    .all(|r| c.split_whitespace().any(|x| x == *r))
            })
            .unwrap_or(false)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.mount.join(&self.parent).join(name)
    }

    /// Enables the required controllers for the children of `dir`.
    fn delegate(dir: &Path) -> Result<(), CgroupError> {
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        let missing: Vec<String> = REQUIRED
            .iter()
            .filter(|r| !enabled.split_whitespace().any(|x| x == **r))
            .map(|r| format!("+{r}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        write_file(&control, &missing.join(" "))
    }
}

impl CgroupManager for CgroupV2 {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let parent = self.mount.join(&self.parent);
        Self::delegate(&self.mount)?;
        make_dir(&parent)?;
        Self::delegate(&parent)?;
        let dir = self.dir(name);
        make_dir(&dir)?;
        write_file(&dir.join("memory.max"), &limits.memory_bytes().to_string())?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
        write_file(
            &dir.join("cpu.max"),
            &format!(
                "{} {CPU_PERIOD_US}",
                u64::from(limits.cpu_count) * CPU_PERIOD_US
            ),
        )?;
        write_file(&dir.join("pids.max"), &limits.pids.to_string())?;
        Ok(())
    }

    fn join(&self, _name: &str) -> Join {
        // Writing "0" to cgroup.procs would still take the global lock in v2; the
        // runtime writes the pid instead.
        Join::RuntimeWrites
    }

    fn add_process(&self, name: &str, pid: libc::pid_t) -> Result<(), CgroupError> {
        write_file(&self.dir(name).join("cgroup.procs"), &pid.to_string())
    }

    fn processes(&self, name: &str) -> Result<Vec<libc::pid_t>, CgroupError> {
        read_pids(&self.dir(name).join("cgroup.procs"))
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        remove_dir(&self.dir(name))
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        list_dirs(&self.mount.join(&self.parent))
    }

    fn file(&self, name: &str, file: &str) -> PathBuf {
        self.dir(name).join(file)
    }

    fn stats(&self, name: &str) -> Result<CgroupStats, CgroupError> {
        let dir = self.dir(name);
        let cpu = read_text(&dir.join("cpu.stat"))?;
        let memory = read_text(&dir.join("memory.stat"))?;
        Ok(CgroupStats {
            cpu_usage_ns: stat_field(&cpu, "usage_usec").unwrap_or(0) * 1000,
            memory_bytes: read_u64(&dir.join("memory.current"))?,
            memory_limit_bytes: read_u64(&dir.join("memory.max"))?,
            memory_cache_bytes: stat_field(&memory, "file").unwrap_or(0),
            pids: read_u64(&dir.join("pids.current"))?,
        })
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError> {
        write_file(
            &self.dir(name).join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    fn freezer_dir(&self, name: &str) -> PathBuf {
        self.dir(name)
    }

    fn self_move_files(&self, name: &str) -> Vec<PathBuf> {
        vec![self.dir(name).join("cgroup.procs")]
    }

    fn freezer_state(&self, name: &str) -> Result<FreezerState, CgroupError> {
        let dir = self.dir(name);
        // `cgroup.events` says whether the freeze has completed; `cgroup.freeze` what
        // was asked for.
        if stat_field(&read_text(&dir.join("cgroup.events"))?, "frozen") == Some(1) {
            return Ok(FreezerState::Frozen);
        }
        Ok(match read_text(&dir.join("cgroup.freeze"))?.trim() {
            "1" => FreezerState::Freezing,
            _ => FreezerState::Thawed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_delegates_controllers_and_writes_limits() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(tmp.path().join("cgroup.subtree_control"), "cpu\n").unwrap();
        assert!(CgroupV2::has_required_controllers(tmp.path()));
        let cg = CgroupV2::new(tmp.path().to_owned(), "cubicle");
        let limits = Limits {
            cpu_count: 2,
            memory_mb: 64,
            pids: 50,
        };
        cg.create("sbx", &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        // A fake file is overwritten where the kernel would append; the last write wins.
        assert_eq!(read("cgroup.subtree_control"), "+memory +pids");
        assert_eq!(read("cubicle/sbx/memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("cubicle/sbx/cpu.max"), "200000 100000");
        assert_eq!(read("cubicle/sbx/pids.max"), "50");
        assert_eq!(cg.list().unwrap(), vec!["sbx".to_string()]);
    }

    #[test]
    fn freeze_is_asked_in_cgroup_freeze_and_seen_in_cgroup_events() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = CgroupV2::new(tmp.path().to_owned(), "cubicle");
        let dir = tmp.path().join("cubicle/sbx");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        cg.set_frozen("sbx", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "1"
        );
        assert_eq!(cg.freezer_state("sbx").unwrap(), FreezerState::Freezing);
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert_eq!(cg.freezer_state("sbx").unwrap(), FreezerState::Frozen);
        cg.set_frozen("sbx", false).unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert_eq!(cg.freezer_state("sbx").unwrap(), FreezerState::Thawed);
    }

    #[test]
    fn missing_controllers_are_detected() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        assert!(!CgroupV2::has_required_controllers(tmp.path()));
    }
}
