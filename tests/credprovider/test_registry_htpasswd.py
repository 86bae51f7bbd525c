"""Proof against a real registry (htpasswd auth) and a real client (skopeo): the
credentials the provider hands the kubelet pull the image; without them, no pull."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.sandbox.registry import htpasswd, oci_layout, pull, push, registry
from tests.credprovider.conftest import request, run_provider, write_private
from tests.credprovider.registry import needs_tools
from tests.credprovider.test_docker_config import helper_env

pytestmark = needs_tools
USER, PASSWORD = "puller", "htpasswd-Secret-1"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry holding team/app:v1, reachable only with USER/PASSWORD."""
    work = tmp_path_factory.mktemp("htpasswd")
    users = htpasswd(work / "htpasswd", {USER: PASSWORD})
    with registry({"htpasswd": {"realm": "nodeplug-test", "path": str(users)}}) as address:
        push(oci_layout(work / "layout"), f"{address}/team/app:v1", USER, PASSWORD)
        yield address


def provider_auth(tmp_path: Path, config: str, image: str) -> dict[str, dict[str, str]]:
    path = write_private(tmp_path / "provider.toml", config)
    result = run_provider(["--config", path], request(image))
    assert result.returncode == 0, result.stderr
    auth: dict[str, dict[str, str]] = json.loads(result.stdout).get("auth", {})
    return auth


def test_static_credentials_pull_and_nothing_else_does(served: str, tmp_path: Path) -> None:
    password_file = write_private(tmp_path / "pw", PASSWORD + "\n")
    config = f"""
    [[static]]
    registry = "{served}"
    username = "{USER}"
    passwordFile = "{password_file}"
    """
    auth = provider_auth(tmp_path, config, f"{served}/team/app")
    login = auth[served]
    pulled = pull(f"{served}/team/app:v1", (login["username"], login["password"]))
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["Name"] == f"{served}/team/app"
    anonymous = pull(f"{served}/team/app:v1", None)
    assert anonymous.returncode != 0
    assert "unauthorized" in anonymous.stderr.lower() or "401" in anonymous.stderr
    assert pull(f"{served}/team/app:v1", (USER, "wrong")).returncode != 0


def test_a_glob_pattern_covers_the_registry_port_included(served: str, tmp_path: Path) -> None:
    port = served.rpartition(":")[2]
    config = (
        f'[[static]]\nregistry = "*.0.0.1:{port}"\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
    )
    auth = provider_auth(tmp_path, config, f"{served}/team/app")
    login = auth[f"*.0.0.1:{port}"]
    assert pull(f"{served}/team/app:v1", (login["username"], login["password"])).returncode == 0
    # The same glob without the port is no key for this registry, as the kubelet sees it.
    config = f'[[static]]\nregistry = "*.0.0.1"\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
    assert provider_auth(tmp_path, config, f"{served}/team/app") == {}


def test_a_docker_credential_helper_becomes_a_kubelet_provider(served: str, tmp_path: Path) -> None:
    docker_config = write_private(
        tmp_path / "config.json", json.dumps({"credsStore": "nodeplugtest"})
    )
    config = write_private(tmp_path / "p.toml", f'[[dockerConfig]]\npath = "{docker_config}"\n')
    env = helper_env(tmp_path, {served: [USER, PASSWORD]})
    result = run_provider(["--config", config], request(f"{served}/team/app"), env=env)
    assert result.returncode == 0, result.stderr
    login = json.loads(result.stdout)["auth"][served]
    pulled = pull(f"{served}/team/app:v1", (login["username"], login["password"]))
    assert pulled.returncode == 0, pulled.stderr
