"""nodeplug-credential-provider: the kubelet's image credential provider exec plugin.

The kubelet runs it (named in its CredentialProviderConfig) on every credential cache
miss, writes one CredentialProviderRequest to stdin and reads one
CredentialProviderResponse from stdout. On failure: one line on stderr, nothing on
stdout, exit 2 for a wrong command line and 1 for anything else. `check` validates the
config instead and says what the kubelet's config must say for it. It runs on the
node's own Python (3.9 or later) and imports only the standard library; network
modules load only when a configured source needs them.
"""

from __future__ import annotations

import sys

PROG = "nodeplug-credential-provider"
USAGE = f"usage: {PROG} [check] --config FILE [--cache-dir DIR]"


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

    arguments = sys.argv[1:] if argv is None else argv
    try:
        if arguments[:1] == ["check"]:
            from credprovider.check import report  # noqa: PLC0415

            # The kubelet's own arguments work after `check`; only the config matters.
            output = report(_options(arguments[1:])[0])
        else:
            from credprovider.api import MAX_REQUEST_BYTES  # noqa: PLC0415

            # One byte past the limit is enough to refuse; never the whole of a flood.
            output = run(arguments, sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1))
    except UsageError as error:
        # One line, like every failure: the kubelet logs stderr as part of its error.
        print(f"{PROG}: {error} ({USAGE})", file=sys.stderr)
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
    sys.stdout.write(output)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
