"""Templates from container images whose entrypoint is a service (issue 8), through the
real `e2b` SDK: `cubicle tpl create-from-image` builds one from an OCI layout directory,
from a `docker save` archive and from a loopback registry (Debian's `docker-registry`,
pushed to with `skopeo`): python3 -m http.server on a probed port. The SDK
creates a sandbox of it, runs a command next to the service, and the service answers
through the daemon at `sandbox.get_host(port)` as soon as the create returned.

The images are one layer of the `base` template's root filesystem, written by the test
(no Docker). Templates go into the session daemon's templates directory (the host's,
symlinked) under random names and are removed at the end.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import harness
import oci_images

PORT = 8000
CONFIG = {
    "Entrypoint": ["python3", "-m", "http.server"],
    "Cmd": [str(PORT)],
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from the image"],
    "WorkingDir": "/srv",
    "ExposedPorts": {f"{PORT}/tcp": {}},
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Debian's `docker-registry` on a free loopback port (plain HTTP, no auth), its
    storage in a temporary directory; stopped at the end of the module."""
    d = tmp_path_factory.mktemp("registry")
    port = harness.free_port()
    (d / "config.yml").write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {d / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(d / "config.yml")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (d / "registry.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the registry never answered"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory, registry) -> dict[str, str]:
    d = tmp_path_factory.mktemp("images")
    layer = oci_images.base_layer(harness.TEMPLATES / "base" / "rootfs")
    oci_images.write_layout(d / "layout", layer, CONFIG)
    oci_images.write_docker_save(d / "saved.tar", layer, CONFIG)
    # The same image pushed to the registry, as a user's CI would.
    ref = f"{registry}/e2b-test/web:v1"
    pushed = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
         f"oci:{d / 'layout'}", f"docker://{ref}"],
        capture_output=True, text=True, timeout=300,
    )
    assert pushed.returncode == 0, pushed.stderr
    return {"layout": str(d / "layout"), "docker-save": str(d / "saved.tar"), "registry": ref}


def cubicle(daemon, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a client of the session daemon: builds are its jobs."""
    env = {**os.environ, "E2B_API_URL": daemon.url, "E2B_API_KEY": daemon.api_key}
    return subprocess.run(
        [str(harness.BIN), "--data-dir", str(daemon.data), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture
def template_name(daemon):
    name = f"e2b-svc-{secrets.token_hex(4)}"
    yield name
    if (daemon.data / "templates" / name).exists():
        out = cubicle(daemon, "tpl", "rm", name)
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("source", ["layout", "docker-save", "registry"])
def test_service_answers_through_get_host(daemon, conn, images, template_name, source):
    t0 = time.monotonic()
    built = cubicle(
        daemon,
        "tpl", "create-from-image",
        "--image", images[source],
        "--template-id", template_name,
        "--probe", str(PORT),
        "--probe-timeout", "30",
    )
    build_s = time.monotonic() - t0
    assert built.returncode == 0, built.stderr
    # The snapshotting phase's line of the build log.
    assert "answered the probe" in built.stderr, built.stderr

    t0 = time.monotonic()
    sbx = harness.create(conn, template_name, timeout=120)
    create_ms = (time.monotonic() - t0) * 1000
    try:
        # The service answers at once: no waiting, no retry.
        r = httpx.get(daemon.url + "/", headers={"Host": sbx.get_host(PORT)}, timeout=10)
        assert r.status_code == 200, r.text
        assert "Directory listing for /" in r.text
        assert "SimpleHTTP" in r.headers.get("server", "")
        # Commands run as before, with the template's environment.
        out = sbx.commands.run("echo $GREETING; whoami; pgrep -x python3 >/dev/null && echo running")
        assert out.stdout == "hello from the image\nuser\nrunning\n"
        # A second sandbox of it, and one of `base`, timed the same way.
        times = {}
        for t in (template_name, "base"):
            t0 = time.monotonic()
            other = harness.create(conn, t, timeout=60)
            times[t] = (time.monotonic() - t0) * 1000
            harness.kill_quietly(other)
        harness.MEASUREMENTS.append(
            f"template with a service ({source}): build {build_s:.1f} s, "
            f"Sandbox.create {create_ms:.0f} ms, again {times[template_name]:.0f} ms "
            f"(base: {times['base']:.0f} ms)"
        )
    finally:
        harness.kill_quietly(sbx)


def test_a_probe_that_never_answers_fails_the_build(daemon, images, template_name):
    before = daemon.sandbox_dirs()
    t0 = time.monotonic()
    built = cubicle(
        daemon,
        "tpl", "create-from-image",
        "--image", str(images["layout"]),
        "--template-id", template_name,
        "--probe", "8001",
        "--probe-timeout", "2",
    )
    assert built.returncode != 0
    assert (
        "the service did not answer the probe GET / on port 8001 within 2 s" in built.stderr
    ), built.stderr
    assert time.monotonic() - t0 < 120
    assert not (daemon.data / "templates" / template_name).exists()
    assert daemon.sandbox_dirs() <= before, daemon.sandbox_dirs() - before
