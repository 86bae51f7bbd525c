"""Generate the Python modules for every .proto under proto/ (one command, committed output).

    python proto/generate.py          # regenerate in place
    python proto/generate.py --check  # exit 1 if the committed modules are stale (CI)

A source at proto/<pkg>/<sub>/x.proto becomes <pkg>/<sub>/x_pb2.py (+ _grpc and .pyi stubs),
so generated code lives inside the package that uses it and imports as e.g.
`deviceplugin.v1beta1.api_pb2`, never as a top-level `proto` package.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for all sources into out_dir; return the files written, relative to it."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    # protoc finds the mypy-protobuf plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    written = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())
    for rel in written:
        # Generated sub-packages need an __init__.py to be importable and packaged.
        for parent in rel.parents:
            if parent == Path() or (REPO_ROOT / parent / "__init__.py").exists():
                continue
            init = out_dir / parent / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from proto/ by proto/generate.py; do not edit."""\n')
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


def stale_files(fresh_dir: Path, files: list[Path]) -> list[str]:
    problems = []
    for rel in files:
        committed = REPO_ROOT / rel
        if not committed.exists():
            problems.append(f"missing: {rel}")
        elif not filecmp.cmp(committed, fresh_dir / rel, shallow=False):
            problems.append(f"stale: {rel}")
    expected = {str(rel) for rel in files}
    for source in proto_sources():
        package_dir = REPO_ROOT / source.parent.relative_to(PROTO_ROOT)
        for path in package_dir.glob("*"):
            name = str(path.relative_to(REPO_ROOT))
            if path.name.endswith(GENERATED_SUFFIXES) and name not in expected:
                problems.append(f"orphaned (no .proto source): {name}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed output is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        files = generate(fresh)
        if options.check:
            problems = stale_files(fresh, files)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                print("generated code is stale: run `python proto/generate.py`", file=sys.stderr)
                return 1
            print(f"generated code is up to date ({len(files)} files)")
            return 0
        for rel in files:
            target = REPO_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((fresh / rel).read_bytes())
        print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
