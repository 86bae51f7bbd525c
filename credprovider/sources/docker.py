"""Docker's config.json: `auths` entries and credential helpers (credHelpers, credsStore).

Keys of `auths` become patterns as the kubelet's own keyring makes them from a
dockercfg: an http(s):// scheme is dropped, a leading /v1/ or /v2/ path is dropped, and
the rest (host, then path if any beyond "/") is the key. `auth` (base64 user:password)
wins over `username`/`password`, as in the kubelet. An `identitytoken` becomes the
password (with the entry's user name, or "<token>"): registries that accept refresh
tokens as basic-auth passwords (ACR, for one) take it; others will refuse it.

Helpers follow docker's credential helper protocol: `docker-credential-<name> get` with
the server URL on stdin answers {"ServerURL", "Username", "Secret"} on stdout, or
"credentials not found in native keychain". credHelpers name a helper per registry;
credsStore is asked for any other image's registry. A helper that fails otherwise fails
the request: a partial answer would be cached by the kubelet as if complete. A helper's
own output is never repeated in our messages: it may hold a secret.
"""

from __future__ import annotations

import base64
import binascii
import subprocess

from credprovider.errors import ProviderError
from credprovider.files import read_private
from credprovider.match import PatternError, is_default_registry, matches, parse
from credprovider.sources import Credential
from credprovider.wire import loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from credprovider.config import Table

DOCKER_HUB_KEY = "index.docker.io"
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_NOT_FOUND = "credentials not found in native keychain"


def _key(location: str) -> str | None:
    """The kubelet keyring's key for a dockercfg location; None where it ignores one."""
    for scheme in ("https://", "http://"):
        if location.startswith(scheme):
            location = location[len(scheme) :]
            break
    try:
        host, path = parse(location)
    except PatternError:
        return None
    if path.startswith(("/v2/", "/v1/")):
        path = path[3:]
    return host + path if path not in ("", "/") else host


def _applies(key: str, image: str) -> bool:
    return matches(key, image) or (key == DOCKER_HUB_KEY and is_default_registry(image))


def _login(entry: object, where: str) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise ProviderError(f"{where}: not an object")
    username, password = entry.get("username") or "", entry.get("password") or ""
    encoded = entry.get("auth") or ""
    if encoded:
        try:
            username, colon, password = (
                base64.b64decode(encoded, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise ProviderError(f"{where}.auth: not base64 of user:password") from None
        if not colon:
            raise ProviderError(f"{where}.auth: not base64 of user:password")
    token = entry.get("identitytoken") or ""
    if token and not password:
        username, password = username or "<token>", token
    if not all(isinstance(value, str) for value in (username, password)):
        raise ProviderError(f"{where}: username and password must be strings")
    return username, password


def _helper(name: str, server: str, timeout: float) -> tuple[str, str] | None:
    """(username, secret) from docker-credential-<name>, or None if it has none."""
    program = f"docker-credential-{name}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise ProviderError(f"credential helper {program} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise ProviderError(f"credential helper {program} took longer than {timeout:g}s") from None
    if result.returncode != 0:
        if _NOT_FOUND in result.stdout.decode(errors="replace"):
            return None
        raise ProviderError(
            f"credential helper {program} failed with exit code {result.returncode}"
        )
    try:
        answer = loads(result.stdout.decode())
    except ValueError:
        raise ProviderError(f"credential helper {program} answered no JSON") from None
    if not isinstance(answer, dict):
        raise ProviderError(f"credential helper {program} answered no JSON object")
    username, secret = answer.get("Username"), answer.get("Secret")
    if not isinstance(username, str) or not isinstance(secret, str):
        raise ProviderError(f"credential helper {program} answered without Username and Secret")
    return username, secret


def _read(path: str) -> dict[str, object]:
    try:
        document = loads(read_private(path, "docker config").decode())
    except (ValueError, UnicodeDecodeError):
        raise ProviderError(f"docker config {path} is not valid JSON") from None
    if not isinstance(document, dict):
        raise ProviderError(f"docker config {path} is not a JSON object")
    for field, kind in (("auths", dict), ("credHelpers", dict), ("credsStore", str)):
        if not isinstance(document.get(field, kind()), kind):
            raise ProviderError(f"docker config {path}: {field} has the wrong type")
    return document


def _one(entry: Table, image: str, seconds: float) -> tuple[list[Credential], list[str]]:
    path, timeout = entry["path"], entry["helperTimeout"]
    document = _read(path)
    auths: dict[str, object] = document.get("auths", {})  # type: ignore[assignment]
    helpers: dict[str, object] = document.get("credHelpers", {})  # type: ignore[assignment]
    found, patterns = [], []
    for location, login in auths.items():
        key = _key(location)
        if key is None:
            continue
        patterns.append(key)
        if _applies(key, image):
            username, password = _login(login, f"docker config {path}: auths[{location!r}]")
            if username and password:
                found.append(Credential(key, username, password, seconds))
    helped = False  # a credHelpers entry answers for this registry, not credsStore
    for location, name in helpers.items():
        key = _key(location)
        if not isinstance(name, str) or not name or "/" in name:
            raise ProviderError(
                f"docker config {path}: credHelpers[{location!r}] is no helper name"
            )
        if key is None or not _applies(key, image):
            continue
        patterns.append(key)
        helped = True
        if login := _helper(name, location, timeout):
            found.append(Credential(key, *login, seconds))
    store = document.get("credsStore")
    if isinstance(store, str) and store and not helped:
        registry = image.partition("/")[0]
        hub = is_default_registry(image)
        login = _helper(store, DOCKER_HUB_SERVER if hub else registry, timeout)
        if login:
            found.append(Credential(DOCKER_HUB_KEY if hub else registry, *login, seconds))
    return found, patterns


def lookup(
    entries: list[Table], image: str, default_seconds: float
) -> tuple[list[Credential], list[str]]:
    found: list[Credential] = []
    patterns: list[str] = []
    for entry in entries:
        seconds = entry["cacheDuration"]
        more, considered = _one(entry, image, default_seconds if seconds == "" else seconds)
        found += more
        patterns += considered
    return found, patterns
