"""Placeholder entry point until the credential provider lands: refuse, never pretend."""

from __future__ import annotations

import sys


def main() -> int:
    print("nodeplug-credential-provider: not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
