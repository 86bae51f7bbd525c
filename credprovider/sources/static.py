"""Static logins from the config: a pattern, a username, a password or password file."""

from __future__ import annotations

from credprovider.files import read_secret
from credprovider.match import matches
from credprovider.sources import Credential

TYPE_CHECKING = False
if TYPE_CHECKING:
    from credprovider.config import Table


def lookup(
    entries: list[Table], image: str, default_seconds: float
) -> tuple[list[Credential], list[str]]:
    found = []
    for entry in entries:
        if not matches(entry["registry"], image):
            continue
        # Read at request time, not cached: a rotated password file applies at once.
        password = entry["password"] or read_secret(entry["passwordFile"], "password file")
        if not password:
            continue  # an empty file: nothing to log in with
        seconds = entry["cacheDuration"]
        found.append(
            Credential(
                entry["registry"],
                entry["username"],
                password,
                default_seconds if seconds == "" else seconds,
            )
        )
    return found, [entry["registry"] for entry in entries]
