"""Image credentials: the provider zipapp, run as the kubelet runs it, against a real registry.

A local docker-registry (htpasswd) holds a tiny pushed image; the kubelet's
CredentialProviderConfig and the provider's own config are written as an admin would;
the zipapp is exec'd with a CredentialProviderRequest on stdin; its answer (password
masked) is then used by skopeo to pull, where an anonymous pull is refused. Without
docker-registry, skopeo or htpasswd it says so and shows the exchange alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from daemon.sandbox import registry
from daemon.sandbox.console import Step, StepError
from daemon.sandbox.core import Demo, Sandbox

PROVIDER = "nodeplug-credential-provider"
API_VERSION = "credentialprovider.kubelet.k8s.io/v1"
USER = "puller"
REPOSITORY = "demo/hello"
# Without a registry, the exchange alone is shown for a made-up one.
NO_REGISTRY = "registry.example.com:5000"
EXEC_TIMEOUT = 30.0
MASK = "********"


def _write_private(path: Path, text: str) -> Path:
    """A file only its owner can read: the provider refuses anything looser."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return path


async def _exec(
    argv: list[str], stdin: bytes, env: dict[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), EXEC_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def masked(response: dict[str, Any]) -> list[str]:
    """The response in a few lines, every password replaced by a mask."""
    lines = [
        f"{response.get('kind')} {response.get('apiVersion')}, cacheKeyType "
        f"{response.get('cacheKeyType')}, cacheDuration {response.get('cacheDuration')}"
    ]
    for pattern, login in sorted((response.get("auth") or {}).items()):
        lines.append(f"auth {pattern}: username {login.get('username')!r}, password {MASK}")
    return lines


class ImageCredentials(Demo):
    title = "image credentials"
    needs_daemon = False

    async def show(self, sandbox: Sandbox) -> None:
        console = sandbox.console
        work = sandbox.root / "credentials"
        bin_dir = work / "bin"
        await asyncio.to_thread(bin_dir.mkdir, mode=0o700, parents=True)
        binary = bin_dir / PROVIDER
        async with console.step("zipapp built") as step:
            await self._build(binary, step)
        password = secrets.token_urlsafe(12)
        address = await self._registry(sandbox, work, password)
        image = f"{address or NO_REGISTRY}/{REPOSITORY}:v1"
        async with console.step("kubelet config") as step:
            provider = await asyncio.to_thread(
                self._configs, work, address or NO_REGISTRY, password
            )
            step.detail = (
                f"{self._short(sandbox, work / 'kubelet-credential-providers.yaml')}, "
                f"{self._short(sandbox, work / 'provider.toml')} (0600)"
            )
        async with console.step("kubelet execs it") as step:
            response = await self._ask(binary, provider, image)
            step.detail = f"CredentialProviderRequest for {image}: exit 0"
            step.lines = masked(response)
        if address is None:
            return
        login = response.get("auth", {}).get(address)
        async with console.step("pull with it") as step:
            if login is None:
                raise StepError(f"the response has no login for {address}")
            pulled = await asyncio.to_thread(
                registry.pull, image, (login["username"], login["password"])
            )
            if pulled.returncode != 0:
                raise StepError(f"skopeo inspect failed: {_last_line(pulled.stderr)}")
            digest = json.loads(pulled.stdout).get("Digest", "?")
            step.detail = f"skopeo pulled {image} ({digest[:19]}…)"
        async with console.step("anonymous pull") as step:
            anonymous = await asyncio.to_thread(registry.pull, image, None)
            if anonymous.returncode == 0:
                raise StepError("the registry let an anonymous client pull")
            step.detail = f"refused, as it should be: {_refusal(anonymous.stderr)}"

    @staticmethod
    def _short(sandbox: Sandbox, path: Path) -> str:
        return str(path.relative_to(sandbox.root))

    @staticmethod
    async def _build(binary: Path, step: Step) -> None:
        argv = [sys.executable, "-m", "credprovider.build", "-o", str(binary)]
        code, _, stderr = await _exec(argv, b"")
        if code != 0:
            problem = _last_line(stderr.decode(errors="replace"))
            remedy = (
                "pip install tomli (bash .ci/setup installs it)" if "tomli" in problem else None
            )
            raise StepError(f"python -m credprovider.build failed: {problem}", remedy)
        step.detail = f"{binary.stat().st_size // 1024} KiB, as the DaemonSet installs it"

    async def _registry(self, sandbox: Sandbox, work: Path, password: str) -> str | None:
        """A registry holding the image, reachable with USER/password; None without tools."""
        console = sandbox.console
        missing = registry.missing_tools()
        if missing:
            packages = " ".join(sorted(set(missing.values())))
            console.left_out(
                "registry and pull",
                f"{', '.join(missing)} not installed: the exchange alone, for {NO_REGISTRY}",
                f"apt-get install {packages}",
            )
            return None
        async with console.step("registry") as step:
            served = work / "registry"
            await asyncio.to_thread(served.mkdir, mode=0o700)
            users = await asyncio.to_thread(registry.htpasswd, work / "htpasswd", {USER: password})
            local = registry.LocalRegistry(
                served, {"htpasswd": {"realm": "nodeplug-sandbox", "path": str(users)}}
            )
            sandbox.host.on_release(local.stop)
            address = await asyncio.to_thread(local.start)
            step.detail = f"docker-registry at {address}, htpasswd login {USER!r}"
        async with console.step("image pushed") as step:
            layout = await asyncio.to_thread(registry.oci_layout, work / "layout")
            reference = f"{address}/{REPOSITORY}:v1"
            await asyncio.to_thread(registry.push, layout, reference, USER, password)
            step.detail = f"{reference}, one layer, with skopeo"
        return address

    @staticmethod
    def _configs(work: Path, registry_address: str, password: str) -> dict[str, Any]:
        """The provider's config and the kubelet's entry for it; the entry."""
        password_file = _write_private(work / "password", password + "\n")
        toml = (
            "# What nodeplug-credential-provider answers (see manifests/credential-provider.toml)\n"
            "[[static]]\n"
            f'registry = "{registry_address}"\n'
            f'username = "{USER}"\n'
            f'passwordFile = "{password_file}"\n'
        )
        config = _write_private(work / "provider.toml", toml)
        provider = {
            "name": PROVIDER,
            "apiVersion": API_VERSION,
            "matchImages": [registry_address],
            "defaultCacheDuration": "5m",
            "args": [f"--config={config}", f"--cache-dir={work / 'cache'}"],
        }
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1",
            "kind": "CredentialProviderConfig",
            "providers": [provider],
        }
        (work / "kubelet-credential-providers.yaml").write_text(
            "# --image-credential-provider-config; the binary is in "
            f"--image-credential-provider-bin-dir={work / 'bin'}\n"
            + yaml.safe_dump(kubelet_config, sort_keys=False)
        )
        return provider

    @staticmethod
    async def _ask(binary: Path, provider: dict[str, Any], image: str) -> dict[str, Any]:
        """What the kubelet does on a cache miss: exec, the request on stdin, JSON back."""
        request = {"apiVersion": provider["apiVersion"], "kind": "CredentialProviderRequest"}
        request["image"] = image
        argv = [str(binary), *provider["args"]]
        code, stdout, stderr = await _exec(argv, json.dumps(request).encode())
        if code != 0:
            raise StepError(f"exit {code}: {_last_line(stderr.decode(errors='replace'))}")
        response: dict[str, Any] = json.loads(stdout)
        return response


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _refusal(stderr: str) -> str:
    lowered = stderr.lower()
    if "unauthorized" in lowered or "401" in lowered:
        return "401 unauthorized"
    return _last_line(stderr)
