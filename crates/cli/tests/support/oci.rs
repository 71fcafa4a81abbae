//! Container images written by tests, without Docker: tar entries, blobs of an OCI
//! image layout, and one-layer images of the `base` template's root filesystem (as an
//! OCI layout directory or a `docker save` archive) with a given run-time config.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

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
