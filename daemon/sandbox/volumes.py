"""CSI: what a cluster does for a pod with a PVC, against the daemon's driver on a real pool.

The daemon makes a btrfs pool image in the sandbox's directory and loop-mounts it; the
simulated plugin watcher registers the driver as the kubelet would; then every call
goes over the CSI socket, as external-provisioner, external-snapshotter and the kubelet
make them: create, stage, publish, write through the mount, hit the quota, snapshot,
clone, expand, stats, tear down. Paths follow the kubelet's layout under its root dir.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from csi.v1 import csi_pb2, csi_pb2_grpc
from daemon import hostprobe, mountinfo
from daemon.sandbox.console import StepError
from daemon.sandbox.core import Demo, Sandbox

DRIVER = "local.csi.nodeplug.io"
POOL_SIZE = "512Mi"
MiB = 1024**2
VOLUME_SIZE = 32 * MiB
EXPANDED_SIZE = 64 * MiB
# mkfs.btrfs and the loop mount happen before the driver registers.
REGISTER_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
Unit = csi_pb2.VolumeUsage.Unit


def _capability(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


@dataclass
class _Placed:
    """A volume as the kubelet placed it for one pod."""

    volume_id: str
    staging: Path
    target: Path
    # The paths as printed: the kubelet's hashes and pod UIDs cut short.
    staging_shown: str
    target_shown: str


def _mib(size: int) -> str:
    return f"{size / MiB:.1f}".removesuffix(".0") + " MiB"


class CsiVolumes(Demo):
    title = "CSI volumes"

    def __init__(self) -> None:
        self.endpoint = ""

    def configure(self, sandbox: Sandbox, data: dict[str, Any]) -> dict[str, Any]:
        if os.geteuid() != 0:
            raise StepError(
                "needs root (a loop-mounted pool, bind mounts)",
                "run it as root: sudo .venv/bin/nodeplug sandbox",
            )
        missing = [tool for tool in ("mkfs.btrfs", "btrfs", "losetup") if not shutil.which(tool)]
        if missing:
            raise StepError(
                f"{', '.join(missing)} not found",
                "apt-get install btrfs-progs util-linux (bash .ci/setup does)",
            )
        host = hostprobe.Host()
        for finding in (hostprobe.btrfs(host), hostprobe.loop_devices(host)):
            if not finding.ok:
                raise StepError(finding.detail, finding.remedy)
        pool = {
            "path": str(sandbox.root / "pool"),
            "image": str(sandbox.root / "pool.img"),
            "size": POOL_SIZE,
        }
        return {**data, "csi": {"driverName": DRIVER, "nodeId": "sandbox-node", "pool": pool}}

    async def show(self, sandbox: Sandbox) -> None:
        console = sandbox.console
        assert sandbox.plugin_watcher is not None
        async with console.step("driver registered", timeout=REGISTER_TIMEOUT) as step:
            registered = await sandbox.plugin_watcher.wait_for(DRIVER, REGISTER_TIMEOUT)
            info = registered.info
            self.endpoint = info.endpoint or str(registered.socket)
            versions = ",".join(info.supported_versions)
            step.detail = f"{info.type} {info.name} {versions}; {registered.summary}"
        console.info("CSI socket", f"{self.endpoint}  (csc, csi-sanity)")
        console.info("pool", self._pool(sandbox))
        async with grpc.aio.insecure_channel(f"unix:{self.endpoint}") as channel:
            await _Lifecycle(sandbox, channel).run()

    def _pool(self, sandbox: Sandbox) -> str:
        csi = sandbox.config.csi
        assert csi is not None and csi.pool is not None
        mount = next(
            (m for m in mountinfo.read() if m.mount_point == csi.pool.path),
            None,
        )
        if mount is None:
            return f"{csi.pool.path}: not mounted"
        stats = os.statvfs(csi.pool.path)
        size = stats.f_blocks * stats.f_frsize
        quotas = hostprobe.btrfs_quotas_on(hostprobe.Host(), mount)
        quota = {True: "quotas on", False: "quotas OFF", None: "quotas unknown"}[quotas]
        return f"{_mib(size)} {mount.fs_type} image on {mount.source}, {quota}"

    def hints(self, sandbox: Sandbox) -> list[str]:
        return [f"CSI socket for csc or csi-sanity: {self.endpoint}"] if self.endpoint else []


class _Lifecycle:
    """One PVC's life, step by step, as a cluster drives it."""

    def __init__(self, sandbox: Sandbox, channel: grpc.aio.Channel) -> None:
        self.sandbox = sandbox
        self.console = sandbox.console
        self.kubelet_dir = sandbox.config.kubelet_dir
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.node = csi_pb2_grpc.NodeStub(channel)

    async def _create(self, name: str, size: int, **source: Any) -> str:
        content = csi_pb2.VolumeContentSource(**source) if source else None
        response = await self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[_capability()],
                volume_content_source=content,
            ),
            timeout=CALL_TIMEOUT,
        )
        return response.volume.volume_id

    async def _place(self, volume_id: str, pv: str, readonly: bool = False) -> _Placed:
        """NodeStage then NodePublish, at the paths the kubelet would use."""
        digest = hashlib.sha256(volume_id.encode()).hexdigest()
        staging = self.kubelet_dir / "plugins/kubernetes.io/csi" / DRIVER / digest / "globalmount"
        uid = str(uuid.uuid4())
        pod = self.kubelet_dir / "pods" / uid / "volumes/kubernetes.io~csi" / pv
        # The kubelet makes the staging directory and the target's parent; the driver
        # makes the target.
        await asyncio.to_thread(staging.mkdir, mode=0o750, parents=True)
        await asyncio.to_thread(pod.mkdir, mode=0o750, parents=True)
        placed = _Placed(
            volume_id,
            staging,
            pod / "mount",
            f"plugins/kubernetes.io/csi/{DRIVER}/{digest[:8]}…/globalmount",
            f"pods/{uid[:8]}…/volumes/kubernetes.io~csi/{pv}/mount",
        )
        async with self.console.step("NodeStageVolume") as step:
            await self.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=str(staging),
                    volume_capability=_capability(),
                ),
                timeout=CALL_TIMEOUT,
            )
            step.detail = placed.staging_shown
        async with self.console.step("NodePublishVolume") as step:
            await self.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=str(staging),
                    target_path=str(placed.target),
                    volume_capability=_capability(),
                    readonly=readonly,
                ),
                timeout=CALL_TIMEOUT,
            )
            step.detail = placed.target_shown + (" (read-only)" if readonly else "")
        return placed

    async def _remove(self, placed: _Placed) -> None:
        await self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=placed.volume_id, target_path=str(placed.target)
            ),
            timeout=CALL_TIMEOUT,
        )
        await self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=placed.volume_id, staging_target_path=str(placed.staging)
            ),
            timeout=CALL_TIMEOUT,
        )
        await self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=placed.volume_id), timeout=CALL_TIMEOUT
        )

    async def run(self) -> None:
        console = self.console
        async with console.step("CreateVolume") as step:
            volume_id = await self._create("pvc-sandbox", VOLUME_SIZE)
            step.detail = f"pvc-sandbox, {_mib(VOLUME_SIZE)} -> {volume_id}"
        volume = await self._place(volume_id, "pvc-sandbox")
        hello = volume.target / "hello.txt"
        text = f"written through {volume.target}\n"
        async with console.step("write a file") as step:
            await asyncio.to_thread(hello.write_text, text)
            step.detail = f"hello.txt, {len(text)} bytes, through the pod's mount"
        async with console.step("quota refuses") as step:
            written, refusal = await asyncio.to_thread(
                _fill, volume.target / "fill", VOLUME_SIZE * 2
            )
            if refusal is None:
                raise StepError(f"{_mib(written)} written into a {_mib(VOLUME_SIZE)} volume")
            step.detail = f"a write past {_mib(VOLUME_SIZE)}: {refusal} after {_mib(written)}"
        async with console.step("CreateSnapshot") as step:
            snapshot = (
                await self.controller.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id, name="snap-sandbox"),
                    timeout=CALL_TIMEOUT,
                )
            ).snapshot
            step.detail = f"snap-sandbox -> {snapshot.snapshot_id}, ready: {snapshot.ready_to_use}"
        async with console.step("CreateVolume") as step:
            clone_id = await self._create(
                "pvc-restored",
                VOLUME_SIZE,
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                    snapshot_id=snapshot.snapshot_id
                ),
            )
            step.detail = f"pvc-restored from the snapshot -> {clone_id}"
        clone = await self._place(clone_id, "pvc-restored", readonly=True)
        async with console.step("clone holds file") as step:
            copied = await asyncio.to_thread((clone.target / "hello.txt").read_text)
            if copied != text:
                raise StepError(f"the clone's hello.txt says {copied!r}")
            step.detail = "hello.txt read back through the clone's read-only mount"
        async with console.step("ExpandVolume") as step:
            expanded = await self.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=volume_id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=EXPANDED_SIZE),
                ),
                timeout=CALL_TIMEOUT,
            )
            more = 8 * MiB
            written, refusal = await asyncio.to_thread(_fill, volume.target / "more", more)
            if refusal is not None:
                raise StepError(f"after expansion, a write was refused: {refusal}")
            node_side = "needed" if expanded.node_expansion_required else "not needed"
            step.detail = (
                f"{_mib(VOLUME_SIZE)} -> {_mib(expanded.capacity_bytes)} online "
                f"(node expansion {node_side}); {_mib(written)} more written"
            )
        async with console.step("NodeGetVolumeStats") as step:
            step.detail = await self._stats(volume)
        async with console.step("teardown") as step:
            await self._remove(clone)
            await self._remove(volume)
            await self.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id),
                timeout=CALL_TIMEOUT,
            )
            left = [
                m
                for m in mountinfo.read()
                if m.mount_point in {volume.staging, volume.target, clone.staging, clone.target}
            ]
            if left:
                raise StepError(f"still mounted: {', '.join(str(m.mount_point) for m in left)}")
            step.detail = "2 volumes unpublished, unstaged and deleted, the snapshot deleted"

    async def _stats(self, volume: _Placed) -> str:
        # qgroup usage is counted when btrfs commits: commit before asking.
        process = await asyncio.create_subprocess_exec("sync", "-f", str(volume.target))
        await process.wait()
        stats = await self.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=volume.volume_id, volume_path=str(volume.target)
            ),
            timeout=CALL_TIMEOUT,
        )
        usage = {u.unit: u for u in stats.usage}
        line = ""
        if Unit.BYTES in usage:
            used = usage[Unit.BYTES]
            line = f"{_mib(used.used)} used of {_mib(used.total)}"
        if Unit.INODES in usage:
            line += f", {usage[Unit.INODES].used} inodes"
        condition = stats.volume_condition
        health = f"abnormal: {condition.message}" if condition.abnormal else condition.message
        return f"{line}; condition {health}"


def _fill(path: Path, limit: int) -> tuple[int, str | None]:
    """Write 1 MiB at a time, synced, up to limit: bytes written and the quota's refusal."""
    chunk = os.urandom(MiB)
    written = 0
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while written < limit:
            written += os.write(descriptor, chunk)
            os.fsync(descriptor)
    except OSError as error:
        if error.errno != errno.EDQUOT:
            raise
        return written, f"{errno.errorcode[error.errno]} ({os.strerror(error.errno)})"
    finally:
        os.close(descriptor)
    return written, None
