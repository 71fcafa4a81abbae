//! Container images written by the tests: layer tars (a few programs copied from the
//! `base` template make the userland), OCI layouts (single-platform or multi-platform)
//! and `docker save` tarballs. Owners are root and mtimes fixed, so the same layers
//! hash the same in every test.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Files of the `base` rootfs the userland layer copies: bash (which commands run
/// under), dash as /bin/sh, cat, and the libraries they load.
pub const COPIED: &[&str] = &[
    "usr/bin/bash",
    "usr/bin/dash",
    "usr/bin/cat",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
];

/// `sha256:<hex>` of `data`.
pub fn sha(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

pub fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

pub fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = header(tar::EntryType::Regular, data.len() as u64, mode);
    b.append_data(&mut h, path, data).unwrap();
}

pub fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, path, target).unwrap();
}

pub fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(tar::EntryType::Directory, 0, mode);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

/// A tar of regular files (`path`, content), mode 0644.
pub fn files_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        file(&mut b, path, data, 0o644);
    }
    b.into_inner().unwrap()
}

/// The userland: bash, dash as /bin/sh, cat and their libraries from `base` (the
/// `base` template's rootfs), plus `/etc/gone` for a later layer to delete.
pub fn userland_layer(base: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in [
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc",
    ] {
        dir(&mut b, d, 0o755);
    }
    dir(&mut b, "tmp", 0o1777);
    symlink(&mut b, "bin", "usr/bin");
    symlink(&mut b, "lib", "usr/lib");
    symlink(&mut b, "lib64", "usr/lib64");
    for path in COPIED {
        // libtinfo.so.6 is a relative symlink in base, read through; owners are the
        // image's (root), not base's shifted ones.
        let data = fs::read(base.join(path))
            .unwrap_or_else(|e| panic!("read {path} from the base template: {e}"));
        file(&mut b, path, &data, 0o755);
    }
    symlink(&mut b, "usr/bin/sh", "dash");
    symlink(
        &mut b,
        "usr/lib64/ld-linux-x86-64.so.2",
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    file(&mut b, "etc/gone", b"deleted by the next layer\n", 0o644);
    b.into_inner().unwrap()
}

/// `/marker` and a whiteout of `/etc/gone`.
pub fn marker_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "marker", b"from the image\n", 0o644);
    file(&mut b, "etc/.wh.gone", b"", 0o644);
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Writes `data` as a blob of `layout`; its descriptor.
pub fn blob(layout: &Path, media_type: &str, data: &[u8]) -> Value {
    let digest = sha(data);
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(blobs.join(&digest[7..]), data).unwrap();
    json!({"mediaType": media_type, "digest": digest, "size": data.len()})
}

/// Writes an image manifest for `arch` into `layout`'s blobs: its config (`config`,
/// the `config` object of the image config) and its layers (uncompressed tars, each
/// gzipped if its flag says so). Returns the manifest's descriptor, with its platform.
pub fn write_manifest(layout: &Path, arch: &str, config: Value, layers: &[(&[u8], bool)]) -> Value {
    let diff_ids: Vec<String> = layers.iter().map(|(l, _)| sha(l)).collect();
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let layers: Vec<Value> = layers
        .iter()
        .map(|(l, gz)| {
            if *gz {
                blob(
                    layout,
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    &gzip(l),
                )
            } else {
                blob(layout, "application/vnd.oci.image.layer.v1.tar", l)
            }
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers
    });
    let mut m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    m["platform"] = json!({"architecture": arch, "os": "linux"});
    m
}

/// Writes `oci-layout` and `index.json` listing `manifest` (a manifest's or an index's
/// descriptor) under the tag `tag` (what `skopeo copy oci:<dir>:<tag>` reads).
pub fn write_index(layout: &Path, mut manifest: Value, tag: &str) {
    manifest["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [manifest]})).unwrap(),
    )
    .unwrap();
}

/// Writes a multi-platform image: an index blob listing `manifests`; its descriptor.
pub fn write_platform_index(layout: &Path, manifests: Vec<Value>) -> Value {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests
    });
    blob(
        layout,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    )
}

/// Writes an OCI layout of the userland and marker layers (the first gzipped) for
/// `arch`, tagged `latest`.
pub fn write_layout(layout: &Path, base: &Path, arch: &str) {
    let (l1, l2) = (userland_layer(base), marker_layer());
    let config =
        json!({"Cmd": ["/bin/sh", "-c", "cat /marker"], "Env": ["A=1"], "WorkingDir": "/"});
    let m = write_manifest(layout, arch, config, &[(&l1, true), (&l2, false)]);
    write_index(layout, m, "latest");
}

/// Writes a `docker save` tarball (classic format) of the same two layers.
pub fn write_docker_save(path: &Path, base: &Path) {
    let (l1, l2) = (userland_layer(base), marker_layer());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]}
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha(&config)[7..]);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": ["oci-test:latest"],
        "Layers": ["one/layer.tar", "two/layer.tar"]
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest),
        (config_name.as_str(), &config),
        ("one/layer.tar", &l1),
        ("two/layer.tar", &l2),
    ] {
        file(&mut b, name, data, 0o644);
    }
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// A layer holding one file of `mib` MiB (zeros) at `path`: slow to verify and unpack.
pub fn big_layer(path: &str, mib: usize) -> Vec<u8> {
    files_layer(&[(path, &vec![0u8; mib << 20])])
}

/// Changes one byte of layer `index` (from 0) of a single-manifest OCI layout, keeping
/// its name (its digest) and size: the image is then corrupt.
pub fn corrupt_layer(layout: &Path, index: usize) {
    let read = |p: &Path| -> Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let blob_path = |digest: &str| layout.join("blobs/sha256").join(&digest[7..]);
    let index_json = read(&layout.join("index.json"));
    let manifest = read(&blob_path(
        index_json["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let layer = blob_path(manifest["layers"][index]["digest"].as_str().unwrap());
    let mut data = fs::read(&layer).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    fs::write(&layer, data).unwrap();
}

/// An uncompressed tar of the `base` template's root filesystem `base`, owners shifted
/// back into the sandbox range (as an image has them); device nodes are left out.
pub fn base_layer(base: &Path) -> Vec<u8> {
    let shift = cubicle_core::uid_map::HOST_BASE;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(base.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        entries.sort();
        for name in entries {
            let rel = rel.join(&name);
            let path = base.join(&rel);
            let md = fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                tar::EntryType::Directory
            } else if ft.is_symlink() {
                tar::EntryType::Symlink
            } else if ft.is_file() {
                tar::EntryType::Regular
            } else {
                continue;
            };
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(md.permissions().mode() & 0o7777);
            h.set_uid(u64::from(md.uid().checked_sub(shift).unwrap_or(md.uid())));
            h.set_gid(u64::from(md.gid().checked_sub(shift).unwrap_or(md.gid())));
            h.set_mtime(md.mtime().max(0) as u64);
            match kind {
                tar::EntryType::Directory => {
                    h.set_size(0);
                    b.append_data(&mut h, &rel, std::io::empty()).unwrap();
                    stack.push(rel);
                }
                tar::EntryType::Symlink => {
                    h.set_size(0);
                    let target = fs::read_link(&path).unwrap();
                    b.append_link(&mut h, &rel, target).unwrap();
                }
                _ => {
                    h.set_size(md.len());
                    b.append_data(&mut h, &rel, fs::File::open(&path).unwrap())
                        .unwrap();
                }
            }
        }
    }
    b.into_inner().unwrap()
}

/// An image config (amd64) of one uncompressed `layer` with the run-time `config`.
fn image_config(layer: &[u8], config: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}
    }))
    .unwrap()
}

/// Writes an OCI image layout of one uncompressed `layer` with the run-time `config`.
pub fn write_one_layer_layout(layout: &Path, layer: &[u8], config: &serde_json::Value) {
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &image_config(layer, config),
    );
    let layer = blob(layout, "application/vnd.oci.image.layer.v1.tar", layer);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer]
    });
    let m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap(),
    )
    .unwrap();
}

/// Writes a `docker save` archive (classic format) of one uncompressed `layer` with the
/// run-time `config`.
pub fn write_one_layer_docker_save(path: &Path, layer: &[u8], config: &serde_json::Value) {
    let config = image_config(layer, config);
    let config_name = format!("{}.json", &sha(&config)[7..]);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": ["svc-test:latest"],
        "Layers": ["l1/layer.tar"]
    }]))
    .unwrap();
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in [
        ("manifest.json", &manifest),
        (config_name.as_str(), &config),
        ("l1/layer.tar", &layer.to_vec()),
    ] {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
}
