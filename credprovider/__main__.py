"""nodeplug-credential-provider: the kubelet's image credential provider exec plugin.

The kubelet runs it (named in its CredentialProviderConfig) on every credential cache
miss, writes one CredentialProviderRequest to stdin and reads one
CredentialProviderResponse from stdout. On failure: exit 1, one line on stderr, nothing
on stdout. It runs on the node's own Python (3.9 or later) and imports only the
standard library; network modules load only when a configured source needs them.
"""

from __future__ import annotations

import sys

PROG = "nodeplug-credential-provider"
USAGE = f"usage: {PROG} --config FILE [--cache-dir DIR]"


class UsageError(Exception):
    pass


def _options(argv: list[str]) -> tuple[str, str | None]:
    # Hand-rolled: argparse alone would cost more start-up time than a whole answer.
    options: dict[str, str] = {}
    i = 0
    while i < len(argv):
        name, _, value = argv[i].partition("=")
        if name not in ("--config", "--cache-dir"):
            raise UsageError(f"unknown argument {argv[i]!r}")
        if not _:
            i += 1
            if i == len(argv):
                raise UsageError(f"{name} needs a value")
            value = argv[i]
        options[name] = value
        i += 1
    if not options.get("--config"):
        raise UsageError("--config is required")
    return options["--config"], options.get("--cache-dir") or None


def run(argv: list[str], stdin: bytes) -> str:
    """The response for one request; ProviderError or UsageError otherwise."""
    from credprovider import api, config, provider  # noqa: PLC0415

    config_path, cache_dir = _options(argv)
    request = api.parse_request(stdin)
    return provider.provide(config.load(config_path, cache_dir), request, cache_dir)


def main(argv: list[str] | None = None) -> int:
    from credprovider.errors import ProviderError  # noqa: PLC0415

    try:
        response = run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer.read())
    except UsageError as error:
        print(f"{PROG}: {error}\n{USAGE}", file=sys.stderr)
        return 2
    except ProviderError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: say where, never the values (they may be secrets)
        trace = error.__traceback__
        while trace and trace.tb_next:
            trace = trace.tb_next
        where = f"{trace.tb_frame.f_code.co_filename}:{trace.tb_lineno}" if trace else "?"
        print(f"{PROG}: internal error {type(error).__name__} at {where}", file=sys.stderr)
        return 1
    sys.stdout.write(response)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
