//! `cubicle tpl create-from-image` from a registry: a real `docker-registry` on loopback
//! (see `support::registry`), images pushed to it with `skopeo`.
//!
//! - A three-layer image (a whiteout, an opaque directory) by tag: built, its layers
//!   downloaded into the blob cache, and a sandbox of it runs through the daemon; the
//!   same image by digest downloads no layer; an image sharing its layers downloads only
//!   its own; a multi-platform index resolves to linux/amd64; a pull from inside
//!   `spawn_blocking` (as the daemon runs builds) works.
//! - Credentials: the right ones work (also from CUBICLE_REGISTRY_PASSWORD), wrong or
//!   missing ones are clear errors.
//! - Errors: unknown tag, unreachable registry, corrupted layer, arm64-only image,
//!   malformed reference; each with its message, exit code 1, and nothing left behind.
//!
//! Needs root and the `base` template (its files make the images' userland), like the
//! other tests here, and the Debian packages docker-registry, skopeo, apache2-utils.

mod support;

use std::fs;
use std::path::Path;

use serde_json::{json, Value};
use support::images::{
    dir, file, files_layer, userland_layer, write_index, write_manifest, write_platform_index,
};
use support::registry::Registry;
use support::{Daemon, Run};

/// A private data dir (traversable by the sandboxes' unprivileged root).
fn data_dir() -> tempfile::TempDir {
    support::private_dir("cubicle-registry-test-", 0o711)
}

/// Files under `/data` that the next layer's opaque marker hides.
fn lower_data_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "data", 0o755);
    file(&mut b, "data/old1", b"hidden by the opaque dir\n", 0o644);
    dir(&mut b, "data/sub", 0o755);
    file(&mut b, "data/sub/old2", b"hidden too\n", 0o644);
    b.into_inner().unwrap()
}

/// `/marker`, a whiteout of `/etc/gone` and `/data` made opaque.
fn upper_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "marker", b"from the registry\n", 0o644);
    file(&mut b, "etc/.wh.gone", b"", 0o644);
    dir(&mut b, "data", 0o755);
    file(&mut b, "data/.wh..wh..opq", b"", 0o644);
    file(&mut b, "data/new", b"above the opaque marker\n", 0o644);
    b.into_inner().unwrap()
}

fn run_config() -> Value {
    // A distribution image's shell: a one-shot service that ends at once (status 0).
    json!({"Cmd": ["/bin/sh"], "Env": ["FROM=registry"], "WorkingDir": "/"})
}

/// Writes a single-platform layout tagged `tag`.
fn layout(path: &Path, arch: &str, layers: &[(&[u8], bool)]) {
    let m = write_manifest(path, arch, run_config(), layers);
    write_index(path, m, "tag");
}

fn create(data: &Path, image: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = vec![
        "tpl",
        "create-from-image",
        "--local",
        "--image",
        image,
        "--template-id",
        name,
    ];
    args.extend_from_slice(extra);
    support::cubicle_local(data, &args, env)
}

fn template_json(data: &Path, name: &str) -> Value {
    serde_json::from_slice(
        &fs::read(data.join("templates").join(name).join("template.json")).unwrap(),
    )
    .unwrap()
}

/// The blobs in the data dir's cache.
fn cached_blobs(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(data.join("cache/blobs/sha256"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A failed build left no template, no build directory, no partial download.
#[track_caller]
fn nothing_left(data: &Path, name: &str) {
    let templates = data.join("templates");
    if let Ok(entries) = fs::read_dir(&templates) {
        for e in entries {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                n != name && !n.starts_with(".build-") && !n.starts_with(".old-"),
                "left behind: {n}"
            );
        }
    }
    for blob in cached_blobs(data) {
        assert!(!blob.starts_with(".part-"), "partial download left: {blob}");
    }
}

#[track_caller]
fn fails(run: Run, message: &str) -> String {
    let run = run.code(1);
    assert!(
        run.stderr.contains(message),
        "expected {message:?} in:\n{}",
        run.stderr
    );
    run.stderr
}

#[test]
fn registry_images_build_templates_that_run_and_share_cached_layers() {
    let base = support::base_rootfs();
    let reg = Registry::start();
    let images = tempfile::tempdir().unwrap();
    let (l1, l2, l3) = (userland_layer(&base), lower_data_layer(), upper_layer());
    let app = images.path().join("app");
    layout(&app, "amd64", &[(&l1, true), (&l2, false), (&l3, true)]);
    reg.push(&app, "tag", "cubicle-test/app:v1", false);
    let digests = reg.layers("cubicle-test/app:v1");
    let data = data_dir();
    let image = reg.reference("cubicle-test/app:v1");

    let built = create(data.path(), &image, "reg-app", &[], &[]);
    let stderr = built.stderr.clone();
    let stdout = built.ok();
    assert!(
        stdout.starts_with(&format!("built reg-app from {image} in ")),
        "{stdout}"
    );
    assert!(stdout.contains(" 3 layers"), "{stdout}");
    for line in [
        "== pulling",
        &format!("pulling {image} from http://{}", reg.addr),
        "layer 1/3 (sha256:",
        "== unpacking",
        "== building",
    ] {
        assert!(stderr.contains(line), "no {line:?} in:\n{stderr}");
    }
    // One line per layer and stage as it completes (stderr is no terminal: no bars).
    for i in 1..=3 {
        let short = &digests[i - 1][..19];
        for stage in ["downloaded", "verified", "unpacked"] {
            assert_eq!(
                stderr
                    .matches(&format!("layer {i}/3 ({short}): {stage} "))
                    .count(),
                1,
                "layer {i} not {stage} once:\n{stderr}"
            );
        }
    }
    assert!(!stderr.contains('\r'), "{stderr}");
    assert_eq!(
        reg.blob_gets(),
        4,
        "3 layers and the config:\n{}",
        reg.log()
    );
    // The cache has the manifest, the config and the layers, by digest.
    let cached = cached_blobs(data.path());
    for d in &digests {
        assert!(cached.contains(&d[7..].to_owned()), "{d} not in {cached:?}");
    }
    assert_eq!(cached.len(), 5, "{cached:?}");

    let rootfs = data.path().join("templates/reg-app/rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("marker")).unwrap(),
        "from the registry\n"
    );
    assert!(!rootfs.join("etc/gone").exists(), "whiteout applied");
    assert!(!rootfs.join("data/old1").exists(), "opaque dir applied");
    assert!(!rootfs.join("data/sub").exists(), "opaque dir applied");
    assert!(rootfs.join("data/new").is_file());
    let meta = template_json(data.path(), "reg-app");
    let top = reg.digest("cubicle-test/app:v1");
    assert_eq!(meta["recipe"], "image");
    assert_eq!(meta["image"]["format"], "registry");
    assert_eq!(meta["image"]["source"], image.as_str());
    assert_eq!(meta["image"]["digest"], top.as_str());
    assert_eq!(
        meta["image"]["pinned"],
        format!("{}/cubicle-test/app@{top}", reg.addr).as_str()
    );
    assert_eq!(meta["image"]["layers"], 3);
    assert_eq!(meta["image"]["config"]["env"], json!(["FROM=registry"]));

    // By digest, under another name: nothing but the manifest is downloaded.
    let by_digest = reg.reference(&format!("cubicle-test/app@{top}"));
    let again = create(data.path(), &by_digest, "reg-app-pinned", &[], &[]);
    let stderr = again.stderr.clone();
    again.ok();
    for i in 1..=3 {
        assert!(
            stderr.contains(&format!("layer {i}/3 ({}): cached", &digests[i - 1][..19])),
            "layer {i} not cached:\n{stderr}"
        );
    }
    assert!(!stderr.contains("downloaded"), "{stderr}");
    assert_eq!(
        reg.blob_gets(),
        4,
        "a cached rebuild fetched blobs:\n{}",
        reg.log()
    );
    assert_eq!(cached_blobs(data.path()), cached);
    assert_eq!(
        template_json(data.path(), "reg-app-pinned")["image"]["digest"],
        top.as_str()
    );
    support::cubicle_local(data.path(), &["tpl", "rm", "reg-app-pinned"], &[]).ok();

    // A cached layer that went bad on disk is caught when unpacked, dropped from the
    // cache, and fetched again by the next build.
    let cached_l3 = data
        .path()
        .join("cache/blobs/sha256")
        .join(&digests[2][7..]);
    let mut bytes = fs::read(&cached_l3).unwrap();
    bytes[50] ^= 0xff;
    fs::write(&cached_l3, &bytes).unwrap();
    fails(
        create(data.path(), &image, "reg-app-bad", &[], &[]),
        &format!(
            "layer 3/3 ({}): digest mismatch: expected {}",
            &digests[2][..19],
            digests[2]
        ),
    );
    nothing_left(data.path(), "reg-app-bad");
    assert!(!cached_l3.exists(), "the bad blob stayed in the cache");
    let again = create(data.path(), &image, "reg-app-again", &[], &[]);
    assert!(
        again
            .stderr
            .contains(&format!("layer 3/3 ({}): downloaded", &digests[2][..19])),
        "{}",
        again.stderr
    );
    again.ok();
    support::cubicle_local(data.path(), &["tpl", "rm", "reg-app-again"], &[]).ok();

    // Another repository sharing the first two layers: only its own layer is fetched.
    let l4 = files_layer(&[("extra", b"only in v2\n")]);
    let v2 = images.path().join("v2");
    layout(&v2, "amd64", &[(&l1, true), (&l2, false), (&l4, false)]);
    reg.push(&v2, "tag", "cubicle-test/other:v2", false);
    let d2 = reg.layers("cubicle-test/other:v2");
    let before = reg.blob_gets();
    let out = create(
        data.path(),
        &reg.reference("cubicle-test/other:v2"),
        "reg-v2",
        &[],
        &[],
    );
    let stderr = out.stderr.clone();
    out.ok();
    assert!(
        stderr.contains(&format!("layer 1/3 ({}): cached", &d2[0][..19])),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("layer 2/3 ({}): cached", &d2[1][..19])),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("layer 3/3 ({}): downloaded", &d2[2][..19])),
        "{stderr}"
    );
    assert_eq!(
        reg.blob_gets() - before,
        2,
        "its layer and config:\n{}",
        reg.log()
    );
    let rootfs2 = data.path().join("templates/reg-v2/rootfs");
    assert_eq!(
        fs::read_to_string(rootfs2.join("extra")).unwrap(),
        "only in v2\n"
    );
    assert!(rootfs2.join("data/old1").is_file(), "no opaque layer in v2");
    support::cubicle_local(data.path(), &["tpl", "rm", "reg-v2"], &[]).ok();

    // A multi-platform index: the amd64 manifest is used, the arm64 one not fetched.
    let multi = images.path().join("multi");
    let arm_layer = files_layer(&[("arch", b"arm64\n")]);
    let amd_layer = files_layer(&[("arch", b"amd64\n")]);
    let arm = write_manifest(
        &multi,
        "arm64",
        run_config(),
        &[(&l1, true), (&arm_layer, false)],
    );
    let amd = write_manifest(
        &multi,
        "amd64",
        run_config(),
        &[(&l1, true), (&amd_layer, false)],
    );
    let index = write_platform_index(&multi, vec![arm, amd]);
    write_index(&multi, index, "tag");
    reg.push(&multi, "tag", "cubicle-test/multi:v1", true);
    let out = create(
        data.path(),
        &reg.reference("cubicle-test/multi:v1"),
        "reg-multi",
        &[],
        &[],
    );
    let stderr = out.stderr.clone();
    out.ok();
    assert!(
        stderr.contains("is a multi-platform index; using its linux/amd64 manifest"),
        "{stderr}"
    );
    let rootfs3 = data.path().join("templates/reg-multi/rootfs");
    assert_eq!(fs::read_to_string(rootfs3.join("arch")).unwrap(), "amd64\n");
    let meta = template_json(data.path(), "reg-multi");
    let pushed = reg.manifest("cubicle-test/multi:v1");
    let amd = pushed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap_or_else(|| panic!("{pushed}"));
    assert_eq!(meta["image"]["digest"], amd["digest"]);
    assert_eq!(
        meta["image"]["pinned"],
        format!(
            "{}/cubicle-test/multi@{}",
            reg.addr,
            reg.digest("cubicle-test/multi:v1")
        )
        .as_str()
    );
    support::cubicle_local(data.path(), &["tpl", "rm", "reg-multi"], &[]).ok();

    // The pull itself from spawn_blocking on a multi-threaded runtime, as the daemon
    // runs builds: into a fresh cache.
    let cache_dir = images.path().join("cache");
    let layout_dir = images.path().join("pulled");
    let reference = image.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pulled = rt
        .block_on(async move {
            tokio::task::spawn_blocking(move || {
                let cubicle_template::registry::ImageSource::Registry(r) =
                    cubicle_template::registry::image_source(&reference).unwrap()
                else {
                    panic!("{reference} is not a reference")
                };
                let cache = cubicle_template::registry::BlobCache::new(&cache_dir);
                let mut events = Vec::new();
                let pulled =
                    cubicle_template::registry::pull(&r, None, &cache, &layout_dir, &mut |e| {
                        events.push(e)
                    });
                (pulled, events)
            })
            .await
        })
        .unwrap();
    let (pulled, events) = pulled;
    let pulled = pulled.unwrap();
    assert_eq!((pulled.layers, pulled.cached_layers), (3, 0));
    assert_eq!(pulled.digest, top);
    let complete: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            cubicle_template::BuildEvent::LayerProgress(cubicle_template::LayerProgress {
                index,
                stage: cubicle_template::LayerStage::Downloading,
                done,
                total,
                cached: false,
                ..
            }) if done == total => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(complete, [1, 2, 3], "{events:?}");
    assert!(images.path().join("pulled/index.json").is_file());

    // A sandbox of the first template, through the daemon.
    let d = Daemon::start_with_templates(&data.path().join("templates"));
    let sbx = d.create_sandbox("reg-app", 60);
    let out = d
        .cli(&[
            "sandbox",
            "exec",
            &sbx,
            "cat /marker; echo /data/*; test -e /etc/gone && echo present || echo gone",
        ])
        .ok();
    assert_eq!(out, "from the registry\n/data/new\ngone\n");
    d.cli(&["sandbox", "kill", &sbx]).ok();
}

#[test]
fn registry_credentials() {
    let base = support::base_rootfs();
    let reg = Registry::start_with_auth("cubicle", "s3cret-pw");
    let images = tempfile::tempdir().unwrap();
    let l1 = userland_layer(&base);
    let marker = files_layer(&[("marker", b"private\n")]);
    let app = images.path().join("private");
    layout(&app, "amd64", &[(&l1, true), (&marker, false)]);
    reg.push(&app, "tag", "cubicle-test/private:v1", false);
    let data = data_dir();
    let image = reg.reference("cubicle-test/private:v1");
    let registry = &reg.addr;

    let stderr = fails(
        create(data.path(), &image, "reg-anon", &[], &[]),
        &format!("the registry {registry} requires credentials (HTTP 401 Unauthorized); pass --registry-username and --registry-password"),
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    nothing_left(data.path(), "reg-anon");
    fails(
        create(
            data.path(),
            &image,
            "reg-wrong",
            &[
                "--registry-username",
                "cubicle",
                "--registry-password",
                "wrong",
            ],
            &[],
        ),
        &format!("the registry {registry} refused the credentials of user 'cubicle'"),
    );
    nothing_left(data.path(), "reg-wrong");
    fails(
        create(
            data.path(),
            &image,
            "reg-nobody",
            &["--registry-username", "nobody"],
            &[("CUBICLE_REGISTRY_PASSWORD", "s3cret-pw")],
        ),
        "refused the credentials of user 'nobody'",
    );
    nothing_left(data.path(), "reg-nobody");

    // The right ones: on the command line, and the password from the environment.
    create(
        data.path(),
        &image,
        "reg-private",
        &[
            "--registry-username",
            "cubicle",
            "--registry-password",
            "s3cret-pw",
        ],
        &[],
    )
    .ok();
    let rootfs = data.path().join("templates/reg-private/rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("marker")).unwrap(),
        "private\n"
    );
    let out = create(
        data.path(),
        &image,
        "reg-private-env",
        &["--registry-username", "cubicle"],
        &[("CUBICLE_REGISTRY_PASSWORD", "s3cret-pw")],
    );
    assert!(out.stderr.contains("cached"), "{}", out.stderr);
    out.ok();
    // The password is never printed nor recorded.
    let meta =
        fs::read_to_string(data.path().join("templates/reg-private-env/template.json")).unwrap();
    assert!(!meta.contains("s3cret"), "{meta}");
}

#[test]
fn registry_errors_are_clear_and_leave_nothing_behind() {
    let base = support::base_rootfs();
    let reg = Registry::start();
    let images = tempfile::tempdir().unwrap();
    let data = data_dir();
    let registry = &reg.addr;
    let l1 = userland_layer(&base);
    let app = images.path().join("app");
    layout(&app, "amd64", &[(&l1, true)]);
    reg.push(&app, "tag", "cubicle-test/errors:v1", false);

    // Unknown tag, unknown repository.
    fails(
        create(data.path(), &reg.reference("cubicle-test/errors:nope"), "reg-e1", &[], &[]),
        &format!(
            "image {registry}/cubicle-test/errors:nope not found in the registry {registry}: MANIFEST_UNKNOWN"
        ),
    );
    nothing_left(data.path(), "reg-e1");
    fails(
        create(
            data.path(),
            &reg.reference("cubicle-test/none:v1"),
            "reg-e2",
            &[],
            &[],
        ),
        &format!("image {registry}/cubicle-test/none:v1 not found in the registry {registry}"),
    );
    nothing_left(data.path(), "reg-e2");

    // Unreachable: a closed port.
    let closed = support::free_addr();
    fails(
        create(
            data.path(),
            &format!("{closed}/cubicle-test/errors:v1"),
            "reg-e3",
            &[],
            &[],
        ),
        &format!("cannot reach the registry {closed}: "),
    );
    nothing_left(data.path(), "reg-e3");

    // Malformed references, and a name that is neither a file nor a reference.
    fails(
        create(
            data.path(),
            &format!("{registry}/Upper/Case:v1"),
            "reg-e4",
            &[],
            &[],
        ),
        &format!("invalid image reference \"{registry}/Upper/Case:v1\""),
    );
    fails(
        create(data.path(), &format!("{registry}/app@sha256:1234"), "reg-e4", &[], &[]),
        &format!("invalid image reference \"{registry}/app@sha256:1234\": invalid reference format; expected host[:port]/repository[:tag] or host[:port]/repository@sha256:<64 hex digits>"),
    );
    fails(
        create(data.path(), "debian:12", "reg-e4", &[], &[]),
        "debian:12 is not an image: no such file or directory, and not a registry reference",
    );
    nothing_left(data.path(), "reg-e4");

    // An arm64-only image: refused before any layer is fetched.
    let arm = images.path().join("arm");
    layout(&arm, "arm64", &[(&l1, true)]);
    reg.push(&arm, "tag", "cubicle-test/arm:v1", false);
    let before = reg.blob_gets();
    fails(
        create(
            data.path(),
            &reg.reference("cubicle-test/arm:v1"),
            "reg-e5",
            &[],
            &[],
        ),
        "the image is for linux/arm64, not linux/amd64",
    );
    assert_eq!(
        reg.blob_gets() - before,
        1,
        "only its config:\n{}",
        reg.log()
    );
    nothing_left(data.path(), "reg-e5");

    // A corrupted layer: the registry serves other bytes (of the same length) than
    // the digest says; the error names the layer, nothing of it is cached.
    let unique = files_layer(&[(
        "unique",
        format!("{:?}", std::time::SystemTime::now()).as_bytes(),
    )]);
    let bad = images.path().join("bad");
    layout(&bad, "amd64", &[(&l1, true), (&unique, false)]);
    reg.push(&bad, "tag", "cubicle-test/bad:v1", false);
    let digests = reg.layers("cubicle-test/bad:v1");
    let blob = reg.blob_data(&digests[1]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let stderr = fails(
        create(
            data.path(),
            &reg.reference("cubicle-test/bad:v1"),
            "reg-e6",
            &[],
            &[],
        ),
        &format!(
            "layer 2/2 ({}): the registry {registry} sent corrupted data: expected {}, got sha256:",
            &digests[1][..19],
            digests[1]
        ),
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    nothing_left(data.path(), "reg-e6");
    assert!(
        !cached_blobs(data.path()).contains(&digests[1][7..].to_owned()),
        "a corrupted layer was cached"
    );
}

#[test]
fn a_daemon_build_job_pulls_from_the_registry_with_credentials_asked_again_on_rebuild() {
    let base = support::base_rootfs();
    let reg = Registry::start_with_auth("alice", "s3cret");
    let images = tempfile::tempdir().unwrap();
    let app = images.path().join("app");
    layout(&app, "amd64", &[(&userland_layer(&base), true)]);
    reg.push(&app, "tag", "cubicle-test/job:v1", false);
    let image = reg.reference("cubicle-test/job:v1");
    let templates = support::private_dir("cubicle-reg-job-", 0o755);
    let d = Daemon::start_with_templates(templates.path());
    let creds = [
        "--registry-username",
        "alice",
        "--registry-password",
        "s3cret",
    ];
    let mut args = vec![
        "tpl",
        "create-from-image",
        "--image",
        &image,
        "--template-id",
        "reg-job",
    ];
    args.extend_from_slice(&creds);
    let built = d.cli(&args);
    let stderr = built.stderr.clone();
    let stdout = built.ok();
    assert!(stdout.starts_with("built reg-job from "), "{stdout}");
    for line in [
        "== pulling",
        "layer 1/1 (sha256:",
        "== unpacking",
        "== snapshotting",
    ] {
        assert!(stderr.contains(line), "no {line:?} in:\n{stderr}");
    }
    // Following the job without a terminal: one line per layer and stage, no bars.
    for stage in ["downloaded", "verified", "unpacked"] {
        let n = stderr
            .lines()
            .filter(|l| l.contains("layer 1/1 (sha256:") && l.contains(&format!("): {stage} ")))
            .count();
        assert_eq!(n, 1, "{stage}:\n{stderr}");
    }
    assert!(!stderr.contains('\r'), "{stderr}");
    // The password is never stored: not in the database, not in the build's record.
    let db = std::fs::read(d.dir.path().join("cubicle.db")).unwrap();
    let wal = std::fs::read(d.dir.path().join("cubicle.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(6).any(|w| w == b"s3cret"),
            "the registry password was stored"
        );
    }
    // A rebuild without the credentials is refused by the registry; with them it works.
    let refused = d.cli(&["tpl", "rebuild", "reg-job"]).code(1);
    assert!(
        refused.stderr.contains("failed while pulling"),
        "{}",
        refused.stderr
    );
    let mut again = vec!["tpl", "rebuild", "reg-job"];
    again.extend_from_slice(&creds);
    let rebuilt = d.cli(&again).ok();
    assert!(rebuilt.starts_with("built reg-job from "), "{rebuilt}");
    d.cli(&["tpl", "rm", "reg-job"]).ok();
}
