"""One request in, one response out: ask every configured source, merge, pick caching.

Sources are asked in config order of kind (static, dockerConfig, serviceAccountToken);
where two give the same pattern, the first wins (the response is a map). The kubelet
caches the answer for the shortest duration any returned credential allows, per image
when some configured pattern for this registry has a path (an answer for one image is
then not the answer for its neighbours), per registry otherwise.
"""

from __future__ import annotations

from credprovider.api import render_response
from credprovider.match import narrower_than_registry

TYPE_CHECKING = False
if TYPE_CHECKING:
    from credprovider.api import Request
    from credprovider.config import Table
    from credprovider.sources import Credential


def provide(config: Table, request: Request, cache_dir: str | None) -> str:
    image = request.image
    found: list[Credential] = []
    patterns: list[str] = []
    if config["static"]:
        from credprovider.sources import static  # noqa: PLC0415

        _add(static.lookup(config["static"], image, config["cacheDuration"]), found, patterns)
    if config["dockerConfig"]:
        from credprovider.sources import docker  # noqa: PLC0415

        _add(docker.lookup(config["dockerConfig"], image, config["cacheDuration"]), found, patterns)
    if config["serviceAccountToken"]:
        from credprovider.sources import token  # noqa: PLC0415

        _add(token.lookup(config["serviceAccountToken"], request, cache_dir), found, patterns)
    auth: dict[str, tuple[str, str]] = {}
    for credential in found:
        auth.setdefault(credential.pattern, (credential.username, credential.password))
    seconds = int(min(credential.seconds for credential in found)) if found else 0
    per_image = any(narrower_than_registry(pattern, image) for pattern in patterns)
    key_type = "Image" if per_image or not found else "Registry"
    return render_response(request.api_version, key_type, seconds, auth)


def _add(
    answer: tuple[list[Credential], list[str]], found: list[Credential], patterns: list[str]
) -> None:
    found += answer[0]
    patterns += answer[1]
