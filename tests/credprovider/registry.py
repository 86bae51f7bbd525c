"""Skip marker for the tests that need a real registry and client (daemon.sandbox.registry)."""

from __future__ import annotations

import pytest

from daemon.sandbox.registry import missing_tools

needs_tools = pytest.mark.skipif(
    bool(missing_tools()),
    reason=f"needs {', '.join(missing_tools())} (bash .ci/setup installs them)",
)
