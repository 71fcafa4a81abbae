"""Templates through the real SDK: `Template.exists(name)` and the SDK's generated API
client (`get_templates`, `get_templates_template_id`, `delete_templates_template_id`,
`get_templates_template_id_builds_build_id_status`) against a template that Cubicle's
own build endpoint (`POST /templates/images`) makes from an OCI image written here.

The image's userland (bash, dash as /bin/sh, cat and their libraries) is copied from
the host's `base` template. The session daemon's templates are the host's, so the
template gets a random name and is removed at the end.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import secrets
import tarfile
import time
from pathlib import Path

import pytest
from e2b import Sandbox, Template
from e2b.api.client.api.templates import (
    delete_templates_template_id,
    get_templates,
    get_templates_template_id,
    get_templates_template_id_builds_build_id_status,
)
from e2b.api.client.models import TemplateBuildInfo, TemplateBuildStatus, TemplateWithBuilds
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig

import harness

COPIED = [
    "usr/bin/bash",
    "usr/bin/dash",
    "usr/bin/cat",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
]


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            elif kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = data
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_image(layout: Path, base: Path) -> None:
    """An OCI layout: the userland (gzipped), then /marker."""
    entries = [(d, "dir", None, 0o755) for d in ["usr", "usr/bin", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib64"]]
    entries += [("tmp", "dir", None, 0o1777), ("bin", "link", "usr/bin", 0o777), ("lib", "link", "usr/lib", 0o777),
                ("lib64", "link", "usr/lib64", 0o777)]
    entries += [(p, "file", (base / p).read_bytes(), 0o755) for p in COPIED]
    entries += [("usr/bin/sh", "link", "dash", 0o777),
                ("usr/lib64/ld-linux-x86-64.so.2", "link", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 0o777)]
    userland = _tar(entries)
    marker = _tar([("marker", "file", b"from the sdk test\n", 0o644)])
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(media_type: str, data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    diff_ids = [f"sha256:{hashlib.sha256(l).hexdigest()}" for l in (userland, marker)]
    config = blob("application/vnd.oci.image.config.v1+json", json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode())
    layers = [blob("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(userland)),
              blob("application/vnd.oci.image.layer.v1.tar", marker)]
    manifest = blob("application/vnd.oci.image.manifest.v1+json", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": layers,
    }).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))


@pytest.fixture
def api(conn):
    return get_api_client(ConnectionConfig(api_key=conn["api_key"], api_url=conn["api_url"]))


def test_templates_through_the_sdk(conn, http, api, tmp_path):
    base = harness.TEMPLATES / "base" / "rootfs"
    assert (base / "usr/bin/bash").is_file(), f"base template not built in {harness.TEMPLATES}"
    layout = tmp_path / "layout"
    _write_image(layout, base)
    name = f"sdk-tpl-{secrets.token_hex(4)}"
    params = dict(api_key=conn["api_key"], api_url=conn["api_url"])
    assert Template.exists(name, **params) is False

    r = http.post("/templates/images", json={"image": str(layout), "templateID": name})
    assert r.status_code == 202, r.text
    build_id = r.json()["buildID"]
    assert r.json() == {"templateID": name, "buildID": build_id, "phase": "queued"}
    try:
        # The SDK's own status call and model; building until ready.
        seen = []
        offset = 0
        deadline = time.monotonic() + 120
        while True:
            res = get_templates_template_id_builds_build_id_status.sync_detailed(
                name, build_id, client=api, logs_offset=offset
            )
            assert res.status_code == 200, res.content
            info = res.parsed
            assert isinstance(info, TemplateBuildInfo), res.content
            assert info.template_id == name and info.build_id == build_id
            seen += info.logs
            offset += len(info.logs)
            assert all(e.message for e in info.log_entries)
            if info.status != TemplateBuildStatus.BUILDING:
                break
            assert time.monotonic() < deadline, f"still building: {seen[-5:]}"
            time.sleep(0.05)
        assert info.status == TemplateBuildStatus.READY, (info.reason, seen[-10:])
        assert info.additional_properties["phase"] == "ready"
        assert "== unpacking" in seen and "== snapshotting" in seen, seen

        assert Template.exists(name, **params) is True
        listed = get_templates.sync(client=api)
        mine = [t for t in listed if t.template_id == name]
        assert len(mine) == 1 and mine[0].build_id == build_id
        assert mine[0].build_status == TemplateBuildStatus.READY
        one = get_templates_template_id.sync(name, client=api)
        assert isinstance(one, TemplateWithBuilds), one
        assert [str(b.build_id) for b in one.builds] == [build_id]
        assert one.builds[0].status == TemplateBuildStatus.READY

        # In use: refused with what uses it; then deleted.
        sbx = Sandbox.create(name, timeout=60, **conn)
        harness.track(sbx.sandbox_id)
        try:
            assert sbx.commands.run("cat /marker").stdout == "from the sdk test\n"
            res = delete_templates_template_id.sync_detailed(name, client=api)
            assert res.status_code == 409, res.content
            body = json.loads(res.content)
            assert body["code"] == 409
            assert sbx.sandbox_id in body["message"] and "in use" in body["message"], body
        finally:
            sbx.kill()
        res = delete_templates_template_id.sync_detailed(name, client=api)
        assert res.status_code == 204, res.content
        assert Template.exists(name, **params) is False
        res = delete_templates_template_id.sync_detailed(name, client=api)
        assert res.status_code == 404
    finally:
        # Whatever happened, the host's templates get nothing of this test.
        http.delete(f"/templates/{name}")
        assert not (harness.TEMPLATES / name).exists()


def test_e2b_template_builds_point_at_create_from_image(http):
    for path in ["/v3/templates", "/v2/templates/x/builds/y", "/templates"]:
        r = http.post(path, json={})
        body = harness.assert_error_body(r, 501)
        assert "cubicle tpl create-from-image" in body["message"], body
