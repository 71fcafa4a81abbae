"""files.* through the SDK (brief item 3, and the envd-level path traversal of item 10)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid

import httpx
import pytest
from e2b import AsyncSandbox, FileNotFoundException, FileType, FilesystemEventType

import harness


@pytest.fixture
def workdir(sandbox):
    """A fresh directory per test inside the shared sandbox."""
    path = f"/home/user/t-{uuid.uuid4().hex[:10]}"
    assert sandbox.files.make_dir(path) is True
    return path


def test_write_read_text_and_bytes(sandbox, workdir):
    text = "hello ✓ world\nsecond line\n"
    info = sandbox.files.write(f"{workdir}/a.txt", text)
    assert info.name == "a.txt" and info.path == f"{workdir}/a.txt" and info.type == FileType.FILE
    assert sandbox.files.read(f"{workdir}/a.txt") == text

    blob = bytes(range(256)) * 4
    sandbox.files.write(f"{workdir}/b.bin", blob)
    assert bytes(sandbox.files.read(f"{workdir}/b.bin", format="bytes")) == blob
    streamed = b"".join(sandbox.files.read(f"{workdir}/b.bin", format="stream"))
    assert streamed == blob

    # overwrite, relative paths resolve against the user's home, parents are created
    sandbox.files.write(f"{workdir}/a.txt", "short")
    assert sandbox.files.read(f"{workdir}/a.txt") == "short"
    rel = workdir.removeprefix("/home/user/") + "/deep/er/c.txt"
    info = sandbox.files.write(rel, "relative")
    assert info.path == f"{workdir}/deep/er/c.txt"
    assert sandbox.commands.run(f"cat {workdir}/deep/er/c.txt").stdout == "relative"
    # files written through the API belong to the user
    assert sandbox.files.get_info(f"{workdir}/deep/er/c.txt").owner == "user"


def test_write_as_root(sandbox):
    sandbox.files.write("/root/by-root.txt", "root", user="root")
    assert sandbox.files.read("/root/by-root.txt", user="root") == "root"
    assert sandbox.files.get_info("/root/by-root.txt", user="root").owner == "root"


def test_octet_stream_and_gzip_uploads(sandbox, workdir):
    import io

    data = os.urandom(300_000)
    sandbox.files.write(f"{workdir}/stream.bin", io.BytesIO(data))
    assert bytes(sandbox.files.read(f"{workdir}/stream.bin", format="bytes")) == data
    sandbox.files.write(f"{workdir}/gz.bin", data, gzip=True)
    assert bytes(sandbox.files.read(f"{workdir}/gz.bin", format="bytes", gzip=True)) == data


def test_list_with_depth(sandbox, workdir):
    sandbox.files.write(f"{workdir}/top.txt", "1")
    sandbox.files.write(f"{workdir}/d1/mid.txt", "22")
    sandbox.files.write(f"{workdir}/d1/d2/low.txt", "333")

    one = {e.path: e for e in sandbox.files.list(workdir)}
    assert set(one) == {f"{workdir}/top.txt", f"{workdir}/d1"}
    assert one[f"{workdir}/d1"].type == FileType.DIR
    assert one[f"{workdir}/top.txt"].type == FileType.FILE and one[f"{workdir}/top.txt"].size == 1

    two = {e.path for e in sandbox.files.list(workdir, depth=2)}
    assert two == {f"{workdir}/top.txt", f"{workdir}/d1", f"{workdir}/d1/mid.txt", f"{workdir}/d1/d2"}

    three = {e.path for e in sandbox.files.list(workdir, depth=3)}
    assert f"{workdir}/d1/d2/low.txt" in three and len(three) == 5

    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/missing")


def test_exists_get_info_remove(sandbox, workdir):
    path = f"{workdir}/x.txt"
    assert sandbox.files.exists(path) is False
    sandbox.files.write(path, "12345")
    assert sandbox.files.exists(path) is True
    info = sandbox.files.get_info(path)
    assert info.name == "x.txt" and info.path == path and info.type == FileType.FILE
    assert info.size == 5 and info.permissions.startswith("-rw")
    assert sandbox.files.get_info(workdir).type == FileType.DIR
    sandbox.files.remove(path)
    assert sandbox.files.exists(path) is False
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(path)
    # removing a directory removes its contents
    sandbox.files.write(f"{workdir}/sub/y.txt", "y")
    sandbox.files.remove(f"{workdir}/sub")
    assert sandbox.files.exists(f"{workdir}/sub") is False


def test_rename(sandbox, workdir):
    sandbox.files.write(f"{workdir}/old.txt", "content")
    info = sandbox.files.rename(f"{workdir}/old.txt", f"{workdir}/new/place.txt")
    assert info.path == f"{workdir}/new/place.txt" and info.name == "place.txt"
    assert sandbox.files.exists(f"{workdir}/old.txt") is False
    assert sandbox.files.read(f"{workdir}/new/place.txt") == "content"
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/nope.txt", f"{workdir}/other.txt")


def test_make_dir(sandbox, workdir):
    assert sandbox.files.make_dir(f"{workdir}/a/b/c") is True
    assert sandbox.files.make_dir(f"{workdir}/a/b/c") is False
    assert sandbox.files.get_info(f"{workdir}/a/b").type == FileType.DIR


def test_write_files_several(sandbox, workdir):
    rel_dir = workdir.removeprefix("/home/user/")
    infos = sandbox.files.write_files(
        [
            {"path": f"{workdir}/m/1.txt", "data": "one"},
            {"path": f"{workdir}/m/2.bin", "data": b"\x00two\xff"},
            {"path": f"{rel_dir}/m/3.txt", "data": "three"},
        ]
    )
    assert [i.path for i in infos] == [f"{workdir}/m/1.txt", f"{workdir}/m/2.bin", f"{workdir}/m/3.txt"]
    assert sandbox.files.read(f"{workdir}/m/1.txt") == "one"
    assert bytes(sandbox.files.read(f"{workdir}/m/2.bin", format="bytes")) == b"\x00two\xff"
    assert sandbox.files.read(f"{workdir}/m/3.txt") == "three"


def test_20_mb_roundtrip(sandbox, workdir):
    data = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    t0 = time.monotonic()
    sandbox.files.write(f"{workdir}/big.bin", data)
    t1 = time.monotonic()
    back = bytes(sandbox.files.read(f"{workdir}/big.bin", format="bytes"))
    t2 = time.monotonic()
    assert len(back) == len(data)
    assert hashlib.sha256(back).hexdigest() == digest
    # the sandbox sees the same bytes
    assert sandbox.commands.run(f"sha256sum {workdir}/big.bin").stdout.split()[0] == digest
    harness.MEASUREMENTS.append(
        f"files: 20 MiB upload {t1 - t0:.2f}s, download {t2 - t1:.2f}s (sha256 identical)"
    )


def test_watch_dir_sync(sandbox, workdir):
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/w1.txt", "api")
        sandbox.commands.run(f"echo cmd > {workdir}/w2.txt")
        events = []

        def got_both():
            events.extend(handle.get_new_events())
            names = {(e.name, e.type) for e in events}
            return all(
                (n, FilesystemEventType.CREATE) in names or (n, FilesystemEventType.WRITE) in names
                for n in ("w1.txt", "w2.txt")
            )

        harness.wait_until(got_both, 10, what="CREATE/WRITE events of w1.txt and w2.txt")
        sandbox.files.remove(f"{workdir}/w1.txt")
        harness.wait_until(
            lambda: any(
                e.name == "w1.txt" and e.type == FilesystemEventType.REMOVE
                for e in handle.get_new_events()
            ),
            10,
            what="REMOVE event of w1.txt",
        )
    finally:
        handle.stop()
    with pytest.raises(Exception):
        handle.get_new_events()


def test_watch_missing_dir(sandbox):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir("/home/user/no-such-dir-xyz")


def test_watch_dir_async(sandbox, conn, workdir):
    async def scenario():
        sbx = await AsyncSandbox.connect(sandbox.sandbox_id, **conn)
        events = []
        handle = await sbx.files.watch_dir(workdir, on_event=events.append)
        try:
            await sbx.files.write(f"{workdir}/async.txt", "z")
            for _ in range(200):
                if any(e.name == "async.txt" for e in events):
                    break
                await asyncio.sleep(0.05)
        finally:
            await handle.stop()
        kinds = {e.type for e in events if e.name == "async.txt"}
        assert kinds & {FilesystemEventType.CREATE, FilesystemEventType.WRITE}, events

    asyncio.run(scenario())


def test_read_missing_file(sandbox):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/home/user/definitely/missing.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/home/user/definitely/missing.txt", format="bytes")


def test_envd_path_traversal_stays_inside(sandbox):
    # "/../../etc/hostname" is the sandbox's /etc/hostname, not the host's
    inside = sandbox.files.read("/../../etc/hostname").strip()
    assert inside == sandbox.sandbox_id
    assert inside != socket.gethostname()
    assert sandbox.files.read("/home/user/../../../../etc/hostname").strip() == sandbox.sandbox_id
    # writes with .. cannot leave the sandbox either
    name = f"cbt-escape-{uuid.uuid4().hex[:8]}"
    sandbox.files.write(f"/../../../tmp/{name}", "x")
    assert not os.path.exists(f"/tmp/{name}")
    assert sandbox.files.read(f"/tmp/{name}") == "x"
    # the agent socket dir is not readable for user processes
    r = sandbox.commands.run("ls /run/cubicle 2>&1; true")
    assert "agent.sock" not in r.stdout or "denied" in r.stdout


def test_signed_urls(sandbox, workdir):
    """download_url/upload_url work without X-Access-Token; a tampered signature is 401."""
    sandbox.files.write(f"{workdir}/signed.txt", "signed content")
    url = sandbox.download_url(f"{workdir}/signed.txt")
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"}
    r = httpx.get(url, headers=headers)
    assert r.status_code == 200 and r.text == "signed content"
    bad = url.replace("signature=v1_", "signature=v1_x")
    r = httpx.get(bad, headers=headers)
    harness.assert_error_body(r, 401)

    up = sandbox.upload_url(f"{workdir}/uploaded.txt", use_signature_expiration=60)
    r = httpx.post(up, headers=headers, files={"file": ("uploaded.txt", b"via signed url")})
    assert r.status_code == 200, r.text
    assert sandbox.files.read(f"{workdir}/uploaded.txt") == "via signed url"
