"""What each dependency of `nodeplug run` costs in RSS once imported, in the daemon's order.

    .venv/bin/python bench/import_cost.py [--runs 5]

A fresh interpreter imports the groups below one after another and reads its RSS after
each (after a collection and malloc_trim, as the daemon does once started); a module
shared by two groups counts for the first. The baseline is the bare interpreter of the
same run. The last rows are what the daemon no longer imports, measured on top of all
the rest: what it would cost again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

# Each group: a name and the statements that import it.
GROUPS = [
    ("asyncio (and ssl, which it imports)", ["import asyncio"]),
    ("grpc", ["import grpc, grpc.aio"]),
    ("protobuf runtime", ["from google.protobuf.internal import builder"]),
    ("grpc health service", ["import grpc_health.v1.health"]),
    ("PyYAML", ["import yaml"]),
    ("h11", ["import h11"]),
    ("asyncinotify", ["import asyncinotify"]),
    ("msgspec", ["import msgspec"]),
    ("importlib.metadata (entry points)", ["import importlib.metadata"]),
    ("nodeplug: config and backends", ["import daemon.config, deviceplugin.backends.simulated"]),
    ("nodeplug: daemon, device plugins", ["import daemon.cli, daemon.supervisor, daemon.reload"]),
    ("nodeplug: CSI (protos and services)", ["import daemon.csiplugin"]),
]
FORMER = [
    (
        "pydantic, with a model (not imported)",
        ["import pydantic", "class Model(pydantic.BaseModel):\n    size: int = 1"],
    ),
]
MEASURE = """
import ctypes, gc, json, sys
libc = ctypes.CDLL(None)

def rss():
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

found = [rss()]
for statements in json.loads(sys.argv[1]):
    for statement in statements:
        exec(statement)
    found.append(rss())
print(json.dumps(found))
"""


def measure(groups: list[tuple[str, list[str]]]) -> list[int]:
    argv = [sys.executable, "-c", MEASURE, json.dumps([s for _, s in groups])]
    return list(json.loads(subprocess.run(argv, capture_output=True, check=True).stdout))


def main(runs: int) -> None:
    groups = GROUPS + FORMER
    samples = [measure(groups) for _ in range(runs)]
    bare = statistics.median(sample[0] for sample in samples)
    steps = [
        statistics.median(sample[i + 1] - sample[i] for sample in samples)
        for i in range(len(groups))
    ]
    imported = sum(steps[: len(GROUPS)])
    print(f"median of {runs} runs; bare interpreter (the baseline): {bare / 2**20:.1f} MiB")
    print("| imports                               |  MiB | x bare | share |")
    print("|---------------------------------------|------|--------|-------|")
    for (name, _), step in zip(groups, steps, strict=True):
        share = f"{step / imported:5.0%}" if name not in dict(FORMER) else "    -"
        print(f"| {name:<37} | {step / 2**20:4.1f} | {step / bare:6.2f} | {share} |")
    print(f"all the daemon's imports: {imported / 2**20:.1f} MiB ({imported / bare:.2f}x bare)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    main(parser.parse_args().runs)
