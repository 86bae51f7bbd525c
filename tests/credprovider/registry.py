"""Real parts for the credential tests: Debian's docker-registry on loopback, skopeo.

Each registry gets a free port on 127.0.0.1, its own storage in a temp directory, and
is stopped (and its files removed) when the context exits, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

TOOLS = ("docker-registry", "skopeo", "htpasswd")
needs_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (bash .ci/setup installs them)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError as error:
            error.close()
            return  # 401: up, and asking for credentials
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not start: {log.read_text()}")


@contextlib.contextmanager
def registry(auth: Mapping[str, object]) -> Iterator[str]:
    """A running registry with the given `auth` section; yields "127.0.0.1:PORT"."""
    with tempfile.TemporaryDirectory(prefix="np-registry-") as scratch:
        work = Path(scratch)
        address = f"127.0.0.1:{free_port()}"
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
            "http": {"addr": address, "secret": "nodeplug-test"},
            "auth": auth,
        }
        # The registry reads YAML; JSON is YAML.
        (work / "config.yml").write_text(json.dumps(config))
        log = work / "registry.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                ["docker-registry", "serve", str(work / "config.yml")],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_ready(f"http://{address}/v2/", process, log)
            yield address
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file (bcrypt, which the registry requires) for `users`."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run(
            ["htpasswd", "-Bb", str(path), user, password], check=True, capture_output=True
        )
    return path


def _blob(layout: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(layout: Path) -> Path:
    """A one-layer OCI image layout (tag `v1`), small enough to push in milliseconds."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        content = b"hello from nodeplug\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    layer_tar = tar_bytes.getvalue()
    layer = _blob(
        layout, gzip.compress(layer_tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    )
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"],
        },
    }
    config = _blob(
        layout, json.dumps(image_config).encode(), "application/vnd.oci.image.config.v1+json"
    )
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
    manifest |= {"config": config, "layers": [layer]}
    entry = _blob(
        layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
    )
    entry["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    """skopeo with no host auth file or policy: only the credentials given count."""
    env = dict(os.environ, REGISTRY_AUTH_FILE="/nonexistent/auth.json")
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def push(layout: Path, reference: str, username: str, password: str) -> None:
    result = skopeo(
        "copy", "--dest-tls-verify=false", f"--dest-creds={username}:{password}",
        f"oci:{layout}:v1", f"docker://{reference}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def pull(reference: str, creds: tuple[str, str] | None) -> subprocess.CompletedProcess[str]:
    """`skopeo inspect` as a pull: it fetches the manifest with these credentials."""
    login = [f"--creds={creds[0]}:{creds[1]}"] if creds else ["--no-creds"]
    return skopeo("inspect", "--tls-verify=false", *login, f"docker://{reference}")
