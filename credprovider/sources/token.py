"""The pod's service account token (KEP-4412), passed through or exchanged.

The kubelet sends the token (v1 requests, when its config has tokenAttributes). A
`passthrough` source hands it to the registry as the password of a configured user, for
registries that accept Kubernetes tokens themselves; the answer is good until the
token's `exp`. An `exchange` source trades it at an HTTPS endpoint for a registry token
(RFC 8693 token exchange: a form POST, subject_token_type jwt) and hands that out. The
minted token is kept in the on-disk cache (key: endpoint, audience, scope and a hash of
the pod's token) so repeated execs for the same token do not exchange again; either
way the answer is good for what is left of the returned `expires_in`, less a margin.
Every duration is capped by maxCacheDuration. Tokens are never decoded for trust, only
for `exp`: the registry or the exchange endpoint verifies them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

from credprovider import cache
from credprovider.errors import ProviderError
from credprovider.match import matches
from credprovider.sources import Credential
from credprovider.wire import loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from credprovider.api import Request
    from credprovider.config import Table

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a type name
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105


def _seconds_left(token: str, cap: float) -> float:
    """Until the JWT's exp claim, at most `cap`; `cap` when the token carries no exp."""
    parts = token.split(".")
    if len(parts) != 3:
        return cap
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = loads(payload.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return cap
    expires = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        return cap
    return max(0.0, min(cap, expires - time.time()))


def _post(entry: Table, token: str) -> tuple[str, float]:
    """Exchange the pod's token; (registry token, seconds it lives)."""
    import ssl  # noqa: PLC0415 - network modules load only for this source
    import urllib.error  # noqa: PLC0415
    import urllib.parse  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    endpoint = entry["endpoint"]
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": token,
        "subject_token_type": JWT_TOKEN_TYPE,
        "requested_token_type": ACCESS_TOKEN_TYPE,
    }
    form |= {key: entry[key] for key in ("audience", "scope") if entry[key]}
    context = ssl.create_default_context(cafile=entry["caFile"] or None)
    post = urllib.request.Request(  # noqa: S310 - the config allows https:// only
        endpoint,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(post, timeout=entry["timeout"], context=context) as reply:  # noqa: S310
            body = reply.read()
    except urllib.error.HTTPError as error:
        # RFC 6749 error codes (invalid_grant, ...) say what is wrong and hold no secret.
        with error:
            code = _object(error.read()).get("error")
        detail = f" ({code})" if isinstance(code, str) and code else ""
        raise ProviderError(
            f"token exchange at {endpoint} failed: HTTP {error.code}{detail}"
        ) from None
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "reason", error)
        raise ProviderError(f"token exchange at {endpoint} failed: {reason}") from None
    answer = _object(body)
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise ProviderError(f"token exchange at {endpoint} answered no access_token")
    if answer.get("expires_in") is None:  # RFC 6749 only recommends it
        return access, _seconds_left(token, entry["maxCacheDuration"])
    lifetime = _positive_seconds(answer["expires_in"])
    if lifetime is None:
        raise ProviderError(
            f"token exchange at {endpoint} answered an expires_in that is not "
            "a positive number of seconds"
        )
    return access, lifetime


def _object(body: bytes) -> dict[str, object]:
    """A JSON object body; empty when the body is anything else."""
    try:
        document = loads(body.decode())
    except (ValueError, UnicodeDecodeError):
        return {}
    return document if isinstance(document, dict) else {}


def _positive_seconds(value: object) -> float | None:
    """A JSON number, or a string of one as some servers send, if positive and finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    return seconds if 0 < seconds < float("inf") else None  # NaN fails this too


def _exchanged(entry: Table, token: str, cache_dir: str | None) -> tuple[str, float]:
    """(registry token, seconds it has left), minted now or kept from an earlier exec."""
    material = "\0".join((entry["endpoint"], entry["audience"], entry["scope"], token))
    key = hashlib.sha256(material.encode()).hexdigest()
    if cache_dir and (hit := cache.get(cache_dir, key)):
        return hit
    access, lifetime = _post(entry, token)
    if cache_dir:
        cache.put(cache_dir, key, access, lifetime)
    return access, lifetime


def lookup(
    entries: list[Table], request: Request, cache_dir: str | None
) -> tuple[list[Credential], list[str]]:
    found = []
    for entry in entries:
        if not request.token or not matches(entry["registry"], request.image):
            continue  # no token: a pod without service account, or not a v1 request
        cap = entry["maxCacheDuration"]
        if entry["mode"] == "passthrough":
            password, seconds = request.token, _seconds_left(request.token, cap)
        else:
            password, left = _exchanged(entry, request.token, cache_dir)
            # Fresh or kept, the kubelet must stop using it a margin before it expires.
            seconds = max(0.0, min(cap, left - cache.MARGIN_SECONDS))
        found.append(Credential(entry["registry"], entry["username"], password, seconds))
    return found, [entry["registry"] for entry in entries]
