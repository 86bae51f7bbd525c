"""Vendor backend packages as pip would install them: a dist-info with entry points."""

from __future__ import annotations

from pathlib import Path

import pytest

ENTRY_POINTS = """\
[nodeplug.device_backends]
broken-import = brokenvendor:create
exploding = explodingvendor:create
counting = countingvendor:create
pydantic-vendor = pydanticvendor:create
msgspec-vendor = msgspecvendor:create
"""

MODULES = {
    # A vendor package whose SDK is missing on this node.
    "brokenvendor.py": "import nodeplug_no_such_sdk\n\n\ndef create(config):\n    pass\n",
    # A factory that fails for a reason no validation could foresee.
    "explodingvendor.py": ("def create(config):\n    raise RuntimeError('SDK not initialised')\n"),
    # Records each backend it builds, by the "tag" in its config, one line per build.
    "countingvendor.py": (
        "from pathlib import Path\n"
        "from deviceplugin.backends import simulated\n\n\n"
        "def create(config):\n"
        "    with Path(config['log']).open('a') as log:\n"
        "        log.write(config['tag'] + '\\n')\n"
        "    return simulated.create({'count': 2})\n"
    ),
    # Vendors validating their config with pydantic or with msgspec (configkit not used).
    "pydanticvendor.py": (
        "from pydantic import BaseModel, ConfigDict\n\n\n"
        "class Config(BaseModel):\n"
        "    model_config = ConfigDict(extra='forbid')\n"
        "    size: int\n"
        "    ports: list[int] = []\n\n\n"
        "def create(config):\n"
        "    Config.model_validate(config)\n"
    ),
    "msgspecvendor.py": (
        "import msgspec\n\n\n"
        "class Config(msgspec.Struct, forbid_unknown_fields=True):\n"
        "    size: int\n\n\n"
        "def create(config):\n"
        "    msgspec.convert(config, Config)\n"
    ),
}


def install_vendor_packages(site: Path) -> Path:
    """Write the packages into `site`, a directory to put on sys.path or PYTHONPATH."""
    info = site / "nodeplug_test_vendors-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nodeplug-test-vendors\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    for name, source in MODULES.items():
        (site / name).write_text(source)
    return site


@pytest.fixture
def vendor_site(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The vendor packages, installed for this process (and for children via PYTHONPATH)."""
    site = install_vendor_packages(short_tmp / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site
