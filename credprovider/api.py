"""The kubelet's exec plugin API (k8s.io/kubelet/pkg/apis/credentialprovider).

v1, v1beta1 and v1alpha1 carry the same request and response; only v1 has
serviceAccountToken and serviceAccountAnnotations (KEP-4412). The response must use the
request's apiVersion: the kubelet compares them and drops a mismatch. The kubelet
decodes responses strictly, so the response carries exactly the API's fields.
"""

from __future__ import annotations

from credprovider.errors import ProviderError
from credprovider.wire import NestingError, dumps, loads

GROUP = "credentialprovider.kubelet.k8s.io"
V1 = f"{GROUP}/v1"
API_VERSIONS = (V1, f"{GROUP}/v1beta1", f"{GROUP}/v1alpha1")
REQUEST_KIND = "CredentialProviderRequest"
RESPONSE_KIND = "CredentialProviderResponse"
CACHE_KEY_TYPES = ("Image", "Registry", "Global")
# A real request is a few KiB: an image reference (distribution caps names at 255
# bytes), a service account token, and the service account's annotations that the
# kubelet config names, at most 256 KiB in all (the API server's limit), which Go's
# JSON encoder may grow six-fold by escaping (<, >, & and control characters as
# \u00XX). 2 MiB holds all of that; anything larger is not from a kubelet.
MAX_REQUEST_BYTES = 2 << 20


class Request:
    __slots__ = ("annotations", "api_version", "image", "token")

    def __init__(
        self,
        api_version: str,
        image: str,
        token: str = "",
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.api_version = api_version
        self.image = image
        self.token = token  # the pod's service account token; never logged
        self.annotations = annotations or {}


def _shown(value: object) -> str:
    """A short, quoted rendering of a wrong value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_request(data: bytes) -> Request:
    """The request in `data`: at most MAX_REQUEST_BYTES (read one byte more to tell)."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ProviderError(
            f"request on stdin is larger than {MAX_REQUEST_BYTES >> 20} MiB; "
            "a kubelet's is a few KiB"
        )
    try:
        document = loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProviderError("request on stdin is not UTF-8") from None
    except NestingError:
        raise ProviderError(
            "request on stdin is JSON nested too deeply; a kubelet's is two levels deep"
        ) from None
    except ValueError as error:
        raise ProviderError(f"request on stdin is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ProviderError("request on stdin is not a JSON object")
    api_version = document.get("apiVersion")
    if api_version is None:
        raise ProviderError("request has no apiVersion")
    if api_version not in API_VERSIONS:
        expected = ", ".join(API_VERSIONS)
        raise ProviderError(
            f"unsupported apiVersion {_shown(api_version)}; expected one of {expected}"
        )
    kind = document.get("kind")
    if kind != REQUEST_KIND:
        raise ProviderError(f"request kind is {_shown(kind)}, expected {REQUEST_KIND!r}")
    image = document.get("image")
    if not isinstance(image, str) or not image:
        raise ProviderError("request has no image")
    if api_version != V1:
        return Request(api_version, image)
    token = document.get("serviceAccountToken", "")
    if not isinstance(token, str):
        raise ProviderError("request serviceAccountToken is not a string")
    annotations = document.get("serviceAccountAnnotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        raise ProviderError("request serviceAccountAnnotations is not a map of strings")
    return Request(api_version, image, token, annotations)


def render_response(
    api_version: str, cache_key_type: str, cache_seconds: int, auth: dict[str, tuple[str, str]]
) -> str:
    response: dict[str, object] = {
        "apiVersion": api_version,
        "kind": RESPONSE_KIND,
        "cacheKeyType": cache_key_type,
        # Always explicit: a missing duration would make the kubelet use its default.
        "cacheDuration": f"{cache_seconds}s",
    }
    if auth:
        response["auth"] = {
            pattern: {"username": username, "password": password}
            for pattern, (username, password) in auth.items()
        }
    return dumps(response) + "\n"
