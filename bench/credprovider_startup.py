"""Wall time of one static-source credential request, as ratios to a bare interpreter.

    .venv/bin/python bench/credprovider_startup.py [--rounds N]

Every command runs once per round, in turn, so drift on the machine hits all rows
alike; the table shows medians. The baseline, `python3 -I -S -c pass`, is the least any
Python program can cost. "empty zipapp" is the floor of the zipapp form itself: running
a zip makes the interpreter import runpy and zipimport's machinery before our code
starts. The shebang row is what the kubelet pays when it execs the file: the host's
site-packages set-up included (on a node, usually cheap; -I -S rows leave it out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from credprovider.build import build  # noqa: E402

# The real interpreter, not a venv wrapper or a pyenv shim; the shebang row finds it
# first on PATH too, as the kubelet's PATH would find the system's python3.
PYTHON = os.path.realpath(sys.executable)
ENV = {"PATH": f"{Path(PYTHON).parent}:/usr/bin:/bin"}
CONFIG = """\
cacheDuration = "10m"
[[static]]
registry = "*.example.com"
username = "puller"
password = "bench-only"
"""
REQUEST = json.dumps(
    {
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "kind": "CredentialProviderRequest",
        "image": "registry.example.com/team/app",
    }
).encode()


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, input=REQUEST, capture_output=True, check=False, env=ENV)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command} failed: {result.stderr.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        app = build(str(work / "nodeplug-credential-provider"))
        config = work / "provider.toml"
        config.write_text(CONFIG)
        config.chmod(0o600)
        empty = work / "empty.pyz"
        with zipfile.ZipFile(empty, "w") as archive:
            archive.writestr("__main__.py", "")
        args = ["--config", str(config), "--cache-dir", str(work / "cache")]
        source = (
            f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            "from credprovider.__main__ import main; sys.exit(main())"
        )
        rows = {
            "python3 -I -S -c pass (baseline)": [PYTHON, "-I", "-S", "-c", "pass"],
            "empty zipapp, python3 -I -S (floor of the form)": [PYTHON, "-I", "-S", str(empty)],
            "source tree, python3 -I -S, config cached": [PYTHON, "-I", "-S", "-c", source, *args],
            "zipapp, python3 -I -S, config cached": [PYTHON, "-I", "-S", app, *args],
            "zipapp, python3 -I -S, no --cache-dir (TOML each run)": [
                PYTHON,
                "-I",
                "-S",
                app,
                *args[:2],
            ],
            "zipapp exec'd by its shebang (site included), cached": [app, *args],
        }
        for command in rows.values():  # warm the page cache and the config cache
            _time(command)
        samples: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(rounds):
            for name, command in rows.items():
                samples[name].append(_time(command))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    baseline = next(iter(medians.values()))
    print(f"{rounds} rounds, {PYTHON} {sys.version.split()[0]}; medians")
    print(f"{'command':<56} {'ms':>7} {'ratio':>6}")
    for name, seconds in medians.items():
        print(f"{name:<56} {seconds * 1000:7.2f} {seconds / baseline:6.2f}")


if __name__ == "__main__":
    main()
