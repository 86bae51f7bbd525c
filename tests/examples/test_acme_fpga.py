"""The example vendor backend, driven like the kubelet drives it."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from daemon import config as configuration
from deviceplugin.backend import Allocator, Backend, HealthChecker, PreStarter
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet
from deviceplugin.testkit import FakeKubelet
from tests.deviceplugin.conftest import make_config, running

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "acme_fpga"
RESOURCE = "acme.example/fpga"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("acme_nodeplug", EXAMPLE / "acme_nodeplug.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("acme_nodeplug", module)
    spec.loader.exec_module(module)
    return module


def make_cards(root: Path) -> tuple[Path, Path]:
    """Two ACME cards as the driver shows them: device nodes and status directories."""
    dev, status = root / "dev", root / "status"
    dev.mkdir()
    for index in range(2):
        os.mknod(dev / f"acme-fpga{index}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        (status / f"acme-fpga{index}").mkdir(parents=True)
        (status / f"acme-fpga{index}" / "health").write_text("ok\n")
    return dev, status


def test_entry_point_names_the_factory() -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["nodeplug.device_backends"]["acme-fpga"]
    module_name, _, attribute = target.partition(":")
    assert module_name == "acme_nodeplug"
    assert callable(getattr(load_example(), attribute))


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown keys: colour"):
        load_example().create({"colour": "red"})


@pytest.mark.root
async def test_acme_cards_end_to_end(short_tmp: Path, kubelet: FakeKubelet) -> None:
    dev, status = make_cards(short_tmp)
    backend: Backend = load_example().create(
        {"devices": f"{dev}/acme-fpga*", "statusDir": str(status), "healthInterval": 0.05}
    )
    assert isinstance(backend, Allocator) and isinstance(backend, PreStarter)
    assert isinstance(backend, HealthChecker)
    config = make_config(short_tmp, {"resourceName": RESOURCE, "backend": "acme-fpga"})
    async with running(config, [backend]):
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
        assert kubelet.client(RESOURCE).options.pre_start_required
        container = await kubelet.admit(RESOURCE, 2)
        assert container.envs["ACME_FPGA_DEVICES"] == "acme-fpga0,acme-fpga1"
        assert [(m.container_path, m.read_only) for m in container.mounts] == [("/opt/acme", True)]
        assert sorted(c.name for c in container.cdi_devices) == [
            "acme.example/fpga=acme-fpga0",
            "acme.example/fpga=acme-fpga1",
        ]
        assert (status / "acme-fpga1" / "reset").read_text() == "1\n", "reset before start"

        (status / "acme-fpga1" / "health").write_text("ECC error\n")
        await kubelet.wait_for_devices(RESOURCE, lambda d: d["acme-fpga1"].health == "Unhealthy")
        (status / "acme-fpga1" / "health").write_text("ok\n")
        await kubelet.wait_for_devices(RESOURCE, lambda d: d["acme-fpga1"].health == "Healthy")


@pytest.mark.root
async def test_acme_cards_served_as_a_dra_driver_too(
    short_tmp: Path, kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_NAME", "node-a")
    dev, status = make_cards(short_tmp)
    backend: Backend = load_example().create(
        {"devices": f"{dev}/acme-fpga*", "statusDir": str(status), "model": "acme-x2"}
    )
    spec = {"resourceName": RESOURCE, "backend": "acme-fpga", "api": "both"}
    async with ApiServer() as api, FakeDraKubelet(short_tmp / "kubelet") as dra_kubelet:
        api.add_node("node-a")
        kubeconfig = api.write_kubeconfig(short_tmp / "kubeconfig")
        config = configuration.parse(
            configuration.confined_to(
                {"devicePlugins": [spec], "kubeconfig": str(kubeconfig)}, short_tmp
            )
        )
        async with running(config, [backend]):
            await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
            container = await kubelet.admit(RESOURCE, 1)  # the device plugin, as before
            given = container.envs["ACME_FPGA_DEVICES"]
            await api.wait_for(lambda: len(api.slices_of("node-a", "fpga.acme.example")) == 1)
            (published,) = api.slices_of("node-a", "fpga.acme.example")
            other = next(d for d in published["spec"]["devices"] if d["name"] != given)
            assert other["attributes"]["model"] == {"string": "acme-x2"}
            claim = api.add_claim(
                "ns",
                "c",
                [
                    {
                        "request": "fpga",
                        "driver": "fpga.acme.example",
                        "pool": "node-a",
                        "device": other["name"],
                    }
                ],
            )
            uid = claim["metadata"]["uid"]
            await dra_kubelet.wait_for_driver("fpga.acme.example")
            response = await dra_kubelet.prepare("fpga.acme.example", [("ns", uid, "c")])
            (device,) = response.claims[uid].devices
            assert f"acme.example/fpga={other['name']}" in device.cdi_device_ids
            assert f"{RESOURCE}={uid}" in device.cdi_device_ids
