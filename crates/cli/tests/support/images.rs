//! Container images written by tests, without any tool: tar layers built in memory,
//! an OCI image layout directory and a `docker save` tarball of them. The userland layer
//! copies a few programs from the `base` template (bash, dash as /bin/sh, cat and their
//! libraries), so a sandbox of the image can run commands.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

/// Files of the `base` rootfs the image's first layer copies: bash (which commands
/// run under), dash as /bin/sh, cat, and the libraries they load.
pub const COPIED: &[&str] = &[
    "usr/bin/bash",
    "usr/bin/dash",
    "usr/bin/cat",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
];

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

pub fn blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let digest = sha(data);
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(blobs.join(&digest[7..]), data).unwrap();
    json!({"mediaType": media_type, "digest": digest, "size": data.len()})
}

/// Writes an OCI layout of the two layers (the first gzipped) for `arch`.
pub fn write_layout(layout: &Path, base: &Path, arch: &str) {
    write_oci(
        layout,
        arch,
        &[(userland_layer(base), true), (marker_layer(), false)],
        json!({"Cmd": ["/bin/sh", "-c", "cat /marker"], "Env": ["A=1"], "WorkingDir": "/"}),
    );
}

/// Writes an OCI layout of `layers` (tar bytes, and whether to gzip them) for
/// linux/`arch`, with `config` as the image config's `config`.
pub fn write_oci(layout: &Path, arch: &str, layers: &[(Vec<u8>, bool)], config: serde_json::Value) {
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
    let layers: Vec<serde_json::Value> = layers
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

/// A layer holding one file of `mib` MiB (zeros) at `path`: slow to verify and unpack.
pub fn big_layer(path: &str, mib: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, path, &vec![0u8; mib << 20], 0o644);
    b.into_inner().unwrap()
}

/// Changes one byte of layer `index` (from 0) of the OCI layout, keeping its name (its
/// digest) and size: the image is then corrupt.
pub fn corrupt_layer(layout: &Path, index: usize) {
    let read =
        |p: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
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
