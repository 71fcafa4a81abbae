"""Container images written by the tests, without Docker: one layer holding the `base`
template's root filesystem (owners shifted back into the image's range), as an OCI
image layout directory or a `docker save` archive, with the run-time config given."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

SHIFT = 1_000_000_000


def base_layer(base_rootfs: Path) -> bytes:
    """An uncompressed tar of `base_rootfs` with sandbox-range owners (device nodes
    and sockets are left out; an image does not need them)."""
    buf = io.BytesIO()

    def unshift(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if ti.ischr() or ti.isblk() or ti.isfifo():
            return None
        ti.uid = ti.uid - SHIFT if ti.uid >= SHIFT else ti.uid
        ti.gid = ti.gid - SHIFT if ti.gid >= SHIFT else ti.gid
        ti.uname = ti.gname = ""
        return ti

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in sorted(os.listdir(base_rootfs)):
            tar.add(str(base_rootfs / entry), arcname=entry, recursive=True, filter=unshift)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layer: bytes, config: dict) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]},
        }
    ).encode()


def write_layout(path: Path, layer: bytes, config: dict) -> None:
    """An OCI image layout directory of one layer."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(media_type: str, data: bytes) -> dict:
        digest = _sha(data)
        (blobs / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    cfg = blob("application/vnd.oci.image.config.v1+json", image_config(layer, config))
    lay = blob("application/vnd.oci.image.layer.v1.tar", layer)
    manifest = blob(
        "application/vnd.oci.image.manifest.v1+json",
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg,
                "layers": [lay],
            }
        ).encode(),
    )
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))


def write_docker_save(path: Path, layer: bytes, config: dict) -> None:
    """A `docker save` archive (classic format) of one layer."""
    cfg = image_config(layer, config)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": cfg_name, "RepoTags": ["svc-test:latest"], "Layers": ["l1/layer.tar"]}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("manifest.json", manifest), (cfg_name, cfg), ("l1/layer.tar", layer)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tar.addfile(ti, io.BytesIO(data))
