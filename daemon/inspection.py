"""`nodeplug check-config` and `nodeplug devices`: what a config would run, what backends see."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from daemon.config import Config
from deviceplugin import configkit
from deviceplugin.backend import Backend, Device
from deviceplugin.cdi import spec_file_name
from deviceplugin.dra.names import PLUGINS_SUBDIR, SOCKET_NAME
from deviceplugin.names import socket_file_name


def describe(config: Config) -> list[str]:
    """The plan for a valid config, in the words an admin checks it against."""
    lines = [
        f"kubelet directory   {config.kubelet_dir}",
        f"device-plugin dir   {config.device_plugin_dir} (the kubelet's kubelet.sock)",
        f"state directory     {config.state_dir}",
        f"HTTP endpoints      {config.http.address or 'off'} (/metrics /healthz /readyz)",
        f"NFD feature file    {config.node_features.file or 'off'}",
        f"device plugins      {len(config.device_plugins)}, registering via "
        f"{config.device_plugin_registration.value}",
    ]
    directory_length = len(str(config.device_plugin_socket_dir))
    for spec in config.device_plugins:
        socket = config.device_plugin_socket_dir / socket_file_name(
            spec.resource_name, directory_length
        )
        lines.append(f"  {spec.resource_name}")
        lines.append(
            f"    backend           {spec.backend} {json.dumps(spec.config, sort_keys=True)}"
        )
        if spec.serves_dra:
            dra_socket = config.kubelet_dir / PLUGINS_SUBDIR / spec.driver_name / SOCKET_NAME
            lines.append(f"    DRA driver        {spec.driver_name}, socket {dra_socket}")
        if not spec.serves_device_plugin:
            continue
        lines.append(f"    socket            {socket}")
        lines.append(
            f"    sharing           {spec.replicas} per device, {spec.allocation_policy.value}"
        )
        strategies = ", ".join(sorted(spec.strategies))
        lines.append(f"    devices reach     containers by {strategies}")
        if spec.writes_cdi_spec:
            lines.append(
                f"    CDI spec          {config.cdi.dir / spec_file_name(spec.resource_name)}"
            )
    if any(spec.serves_dra for spec in config.device_plugins):
        lines.append(f"Kubernetes API      {config.kubeconfig or 'in-cluster, else $KUBECONFIG'}")
    if config.csi is None:
        lines.append("CSI driver          off")
    else:
        csi = config.csi
        if csi.pool is None:
            lines.append(f"CSI driver          {csi.driver_name}, expansion controller only")
        else:
            lines.append(f"CSI driver          {csi.driver_name} on node {csi.node_id}")
        lines.append(f"    mode              {csi.mode}")
        lines.append(f"    socket            {config.csi_socket}")
        if csi.pool is not None:
            dumped = configkit.dumped(csi.pool).items()
            pool = {key: value for key, value in dumped if value is not None}
            lines.append(f"    pool              {pool}")
    return lines


async def first_snapshot(backend: Backend, timeout: float) -> list[Device]:
    """The backend's first device list; its watch is closed afterwards."""
    watch = backend.watch()
    try:
        async with asyncio.timeout(timeout):
            return list(await anext(watch))
    finally:
        with contextlib.suppress(Exception):
            await watch.aclose()  # type: ignore[attr-defined]


async def discover(
    config: Config, backends: Mapping[str, Backend], timeout: float
) -> dict[str, list[Device]]:
    names = [spec.resource_name for spec in config.device_plugins]
    snapshots = await asyncio.gather(*(first_snapshot(backends[n], timeout) for n in names))
    return dict(zip(names, snapshots, strict=True))


def device_json(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "healthy": device.healthy,
        "numaNode": device.numa_node,
        "deviceNodes": [
            {
                "hostPath": n.host_path,
                "containerPath": n.container_path or n.host_path,
                "permissions": n.permissions,
            }
            for n in device.device_nodes
        ],
        "mounts": [
            {"hostPath": m.host_path, "containerPath": m.container_path, "readOnly": m.read_only}
            for m in device.mounts
        ],
        "envs": dict(device.envs),
        "cdiDevices": list(device.cdi_devices),
    }


def device_table(found: dict[str, list[Device]]) -> list[str]:
    lines = [f"{'RESOURCE':<32} {'DEVICE':<24} {'HEALTH':<10} {'NUMA':<5} NODES"]
    for resource, devices in found.items():
        if not devices:
            lines.append(f"{resource:<32} {'(none found)':<24}")
        for device in devices:
            health = "Healthy" if device.healthy else "Unhealthy"
            numa = "-" if device.numa_node is None else str(device.numa_node)
            nodes = ",".join(n.host_path for n in device.device_nodes) or "-"
            lines.append(f"{resource:<32} {device.id:<24} {health:<10} {numa:<5} {nodes}")
    return lines
