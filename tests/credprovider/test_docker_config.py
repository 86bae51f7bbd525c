"""Docker config.json sources: auths as the kubelet's keyring reads them, and real
credential helper executables speaking docker's protocol."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.credprovider.conftest import request, run_provider, write_private

HELPER = f"""#!{sys.executable}
import json, os, sys, time
server = sys.stdin.read()
with open(os.environ["NP_HELPER_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + " " + server + "\\n")
answer = json.load(open(os.environ["NP_HELPER_STORE"])).get(server)
if answer is None:
    print("credentials not found in native keychain")
    sys.exit(1)
if answer == "FAIL":
    print("helper-secret-output")
    print("helper-secret-error", file=sys.stderr)
    sys.exit(3)
if answer == "SLEEP":
    time.sleep(10)
if answer == "GARBAGE":
    print("not json")
    sys.exit(0)
json.dump({{"ServerURL": server, "Username": answer[0], "Secret": answer[1]}}, sys.stdout)
"""

Run = Callable[..., Any]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def helper_env(tmp_path: Path, store: dict[str, Any]) -> dict[str, str]:
    """Install the test helpers (nodeplugtest, other) answering from `store`; their env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("nodeplugtest", "other"):
        helper = bin_dir / f"docker-credential-{name}"
        helper.write_text(HELPER)
        helper.chmod(0o755)
    (tmp_path / "store.json").write_text(json.dumps(store))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env | {
        "NP_HELPER_STORE": str(tmp_path / "store.json"),
        "NP_HELPER_LOG": str(tmp_path / "log"),
    }


@pytest.fixture
def docker(tmp_path: Path) -> Run:
    """Run the provider on a docker config (and helper store); parsed response or the result."""

    def run(
        docker_config: dict[str, Any],
        image: str,
        store: dict[str, Any] | None = None,
        extra: str = "",
        ok: bool = True,
    ) -> Any:
        config_json = write_private(tmp_path / "config.json", json.dumps(docker_config))
        toml = write_private(
            tmp_path / "p.toml", f'[[dockerConfig]]\npath = "{config_json}"\n{extra}'
        )
        result = run_provider(
            ["--config", toml], request(image), env=helper_env(tmp_path, store or {})
        )
        if not ok:
            return result
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    return run


@pytest.mark.parametrize(
    ("location", "image", "key"),
    [
        ("registry.io", "registry.io/app", "registry.io"),
        ("https://registry.io", "registry.io/app", "registry.io"),
        ("http://registry.io:5000/", "registry.io:5000/app", "registry.io:5000"),
        ("https://registry.io/v2/", "registry.io/app", "registry.io"),
        ("https://registry.io/v1/team", "registry.io/team/app", "registry.io/team"),
        ("registry.io/team", "registry.io/team/app", "registry.io/team"),
        ("*.registry.io", "a.registry.io/app", "*.registry.io"),
        ("https://index.docker.io/v1/", "docker.io/library/nginx", "index.docker.io"),
        ("https://index.docker.io/v1/", "nginx", "index.docker.io"),
        ("https://index.docker.io/v1/", "someone/app", "index.docker.io"),
    ],
)
def test_auths_keys_as_the_kubelet_keyring_makes_them(
    docker: Run, location: str, image: str, key: str
) -> None:
    response = docker({"auths": {location: {"auth": b64("user:pa:ss")}}}, image)
    assert response["auth"] == {key: {"username": "user", "password": "pa:ss"}}


@pytest.mark.parametrize(
    ("entry", "login"),
    [
        ({"username": "u", "password": "p"}, ("u", "p")),
        ({"auth": b64("a:b"), "username": "u", "password": "p"}, ("a", "b")),
        ({"auth": b64("00000000-0000:"), "identitytoken": "refresh"}, ("00000000-0000", "refresh")),
        ({"identitytoken": "refresh"}, ("<token>", "refresh")),
    ],
)
def test_auths_entries(docker: Run, entry: dict[str, str], login: tuple[str, str]) -> None:
    response = docker({"auths": {"r.io": entry}}, "r.io/x")
    assert response["auth"]["r.io"] == {"username": login[0], "password": login[1]}


def test_entries_for_other_registries_or_empty_logins_give_nothing(docker: Run) -> None:
    auths = {"other.io": {"auth": b64("u:p")}, "r.io": {"username": "u"}, "bad host": {"auth": "x"}}
    assert docker({"auths": auths}, "r.io/x") == {
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "kind": "CredentialProviderResponse",
        "cacheKeyType": "Image",
        "cacheDuration": "0s",
    }


def test_a_cred_helper_answers_for_its_registry(docker: Run, tmp_path: Path) -> None:
    config = {"credHelpers": {"r.io": "nodeplugtest", "q.io": "other"}}
    response = docker(config, "r.io/team/app", store={"r.io": ["helped", "helper-pw"]})
    assert response["auth"] == {"r.io": {"username": "helped", "password": "helper-pw"}}
    assert response["cacheKeyType"] == "Registry"
    assert (tmp_path / "log").read_text() == "get r.io\n"  # only the matching helper ran


def test_creds_store_answers_for_any_other_registry(docker: Run, tmp_path: Path) -> None:
    config = {"credsStore": "nodeplugtest", "auths": {"r.io:5000": {}}}
    store = {"r.io:5000": ["stored", "store-pw"], "https://index.docker.io/v1/": ["hub", "hub-pw"]}
    assert docker(config, "r.io:5000/app", store=store)["auth"] == {
        "r.io:5000": {"username": "stored", "password": "store-pw"}
    }
    assert docker(config, "library/nginx", store=store)["auth"] == {
        "index.docker.io": {"username": "hub", "password": "hub-pw"}
    }
    assert "auth" not in docker(config, "unknown.io/app", store=store)


def test_helpers_that_fail_fail_the_request_without_echoing_them(docker: Run) -> None:
    result = docker(
        {"credHelpers": {"r.io": "nodeplugtest"}}, "r.io/x", store={"r.io": "FAIL"}, ok=False
    )
    assert result.returncode == 1 and result.stdout == b""
    assert b"docker-credential-nodeplugtest failed with exit code 3" in result.stderr
    assert b"helper-secret" not in result.stderr


@pytest.mark.parametrize(
    ("config", "store", "extra", "message"),
    [
        ({"credHelpers": {"r.io": "missing"}}, {}, "", "docker-credential-missing is not on PATH"),
        ({"credHelpers": {"r.io": "nodeplugtest"}}, {"r.io": "GARBAGE"}, "", "answered no JSON"),
        ({"credHelpers": {"r.io": "../x"}}, {}, "", "is no helper name"),
        (
            {"credHelpers": {"r.io": "nodeplugtest"}},
            {"r.io": "SLEEP"},
            'helperTimeout = "1s"',
            "took longer than 1s",
        ),
        ({"auths": {"r.io": {"auth": "%%%"}}}, {}, "", "not base64 of user:password"),
        ({"auths": {"r.io": {"auth": b64("nocolon")}}}, {}, "", "not base64 of user:password"),
        ({"auths": []}, {}, "", "auths has the wrong type"),
        ({"auths": {"r.io": "x"}}, {}, "", "not an object"),
    ],
)
def test_bad_docker_configs_and_helpers(
    docker: Run, config: dict[str, Any], store: dict[str, Any], extra: str, message: str
) -> None:
    result = docker(config, "r.io/x", store=store, extra=extra, ok=False)
    assert result.returncode == 1 and result.stdout == b""
    assert message.encode() in result.stderr, result.stderr


def test_docker_config_open_to_others_is_refused(tmp_path: Path) -> None:
    config_json = write_private(tmp_path / "config.json", "{}", 0o644)
    toml = write_private(tmp_path / "p.toml", f'[[dockerConfig]]\npath = "{config_json}"\n')
    result = run_provider(["--config", toml], request("r.io/x"))
    assert result.returncode == 1
    assert b"docker config" in result.stderr and b"accessible by group or others" in result.stderr


def test_invalid_json_docker_config(tmp_path: Path) -> None:
    config_json = write_private(tmp_path / "config.json", "{")
    toml = write_private(tmp_path / "p.toml", f'[[dockerConfig]]\npath = "{config_json}"\n')
    result = run_provider(["--config", toml], request("r.io/x"))
    assert result.returncode == 1 and b"is not valid JSON" in result.stderr
