"""The Dockerfile, read as text (no Docker engine here to build it): its stages, base
image, build context and the paths the DaemonSet relies on."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import translate
from pathlib import Path

import pytest

from credprovider.build import DEFAULT_OUTPUT
from daemon.cli import DEFAULT_CONFIG
from tests.manifests import model

BASE_IMAGE = re.compile(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?")


def stages() -> list[model.Stage]:
    return model.dockerfile()[1]


def builder() -> model.Stage:
    (found,) = [s for s in stages() if s.name == "builder"]
    return found


def runtime() -> model.Stage:
    return stages()[-1]


def excluded(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (Docker's rules: the
    last pattern matching the path or one of its parent directories decides)."""
    verdict = False
    for line in model.DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        # `*` stays within one path component, `**` spans any number of them.
        regex = translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


def test_both_stages_start_from_one_pinned_debian_12_python_3_11() -> None:
    arguments, found = model.dockerfile()
    assert [s.name for s in found] == ["builder", None]
    assert {s.base for s in found} == {"${PYTHON_IMAGE}"}
    assert BASE_IMAGE.fullmatch(arguments["PYTHON_IMAGE"])


def test_the_builder_installs_the_project_and_builds_the_zipapp() -> None:
    runs = " ".join(builder().arguments("RUN"))
    assert "python -m venv /opt/nodeplug" in runs
    assert re.search(r"/opt/nodeplug/bin/pip install --constraint \.ci/constraints\.txt \.", runs)
    build = re.search(r"python -m credprovider\.build\s+--output (\S+)", runs)
    assert build, "the zipapp is not built"
    # ...and the runtime stage has it where the init container copies it from.
    zipapp, _ = model.installs()[model.installed_binary()]
    copies = [model.copy_arguments(rest) for rest in runtime().arguments("COPY")]
    assert ({"from": "builder"}, [build.group(1)], zipapp) in copies
    assert Path(zipapp).name == Path(DEFAULT_OUTPUT).name == model.provider()["name"]


def test_the_builder_does_not_run_as_root() -> None:
    users = builder().arguments("USER")
    assert users and users[-1] not in {"root", "0", "0:0"}
    first_pip = next(i for i, (w, r) in enumerate(builder().instructions) if "pip" in r)
    first_user = next(i for i, (w, _) in enumerate(builder().instructions) if w == "USER")
    assert first_user < first_pip


@pytest.mark.parametrize(
    "copy",
    [rest for stage in model.dockerfile()[1] for rest in stage.arguments("COPY")],
)
def test_what_the_builder_copies_exists_in_the_build_context(copy: str) -> None:
    options, sources, _ = model.copy_arguments(copy)
    if "from" in options:
        return
    for source in sources:
        assert (model.ROOT / source).exists(), source
        assert not excluded(source), f".dockerignore leaves out {source}"
        for inner in (model.ROOT / source).rglob("*.py"):
            assert not excluded(str(inner.relative_to(model.ROOT))), inner


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", "dist/x", "tests/conftest.py", "daemon/__pycache__/x.pyc"],
)
def test_the_build_context_leaves_local_files_out(path: str) -> None:
    assert excluded(path)


def test_the_runtime_has_the_tools_the_daemon_runs() -> None:
    runs = " ".join(runtime().arguments("RUN"))
    install = re.search(r"apt-get install -y --no-install-recommends ([\w\s.+-]+?)(&&|$)", runs)
    assert install
    packages = set(install.group(1).split())
    # mount/umount/losetup, btrfs/mkfs.btrfs, chattr, libudev for pyudev.
    assert {"mount", "util-linux", "btrfs-progs", "e2fsprogs", "libudev1"} <= packages
    # CI tests the daemon against the same Debian packages.
    ci = {
        line.split()[0]
        for line in (model.ROOT / ".ci" / "apt-packages").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"util-linux", "btrfs-progs", "e2fsprogs"} <= ci


def test_the_entrypoint_runs_the_daemon_with_the_mounted_config() -> None:
    (entrypoint,) = runtime().arguments("ENTRYPOINT")
    command = json.loads(entrypoint)
    assert command == ["nodeplug", "run", "--config", str(DEFAULT_CONFIG)]
    scripts = tomllib.loads((model.ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nodeplug"] == "daemon.cli:main"
    assert any(
        re.fullmatch(r"PATH=/opt/nodeplug/bin:\$PATH", rest) for rest in runtime().arguments("ENV")
    )
    # The DaemonSet only adds flags, and only ones `nodeplug run` has.
    nodeplug = model.container("nodeplug")
    assert "command" not in nodeplug
    assert set(model.flags("nodeplug")) <= {"--log-format", "--log-level"}


def test_the_runtime_runs_as_root_for_the_daemon() -> None:
    # Explicit, with its reasons next to it in the Dockerfile: mounts, loop devices.
    assert runtime().arguments("USER") == ["0:0"]
