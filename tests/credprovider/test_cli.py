"""The exec contract: requests, responses, failures, static sources and file permissions."""

from __future__ import annotations

import json
import marshal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.credprovider.conftest import (
    API_VERSIONS,
    V1,
    Provide,
    request,
    run_provider,
    write_private,
)

STATIC = """
cacheDuration = "10m"
[[static]]
registry = "*.example.com"
username = "puller"
password = "s3cret-static"
"""


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_answers_in_the_request_version(provide: Provide, api_version: str) -> None:
    response = provide(STATIC, "a.example.com/team/app", api_version)
    assert response == {
        "apiVersion": api_version,
        "kind": "CredentialProviderResponse",
        "cacheKeyType": "Registry",
        "cacheDuration": "600s",
        "auth": {"*.example.com": {"username": "puller", "password": "s3cret-static"}},
    }


def test_no_match_is_an_explicit_empty_answer(provide: Provide) -> None:
    response = provide(STATIC, "example.com/app")
    assert response == {
        "apiVersion": V1,
        "kind": "CredentialProviderResponse",
        "cacheKeyType": "Image",
        "cacheDuration": "0s",
    }


def test_path_patterns_cache_per_image_and_the_shortest_duration_wins(
    provide: Provide, tmp_path: Path
) -> None:
    secret = write_private(tmp_path / "team-password", "team-pw\n")
    config = f"""
    [[static]]
    registry = "registry.io:5000"
    username = "everyone"
    password = "all"
    cacheDuration = "1h"
    [[static]]
    registry = "registry.io:5000/team"
    username = "team"
    passwordFile = "{secret}"
    cacheDuration = "90s"
    """
    response = provide(config, "registry.io:5000/team/app")
    assert response["auth"] == {
        "registry.io:5000": {"username": "everyone", "password": "all"},
        "registry.io:5000/team": {"username": "team", "password": "team-pw"},
    }
    assert (response["cacheKeyType"], response["cacheDuration"]) == ("Image", "90s")
    # Another image of the registry must not reuse that answer: it lacks the team entry.
    other = provide(config, "registry.io:5000/other/app")
    assert other["auth"] == {"registry.io:5000": {"username": "everyone", "password": "all"}}
    assert other["cacheKeyType"] == "Image"
    # Path patterns elsewhere do not force per-image caching here.
    assert provide(config, "registry.io:5001/x")["cacheDuration"] == "0s"


def test_password_file_changes_apply_at_once(provide: Provide, tmp_path: Path) -> None:
    secret = write_private(tmp_path / "pw", "one")
    config = f'[[static]]\nregistry = "r.io"\nusername = "u"\npasswordFile = "{secret}"\n'
    assert provide(config, "r.io/x")["auth"]["r.io"]["password"] == "one"
    write_private(secret, "two\r\n")
    assert provide(config, "r.io/x")["auth"]["r.io"]["password"] == "two"


BAD_REQUESTS = [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b'{"a": 1} x', "not valid JSON"),
    (b"NaN", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[]", "not a JSON object"),
    (b'"image"', "not a JSON object"),
    (b'{"kind": "CredentialProviderRequest", "image": "r.io/x"}', "no apiVersion"),
    (request("r.io/x", "credentialprovider.kubelet.k8s.io/v2"), "unsupported apiVersion"),
    (request("r.io/x", "v1"), "unsupported apiVersion"),
    (request("r.io/x", kind="CredentialProviderResponse"), "request kind is"),
    (json.dumps({"apiVersion": V1, "image": "r.io/x"}).encode(), "request kind is"),
    (json.dumps({"apiVersion": V1, "kind": "CredentialProviderRequest"}).encode(), "no image"),
    (request(""), "no image"),
    (
        json.dumps({"apiVersion": V1, "kind": "CredentialProviderRequest", "image": 1}).encode(),
        "no image",
    ),
    (request("r.io/x", serviceAccountToken=7), "serviceAccountToken is not a string"),
    (request("r.io/x", serviceAccountAnnotations=["a"]), "not a map of strings"),
    (request("r.io/x", serviceAccountAnnotations={"a": 1}), "not a map of strings"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    (request("r.io/x") + b" " * (2 << 20), "larger than 2 MiB"),
    (b"[" * (64 << 20), "larger than 2 MiB"),
]


@pytest.mark.parametrize(("stdin", "message"), BAD_REQUESTS)
def test_bad_requests_fail_with_one_clear_line(
    config_file: Callable[[str], Path], stdin: bytes, message: str
) -> None:
    result = run_provider(["--config", config_file(STATIC)], stdin)
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert "s3cret" not in result.stderr.decode()


def go_json_string(text: str) -> str:
    """`text` as Go's encoding/json writes it for the kubelet: <, > and & escaped."""
    escaped = json.dumps(text)
    for char in "<>&":
        escaped = escaped.replace(char, f"\\u{ord(char):04x}")
    return escaped


def test_the_largest_request_a_kubelet_can_send_is_answered(
    config_file: Callable[[str], Path],
) -> None:
    # The API server allows 256 KiB of annotations on a service account; the kubelet
    # passes those its config names, and Go's encoder turns each `<` into six bytes.
    key = "example.com/registry-role"
    value = "<" * (256 * 1024 - len(key))
    token = "eyJ" + "a" * 8000
    stdin = (
        f'{{"kind":"CredentialProviderRequest","apiVersion":"{V1}","image":"a.example.com/x",'
        f'"serviceAccountToken":"{token}",'
        f'"serviceAccountAnnotations":{{{go_json_string(key)}:{go_json_string(value)}}}}}\n'
    ).encode()
    assert len(stdin) > 1.5 * 2**20
    result = run_provider(["--config", config_file(STATIC)], stdin)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["auth"]["*.example.com"]["username"] == "puller"


def test_a_bad_request_never_echoes_the_token(config_file: Callable[[str], Path]) -> None:
    stdin = request("r.io/x", serviceAccountToken="eyJ-secret-token", serviceAccountAnnotations=[1])
    result = run_provider(["--config", config_file(STATIC)], stdin)
    assert result.returncode == 1
    assert b"eyJ-secret-token" not in result.stderr


BAD_CONFIGS = [
    ("cacheDuration = ", "not valid TOML"),
    ("cacheDuration = 5", "config cacheDuration: must be a string"),
    ('cacheDuration = "5"', "has no unit"),
    ('cacheDuration = "5d"', "invalid duration"),
    ("", "no credential source"),
    ("[static]\nregistry = 'r.io'", "config static: must be an array of tables"),
    ("[[static]]\nusername = 'u'\npassword = 'p'", "config static[0].registry: required"),
    ("[[static]]\nregistry = 'r.io'\npassword = 'p'", "config static[0].username: required"),
    ("[[static]]\nregistry = 'r.io'\nusername = 'u'", "set exactly one of password, passwordFile"),
    (
        "[[static]]\nregistry = 'r.io'\nusername = 'u'\npassword = 'p'\npasswordFile = '/p'",
        "set exactly one of password, passwordFile",
    ),
    ("[[static]]\nregistry = 'r.io'\nusername = 'u'\npasswordFile = 'rel'", "not an absolute path"),
    (
        "[[static]]\nregistry = 'r.io'\nusername = 'u'\npassword = 'p'\nextra = 1",
        "extra: unknown field",
    ),
    ("[[static]]\nregistry = 'reg[0-9].io'\nusername = 'u'\npassword = 'p'", "can never match"),
    ("[[static]]\nregistry = 'r.io:x'\nusername = 'u'\npassword = 'p'", "can never match"),
    ("[[static]]\nregistry = 'reg?.io'\nusername = 'u'\npassword = 'p'", "not a glob or host"),
    ("[[static]]\nregistry = 'u@r.io'\nusername = 'u'\npassword = 'p'", "not a glob or host"),
    ("[[static]]\nregistry = 'r.io'\nusername = ''\npassword = 'p'", "must not be empty"),
    ("[[static]]\nregistry = 'r.io'\nusername = 'u'\npassword = 'p'\n[[bogus]]", "bogus: unknown"),
    ('cacheDuration = "99999999999999h"', "longer than Go's longest, 2562047h47m16.854775807s"),
    ('cacheDuration = "2562047h47m16.854775808s"', "longer than Go's longest"),
    ('cacheDuration = "2562048h"', "longer than Go's longest"),
    ('cacheDuration = "1' + "0" * 5000 + 's"', "longer than Go's longest"),
    ('cacheDuration = "2562047h2562047h"', "longer than Go's longest"),
    ('cacheDuration = "-5m"', "invalid duration"),
    ('cacheDuration = "1.2.3s"', "invalid duration"),
    ('cacheDuration = "\u00b2s"', "invalid duration"),
    (
        "[[static]]\nregistry = 'r.io'\nusername = 'u'\npassword = 'p'\n"
        "cacheDuration = '9999999999999999m'",
        "config static[0].cacheDuration: duration '9999999999999999m' is longer than Go's",
    ),
    (
        "[[serviceAccountToken]]\nregistry = 'r.io'\nusername = 'u'\nmaxCacheDuration = '3000000h'",
        "config serviceAccountToken[0].maxCacheDuration: duration '3000000h' is longer",
    ),
    ("[[dockerConfig]]\npath = '/x'\nhelperTimeout = '1m'", "at most 30s"),
    ("[[dockerConfig]]\npath = '/x'\nhelperTimeout = '0s'", "more than 0s"),
    (
        "[[serviceAccountToken]]\nregistry = 'r.io'\nusername = 'u'\nmode = 'x'",
        "passthrough or exchange",
    ),
    (
        "[[serviceAccountToken]]\nregistry = 'r.io'\nusername = 'u'\nmode = 'exchange'",
        "endpoint: required",
    ),
    (
        "[[serviceAccountToken]]\nregistry = 'r.io'\nusername = 'u'\nendpoint = 'https://x'",
        "endpoint: only for mode exchange",
    ),
    (
        "[[serviceAccountToken]]\nregistry = 'r.io'\nusername = 'u'\nmode = 'exchange'\n"
        "endpoint = 'http://x'",
        "not an https:// URL",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_configs_fail_naming_the_field(
    config_file: Callable[[str], Path], text: str, message: str
) -> None:
    result = run_provider(["--config", config_file(text)], request("r.io/x"))
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize(
    ("duration", "answered"),
    [
        # Go's longest duration, to the nanosecond: whole seconds, which Go reads back.
        ("2562047h47m16.854775807s", "9223372036s"),
        ("1.5h", "5400s"),
        ("1h30m", "5400s"),
        ("90s", "90s"),
        ("1500ms", "1s"),
        (".5s", "0s"),
        ("0", "0s"),
        ("0.7s0.2s0.1s", "1s"),  # exact: floats would sum these to 0.9999999999999999
    ],
)
def test_cache_durations_are_whole_seconds_go_can_read(
    provide: Provide, duration: str, answered: str
) -> None:
    config = STATIC.replace('cacheDuration = "10m"', f'cacheDuration = "{duration}"')
    assert provide(config, "a.example.com/x")["cacheDuration"] == answered


def test_a_config_cache_from_before_the_duration_check_is_not_reused(tmp_path: Path) -> None:
    """An earlier provider cached a parsed config holding an out-of-range duration:
    its cache format differs, so the file is parsed again, and refused."""
    config = write_private(tmp_path / "c.toml", STATIC.replace('"10m"', '"99999999999999h"'))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    info = config.stat()
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    key = (1, sys.hexversion, str(config), *identity)
    old = {"cacheDuration": 3.6e17, "static": [], "dockerConfig": [], "serviceAccountToken": []}
    (cache / "config.marshal").write_bytes(marshal.dumps((key, old)))
    (cache / "config.marshal").chmod(0o600)
    result = run_provider(["--config", config, "--cache-dir", cache], request("a.example.com/x"))
    assert result.returncode == 1 and b"longer than Go's longest" in result.stderr


def test_config_errors_never_show_secrets(config_file: Callable[[str], Path]) -> None:
    text = (
        '[[static]]\nregistry = "r.io"\nusername = "u"\npassword = "hunter2-pw"\nbad = "hunter2-x"'
    )
    result = run_provider(["--config", config_file(text)], request("r.io/x"))
    assert result.returncode == 1
    assert b"hunter2" not in result.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602, 0o700 | 0o010])
def test_config_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_private(tmp_path / "c.toml", STATIC, mode)
    result = run_provider(["--config", path], request("a.example.com/x"))
    assert result.returncode == 1
    assert b"accessible by group or others" in result.stderr
    assert result.stdout == b""


def test_password_file_open_to_others_is_refused(tmp_path: Path) -> None:
    secret = write_private(tmp_path / "pw", "p", 0o644)
    config = write_private(
        tmp_path / "c.toml",
        f'[[static]]\nregistry = "r.io"\nusername = "u"\npasswordFile = "{secret}"',
    )
    result = run_provider(["--config", config], request("r.io/x"))
    assert result.returncode == 1
    assert b"password file" in result.stderr and b"accessible by group or others" in result.stderr


def test_chmod_invalidates_the_cached_config(tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", STATIC)
    args: list[str | Path] = ["--config", config, "--cache-dir", tmp_path / "cache"]
    assert run_provider(args, request("a.example.com/x")).returncode == 0
    assert (tmp_path / "cache" / "config.marshal").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    config.chmod(0o644)
    assert b"accessible by group" in run_provider(args, request("a.example.com/x")).stderr


def test_the_cached_config_follows_edits(tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", STATIC)
    args: list[str | Path] = ["--config", config, "--cache-dir", tmp_path / "cache"]
    first = json.loads(run_provider(args, request("a.example.com/x")).stdout)
    write_private(config, STATIC.replace("s3cret-static", "rotated"))
    second = json.loads(run_provider(args, request("a.example.com/x")).stdout)
    assert first["auth"]["*.example.com"]["password"] == "s3cret-static"
    assert second["auth"]["*.example.com"]["password"] == "rotated"


def test_a_damaged_config_cache_is_replaced(tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", STATIC)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    write_private(cache / "config.marshal", "garbage")
    result = run_provider(["--config", config, "--cache-dir", cache], request("a.example.com/x"))
    assert result.returncode == 0, result.stderr


def test_missing_config(tmp_path: Path) -> None:
    result = run_provider(["--config", tmp_path / "nope.toml"], request("r.io/x"))
    assert result.returncode == 1
    assert b"does not exist" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--config is required"),
        (["--config"], "--config needs a value"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run_provider(args, request("r.io/x"))
    assert result.returncode == 2
    assert result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("nodeplug-credential-provider: ") and message in line
    assert "usage: nodeplug-credential-provider [check] --config FILE" in line


def test_equals_form_of_options(tmp_path: Path) -> None:
    config = write_private(tmp_path / "c.toml", STATIC)
    result = run_provider([f"--config={config}"], request("a.example.com/x"))
    assert result.returncode == 0, result.stderr
