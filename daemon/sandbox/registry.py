"""A real image registry on loopback and a real client: Debian's docker-registry, skopeo.

Shared by `nodeplug sandbox` (its credential step) and the credential provider's
tests. Each registry gets a free port on 127.0.0.1 and its own storage; stop() ends it
whatever state it is in. Everything here blocks: the sandbox calls it through
asyncio.to_thread.
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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

# Tool -> the Debian package that brings it.
TOOLS = {"docker-registry": "docker-registry", "skopeo": "skopeo", "htpasswd": "apache2-utils"}
START_TIMEOUT = 20.0
_HELLO = b"hello from nodeplug\n"


def missing_tools() -> dict[str, str]:
    """Tools not on PATH -> the package to install."""
    return {tool: package for tool, package in TOOLS.items() if shutil.which(tool) is None}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class LocalRegistry:
    """docker-registry serving `work`/data with the given `auth` section."""

    def __init__(self, work: Path, auth: Mapping[str, object]) -> None:
        self.work = work
        self.auth = auth
        self.address = f"127.0.0.1:{free_port()}"
        self.log = work / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None
        # stop() may run in another thread while start() is still waiting.
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> str:
        """Start and wait until it answers; returns "127.0.0.1:PORT"."""
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.work / "data")}},
            "http": {"addr": self.address, "secret": "nodeplug-local"},
            "auth": self.auth,
        }
        # The registry reads YAML; JSON is YAML.
        (self.work / "config.yml").write_text(json.dumps(config))
        with self._lock:
            if self._stopped:
                raise RuntimeError("the registry was stopped before it started")
            with self.log.open("wb") as output:
                self._process = subprocess.Popen(
                    ["docker-registry", "serve", str(self.work / "config.yml")],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
        self._wait_ready(f"http://{self.address}/v2/")
        return self.address

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            process = self._process
            if self._stopped or process is None or process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own http URL
                    return
            except urllib.error.HTTPError as error:
                error.close()
                return  # 401: up, and asking for credentials
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer within {START_TIMEOUT:g} s")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-500:] or "(no output)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def registry(auth: Mapping[str, object]) -> Iterator[str]:
    """A running registry in a temporary directory; yields "127.0.0.1:PORT"."""
    with tempfile.TemporaryDirectory(prefix="np-registry-") as scratch:
        served = LocalRegistry(Path(scratch), auth)
        try:
            yield served.start()
        finally:
            served.stop()


def htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file (bcrypt, which the registry requires) for `users`, mode 0600."""
    path.touch(mode=0o600)
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
        info = tarfile.TarInfo("hello.txt")
        info.size = len(_HELLO)
        tar.addfile(info, io.BytesIO(_HELLO))
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
        stdin=subprocess.DEVNULL,
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
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy to {reference} failed: {result.stderr.strip()}")


def pull(reference: str, creds: tuple[str, str] | None) -> subprocess.CompletedProcess[str]:
    """`skopeo inspect` as a pull: it fetches the manifest with these credentials."""
    login = [f"--creds={creds[0]}:{creds[1]}"] if creds else ["--no-creds"]
    return skopeo("inspect", "--tls-verify=false", *login, f"docker://{reference}")
