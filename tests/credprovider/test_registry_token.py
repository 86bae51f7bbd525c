"""Service account tokens against a real registry with token auth (a token server in the
tests) and a real client: passed through, or exchanged (RFC 8693) at an HTTPS endpoint."""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.credprovider.conftest import V1, request, run_provider, write_private
from tests.credprovider.registry import free_port, needs_tools, oci_layout, pull, push, registry
from tests.credprovider.tokenauth import (
    ISSUER,
    SERVICE,
    ExchangeServer,
    TokenServer,
    certificate,
    fake_pod_token,
    serve,
)

pytestmark = needs_tools
POD_TOKEN = fake_pod_token(900)


def pod_token_left() -> float:
    """Seconds until POD_TOKEN's exp (made at import: a slow run eats into it)."""
    payload = POD_TOKEN.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"]) - time.time()


@dataclass
class Setup:
    registry: str
    issuer: TokenServer
    exchange: ExchangeServer
    endpoint: str
    ca_file: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("token")
    signing_cert, signing_key = certificate(work / "signing")
    tls_cert, tls_key = certificate(work / "tls")
    issuer = TokenServer(signing_key)
    issuer.logins["admin"] = "admin-pw"
    exchange = ExchangeServer(issuer, "exchanged", POD_TOKEN)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tls_cert, tls_key)
    with (
        serve(issuer.handler()) as token_address,
        serve(exchange.handler(), tls) as exchange_address,
    ):
        auth = {
            "token": {
                "realm": f"http://{token_address}/token",
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(signing_cert),
            }
        }
        with registry(auth) as address:
            push(oci_layout(work / "layout"), f"{address}/team/app:v1", "admin", "admin-pw")
            yield Setup(address, issuer, exchange, f"https://{exchange_address}/token", tls_cert)


def provide(tmp_path: Path, config: str, image: str, **fields: Any) -> Any:
    path = write_private(tmp_path / "p.toml", config)
    args: list[str | Path] = ["--config", path, "--cache-dir", tmp_path / "cache"]
    return run_provider(args, request(image, **fields))


def answer(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    response: dict[str, Any] = json.loads(result.stdout)
    return response


def test_passthrough_hands_the_pod_token_to_the_registry(setup: Setup, tmp_path: Path) -> None:
    setup.issuer.logins["sa"] = POD_TOKEN  # a registry that trusts the cluster's tokens
    config = f'[[serviceAccountToken]]\nregistry = "{setup.registry}"\nusername = "sa"\n'
    before = pod_token_left()
    response = answer(
        provide(tmp_path, config, f"{setup.registry}/team/app", serviceAccountToken=POD_TOKEN)
    )
    after = pod_token_left()
    login = response["auth"][setup.registry]
    assert login == {"username": "sa", "password": POD_TOKEN}
    assert after - 1 <= int(response["cacheDuration"][:-1]) <= before  # until the token's exp
    assert pull(f"{setup.registry}/team/app:v1", ("sa", login["password"])).returncode == 0
    assert pull(f"{setup.registry}/team/app:v1", None).returncode != 0


def exchange_config(setup: Setup, extra: str = "") -> str:
    return f"""
    [[serviceAccountToken]]
    registry = "{setup.registry}"
    username = "exchanged"
    mode = "exchange"
    endpoint = "{setup.endpoint}"
    audience = "{SERVICE}"
    caFile = "{setup.ca_file}"
    {extra}
    """


def test_exchange_mints_a_registry_token_once_and_caches_it(setup: Setup, tmp_path: Path) -> None:
    image = f"{setup.registry}/team/app"
    calls = len(setup.exchange.forms)
    first = answer(provide(tmp_path, exchange_config(setup), image, serviceAccountToken=POD_TOKEN))
    form = setup.exchange.forms[-1]
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert (form["subject_token"], form["audience"]) == (POD_TOKEN, SERVICE)
    login = first["auth"][setup.registry]
    assert login["username"] == "exchanged" and login["password"].startswith("registry-token-")
    assert first["cacheDuration"] == "570s"  # expires_in 600, less the 30 s margin
    pulled = pull(f"{image}:v1", (login["username"], login["password"]))
    assert pulled.returncode == 0, pulled.stderr
    # The next exec (the kubelet's cache missed, say) reuses the minted token from disk.
    second = answer(provide(tmp_path, exchange_config(setup), image, serviceAccountToken=POD_TOKEN))
    assert second["auth"] == first["auth"]
    assert len(setup.exchange.forms) == calls + 1
    (cached,) = (tmp_path / "cache").glob("token-*.json")
    assert cached.stat().st_mode & 0o777 == 0o600
    assert POD_TOKEN.encode() not in cached.read_bytes()


def test_a_kept_token_is_answered_with_the_same_margin_as_a_fresh_one(
    setup: Setup, tmp_path: Path
) -> None:
    image = f"{setup.registry}/team/app"
    config = exchange_config(setup)
    fresh = answer(provide(tmp_path, config, image, serviceAccountToken=POD_TOKEN))
    assert fresh["cacheDuration"] == "570s"  # expires_in 600, less the 30 s margin
    # The next exec finds the token in --cache-dir with 600 s less the time since
    # minting left: the kubelet must still stop using it 30 s before it expires.
    (kept,) = (tmp_path / "cache").glob("token-*.json")
    entry = json.loads(kept.read_text())
    entry["expires"] = repr(float(entry["expires"]) - 200)  # as if minted 200 s ago
    kept.write_text(json.dumps(entry))
    again = answer(provide(tmp_path, config, image, serviceAccountToken=POD_TOKEN))
    assert again["auth"] == fresh["auth"]
    assert 365 <= int(again["cacheDuration"][:-1]) <= 370  # 400 s left, less 30 s


@pytest.mark.parametrize(
    "expires_in",
    ["ten minutes", "", "NaN", "Infinity", "1e999", "-60", 0, -1, True, [600], 10**400],
)
def test_an_expires_in_that_is_no_positive_number_is_a_clear_error(
    setup: Setup, tmp_path: Path, expires_in: object
) -> None:
    setup.exchange.expires_in = expires_in
    try:
        result = provide(
            tmp_path, exchange_config(setup), f"{setup.registry}/x", serviceAccountToken=POD_TOKEN
        )
    finally:
        setup.exchange.expires_in = 600
    assert result.returncode == 1 and result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line == (
        f"nodeplug-credential-provider: token exchange at {setup.endpoint} answered an "
        "expires_in that is not a positive number of seconds"
    )
    assert not list((tmp_path / "cache").glob("token-*.json"))  # nothing kept


@pytest.mark.parametrize(
    ("expires_in", "answered"), [("900", "870s"), (120.5, "90s"), (None, None)]
)
def test_expires_in_as_a_number_string_or_absent(
    setup: Setup, tmp_path: Path, expires_in: object, answered: str | None
) -> None:
    setup.exchange.expires_in = expires_in
    before = pod_token_left()
    try:
        result = provide(
            tmp_path, exchange_config(setup), f"{setup.registry}/x", serviceAccountToken=POD_TOKEN
        )
    finally:
        setup.exchange.expires_in = 600
    after = pod_token_left()
    seconds = int(answer(result)["cacheDuration"][:-1])
    if answered is None:  # absent: as long as the pod's token, less the margin
        assert after - 31 <= seconds <= before - 30
    else:
        assert f"{seconds}s" == answered


def test_no_token_no_exchange(setup: Setup, tmp_path: Path) -> None:
    calls = len(setup.exchange.forms)
    image = f"{setup.registry}/team/app"
    assert "auth" not in answer(provide(tmp_path, exchange_config(setup), image))
    beta = "credentialprovider.kubelet.k8s.io/v1beta1"
    assert "auth" not in answer(provide(tmp_path, exchange_config(setup), image, apiVersion=beta))
    assert len(setup.exchange.forms) == calls


def test_a_refused_exchange_fails_clearly_without_the_token(setup: Setup, tmp_path: Path) -> None:
    other = fake_pod_token(600)
    result = provide(
        tmp_path, exchange_config(setup), f"{setup.registry}/x", serviceAccountToken=other
    )
    assert result.returncode == 1 and result.stdout == b""
    assert b"HTTP 400 (invalid_grant)" in result.stderr
    assert other.encode() not in result.stderr


def test_an_untrusted_certificate_is_refused(setup: Setup, tmp_path: Path) -> None:
    config = exchange_config(setup).replace(f'caFile = "{setup.ca_file}"', "")
    result = provide(tmp_path, config, f"{setup.registry}/x", serviceAccountToken=POD_TOKEN)
    assert result.returncode == 1 and b"CERTIFICATE_VERIFY_FAILED" in result.stderr


def test_a_slow_endpoint_times_out_long_before_the_kubelet(setup: Setup, tmp_path: Path) -> None:
    setup.exchange.delay = 3
    try:
        config = exchange_config(setup, 'timeout = "1s"')
        result = provide(tmp_path, config, f"{setup.registry}/x", serviceAccountToken=POD_TOKEN)
    finally:
        setup.exchange.delay = 0
    assert result.returncode == 1 and b"timed out" in result.stderr


def test_an_unreachable_endpoint(setup: Setup, tmp_path: Path) -> None:
    config = exchange_config(setup).replace(
        setup.endpoint, f"https://127.0.0.1:{free_port()}/token"
    )
    result = provide(tmp_path, config, f"{setup.registry}/x", serviceAccountToken=POD_TOKEN)
    assert result.returncode == 1 and b"token exchange at https://127.0.0.1:" in result.stderr


def test_responses_stay_in_the_request_version(setup: Setup, tmp_path: Path) -> None:
    config = f'[[serviceAccountToken]]\nregistry = "{setup.registry}"\nusername = "sa"\n'
    response = answer(
        provide(tmp_path, config, f"{setup.registry}/x", serviceAccountToken=POD_TOKEN)
    )
    assert response["apiVersion"] == V1 and response["cacheKeyType"] == "Registry"
