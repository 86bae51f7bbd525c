"""The example kubelet CredentialProviderConfig, checked by the kubelet's own rules
(pkg/credentialprovider/plugin/config.go validateCredentialProviderConfig, the strict
decoding of kubelet.config.k8s.io/v1 types), and the example provider config."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from credprovider import config as provider_config
from credprovider.__main__ import _options
from credprovider.api import API_VERSIONS
from credprovider.build import DEFAULT_OUTPUT
from credprovider.check import kubelet_requirements
from credprovider.match import PatternError, parse
from tests.credprovider.conftest import V1, request, run_provider, write_private
from tests.credprovider.tokenauth import fake_pod_token

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
KUBELET_CONFIG = MANIFESTS / "credential-provider-config.yaml"
PROVIDER_FIELDS = {"name", "matchImages", "defaultCacheDuration", "apiVersion", "args", "env"}
PROVIDER_FIELDS |= {"tokenAttributes"}
TOKEN_FIELDS = {"serviceAccountTokenAudience", "cacheType", "requireServiceAccount"}
TOKEN_FIELDS |= {"requiredServiceAccountAnnotationKeys", "optionalServiceAccountAnnotationKeys"}
_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$|^0$")


def qualified_name_errors(key: str) -> list[str]:
    """apimachinery's IsQualifiedName: [prefix/]name, prefix a DNS subdomain."""
    prefix, slash, name = key.rpartition("/")
    errors = []
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        errors.append(f"bad prefix {prefix!r}")
    if not name or len(name) > 63 or not _NAME.match(name):
        errors.append(f"bad name {name!r}")
    return errors


def kubelet_errors(document: dict[str, Any]) -> list[str]:
    """What the kubelet would refuse in a CredentialProviderConfig (empty: accepted)."""
    errors: list[str] = []
    if document.get("apiVersion") != "kubelet.config.k8s.io/v1":
        errors.append("apiVersion")
    if document.get("kind") != "CredentialProviderConfig":
        errors.append("kind")
    errors += [
        f"unknown field {k}" for k in document if k not in {"apiVersion", "kind", "providers"}
    ]
    providers = document.get("providers") or []
    if not providers:
        errors.append("providers: at least 1 item in plugins is required")
    names: set[str] = set()
    for provider in providers:
        errors += [f"unknown field {k}" for k in provider if k not in PROVIDER_FIELDS]
        name = provider.get("name", "")
        if "/" in name or " " in name or name in (".", "..", "") or name in names:
            errors.append(f"providers.name {name!r}")
        names.add(name)
        if provider.get("apiVersion") not in API_VERSIONS:
            errors.append("providers.apiVersion")
        if not provider.get("matchImages"):
            errors.append("providers.matchImages: at least 1 item")
        for pattern in provider.get("matchImages") or []:
            try:
                parse(pattern)  # the kubelet checks ParseSchemelessURL
            except PatternError as error:
                errors.append(f"providers.matchImages {pattern!r}: {error}")
        duration = provider.get("defaultCacheDuration")
        if not isinstance(duration, str) or not _DURATION.match(duration):
            errors.append("providers.defaultCacheDuration: required, a duration >= 0")
        if not all(isinstance(a, str) for a in provider.get("args", [])):
            errors.append("providers.args")
        if any(set(env) != {"name", "value"} for env in provider.get("env", [])):
            errors.append("providers.env")
        if "tokenAttributes" in provider:
            errors += token_errors(provider["tokenAttributes"], provider.get("apiVersion"))
    return errors


def token_errors(attributes: dict[str, Any], api_version: str | None) -> list[str]:
    errors = [f"unknown field tokenAttributes.{k}" for k in attributes if k not in TOKEN_FIELDS]
    if not attributes.get("serviceAccountTokenAudience"):
        errors.append("tokenAttributes.serviceAccountTokenAudience: required")
    require = attributes.get("requireServiceAccount")
    if not isinstance(require, bool):
        errors.append("tokenAttributes.requireServiceAccount: required")
    if api_version != "credentialprovider.kubelet.k8s.io/v1":
        errors.append("tokenAttributes: only for credentialprovider.kubelet.k8s.io/v1")
    required = attributes.get("requiredServiceAccountAnnotationKeys") or []
    optional = attributes.get("optionalServiceAccountAnnotationKeys") or []
    if require is False and required:
        errors.append("requireServiceAccount cannot be false with required annotation keys")
    for keys in (required, optional):
        errors += [e for key in keys for e in qualified_name_errors(key.lower())]
        if len(set(keys)) != len(keys):
            errors.append("duplicate annotation key")
    if set(required) & set(optional):
        errors.append("annotation keys cannot be both required and optional")
    if attributes.get("cacheType") not in ("ServiceAccount", "Token"):
        errors.append("tokenAttributes.cacheType: ServiceAccount or Token")
    return errors


def load_example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(KUBELET_CONFIG.read_text())
    return document


def test_the_example_passes_the_kubelets_validation() -> None:
    assert kubelet_errors(load_example()) == []


def test_the_example_runs_our_binary_with_our_arguments() -> None:
    (provider,) = load_example()["providers"]
    assert provider["name"] == Path(DEFAULT_OUTPUT).name
    config, cache_dir = _options(provider["args"])
    assert config.startswith("/") and cache_dir and cache_dir.startswith("/")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.update(kind="KubeletConfiguration"), "kind"),
        (lambda d: d.update(providers=[]), "at least 1 item"),
        (lambda d: d["providers"][0].update(name="a/b"), "providers.name"),
        (lambda d: d["providers"].append(dict(d["providers"][0])), "providers.name"),
        (lambda d: d["providers"][0].update(matchImages=[]), "matchImages: at least 1"),
        (lambda d: d["providers"][0].update(matchImages=["reg[0-9].io"]), "invalid IP-literal"),
        (lambda d: d["providers"][0].pop("defaultCacheDuration"), "defaultCacheDuration"),
        (lambda d: d["providers"][0].update(defaultCacheDuration="-1m"), "defaultCacheDuration"),
        (lambda d: d["providers"][0].update(matchImage=["x"]), "unknown field matchImage"),
        (
            lambda d: d["providers"][0].update(
                apiVersion="credentialprovider.kubelet.k8s.io/v1beta1"
            ),
            "only for credentialprovider.kubelet.k8s.io/v1",
        ),
        (lambda d: d["providers"][0]["tokenAttributes"].pop("cacheType"), "cacheType"),
        (lambda d: d["providers"][0]["tokenAttributes"].pop("requireServiceAccount"), "required"),
        (
            lambda d: d["providers"][0]["tokenAttributes"].update(
                requiredServiceAccountAnnotationKeys=["nodeplug.example.com/registry-role"]
            ),
            "cannot be false",
        ),
        (
            lambda d: d["providers"][0]["tokenAttributes"].update(
                optionalServiceAccountAnnotationKeys=["bad key!"]
            ),
            "bad name",
        ),
    ],
)
def test_the_validator_refuses_what_the_kubelet_refuses(change: Any, error: str) -> None:
    document = load_example()
    change(document)
    assert any(error in message for message in kubelet_errors(document)), kubelet_errors(document)


def test_the_example_provider_config_is_valid() -> None:
    raw = tomllib.loads((MANIFESTS / "credential-provider.toml").read_text())
    config = provider_config.validate(raw)
    assert [len(config[kind]) for kind in ("static", "dockerConfig", "serviceAccountToken")] == [
        1,
        1,
        1,
    ]


def pairing_errors(entry: dict[str, Any], config: provider_config.Table) -> list[str]:
    """Where the kubelet's provider entry falls short of what the provider's config
    needs (credprovider.check's requirements, which `check` prints)."""
    errors = []
    for need in kubelet_requirements(config):
        value: Any = entry
        for part in need.field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or (need.values and value not in need.values):
            wanted = " or ".join(need.values) or "set"
            errors.append(f"{need.field} is {value!r}, must be {wanted}: {need.reason}")
    return errors


def example_provider_config(mode: str) -> dict[str, Any]:
    """The example provider config, its token source switched to `mode`."""
    raw = tomllib.loads((MANIFESTS / "credential-provider.toml").read_text())
    (source,) = raw["serviceAccountToken"]
    assert source["mode"] == "exchange"
    if mode == "passthrough":
        raw["serviceAccountToken"] = [
            {"registry": source["registry"], "username": "sa", "mode": "passthrough"}
        ]
    return raw


@pytest.mark.parametrize("mode", ["exchange", "passthrough"])
def test_the_example_kubelet_config_fits_the_provider_config_in_either_mode(mode: str) -> None:
    config = provider_config.validate(example_provider_config(mode))
    (entry,) = load_example()["providers"]
    assert pairing_errors(entry, config) == []


@pytest.mark.parametrize(
    ("change", "mode", "error"),
    [
        (
            lambda p: p["tokenAttributes"].update(cacheType="ServiceAccount"),
            "passthrough",
            "cacheType is 'ServiceAccount', must be Token",
        ),
        (lambda p: p.pop("tokenAttributes"), "exchange", "tokenAttributes is None, must be set"),
        (
            lambda p: p.update(apiVersion="credentialprovider.kubelet.k8s.io/v1beta1"),
            "exchange",
            "apiVersion is",
        ),
    ],
)
def test_pairing_flags_a_kubelet_config_that_defeats_the_token_sources(
    change: Any, mode: str, error: str
) -> None:
    config = provider_config.validate(example_provider_config(mode))
    (entry,) = copy.deepcopy(load_example())["providers"]
    change(entry)
    assert any(error in message for message in pairing_errors(entry, config))


def kubelet_keeps(response: dict[str, Any], token: str, cache_type: str) -> dict[str, Any]:
    """The logins the kubelet keeps from a response (pkg/credentialprovider/plugin/
    plugin.go): unless cacheType is Token, an answer holding the pod's token as a
    password is dropped whole."""
    auth: dict[str, Any] = response.get("auth", {})
    if token and cache_type != "Token" and any(a["password"] == token for a in auth.values()):
        return {}
    return auth


@pytest.mark.parametrize(("cache_type", "kept"), [("Token", True), ("ServiceAccount", False)])
def test_the_kubelet_keeps_a_passthrough_answer_only_under_cache_type_token(
    tmp_path: Path, cache_type: str, kept: bool
) -> None:
    """Over a real exec: a passthrough answer with a static login next to it, as the
    kubelet would treat it under each cacheType; the example says Token."""
    registry = "team.registry.example.com"
    config = write_private(
        tmp_path / "p.toml",
        f'[[static]]\nregistry = "{registry}"\nusername = "u"\npassword = "p"\n'
        f'[[serviceAccountToken]]\nregistry = "*.registry.example.com"\nusername = "sa"\n',
    )
    token = fake_pod_token(600)
    result = run_provider(
        ["--config", config], request(f"{registry}/app", serviceAccountToken=token)
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["apiVersion"] == V1
    assert bool(kubelet_keeps(response, token, cache_type)) is kept
    (entry,) = load_example()["providers"]
    assert entry["tokenAttributes"]["cacheType"] == "Token"
