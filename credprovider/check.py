"""`check`: validate the config as an exec would, and say what the kubelet's
CredentialProviderConfig entry for this provider must say for the config to work.

The kubelet's config is YAML, which the standard library cannot read, so the
provider cannot hold itself against it: it states the requirements, and readers of
the kubelet's config (the tests of the shipped manifests) check them with
`kubelet_requirements`. Not on the exec path: only `check` imports this.
"""

from __future__ import annotations

from credprovider.api import V1
from credprovider.config import load

TYPE_CHECKING = False
if TYPE_CHECKING:
    from credprovider.config import Table

_SOURCES = ("static", "dockerConfig", "serviceAccountToken")


class Requirement:
    """A field of the kubelet's provider entry (dotted path), the values it may have
    (none listed: it must only be there), and why."""

    __slots__ = ("field", "reason", "values")

    def __init__(self, field: str, values: tuple[str, ...], reason: str) -> None:
        self.field = field
        self.values = values
        self.reason = reason


def kubelet_requirements(config: Table) -> list[Requirement]:
    tokens = config["serviceAccountToken"]
    if not tokens:
        return []
    needs = [
        Requirement("apiVersion", (V1,), "only v1 requests carry the pod's service account token"),
        Requirement(
            "tokenAttributes",
            (),
            "without it the kubelet sends no token, so serviceAccountToken sources never answer",
        ),
    ]
    passthrough = [i for i, entry in enumerate(tokens) if entry["mode"] == "passthrough"]
    if passthrough:
        # pkg/credentialprovider/plugin/plugin.go: unless cacheType is Token, a response
        # with the pod's token as a password is dropped whole, other sources' logins too.
        needs.append(
            Requirement(
                "tokenAttributes.cacheType",
                ("Token",),
                f"serviceAccountToken[{passthrough[0]}] answers with the pod's own token, "
                "and under any other cacheType the kubelet drops such an answer whole",
            )
        )
    return needs


def report(path: str) -> str:
    """What `check` prints for a valid config; ProviderError for an invalid one."""
    config = load(path, None)  # the file itself, not what a cache remembers of it
    counts = ", ".join(f"{len(config[kind])} {kind}" for kind in _SOURCES if config[kind])
    lines = [f"config {path} is valid; sources: {counts}"]
    needs = kubelet_requirements(config)
    if not needs:
        lines.append(
            "the kubelet's CredentialProviderConfig entry for this provider needs no "
            "tokenAttributes (there is no serviceAccountToken source)"
        )
    else:
        lines.append("the kubelet's CredentialProviderConfig entry for this provider needs:")
        for need in needs:
            value = " or ".join(need.values) or "(set)"
            lines.append(f"  {need.field}: {value}  # {need.reason}")
    return "\n".join(lines) + "\n"
