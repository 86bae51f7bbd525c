"""Run the provider as the kubelet does: a subprocess, JSON on stdin, JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

V1 = "credentialprovider.kubelet.k8s.io/v1"
API_VERSIONS = [
    V1,
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
]


def request(image: str, api_version: str = V1, **fields: Any) -> bytes:
    body = {"apiVersion": api_version, "kind": "CredentialProviderRequest", "image": image}
    return json.dumps(body | fields).encode()


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def run_provider(
    args: Sequence[str | Path],
    stdin: bytes,
    env: dict[str, str] | None = None,
    command: Sequence[str] = (sys.executable, "-m", "credprovider"),
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*command, *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
    )


Provide = Callable[..., dict[str, Any]]


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], Path]:
    def make(text: str) -> Path:
        return write_private(tmp_path / "provider.toml", text)

    return make


@pytest.fixture
def provide(tmp_path: Path) -> Provide:
    """Run with a config text and an image; the parsed response (asserting success)."""

    def run(config: str, image: str, api_version: str = V1, **fields: Any) -> dict[str, Any]:
        path = write_private(tmp_path / "provider.toml", config)
        result = run_provider(
            ["--config", path, "--cache-dir", tmp_path / "cache"],
            request(image, api_version, **fields),
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b""
        response: dict[str, Any] = json.loads(result.stdout)
        return response

    return run
