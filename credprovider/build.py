"""Build the single-file zipapp the kubelet runs on the node: `python -m credprovider.build`.

The file is a zip archive behind a `#!/usr/bin/env python3` line, so any host Python
3.9 or later runs it. It holds the provider's sources (not this builder), the
pure-Python `tomli` backport for hosts without tomllib (3.9, 3.10) with its licence,
and a `__main__`. Next to each source sits bytecode for the building interpreter
(unchecked-hash .pyc, which zipimport uses without comparing timestamps): hosts on that
Python version skip compiling; others find the magic number differs and compile the
source. Entries carry a fixed timestamp, so the same inputs build the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import py_compile
import sys
import tempfile
import zipfile

import tomli

SHEBANG = b"#!/usr/bin/env python3\n"
DEFAULT_OUTPUT = "dist/nodeplug-credential-provider"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_MAIN = b"import sys\nfrom credprovider.__main__ import main\nsys.exit(main())\n"


def _sources() -> dict[str, bytes]:
    """Archive name -> bytes of every module to ship."""
    files: dict[str, bytes] = {"__main__.py": _MAIN}
    for package in (os.path.dirname(__file__), os.path.dirname(tomli.__file__)):
        root = os.path.dirname(package)
        for folder, dirs, names in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.endswith(".py") and path != os.path.abspath(__file__):
                    with open(path, "rb") as file:
                        files[os.path.relpath(path, root)] = file.read()
    licence = next(f for f in importlib.metadata.files("tomli") or () if f.name == "LICENSE")
    files["tomli/LICENSE"] = licence.read_binary()
    return files


def _bytecode(name: str, source: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        source_path, pyc_path = os.path.join(scratch, "m.py"), os.path.join(scratch, "m.pyc")
        with open(source_path, "wb") as file:
            file.write(source)
        py_compile.compile(
            source_path,
            cfile=pyc_path,
            dfile=name,
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        with open(pyc_path, "rb") as file:
            return file.read()


def build(output: str) -> str:
    """Write the zipapp to `output` (mode 0755) and return its path."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in sorted(_sources().items()):
            archive.writestr(zipfile.ZipInfo(name, _EPOCH), data)
            if name.endswith(".py"):
                archive.writestr(zipfile.ZipInfo(name + "c", _EPOCH), _bytecode(name, data))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    temporary = output + ".tmp"
    with open(temporary, "wb") as file:
        file.write(SHEBANG + buffer.getvalue())
    os.chmod(temporary, 0o755)  # noqa: S103 - an executable for root to run
    os.replace(temporary, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the credential provider zipapp.")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="default: %(default)s")
    args = parser.parse_args(argv)
    print(build(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
