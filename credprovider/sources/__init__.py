"""Credential sources. Each `lookup` returns Credentials for one request, plus the
patterns it considered (matched or not) so the provider can pick a safe cacheKeyType.

Modules are imported only when the config uses them: the docker and token sources
pull in subprocess, urllib and ssl, which a static answer never needs.
"""

from __future__ import annotations


class Credential:
    """One `auth` entry for the kubelet: a pattern, a login, and how long it is good."""

    __slots__ = ("password", "pattern", "seconds", "username")

    def __init__(self, pattern: str, username: str, password: str, seconds: float) -> None:
        self.pattern = pattern
        self.username = username
        self.password = password
        self.seconds = seconds
