//! cgroup v1: one hierarchy per controller.

use std::path::{Path, PathBuf};

use cubicle_core::Limits;

use super::{
    list_dirs, make_dir, read_pids, read_text, read_u64, remove_dir, stat_field, write_file,
    CgroupError, CgroupManager, CgroupStats, FreezerState, Join, CPU_PERIOD_US,
};

/// Mount points of the v1 controllers sandboxes use.
#[derive(Debug, Clone)]
pub struct Mounts {
    /// `memory` controller.
    pub memory: PathBuf,
    /// `cpu` controller (often co-mounted with cpuacct).
    pub cpu: PathBuf,
    /// `cpuacct` controller (CPU usage accounting; may be the same mount as `cpu`).
    pub cpuacct: PathBuf,
    /// `pids` controller.
    pub pids: PathBuf,
    /// `freezer` controller (pause/resume).
    pub freezer: PathBuf,
}

/// Sandbox cgroups in v1 hierarchies.
#[derive(Debug)]
pub struct CgroupV1 {
    mounts: Mounts,
    parent: String,
}

impl CgroupV1 {
    /// Sandbox cgroups under `<controller mount>/<parent>/`.
    pub fn new(mounts: Mounts, parent: &str) -> Self {
        CgroupV1 {
            mounts,
            parent: parent.to_owned(),
        }
    }

    /// The distinct hierarchies (co-mounted controllers share one).
    fn hierarchies(&self) -> Vec<&PathBuf> {
        let m = &self.mounts;
        let mut all = vec![&m.memory, &m.cpu, &m.cpuacct, &m.pids, &m.freezer];
        all.dedup_by(|a, b| a == b);
        let mut distinct: Vec<&PathBuf> = Vec::new();
        for h in all {
            if !distinct.contains(&h) {
                distinct.push(h);
            }
        }
        distinct
    }

    /// The sandbox's directory in every hierarchy.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        self.hierarchies()
            .into_iter()
            .map(|m| m.join(&self.parent).join(name))
            .collect()
    }

    /// The sandbox's directory in the hierarchy of `controller`.
    fn dir(&self, controller: &Path, name: &str) -> PathBuf {
        controller.join(&self.parent).join(name)
    }
}

impl CgroupManager for CgroupV1 {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        for dir in self.dirs(name) {
            make_dir(dir.parent().expect("joined path has a parent"))?;
            make_dir(&dir)?;
        }
        let m = &self.mounts;
        let (memory, cpu, pids) = (
            self.dir(&m.memory, name),
            self.dir(&m.cpu, name),
            self.dir(&m.pids, name),
        );
        let bytes = limits.memory_bytes().to_string();
        write_file(&memory.join("memory.limit_in_bytes"), &bytes)?;
        // Swap off: memory+swap may not exceed memory (only present with swap accounting).
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_file(&memsw, &bytes)?;
        }
        let swappiness = memory.join("memory.swappiness");
        if swappiness.exists() {
            write_file(&swappiness, "0")?;
        }
        write_file(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write_file(
            &cpu.join("cpu.cfs_quota_us"),
            &(u64::from(limits.cpu_count) * CPU_PERIOD_US).to_string(),
        )?;
        write_file(&pids.join("pids.max"), &limits.pids.to_string())?;
        Ok(())
    }

    fn join(&self, name: &str) -> Join {
        Join::SelfJoin(self.self_move_files(name))
    }

    fn add_process(&self, name: &str, pid: libc::pid_t) -> Result<(), CgroupError> {
        for dir in self.dirs(name) {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn processes(&self, name: &str) -> Result<Vec<libc::pid_t>, CgroupError> {
        let mut all = Vec::new();
        for dir in self.dirs(name) {
            all.extend(read_pids(&dir.join("cgroup.procs"))?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(name) {
            remove_dir(&dir)?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = Vec::new();
        for m in self.hierarchies() {
            names.extend(list_dirs(&m.join(&self.parent))?);
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn file(&self, name: &str, file: &str) -> PathBuf {
        let m = &self.mounts;
        let controller = match file.split('.').next() {
            Some("memory") => &m.memory,
            Some("cpu") => &m.cpu,
            Some("cpuacct") => &m.cpuacct,
            Some("freezer") => &m.freezer,
            _ => &m.pids,
        };
        self.dir(controller, name).join(file)
    }

    fn stats(&self, name: &str) -> Result<CgroupStats, CgroupError> {
        let memory_stat = read_text(&self.file(name, "memory.stat"))?;
        Ok(CgroupStats {
            cpu_usage_ns: read_u64(&self.file(name, "cpuacct.usage"))?,
            memory_bytes: read_u64(&self.file(name, "memory.usage_in_bytes"))?,
            memory_limit_bytes: read_u64(&self.file(name, "memory.limit_in_bytes"))?,
            memory_cache_bytes: stat_field(&memory_stat, "total_cache")
                .or_else(|| stat_field(&memory_stat, "cache"))
                .unwrap_or(0),
            pids: read_u64(&self.file(name, "pids.current"))?,
        })
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError> {
        let state = if frozen { "FROZEN" } else { "THAWED" };
        write_file(&self.file(name, "freezer.state"), state)
    }

    fn freezer_dir(&self, name: &str) -> PathBuf {
        self.dir(&self.mounts.freezer, name)
    }

    fn self_move_files(&self, name: &str) -> Vec<PathBuf> {
        self.dirs(name).iter().map(|d| d.join("tasks")).collect()
    }

    fn freezer_state(&self, name: &str) -> Result<FreezerState, CgroupError> {
        Ok(match read_text(&self.file(name, "freezer.state"))?.trim() {
            "FROZEN" => FreezerState::Frozen,
            "FREEZING" => FreezerState::Freezing,
            _ => FreezerState::Thawed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (tempfile::TempDir, CgroupV1) {
        let tmp = tempfile::tempdir().unwrap();
        let m = |n: &str| {
            let p = tmp.path().join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let cpu = m("cpu,cpuacct");
        let mounts = Mounts {
            memory: m("memory"),
            cpuacct: cpu.clone(),
            cpu,
            pids: m("pids"),
            freezer: m("freezer"),
        };
        (tmp, CgroupV1::new(mounts, "cubicle"))
    }

    #[test]
    fn create_writes_limits_into_each_controller() {
        let (tmp, cg) = fake();
        let limits = Limits {
            cpu_count: 3,
            memory_mb: 512,
            pids: 99,
        };
        cg.create("sbx", &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(
            read("memory/cubicle/sbx/memory.limit_in_bytes"),
            (512u64 << 20).to_string()
        );
        assert_eq!(read("cpu,cpuacct/cubicle/sbx/cpu.cfs_quota_us"), "300000");
        assert_eq!(read("cpu,cpuacct/cubicle/sbx/cpu.cfs_period_us"), "100000");
        assert_eq!(
            cg.dirs("sbx").len(),
            4,
            "co-mounted cpu,cpuacct is one hierarchy"
        );
        assert_eq!(read("pids/cubicle/sbx/pids.max"), "99");
        assert!(tmp.path().join("freezer/cubicle/sbx").is_dir());
        assert_eq!(cg.list().unwrap(), vec!["sbx".to_string()]);
        cg.add_process("sbx", 42).unwrap();
        assert_eq!(read("pids/cubicle/sbx/cgroup.procs"), "42");
        assert_eq!(cg.processes("sbx").unwrap(), vec![42]);
    }

    #[test]
    fn freezer_state_is_written_and_read_in_the_freezer_hierarchy() {
        let (tmp, cg) = fake();
        cg.create("sbx", &Limits::default()).unwrap();
        let state = tmp.path().join("freezer/cubicle/sbx/freezer.state");
        cg.set_frozen("sbx", true).unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "FROZEN");
        assert_eq!(cg.freezer_state("sbx").unwrap(), FreezerState::Frozen);
        std::fs::write(&state, "FREEZING\n").unwrap();
        assert_eq!(cg.freezer_state("sbx").unwrap(), FreezerState::Freezing);
        cg.set_frozen("sbx", false).unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "THAWED");
        assert_eq!(cg.freezer_state("sbx").unwrap(), FreezerState::Thawed);
    }

    #[test]
    fn self_move_files_are_the_tasks_of_each_hierarchy() {
        let (_tmp, cg) = fake();
        let files = cg.self_move_files("sbx");
        assert_eq!(files.len(), cg.dirs("sbx").len());
        for (file, dir) in files.iter().zip(cg.dirs("sbx")) {
            assert_eq!(file, &dir.join("tasks"));
            assert!(file.ends_with("cubicle/sbx/tasks"));
        }
        assert!(cg.freezer_dir("sbx").ends_with("freezer/cubicle/sbx"));
    }

    #[test]
    fn remove_is_idempotent() {
        let (_tmp, cg) = fake();
        cg.create("sbx", &Limits::default()).unwrap();
        // A fake cgroupfs holds regular files; remove them like the kernel would.
        for dir in cg.dirs("sbx") {
            for e in std::fs::read_dir(&dir).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
        cg.remove("sbx").unwrap();
        cg.remove("sbx").unwrap();
        assert!(cg.list().unwrap().is_empty());
        assert!(cg.processes("sbx").unwrap().is_empty());
    }
}
