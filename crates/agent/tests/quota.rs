//! The writable-layer quota (`SandboxSpec::writable_layer_mib`): writes past it fail with
//! ENOSPC inside the sandbox (for its root too), the host's disk only pays for what the
//! limit allows, a sandbox without a limit is unaffected, deleting files frees space, a
//! restored (cloned) sandbox keeps the limit, and nothing stays mounted or attached.

mod support;

use std::os::unix::fs::MetadataExt;

use cubicle_core::ErrorKind;
use cubicle_runtime::Runtime;
use support::{Sandbox, TestEnv};

const LIMIT_MIB: u64 = 64;
const MIB: u64 = 1 << 20;

/// Bytes the sandbox's layer image takes on the host's disk now.
fn image_bytes(env: &TestEnv, sbx: &Sandbox) -> u64 {
    let image = env
        .data
        .path()
        .join("sandboxes")
        .join(sbx.id().as_str())
        .join("layer.img");
    std::fs::metadata(&image)
        .unwrap_or_else(|e| panic!("{}: {e}", image.display()))
        .blocks()
        * 512
}

/// Free bytes of the host filesystem the data dir is on.
fn host_free(env: &TestEnv) -> u64 {
    let s = nix::sys::statvfs::statvfs(env.data.path()).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Writes `mib` MiB of zeros to `path` inside the sandbox; returns (exit code, stderr).
async fn write(sbx: &Sandbox, path: &str, mib: u64) -> (i32, String) {
    let out = sbx
        .sh(&format!("head -c {mib}M /dev/zero > {path} && sync {path}"))
        .await;
    (
        out.end.exit_code,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn limited(env: &TestEnv) -> cubicle_runtime::SandboxSpec {
    let mut spec = env.spec();
    spec.writable_layer_mib = Some(LIMIT_MIB);
    spec
}

#[tokio::test]
async fn writes_past_the_limit_fail_with_enospc_and_the_host_pays_only_the_limit() {
    let env = TestEnv::new();
    let sbx = env.create_spec(limited(&env)).await.expect("create");
    let (image_before, free_before) = (image_bytes(&env, &sbx), host_free(&env));

    // The write stops at the limit whatever it asks for: ask for 4 GiB.
    let (code, stderr) = write(&sbx, "/home/user/big", 4096).await;
    assert_ne!(code, 0, "a write of 4 GiB succeeded");
    assert!(
        stderr.contains("No space left on device"),
        "stderr: {stderr}"
    );
    let (used, _) = env
        .runtime
        .layer_usage(sbx.id())
        .unwrap()
        .expect("a limited sandbox has a layer filesystem");
    assert!(used <= LIMIT_MIB * MIB, "the layer holds {used} bytes");
    assert!(
        used >= (LIMIT_MIB - 8) * MIB,
        "the layer holds {used} bytes"
    );
    // The host paid for at most the limit (the image is sparse), not for the attempt.
    let grown = image_bytes(&env, &sbx).saturating_sub(image_before);
    assert!(
        grown <= (LIMIT_MIB + 8) * MIB,
        "the volume's image grew by {} MiB",
        grown / MIB
    );
    let fell = free_before.saturating_sub(host_free(&env));
    eprintln!(
        "image grew {} MiB, host free space fell {} MiB",
        grown / MIB,
        fell / MIB
    );
    // Other tests and processes write too: the bound only shows the 4 GiB did not land.
    assert!(
        fell < 1024 * MIB,
        "host free space fell by {} MiB",
        fell / MIB
    );

    // Deleting the file frees the quota: writing works again.
    let out = sbx.sh("rm /home/user/big && sync").await;
    assert_eq!(out.end.exit_code, 0);
    let (code, stderr) = write(&sbx, "/home/user/again", LIMIT_MIB / 2).await;
    assert_eq!(code, 0, "write after delete: {stderr}");

    // A sandbox without a limit is not bound by it.
    let free = env.create().await;
    assert_eq!(env.runtime.layer_usage(free.id()).unwrap(), None);
    let (code, stderr) = write(&free, "/home/user/big", 2 * LIMIT_MIB).await;
    assert_eq!(code, 0, "unlimited sandbox: {stderr}");
    free.destroy().await;

    // Destroying the sandbox unmounts its layer and detaches its loop device.
    let image = env
        .data
        .path()
        .join("sandboxes")
        .join(sbx.id().as_str())
        .join("layer.img");
    assert_eq!(mounts_under(&env, "sandboxes"), 1);
    assert!(loop_backs(&image));
    sbx.destroy().await;
    assert_eq!(
        mounts_under(&env, "sandboxes"),
        0,
        "the layer stayed mounted"
    );
    // The loop device clears itself once the sandbox's mount namespace is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while loop_backs(&image) {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop device stayed attached"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Ready-made layers (the pool) go when the runtime drains it.
    assert!(mounts_under(&env, "volumes") > 0, "no ready layers");
    env.runtime.drain_layer_pool();
    assert_eq!(mounts_under(&env, ""), 0, "mounts left behind");
}

/// Mounts under `sub` of the test's data dir (in this mount namespace).
fn mounts_under(env: &TestEnv, sub: &str) -> usize {
    let dir = env.data.path().join(sub);
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| std::path::Path::new(l.split(' ').nth(4).unwrap_or("")).starts_with(&dir))
        .count()
}

/// Whether a loop device is backed by `image` (deleted or not).
fn loop_backs(image: &std::path::Path) -> bool {
    let want = image.display().to_string();
    std::fs::read_dir("/sys/block").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("loop/backing_file"))
            .is_ok_and(|b| b.trim_end().trim_end_matches(" (deleted)") == want)
    })
}

#[tokio::test]
async fn root_inside_gets_no_more_and_sees_the_limit_as_its_disk() {
    let env = TestEnv::new();
    let sbx = env.create_spec(limited(&env)).await.expect("create");
    // The root filesystem reports the layer's size (overlayfs shows its upper's).
    let out = sbx.sh("df -B1 --output=size / | tail -1").await;
    let size: u64 = out.stdout_text().trim().parse().expect("df size");
    assert!(
        ((LIMIT_MIB - 4) * MIB..=LIMIT_MIB * MIB).contains(&size),
        "df says {size}"
    );
    // Root has no reserved blocks to dip into, and no way to grow or remount the layer.
    let out = sbx
        .root_sh(&format!(
            "head -c {}M /dev/zero > /root-big; echo rc=$?",
            2 * LIMIT_MIB
        ))
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.stdout_text().contains("rc=1"), "{}", out.stdout_text());
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let out = sbx
        .root_sh("mount -o remount,rw / 2>&1; ls /dev/loop* 2>&1; true")
        .await;
    let text = out.stdout_text();
    assert!(!text.contains("/dev/loop0"), "{text}");
    // Many small files run out of room too, with the same error.
    let out = sbx
        .sh("rm -f /home/user/x; mkdir /tmp/many && cd /tmp/many && i=0; while [ $i -lt 20000 ]; do echo > f$i || break; i=$((i+1)); done; echo n=$i")
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("No space left on device"), "{stderr}");
}

#[tokio::test]
async fn a_restored_clone_keeps_the_limit_on_a_layer_of_its_own() {
    let env = TestEnv::new();
    let sbx = env.create_spec(limited(&env)).await.expect("create");
    let (code, stderr) = write(&sbx, "/home/user/kept", 8).await;
    assert_eq!(code, 0, "{stderr}");
    let dir = env.data.path().join("ckpt");
    env.runtime
        .checkpoint(sbx.id(), &dir)
        .await
        .expect("checkpoint of a sandbox whose layer is on the quota volume");
    // A second checkpoint links what did not change from the first (across filesystems:
    // the layer is on the volume, the checkpoints are not).
    let dir2 = env.data.path().join("ckpt2");
    env.runtime
        .checkpoint(sbx.id(), &dir2)
        .await
        .expect("second checkpoint");

    let clone = env
        .create_restored(&dir, limited(&env))
        .await
        .expect("restore");
    assert!(env.runtime.layer_usage(clone.id()).unwrap().is_some());
    let out = clone.sh("wc -c < /home/user/kept").await;
    assert_eq!(out.stdout_text().trim(), (8 * MIB).to_string());
    let (code, stderr) = write(&clone, "/home/user/big", 4 * LIMIT_MIB).await;
    assert_ne!(code, 0, "the clone wrote past its limit");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // Overwriting the restored file copies it up into the limited layer too.
    let (code, _) = write(&clone, "/home/user/kept", 4 * LIMIT_MIB).await;
    assert_ne!(code, 0);

    // A checkpoint of the clone (its base layer and its limited layer, flattened) restores.
    let dir3 = env.data.path().join("ckpt3");
    env.runtime
        .checkpoint(clone.id(), &dir3)
        .await
        .expect("checkpoint of the clone");
    let again = env
        .create_restored(&dir3, limited(&env))
        .await
        .expect("restore of the clone's checkpoint");
    let (code, stderr) = write(&again, "/tmp/big", 4 * LIMIT_MIB).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // The same checkpoint without a limit restores onto the data dir's disk.
    let unlimited = env
        .create_restored(&dir3, env.spec())
        .await
        .expect("restore without a limit");
    assert_eq!(env.runtime.layer_usage(unlimited.id()).unwrap(), None);
}

#[tokio::test]
async fn limited_creates_take_ready_layers_and_destroys_leave_nothing() {
    let env = TestEnv::new();
    let mut sandboxes = Vec::new();
    let mut took = Vec::new();
    for _ in 0..4 {
        let started = std::time::Instant::now();
        sandboxes.push(env.create_spec(limited(&env)).await.expect("create"));
        took.push(started.elapsed());
        // Give the pool a moment to make the next one, as between real requests.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!("limited creates: {took:?}");
    for sbx in &sandboxes {
        let (code, stderr) = write(sbx, "/home/user/big", 2 * LIMIT_MIB).await;
        assert_ne!(code, 0);
        assert!(stderr.contains("No space left on device"), "{stderr}");
    }
    for sbx in sandboxes {
        sbx.destroy().await;
    }
    assert_eq!(mounts_under(&env, "sandboxes"), 0);
    env.runtime.drain_layer_pool();
    assert_eq!(mounts_under(&env, ""), 0, "mounts left behind");
    let volumes = env.data.path().join("volumes");
    for sub in ["pool", "trash"] {
        let left: Vec<_> = std::fs::read_dir(volumes.join(sub))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
}

#[tokio::test]
async fn a_limit_out_of_range_is_refused_clearly() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.writable_layer_mib = Some(1);
    let err = env.create_spec(spec).await.err().expect("1 MiB accepted");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("out of range"), "{err}");
    // Nothing was left behind, and no volume was made for it.
    assert_eq!(
        std::fs::read_dir(env.data.path().join("sandboxes"))
            .unwrap()
            .count(),
        0
    );
    assert!(!env.data.path().join("volumes").exists());
    assert_eq!(mounts_under(&env, ""), 0);
}
