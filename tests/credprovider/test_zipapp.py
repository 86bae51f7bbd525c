"""The shipped artifact: one executable zip file that any host python3 runs."""

from __future__ import annotations

import ast
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from credprovider.build import build
from tests.credprovider.conftest import request, run_provider, write_private

CONFIG = '[[static]]\nregistry = "*.example.com"\nusername = "puller"\npassword = "zip-pw"\n'
EXPECTED_AUTH = {"*.example.com": {"username": "puller", "password": "zip-pw"}}
# Modules a static answer must not import: network, heavy parsers, third parties.
NOT_ON_THE_HOT_PATH = ["json", "re", "typing", "tomllib", "tomli", "socket", "ssl", "subprocess"]
NOT_ON_THE_HOT_PATH += ["urllib", "http", "argparse", "pathlib", "dataclasses", "grpc", "yaml"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build(str(tmp_path_factory.mktemp("zipapp") / "nodeplug-credential-provider")))


def test_is_an_executable_zip_behind_a_python3_shebang(app: Path) -> None:
    assert app.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(app, os.X_OK)
    names = zipfile.ZipFile(app).namelist()
    assert "__main__.py" in names and "credprovider/__main__.py" in names
    assert "credprovider/build.py" not in names
    assert {"tomli/__init__.py", "tomli/_parser.py", "tomli/LICENSE"} <= set(names)


def test_builds_are_reproducible(app: Path, tmp_path: Path) -> None:
    assert Path(build(str(tmp_path / "again"))).read_bytes() == app.read_bytes()


def test_the_kubelet_execs_it_directly(app: Path, tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", CONFIG)
    result = run_provider(["--config", config], request("r.example.com/app"), command=[str(app)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["auth"] == EXPECTED_AUTH


def _in_isolation(app: Path, prelude: str, args: list[str]) -> str:
    """Run the zipapp's main with -I -S (no site-packages) after `prelude`."""
    return (
        f"import sys; {prelude}; sys.path.insert(0, {str(app)!r}); sys.argv[1:] = {args!r}; "
        "from credprovider.__main__ import main; code = main(); "
        "print(sorted(sys.modules), file=sys.stderr); sys.exit(code)"
    )


def test_without_tomllib_it_uses_the_bundled_tomli(app: Path, tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", CONFIG)
    # Python 3.9 and 3.10 have no tomllib: hide ours, and site-packages with -S.
    code = _in_isolation(app, "sys.modules['tomllib'] = None", ["--config", str(config)])
    result = run_provider(
        [], request("r.example.com/app"), command=[sys.executable, "-I", "-S", "-c", code]
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["auth"] == EXPECTED_AUTH
    assert "tomli" in result.stderr.decode()


def test_a_cached_static_answer_imports_only_what_it_needs(app: Path, tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", CONFIG)
    args = ["--config", str(config), "--cache-dir", str(tmp_path / "cache")]
    command = [sys.executable, "-I", "-S", "-c", _in_isolation(app, "pass", args)]
    assert run_provider([], request("r.example.com/app"), command=command).returncode == 0
    result = run_provider([], request("r.example.com/app"), command=command)
    assert result.returncode == 0, result.stderr
    imported = {name.partition(".")[0] for name in ast.literal_eval(result.stderr.decode())}
    assert imported.isdisjoint(NOT_ON_THE_HOT_PATH), imported & set(NOT_ON_THE_HOT_PATH)


def _host_pythons() -> list[str]:
    """Every CPython >= 3.9 on this machine besides ours (pyenv's, or python3.X on PATH)."""
    found: dict[int, str] = {}
    for minor in range(9, 15):
        for candidate in (
            *sorted(Path("/root/.pyenv/versions").glob(f"3.{minor}.*/bin/python3")),
            *(Path(d) / f"python3.{minor}" for d in os.environ.get("PATH", "").split(":") if d),
        ):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found.setdefault(minor, str(candidate))
                break
    return [path for minor, path in sorted(found.items()) if minor != sys.version_info.minor]


@pytest.mark.parametrize(
    "python",
    _host_pythons()
    or [pytest.param("", marks=pytest.mark.skip(reason="no other CPython >= 3.9 on this machine"))],
)
def test_runs_on_every_host_python_from_3_9(app: Path, tmp_path: Path, python: str) -> None:
    """The node's python3 may be 3.9 (no tomllib: the bundled tomli parses the config)."""
    config = write_private(tmp_path / "c.toml", CONFIG)
    result = run_provider(
        ["--config", config], request("r.example.com/app"), command=[python, str(app)]
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["auth"] == EXPECTED_AUTH
