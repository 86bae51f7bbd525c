"""The one error the provider reports: a single line, safe to show (never a secret)."""

from __future__ import annotations


class ProviderError(Exception):
    """Ends the run: exit 1, the message on stderr, nothing on stdout."""
