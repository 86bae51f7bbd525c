"""A DRA test bed: the API-server stand-in, a DRA kubelet simulator, a daemon config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import config as configuration
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet

NODE = "node-a"
RESOURCE = "acme.example/fpga"
DRIVER = "fpga.acme.example"


@pytest.fixture
def node_name(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("NODE_NAME", NODE)
    return NODE


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server:
        server.add_node(NODE)
        yield server


@pytest.fixture
async def dra_kubelet(short_tmp: Path) -> AsyncIterator[FakeDraKubelet]:
    async with FakeDraKubelet(short_tmp / "kubelet") as kubelet:
        yield kubelet


def dra_config(
    root: Path, api: ApiServer, *specs: dict[str, Any], **top: Any
) -> configuration.Config:
    kubeconfig = api.write_kubeconfig(root / "kubeconfig")
    data = {"devicePlugins": list(specs), "kubeconfig": str(kubeconfig), **top}
    return configuration.parse(configuration.confined_to(data, root))


def claim_results(*devices: str, driver: str = DRIVER, pool: str = NODE) -> list[dict[str, str]]:
    return [
        {"request": "fpga", "driver": driver, "pool": pool, "device": device} for device in devices
    ]
