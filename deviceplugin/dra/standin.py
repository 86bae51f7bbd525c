"""A small Kubernetes API server stand-in, speaking the real REST protocol over HTTP.

Only what nodeplug's DRA driver uses, done as kube-apiserver does it:
- ResourceSlices (resource.k8s.io/v1, cluster-scoped): create (with generateName),
  get, update (409 Conflict on a stale metadata.resourceVersion), delete,
  deletecollection, list and watch, with the field selectors the API server supports
  for them (`spec.nodeName`, `spec.driver`, `metadata.name`) and label selectors;
- a watch from a resourceVersion older than the kept history gets a 410 Gone ERROR
  event, as after etcd compaction; a watch without one starts with ADDED events;
- ResourceClaims (namespaced) and Nodes: get.
Faults for tests: refuse the next N updates with 409, refuse all writes with 403,
compact the history, cut every open watch, count requests.

For the tests, `nodeplug sandbox` and bench/ (and vendors testing a DRA backend), like
deviceplugin.testkit; the daemon never imports it. It is aiohttp's only user besides
the daemon's HTTP endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

GROUP = "/apis/resource.k8s.io/v1"
Object = dict[str, Any]
SLICE_FIELDS: dict[str, Callable[[Object], str | None]] = {
    "metadata.name": lambda o: o["metadata"]["name"],
    "spec.nodeName": lambda o: o["spec"].get("nodeName", ""),
    "spec.driver": lambda o: o["spec"].get("driver", ""),
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]


@dataclass
class ApiServer:
    """State and fault knobs; `start()` serves it on 127.0.0.1 (a given or a free port)."""

    slices: dict[str, Object] = field(default_factory=dict)
    claims: dict[tuple[str, str], Object] = field(default_factory=dict)
    nodes: dict[str, Object] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    # Refuse this many coming updates with 409 Conflict, as if someone else wrote first.
    conflicts_to_inject: int = 0
    # Refuse every write with 403, as RBAC or an admission policy would.
    forbid_writes: bool = False
    port: int = 0
    _version: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _history: list[tuple[int, str, Object]] = field(default_factory=list)
    # Events at or below this resourceVersion are gone (etcd compaction).
    _compacted: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _watches: set[web.StreamResponse] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(8))

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        slices = f"{GROUP}/resourceslices"
        app.router.add_get(slices, self._list_slices)
        app.router.add_post(slices, self._create_slice)
        app.router.add_delete(slices, self._delete_slices)
        app.router.add_get(slices + "/{name}", self._get_slice)
        app.router.add_put(slices + "/{name}", self._update_slice)
        app.router.add_delete(slices + "/{name}", self._delete_slice)
        app.router.add_get(GROUP + "/namespaces/{ns}/resourceclaims/{name}", self._get_claim)
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only here
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """The API server goes away: open watches are cut, the port is closed."""
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server (token auth, plain HTTP on loopback)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "node", "user": {"token": self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "node"}}],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    # --- test set-up and faults ------------------------------------------------------

    def add_node(self, name: str) -> Object:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
        self._stamp(node)
        self.nodes[name] = node
        return node

    def add_claim(
        self, namespace: str, name: str, results: list[dict[str, str]], *, allocated: bool = True
    ) -> Object:
        """A ResourceClaim; `results` are allocation results (request, driver, pool, device)."""
        claim: Object = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"devices": {"requests": []}},
            "status": {},
        }
        if allocated:
            claim["status"]["allocation"] = {"devices": {"results": results}}
        self._stamp(claim)
        self.claims[namespace, name] = claim
        return claim

    async def add_slice(self, name: str, node: str, driver: str, devices: list[str]) -> Object:
        """Someone else's ResourceSlice (another node's or driver's), as if created by it."""
        obj: Object = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"name": name},
            "spec": {
                "driver": driver,
                "nodeName": node,
                "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                "devices": [{"name": device} for device in devices],
            },
        }
        self._stamp(obj)
        self.slices[name] = obj
        await self._event("ADDED", obj)
        return obj

    async def remove_slice(self, name: str) -> None:
        """Delete a slice behind the driver's back (an admin, or the kubelet's wipe)."""
        obj = self.slices.pop(name)
        self._stamp(obj)
        await self._event("DELETED", obj)

    def replace_claim(self, namespace: str, name: str) -> Object:
        """Delete and recreate the claim under the same name: a new UID."""
        old = self.claims[namespace, name]
        results = old["status"].get("allocation", {}).get("devices", {}).get("results", [])
        return self.add_claim(namespace, name, results)

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: old watches get 410 Gone."""
        self._compacted = self._current
        self._history.clear()

    async def drop_watches(self) -> None:
        dropped = list(self._watches)
        self._watches.clear()  # their loops end at the wake-up below
        for response in dropped:
            with contextlib.suppress(Exception):
                await response.write_eof()
        async with self._changed:
            self._changed.notify_all()

    def slices_of(self, node: str, driver: str) -> list[Object]:
        return [
            s
            for s in self.slices.values()
            if s["spec"].get("nodeName") == node and s["spec"]["driver"] == driver
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until predicate() holds (checked after every request and change of state)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    # --- protocol ----------------------------------------------------------------------

    @property
    def _current(self) -> int:
        return max((rv for rv, _, _ in self._history), default=self._compacted)

    def _stamp(self, obj: Object) -> int:
        version = next(self._version)
        obj["metadata"]["resourceVersion"] = str(version)
        obj["metadata"].setdefault("uid", str(uuid.uuid4()))
        obj["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        return version

    async def _event(self, kind: str, obj: Object) -> None:
        version = int(obj["metadata"]["resourceVersion"])
        self._history.append((version, kind, _copy(obj)))
        async with self._changed:
            self._changed.notify_all()

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.requests.append(Request(request.method, request.path, dict(request.query)))
        async with self._changed:  # wait_for() predicates may look at the requests too
            self._changed.notify_all()
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "no valid bearer token")
        if self.forbid_writes and request.method in ("POST", "PUT", "DELETE"):
            return _status(403, "Forbidden", "denied by the test's admission policy")
        response: web.StreamResponse = await handler(request)
        return response

    async def _get_node(self, request: web.Request) -> web.StreamResponse:
        node = self.nodes.get(request.match_info["name"])
        if node is None:
            return _not_found("nodes", request.match_info["name"])
        return _json(node)

    async def _get_claim(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["ns"], request.match_info["name"])
        claim = self.claims.get(key)
        if claim is None:
            return _not_found("resourceclaims.resource.k8s.io", key[1])
        return _json(claim)

    async def _get_slice(self, request: web.Request) -> web.StreamResponse:
        obj = self.slices.get(request.match_info["name"])
        if obj is None:
            return _not_found("resourceslices.resource.k8s.io", request.match_info["name"])
        return _json(obj)

    async def _create_slice(self, request: web.Request) -> web.StreamResponse:
        obj: Object = await request.json()
        metadata = obj.setdefault("metadata", {})
        if "resourceVersion" in metadata:
            return _status(400, "BadRequest", "resourceVersion must not be set on create")
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                return _status(422, "Invalid", "metadata.name: Required value")
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        if metadata["name"] in self.slices:
            return _status(
                409, "AlreadyExists", f'resourceslices "{metadata["name"]}" already exists'
            )
        invalid = _slice_problem(obj)
        if invalid:
            return _status(422, "Invalid", invalid)
        obj["apiVersion"], obj["kind"] = "resource.k8s.io/v1", "ResourceSlice"
        self._stamp(obj)
        self.slices[metadata["name"]] = obj
        await self._event("ADDED", obj)
        return _json(obj, status=201)

    async def _update_slice(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        obj: Object = await request.json()
        current = self.slices.get(name)
        if current is None:
            return _not_found("resourceslices.resource.k8s.io", name)
        sent = obj.get("metadata", {}).get("resourceVersion")
        if self.conflicts_to_inject > 0 or (
            sent and sent != current["metadata"]["resourceVersion"]
        ):
            self.conflicts_to_inject = max(0, self.conflicts_to_inject - 1)
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on resourceslices.resource.k8s.io "{name}": '
                "the object has been modified; please apply your changes to the latest "
                "version and try again",
            )
        invalid = _slice_problem(obj)
        if invalid:
            return _status(422, "Invalid", invalid)
        obj["metadata"] = {**current["metadata"], **obj.get("metadata", {})}
        obj["apiVersion"], obj["kind"] = "resource.k8s.io/v1", "ResourceSlice"
        self._stamp(obj)
        self.slices[name] = obj
        await self._event("MODIFIED", obj)
        return _json(obj)

    async def _delete_slice(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        obj = self.slices.pop(name, None)
        if obj is None:
            return _not_found("resourceslices.resource.k8s.io", name)
        self._stamp(obj)
        await self._event("DELETED", obj)
        return _json(obj)

    async def _delete_slices(self, request: web.Request) -> web.StreamResponse:
        matches = self._selected(request)
        if isinstance(matches, web.Response):
            return matches
        for obj in matches:
            del self.slices[obj["metadata"]["name"]]
            self._stamp(obj)
            await self._event("DELETED", obj)
        return _json(self._list_body(matches))

    async def _list_slices(self, request: web.Request) -> web.StreamResponse:
        matches = self._selected(request)
        if isinstance(matches, web.Response):
            return matches
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request)
        return _json(self._list_body(matches))

    def _list_body(self, items: list[Object]) -> Object:
        return {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSliceList",
            "metadata": {"resourceVersion": str(self._current)},
            "items": items,
        }

    def _selected(self, request: web.Request) -> list[Object] | web.Response:
        try:
            match = _selector(request.query)
        except ValueError as error:
            return _status(400, "BadRequest", str(error))
        return [_copy(o) for o in self.slices.values() if match(o)]

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        match = _selector(request.query)
        since = request.query.get("resourceVersion", "")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        self._watches.add(response)
        try:
            if since in ("", "0"):
                # No version: the current state as ADDED events, then changes after it.
                position = self._current
                for obj in list(self.slices.values()):
                    if match(obj):
                        await _send(response, "ADDED", obj)
            else:
                position = int(since)
                if position < self._compacted:
                    gone = _status_body(410, "Expired", f"too old resource version: {since}")
                    await _send(response, "ERROR", gone)
                    return response
            async for version, kind, obj in self._events_after(position, response):
                position = version
                if match(obj):
                    await _send(response, kind, obj)
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away, or drop_watches() closed the stream
        finally:
            self._watches.discard(response)
        return response

    async def _events_after(
        self, position: int, response: web.StreamResponse
    ) -> AsyncIterator[tuple[int, str, Object]]:
        while response in self._watches:
            pending = [e for e in self._history if e[0] > position]
            if position < self._compacted:
                return  # compacted under an open watch: the server closes it
            for event in pending:
                yield event
                position = event[0]
            if not pending:
                async with self._changed:
                    await self._changed.wait()


async def _send(response: web.StreamResponse, kind: str, obj: Object) -> None:
    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")


@dataclass(frozen=True)
class _Requirement:
    get: Callable[[Object], str | None]
    value: str | None  # None: the key exists
    negate: bool

    def __call__(self, obj: Object) -> bool:
        found = self.get(obj)
        if self.value is None:
            return found is not None
        return (found == self.value) != self.negate


def _label(key: str) -> Callable[[Object], str | None]:
    def get(obj: Object) -> str | None:
        labels: dict[str, str] = obj["metadata"].get("labels", {})
        return labels.get(key)

    return get


def _selector(query: Any) -> Callable[[Object], bool]:
    requirements: list[_Requirement] = []
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        key, negate, value = _term(term)
        if key not in SLICE_FIELDS:
            known = ", ".join(SLICE_FIELDS)
            raise ValueError(f'"{key}" is not a known field selector: only "{known}"')
        requirements.append(_Requirement(SLICE_FIELDS[key], value, negate))
    for term in filter(None, query.get("labelSelector", "").split(",")):
        if "=" not in term:
            requirements.append(_Requirement(_label(term.strip()), None, negate=False))
        else:
            key, negate, value = _term(term)
            requirements.append(_Requirement(_label(key), value, negate))
    return lambda obj: all(requirement(obj) for requirement in requirements)


def _term(term: str) -> tuple[str, bool, str]:
    if "!=" in term:
        key, value = term.split("!=", 1)
        return key.strip(), True, value.strip()
    key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
    return key.strip(), False, value.strip()


def _slice_problem(obj: Object) -> str | None:
    """The few validation rules of ResourceSlice that a driver could get wrong."""
    spec = obj.get("spec", {})
    pool = spec.get("pool", {})
    if not spec.get("driver") or not pool.get("name"):
        return "spec.driver, spec.pool.name: Required value"
    if pool.get("resourceSliceCount", 0) < 1 or pool.get("generation", -1) < 0:
        return "spec.pool: resourceSliceCount must be > 0, generation >= 0"
    devices = spec.get("devices", [])
    if len(devices) > 128:
        return f"spec.devices: Too many: {len(devices)}: must have at most 128 items"
    if len({d["name"] for d in devices}) != len(devices):
        return "spec.devices: Duplicate value"
    return None


def _status_body(code: int, reason: str, message: str) -> Object:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _status(code: int, reason: str, message: str) -> web.Response:
    return _json(_status_body(code, reason, message), status=code)


def _not_found(resource: str, name: str) -> web.Response:
    return _status(404, "NotFound", f'{resource} "{name}" not found')


def _json(body: Object, status: int = 200) -> web.Response:
    # kube-apiserver sends exactly "application/json", without a charset, and clients
    # (lightkube among them) compare the header literally before decoding a Status.
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _copy(obj: Object) -> Object:
    # JSON data only: a JSON round trip copies it several times faster than deepcopy.
    copied: Object = json.loads(json.dumps(obj))
    return copied
