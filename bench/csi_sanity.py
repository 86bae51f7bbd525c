"""csi-sanity wall time: nodeplug against the Go reference driver, in the same run.

    sudo .venv/bin/python bench/csi_sanity.py --csi-sanity PATH --hostpathplugin PATH \
        [--runs 3] [--modes mount block]

The upstream conformance suite (kubernetes-csi/csi-test `csi-sanity`) runs against
`nodeplug run` (a CSI driver on a fresh sparse 4 GiB btrfs pool image: the suite
expands a volume to 1 GiB) and against the reference driver (csi-driver-host-path's
`hostpathplugin`), alternately, `--runs` times per access type; the table gives each
one's median wall time, the ratio, and the tally of specs (a faster driver that
passes fewer specs has not won anything).
Only the suite's own run is timed, not the drivers' start-up. The binaries are the
user's: this script runs them and never fetches or builds them; without them (flags,
or $CSI_SANITY and $HOSTPATHPLUGIN) it says so and exits 0. Needs root (mounts, loop
devices). Other load on the machine slows both sides: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from csi import mounts
from csi.identity import probed
from daemon import config as configuration

DRIVER = "bench.csi.nodeplug.io"
VOLUME_BYTES = 16 * 1024**2
_TALLY = re.compile(r"(\d+) Passed \| (\d+) Failed \| \d+ Pending \| (\d+) Skipped")


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    passed: int
    failed: int
    skipped: int


@contextlib.asynccontextmanager
async def process(*argv: str, log: Path) -> AsyncIterator[None]:
    """A driver process, its output in log; stopped with SIGTERM (then SIGKILL) on exit."""
    with log.open("wb") as output:
        child = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output
        )
    try:
        yield
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()


@contextlib.asynccontextmanager
async def nodeplug(root: Path) -> AsyncIterator[Path]:
    """`nodeplug run` serving CSI on a pool image below root; yields its socket."""
    csi = {
        "driverName": DRIVER,
        "nodeId": "bench-node",
        "pool": {"path": str(root / "pool"), "image": str(root / "pool.img"), "size": "4Gi"},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(configuration.confined_to({"csi": csi}, root)))
    socket = root / "kubelet" / "plugins" / DRIVER / "csi.sock"
    argv = (sys.executable, "-m", "daemon.cli", "run", "--config", str(config))
    async with process(*argv, "--log-level", "warning", log=root / "nodeplug.log"):
        await probed(socket)
        yield socket


@contextlib.asynccontextmanager
async def hostpath(binary: Path, root: Path) -> AsyncIterator[Path]:
    """The reference driver with its state below root; yields its socket."""
    socket = root / "hostpath.sock"
    argv = (
        str(binary),
        f"--endpoint=unix://{socket}",
        "--nodeid=bench-node",
        f"--statedir={root / 'hostpath-state'}",
        "--v=0",
    )
    async with process(*argv, log=root / "hostpath.log"):
        await probed(socket)
        yield socket


async def sanity(binary: Path, socket: Path, directory: Path, mode: str, log: Path) -> Run:
    """One csi-sanity run against socket, staging and target paths in directory."""
    argv = (
        str(binary),
        f"--csi.endpoint=unix://{socket}",
        f"--csi.stagingdir={directory / 'staging'}",
        f"--csi.mountdir={directory / 'target'}",
        f"--csi.testvolumesize={VOLUME_BYTES}",
        f"--csi.testvolumeaccesstype={mode}",
        "--ginkgo.no-color",
    )
    started = time.perf_counter()
    child = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await child.communicate()
    seconds = time.perf_counter() - started
    log.write_bytes(output)
    tally = _TALLY.search(output.decode(errors="replace"))
    if tally is None:
        raise RuntimeError(f"csi-sanity printed no tally; see {log}")
    passed, failed, skipped = (int(n) for n in tally.groups())
    return Run(seconds, passed, failed, skipped)


def cleanup_below(root: Path) -> None:
    """Unmount what the drivers left mounted below root (innermost first)."""
    table = mounts.parse_mountinfo(Path("/proc/self/mountinfo").read_text(encoding="utf-8"))
    for mount in reversed(table):
        if Path(mount.mount_point).is_relative_to(root):
            subprocess.run(
                ["umount", "-l", "--", mount.mount_point], check=False, capture_output=True
            )


async def one_round(
    sanity_binary: Path, hostpath_binary: Path, mode: str, keep: Path
) -> tuple[Run, Run]:
    runs = []
    for name in ("nodeplug", "hostpath"):
        root = Path(tempfile.mkdtemp(prefix=f"np-sanity-{name}-", dir="/tmp"))
        try:
            driver = nodeplug(root) if name == "nodeplug" else hostpath(hostpath_binary, root)
            async with driver as socket:
                # Below kubeletDir, where nodeplug accepts request paths.
                directory = root / "kubelet" / "pods" / "sanity"
                directory.mkdir(parents=True)
                log = keep / f"{name}-{mode}-{len(list(keep.iterdir()))}.log"
                runs.append(await sanity(sanity_binary, socket, directory, mode, log))
        finally:
            cleanup_below(root)
            shutil.rmtree(root, ignore_errors=True)
    return runs[0], runs[1]


def report(mode: str, ours: Sequence[Run], theirs: Sequence[Run]) -> str:
    ours_median = statistics.median(r.seconds for r in ours)
    theirs_median = statistics.median(r.seconds for r in theirs)
    worst = max(ours, key=lambda r: (r.failed, -r.passed))
    reference = max(theirs, key=lambda r: (r.failed, -r.passed))
    return (
        f"{mode:<7}{ours_median:>11.2f}{theirs_median:>11.2f}"
        f"{ours_median / theirs_median:>8.2f}x"
        f"{f'{worst.passed}/{worst.failed}/{worst.skipped}':>15}"
        f"{f'{reference.passed}/{reference.failed}/{reference.skipped}':>15}"
    )


async def bench(
    sanity_binary: Path, hostpath_binary: Path, modes: Sequence[str], runs: int, keep: Path
) -> None:
    print(
        f"{'mode':<7}{'nodeplug s':>11}{'hostpath s':>11}{'ratio':>9}"
        f"{'ours p/f/s':>15}{'theirs p/f/s':>15}   (median of {runs}; logs in {keep})"
    )
    for mode in modes:
        ours: list[Run] = []
        theirs: list[Run] = []
        for _ in range(runs):
            mine, reference = await one_round(sanity_binary, hostpath_binary, mode, keep)
            ours.append(mine)
            theirs.append(reference)
        print(report(mode, ours, theirs), flush=True)


def binary(value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    found = shutil.which(value)
    if found is None:
        print(f"{what}: {value} is not an executable file", file=sys.stderr)
        return None
    return Path(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csi-sanity", default=os.environ.get("CSI_SANITY"))
    parser.add_argument("--hostpathplugin", default=os.environ.get("HOSTPATHPLUGIN"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--modes", nargs="+", choices=("mount", "block"), default=["mount", "block"]
    )
    options = parser.parse_args()
    sanity_binary = binary(options.csi_sanity, "--csi-sanity")
    hostpath_binary = binary(options.hostpathplugin, "--hostpathplugin")
    if sanity_binary is None or hostpath_binary is None:
        print(
            "skipped: give --csi-sanity and --hostpathplugin (or $CSI_SANITY and "
            "$HOSTPATHPLUGIN), built from kubernetes-csi/csi-test and csi-driver-host-path",
        )
        return
    if os.geteuid() != 0:
        print("skipped: needs root (mounts and loop devices)")
        return
    keep = Path(tempfile.mkdtemp(prefix="np-sanity-logs-", dir="/tmp"))
    asyncio.run(bench(sanity_binary, hostpath_binary, options.modes, options.runs, keep))


if __name__ == "__main__":
    main()
