"""A state file the driver cannot read stops the CSI driver alone, says why, and is recoverable."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from csi.state import StateFileError, StateStore, Status, VolumeRecord
from daemon import config as configuration
from deviceplugin.testkit import FakeKubelet
from tests.csi.test_daemon import csi_socket, daemon_config, registration_socket
from tests.daemon.test_operations import eventually, get
from tests.deviceplugin.conftest import running

MiB = 1024**2
RESOURCE = "example.com/widget"


def record(index: int) -> VolumeRecord:
    return VolumeRecord(f"v{index:032x}", f"pvc-{index}", MiB, False, {}, "", 1.0, Status.READY)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b'{"version": 1, "volumes": {"v', "is not valid JSON (truncated?)"),
        (b"[]", "does not hold a JSON object"),
        (b'{"version": 2}', "written by a newer nodeplug (format version 2"),
        (b'{"version": "1"}', "unknown format version '1'"),
        (b"{}", "unknown format version None"),
        (b'{"version": 1, "volumes": {"v1": {"id": "v1"}}}', "holds a record"),
        (b'{"version": 1, "volumes": {"v1": 7}}', "holds a record"),
        (b'{"version": 1, "volumes": []}', "holds a record"),
        (b"\xff\xfe{", "is not UTF-8"),
    ],
)
def test_an_unreadable_state_file_is_named_with_its_problem_and_the_way_out(
    short_tmp: Path, content: bytes, problem: str
) -> None:
    store = StateStore(short_tmp / "state")
    store.path.parent.mkdir(mode=0o700)
    store.path.write_bytes(content)
    with pytest.raises(StateFileError) as error:
        store.load()
    message = str(error.value)
    assert str(store.path) in message
    assert problem in message
    assert f"{store.path}.prev" in message
    assert store.path.read_bytes() == content, "the damaged file is left as it was"


async def test_each_write_keeps_the_state_before_it(short_tmp: Path) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    store.state.volumes["a"] = record(1)
    await store.save()
    previous = store.path.with_name(store.path.name + ".prev")
    assert not previous.exists(), "the first write replaces nothing"
    first = store.path.read_text()
    store.state.volumes["b"] = record(2)
    await store.save()
    assert previous.read_text() == first
    assert stat.S_IMODE(previous.stat().st_mode) == 0o600
    assert sorted(p.name for p in store.path.parent.iterdir()) == [
        "csi-state.json",
        "csi-state.json.prev",
    ]
    # Recovery as the message describes it: the previous state loads.
    store.path.write_bytes(b"")
    previous.replace(store.path)
    assert set(StateStore(short_tmp / "state").load().volumes) == {"a"}


@pytest.mark.root
async def test_a_damaged_state_file_stops_only_the_csi_driver(
    short_tmp: Path, btrfs_pool: Path, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    (state / "csi-state.json").write_text('{"version": 1, "volumes": {"v')
    plugins = [{"resourceName": RESOURCE, "backend": "simulated", "config": {"count": 1}}]
    data = {**daemon_config(short_tmp, btrfs_pool), "devicePlugins": plugins}
    async with running(configuration.parse(data)) as daemon:
        await kubelet.wait_for_devices(RESOURCE, lambda devices: len(devices) == 1)
        await eventually(lambda: bool(daemon.problems()))
        status, body = await get(daemon, "/readyz")
        answer = json.loads(body)
        assert status == 503
        assert answer["waiting_for"] == ["CSI driver"]
        problem = answer["problems"]["CSI driver"]
        assert str(state / "csi-state.json") in problem
        assert "not valid JSON" in problem
        assert "csi-state.json.prev" in problem
        assert not csi_socket(short_tmp).exists()
        assert not registration_socket(short_tmp).exists()
        health, _ = await get(daemon, "/healthz")
        assert health == 200, "liveness holds: a restart would not fix the file"
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any(getattr(r, "problem", "") == problem for r in logged)
