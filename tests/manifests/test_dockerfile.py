"""The Dockerfile, read as text (no Docker engine here to build it): its stages, base
image, build context and the paths the DaemonSet relies on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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
    assert ({"from": "builder", "chown": "0:0"}, [build.group(1)], zipapp) in copies
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


def builder_uid() -> str:
    runs = " ".join(builder().arguments("RUN"))
    found = re.search(r"useradd\b[^&]*--uid (\d+) builder", runs)
    assert found, "the builder user has no fixed uid"
    return found.group(1)


def test_what_the_runtime_takes_from_the_builder_is_owned_by_root() -> None:
    copies = [model.copy_arguments(rest) for rest in runtime().arguments("COPY")]
    taken = [options for options, _, _ in copies if "from" in options]
    assert taken, "the runtime copies nothing from the builder"
    # Without --chown the files keep the builder's uid, which this image has no user for.
    assert all(options.get("chown") == "0:0" for options in taken), taken


def pip_install() -> tuple[list[dict[str, str]], str]:
    """The builder's pip install RUN: its --mount options, and its shell command."""
    (run,) = [rest for rest in builder().arguments("RUN") if "pip install" in rest]
    words = run.split(" ")
    mounts = [w.removeprefix("--mount=") for w in words if w.startswith("--mount=")]
    command = " ".join(w for w in words if not w.startswith("--mount=")).strip()
    return [dict(o.partition("=")[::2] for o in m.split(",")) for m in mounts], command


def test_pips_credentials_and_ca_come_only_from_build_secrets() -> None:
    mounts, _ = pip_install()
    assert {m["id"]: m for m in mounts} == {
        # Readable by the user pip runs as (secrets default to root, mode 0400); optional,
        # so that a build without them works.
        "pip.conf": {"type": "secret", "id": "pip.conf", "uid": builder_uid()},
        "pip-ca": {"type": "secret", "id": "pip-ca", "uid": builder_uid()},
    }
    everything = [rest for stage in stages() for _, rest in stage.instructions]
    # Nothing else touches the secrets' paths (a cp would put them in a layer)...
    assert sum("/run/secrets" in rest for rest in everything) == 1
    # ...and no ENV or ARG names pip's config or CA: an ENV persists into the image, and
    # build arguments are recorded in the build's history.
    settings = builder().arguments("ENV") + builder().arguments("ARG")
    assert not [s for s in settings if re.search(r"PIP_(CONFIG_FILE|CERT|CLIENT_CERT)", s)]
    assert builder().arguments("ARG") == ["PIP_INDEX_URL"]
    assert not runtime().arguments("ARG")


@pytest.mark.parametrize("given", [(), ("pip.conf",), ("pip-ca",), ("pip.conf", "pip-ca")])
def test_pip_uses_the_secrets_that_were_given_and_only_those(
    tmp_path: Path, given: tuple[str, ...]
) -> None:
    """The RUN's own shell command, under /bin/sh, with a pip that reports what it got."""
    _, command = pip_install()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in given:
        (secrets / name).write_text(f"{name} content\n")
    pip = tmp_path / "pip"
    report = tmp_path / "report"
    pip.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "config=${PIP_CONFIG_FILE-unset}" "cert=${PIP_CERT-unset}" "$*"'
        f" > {report}\n"
    )
    pip.chmod(0o755)
    script = command.replace("/run/secrets/", f"{secrets}/").replace(
        "/opt/nodeplug/bin/pip", str(pip)
    )
    environment = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        ["/bin/sh", "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config, cert, arguments = report.read_text().splitlines()
    assert config == (f"config={secrets}/pip.conf" if "pip.conf" in given else "config=unset")
    assert cert == (f"cert={secrets}/pip-ca" if "pip-ca" in given else "cert=unset")
    assert arguments == "install --constraint .ci/constraints.txt . tomli"


def test_the_readme_shows_the_build_options_the_dockerfile_reads() -> None:
    readme = (model.ROOT / "README.md").read_text()
    mounts, _ = pip_install()
    for mount in mounts:
        assert f"--secret id={mount['id']},src=" in readme, mount["id"]
    for argument in builder().arguments("ARG"):
        assert f"--build-arg {argument}=" in readme, argument


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for raw in lines:
        line = raw.split("#")[0].strip()
        if line:
            name, equals, version = line.partition("==")
            assert equals and version, f"not an exact pin: {line!r}"
            found[canonical(name)] = version
    return found


def test_the_constraints_pin_exactly_what_ci_installs() -> None:
    """The image installs with .ci/constraints.txt: a distribution CI has but the file
    does not pin (idna, pulled in by yarl, once) could be any version in the image."""
    frozen = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "freeze",
            "--exclude-editable",
            "--disable-pip-version-check",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    installed = pins([line for line in frozen if canonical(line.partition("==")[0]) != "nodeplug"])
    constraints = pins((model.ROOT / ".ci" / "constraints.txt").read_text().splitlines())
    missing = {name: v for name, v in installed.items() if name not in constraints}
    stale = {name: v for name, v in constraints.items() if name not in installed}
    different = {n: (v, constraints[n]) for n, v in installed.items() if constraints.get(n, v) != v}
    assert (missing, stale, different) == ({}, {}, {})
