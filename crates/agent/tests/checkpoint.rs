//! Checkpoints of real sandboxes with CRIU: taken while the sandbox runs, restored as
//! new sandboxes (create-from-snapshot and clone) with everything inside as it was.

mod support;

use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;

use cubicle_core::{DataDir, SandboxId};
use cubicle_runtime::ns::{NsConfig, NsRuntime};
use cubicle_runtime::{Runtime, RuntimeError};
use support::TestEnv;

const COUNTER: &str = "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; \
     mv /tmp/count.new /tmp/count; sleep 0.01; done' >/dev/null 2>&1 &";

/// Host pids of every live process whose pid namespace is that of `pid` (zombies have
/// left their cgroup already).
fn processes_in_pid_ns_of(pid: u32) -> Vec<u32> {
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let zombie = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let target = ns(pid).expect("the sandbox's pid namespace");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| ns(*p).as_ref() == Some(&target) && !zombie(*p))
        .collect()
}

async fn count(sbx: &support::Sandbox) -> u64 {
    sbx.sh("cat /tmp/count")
        .await
        .stdout_text()
        .trim()
        .parse()
        .unwrap_or(0)
}

async fn wait_count_above(sbx: &support::Sandbox, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = count(sbx).await;
        if c > n {
            return c;
        }
        assert!(Instant::now() < deadline, "counter stuck at {c}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_checkpoint_restores_as_independent_sandboxes_with_everything_inside() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    sbx.sh("echo on-disk > /home/user/kept.txt && echo in-shm > /dev/shm/kept")
        .await;
    sbx.sh(COUNTER).await;
    // A process that keeps a file open and writes through it.
    sbx.sh("nohup python3 -c 'import time\nf = open(\"/tmp/fd.log\", \"a\", buffering=1)\nn = 0\nwhile True:\n    n += 1; f.write(str(n) + chr(10)); time.sleep(0.01)' >/dev/null 2>&1 &")
        .await;
    wait_count_above(&sbx, 2).await;

    let dir = env.data.path().join("ckpt");
    let started = Instant::now();
    let info = env
        .runtime
        .checkpoint(sbx.id(), &dir)
        .await
        .expect("checkpoint");
    let took = started.elapsed();
    assert!(info.size_bytes > 0);
    assert_eq!(info.layers, env.layers);
    // The source runs on.
    let c = count(&sbx).await;
    wait_count_above(&sbx, c).await;

    let mut clones = Vec::new();
    let mut restore_times = Vec::new();
    for i in 0..2 {
        let mut spec = env.spec();
        spec.agent.access_token = Some(format!("token-of-clone-{i}"));
        spec.agent.env_vars.insert("CLONE".into(), i.to_string());
        let started = Instant::now();
        let clone = env.create_restored(&dir, spec).await.expect("restore");
        restore_times.push(started.elapsed());
        clones.push(clone);
    }
    eprintln!(
        "checkpoint {took:?} (frozen {} us, {} bytes), restores {restore_times:?}",
        info.frozen_us, info.size_bytes
    );
    for (i, clone) in clones.iter().enumerate() {
        // The clone's own token and env vars, not the source's.
        assert_eq!(
            clone.sh("echo $CLONE").await.stdout_text(),
            format!("{i}\n")
        );
        let tokenless = cubicle_envd::client::EnvdClient::new(&clone.info.agent_socket);
        assert!(
            tokenless.run("true", None).await.is_err(),
            "a clone accepted no token"
        );
        assert_eq!(
            clone.sh("hostname").await.stdout_text().trim(),
            clone.id().as_str()
        );
        assert_eq!(
            clone.sh("cat /etc/hostname").await.stdout_text().trim(),
            clone.id().as_str()
        );
        assert_eq!(
            clone
                .sh("cat /home/user/kept.txt /dev/shm/kept")
                .await
                .stdout_text(),
            "on-disk\nin-shm\n"
        );
        // Processes go on from where the checkpoint caught them.
        let c = count(clone).await;
        assert!(c > 0);
        wait_count_above(clone, c).await;
        let lines = clone.sh("cat /tmp/fd.log").await.stdout_text();
        let numbers: Vec<u64> = lines
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    }
    // Clones diverge: a file written in one is in neither the other nor the source.
    clones[0].sh("echo mine > /tmp/only-here").await;
    assert_ne!(clones[1].sh("cat /tmp/only-here").await.end.exit_code, 0);
    assert_ne!(sbx.sh("cat /tmp/only-here").await.end.exit_code, 0);
    for clone in clones.iter() {
        // Every process of a clone, and nothing else, is in the clone's own cgroup (CRIU
        // restores inside it), and inside the clone that cgroup is the root.
        // (The counter's short-lived children come and go meanwhile: a process that
        // is gone by the second look is not held against either side.)
        let in_sandbox = processes_in_pid_ns_of(clone.info.pid as u32);
        let procs =
            std::fs::read_to_string(env.runtime.cgroup_file(clone.id(), "cgroup.procs")).unwrap();
        let in_cgroup: Vec<u32> = procs.lines().map(|p| p.parse().unwrap()).collect();
        let now_in_sandbox = processes_in_pid_ns_of(clone.info.pid as u32);
        for p in &in_sandbox {
            assert!(
                in_cgroup.contains(p) || !now_in_sandbox.contains(p),
                "process {p} of the clone is outside its cgroup ({in_cgroup:?})"
            );
        }
        for p in &in_cgroup {
            assert!(
                now_in_sandbox.contains(p) || !std::path::Path::new(&format!("/proc/{p}")).exists(),
                "process {p} in the clone's cgroup is not the clone's"
            );
        }
        assert!(in_cgroup.contains(&(clone.info.pid as u32)));
        let cgroups = clone.sh("cat /proc/self/cgroup").await.stdout_text();
        assert!(
            cgroups.lines().all(|l| l.ends_with(":/")),
            "the clone sees host cgroup paths: {cgroups}"
        );
        // Its network namespace is a new one with loopback up (IFF_UP = 0x1).
        let flags = clone.sh("cat /sys/class/net/lo/flags").await.stdout_text();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "lo is down in the clone");
    }

    // A restored sandbox can be checkpointed and restored again (CRIU's user namespace
    // check on a restored, non-dumpable agent: scripts/criu-patches/0003).
    let again = env.data.path().join("ckpt-of-clone");
    env.runtime
        .checkpoint(clones[0].id(), &again)
        .await
        .expect("checkpoint of a restored sandbox");
    let grandchild = env
        .create_restored(&again, env.spec())
        .await
        .expect("restore again");
    assert_eq!(
        grandchild.sh("cat /tmp/only-here").await.stdout_text(),
        "mine\n"
    );
    grandchild.destroy().await;

    // A paused sandbox can be checkpointed and stays paused.
    env.runtime.pause(sbx.id()).await.unwrap();
    let dir2 = env.data.path().join("ckpt2");
    env.runtime
        .checkpoint(sbx.id(), &dir2)
        .await
        .expect("checkpoint of a paused sandbox");
    assert!(env
        .runtime
        .list()
        .await
        .unwrap()
        .iter()
        .any(|s| &s.id == sbx.id() && s.paused));
    env.runtime.resume(sbx.id()).await.unwrap();

    for clone in clones {
        clone.destroy().await;
    }
    sbx.destroy().await;
}

/// A checkpoint taken with one build of the agent restores after the agent binary was
/// replaced by another (an upgrade): the restore mounts the agent the checkpoint was
/// taken with, which the data dir keeps by content; new sandboxes run the new one.
#[tokio::test]
async fn a_checkpoint_restores_after_the_agent_binary_changed() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    sbx.sh("echo kept > /home/user/f").await;
    let dir = env.data.path().join("before-upgrade");
    env.runtime.checkpoint(sbx.id(), &dir).await.unwrap();
    sbx.destroy().await;
    let json = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let runtime_record = |id: &SandboxId| {
        json(
            env.data
                .path()
                .join("sandboxes")
                .join(id.as_str())
                .join("runtime.json"),
        )
    };
    let meta = json(dir.join("checkpoint.json"));
    let old_agent = meta["agentBin"]
        .as_str()
        .expect("agentBin recorded")
        .to_owned();
    assert!(old_agent.starts_with(env.data.path().join("agents").to_str().unwrap()));

    // The same program one byte longer: another size, another digest.
    let newer = env.data.path().join("cubicle-agent-newer");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_cubicle-agent")).unwrap();
    bytes.push(0);
    std::fs::write(&newer, bytes).unwrap();
    std::fs::set_permissions(&newer, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = NsConfig::new(DataDir::new(env.data.path()), newer);
    config.cgroup_parent = "cubicle-test".into();
    let upgraded = std::sync::Arc::new(NsRuntime::new(config).unwrap());

    let spec = env.spec();
    let id = spec.id.clone();
    let restored = upgraded.restore(&dir, spec).await;
    let info = restored.expect("a checkpoint restores after an agent upgrade");
    let client = cubicle_envd::client::EnvdClient::new(&info.agent_socket);
    let out = client.run("cat /home/user/f", None).await.unwrap();
    assert_eq!(out.stdout_text(), "kept\n");
    let record = runtime_record(&id);
    assert_eq!(record["agentBin"], old_agent.as_str(), "{record:#}");
    upgraded.destroy(&id).await.unwrap();

    // A new sandbox of the upgraded runtime runs the new build.
    let spec = env.spec();
    let id = spec.id.clone();
    upgraded.create(spec).await.unwrap();
    let record = runtime_record(&id);
    let new_agent = record["agentBin"].as_str().unwrap();
    assert_ne!(new_agent, old_agent);
    assert_eq!(
        std::fs::metadata(new_agent).unwrap().len(),
        std::fs::metadata(&old_agent).unwrap().len() + 1
    );
    upgraded.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn failed_checkpoints_and_restores_leave_nothing_behind() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    // An existing target directory is refused and left alone.
    let taken = env.data.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    assert!(env.runtime.checkpoint(sbx.id(), &taken).await.is_err());
    assert!(taken.is_dir());
    // Unknown sandbox.
    let missing = SandboxId::generate();
    assert!(matches!(
        env.runtime
            .checkpoint(&missing, &env.data.path().join("x"))
            .await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(!env.data.path().join("x").exists());
    // A directory that holds no checkpoint.
    let spec = env.spec();
    let id = spec.id.clone();
    assert!(matches!(
        env.runtime.restore(&taken, spec).await,
        Err(RuntimeError::Checkpoint { .. })
    ));
    assert!(!env.data.path().join("sandboxes").join(id.as_str()).exists());
    assert!(!env
        .runtime
        .cgroup_names()
        .unwrap()
        .contains(&id.to_string()));
    // The sandbox is untouched.
    assert_eq!(sbx.sh("echo ok").await.stdout_text(), "ok\n");
    sbx.destroy().await;
}

#[tokio::test]
async fn a_full_disk_fails_the_checkpoint_clearly_and_leaves_the_sandbox_running() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    // Enough room for CRIU's first images, not for all of them.
    let full = env.data.path().join("full");
    std::fs::create_dir(&full).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &full,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=256k"),
    )
    .unwrap();
    let dir = full.join("ckpt");
    let result = env.runtime.checkpoint(sbx.id(), &dir).await;
    let listed = std::fs::read_dir(&full).unwrap().count();
    nix::mount::umount(&full).unwrap();
    let err = result.expect_err("a checkpoint onto a full disk");
    assert!(
        err.to_string().contains("No space left") || format!("{err:?}").contains("No space left"),
        "{err:?}"
    );
    assert_eq!(listed, 0, "the half-written checkpoint was removed");
    // The sandbox runs on, thawed.
    assert_eq!(sbx.sh("echo ok").await.stdout_text(), "ok\n");
    assert!(env
        .runtime
        .list()
        .await
        .unwrap()
        .iter()
        .any(|s| s.id == *sbx.id() && !s.paused));
    sbx.destroy().await;
}

#[tokio::test]
async fn checkpoints_link_what_did_not_change_since_the_last_one() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    let sbx = env.create().await;
    sbx.sh("head -c 4194304 /dev/urandom > /home/user/big && echo v1 > /home/user/small")
        .await;
    let ino = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
    let big = |dir: &std::path::Path| dir.join("upper/home/user/big");

    let first = env.data.path().join("first");
    env.runtime.checkpoint(sbx.id(), &first).await.unwrap();
    sbx.sh("echo v2 > /home/user/small").await;
    let second = env.data.path().join("second");
    env.runtime.checkpoint(sbx.id(), &second).await.unwrap();
    assert_eq!(
        ino(big(&first)),
        ino(big(&second)),
        "the unchanged file is linked"
    );
    assert_ne!(
        ino(first.join("upper/home/user/small")),
        ino(second.join("upper/home/user/small"))
    );
    assert_eq!(
        std::fs::read_to_string(second.join("upper/home/user/small")).unwrap(),
        "v2\n"
    );

    // Written in place (same size): copied again, and the older copies keep their bytes.
    let before = std::fs::read(big(&second)).unwrap();
    sbx.sh("printf x | dd of=/home/user/big bs=1 count=1 conv=notrunc 2>/dev/null")
        .await;
    let third = env.data.path().join("third");
    env.runtime.checkpoint(sbx.id(), &third).await.unwrap();
    assert_ne!(ino(big(&second)), ino(big(&third)));
    assert_eq!(std::fs::read(big(&third)).unwrap()[0], b'x');
    assert_eq!(std::fs::read(big(&second)).unwrap(), before);

    // A sandbox restored from a checkpoint runs on hard links to it (no byte copied)
    // and links from it at its own first checkpoint; its writes never reach it.
    let clone = env.create_restored(&third, env.spec()).await.unwrap();
    let clone_dir = env.data.path().join("sandboxes").join(clone.id().as_str());
    assert_eq!(ino(big(&third)), ino(clone_dir.join("base/home/user/big")));
    let of_clone = env.data.path().join("of-clone");
    env.runtime.checkpoint(clone.id(), &of_clone).await.unwrap();
    assert_eq!(ino(big(&third)), ino(big(&of_clone)));
    clone
        .sh(
            "printf y | dd of=/home/user/big bs=1 count=1 conv=notrunc 2>/dev/null \
             && rm /home/user/small && mkdir -p /home/user/new && echo n > /home/user/new/f",
        )
        .await;
    assert_eq!(std::fs::read(big(&third)).unwrap()[0], b'x');
    // Its next checkpoint is the base with its writes applied, and restores as such.
    let again = env.data.path().join("of-clone-again");
    env.runtime.checkpoint(clone.id(), &again).await.unwrap();
    let grandchild = env.create_restored(&again, env.spec()).await.unwrap();
    assert_eq!(
        grandchild
            .sh("head -c1 /home/user/big; echo; ls /home/user; cat /home/user/new/f")
            .await
            .stdout_text(),
        "y\nbig\nnew\nn\n"
    );
    assert_eq!(std::fs::read(big(&third)).unwrap()[0], b'x');
    grandchild.destroy().await;
    clone.destroy().await;
    sbx.destroy().await;
}
