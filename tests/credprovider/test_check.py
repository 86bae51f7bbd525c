"""`nodeplug-credential-provider check`: the config validated as an exec would, and
what the kubelet's CredentialProviderConfig entry must say for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.credprovider.conftest import run_provider, write_private

STATIC = '[[static]]\nregistry = "r.io"\nusername = "u"\npassword = "s3cret"\n'
PASSTHROUGH = '[[serviceAccountToken]]\nregistry = "r.io"\nusername = "sa"\n'
EXCHANGE = (
    '[[serviceAccountToken]]\nregistry = "r.io"\nusername = "x"\nmode = "exchange"\n'
    'endpoint = "https://sts.example.com/token"\n'
)
V1_LINE = "  apiVersion: credentialprovider.kubelet.k8s.io/v1  # only v1 requests carry"
TOKEN_ATTRIBUTES_LINE = "  tokenAttributes: (set)  # without it the kubelet sends no token"
CACHE_TYPE_LINE = "  tokenAttributes.cacheType: Token  # serviceAccountToken[0] answers with"


def check(config: Path, *extra: str) -> tuple[int, list[str], str]:
    result = run_provider(["check", "--config", config, *extra], b"")
    return result.returncode, result.stdout.decode().splitlines(), result.stderr.decode()


@pytest.mark.parametrize(
    ("text", "sources", "needs"),
    [
        (STATIC, "1 static", []),
        (
            STATIC + PASSTHROUGH,
            "1 static, 1 serviceAccountToken",
            [V1_LINE, TOKEN_ATTRIBUTES_LINE, CACHE_TYPE_LINE],
        ),
        (EXCHANGE, "1 serviceAccountToken", [V1_LINE, TOKEN_ATTRIBUTES_LINE]),
        (
            EXCHANGE + PASSTHROUGH,
            "2 serviceAccountToken",
            [V1_LINE, TOKEN_ATTRIBUTES_LINE, CACHE_TYPE_LINE.replace("[0]", "[1]")],
        ),
    ],
)
def test_check_names_what_the_kubelet_config_needs(
    tmp_path: Path, text: str, sources: str, needs: list[str]
) -> None:
    config = write_private(tmp_path / "c.toml", text)
    code, lines, stderr = check(config)
    assert (code, stderr) == (0, "")
    assert lines[0] == f"config {config} is valid; sources: {sources}"
    if not needs:
        assert lines[1:] == [
            "the kubelet's CredentialProviderConfig entry for this provider needs no "
            "tokenAttributes (there is no serviceAccountToken source)"
        ]
        return
    assert lines[1] == "the kubelet's CredentialProviderConfig entry for this provider needs:"
    assert len(lines[2:]) == len(needs)
    for line, start in zip(lines[2:], needs, strict=True):
        assert line.startswith(start), line


def test_check_takes_the_kubelets_arguments_and_parses_the_file_itself(tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", STATIC)
    cache = tmp_path / "cache"
    code, _, _ = check(config, f"--cache-dir={cache}")
    assert code == 0
    assert not cache.exists()  # a check reads the file, never a cached parse of it


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ('cacheDuration = "99999999999999h"\n' + STATIC, 0o600, "longer than Go's longest"),
        (STATIC + "bogus = 1\n", 0o600, "static[0].bogus: unknown field"),
        (STATIC, 0o644, "accessible by group or others"),
    ],
)
def test_check_refuses_what_an_exec_would_refuse(
    tmp_path: Path, text: str, mode: int, message: str
) -> None:
    config = write_private(tmp_path / "c.toml", text, mode)
    code, lines, stderr = check(config)
    assert (code, lines) == (1, [])
    (line,) = stderr.splitlines()
    assert message in line and "s3cret" not in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check"], "--config is required"),
        (["check", "--config", "c", "--check"], "unknown argument"),
    ],
)
def test_check_usage_errors(args: list[str], message: str) -> None:
    result = run_provider(args, b"")
    assert result.returncode == 2 and result.stdout == b""
    assert message.encode() in result.stderr


def test_check_never_reads_stdin(config_file: Callable[[str], Path]) -> None:
    result = run_provider(["check", "--config", config_file(STATIC)], b"not a request")
    assert result.returncode == 0, result.stderr
