"""The Kubernetes API client of the DRA drivers (lightkube), created on first use.

Credentials: the `kubeconfig` file the config names, else the pod's service account
(in-cluster), else $KUBECONFIG (lightkube's KubeConfig.from_env order). Reading them
touches files, so it happens in a thread. Nothing here blocks the daemon's start: a
cluster that cannot be reached only delays what needs it (slices, Prepare).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lightkube import AsyncClient, ConfigError, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.resource_v1 import ResourceClaim

from deviceplugin.dra.claims import AllocatedDevice, ClaimInfo

FIELD_MANAGER = "nodeplug"


class KubeConfigError(Exception):
    """No usable credentials (neither the configured kubeconfig nor in-cluster ones)."""


class KubeAccess:
    def __init__(self, kubeconfig: Path | None) -> None:
        self.kubeconfig = kubeconfig
        self._client: AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> AsyncClient:
        async with self._lock:
            if self._client is None:
                config = await asyncio.to_thread(self._load)
                self._client = AsyncClient(config=config, field_manager=FIELD_MANAGER)
            return self._client

    def _load(self) -> KubeConfig:
        try:
            if self.kubeconfig is not None:
                return KubeConfig.from_file(self.kubeconfig)
            return KubeConfig.from_env()
        except (ConfigError, OSError, ValueError) as error:
            where = str(self.kubeconfig) if self.kubeconfig else "in-cluster or $KUBECONFIG"
            raise KubeConfigError(f"no Kubernetes API credentials ({where}): {error}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def read_claim(self, namespace: str, name: str) -> ClaimInfo | None:
        client = await self.client()
        try:
            claim = await client.get(ResourceClaim, name, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        assert claim.metadata is not None  # the API server always sends metadata
        allocation = claim.status.allocation if claim.status is not None else None
        devices = allocation.devices if allocation is not None else None
        results = tuple(
            AllocatedDevice(r.request, r.driver, r.pool, r.device)
            for r in (devices.results or [] if devices is not None else [])
        )
        return ClaimInfo(claim.metadata.uid or "", allocation is not None, results)
