"""The DRA pieces of the deployment: RBAC and the admission policy in the base, and the
DeviceClass / ResourceClaimTemplate / Pod example, against the schemas and each other."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from deviceplugin.dra.names import default_driver_name
from tests.manifests import model
from tests.manifests.test_cross_refs import allows, roles
from tests.manifests.test_schemas import validate

EXAMPLE = model.MANIFESTS / "examples" / "dra-widget.yaml"


def example(kind: str) -> dict[str, Any]:
    (document,) = [d for d in model.load_all(EXAMPLE) if d["kind"] == kind]
    return document


@pytest.mark.parametrize("kind", ["DeviceClass", "ResourceClaimTemplate", "Pod"])
def test_the_example_matches_the_schemas(kind: str) -> None:
    validate(example(kind))


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("DeviceClass", lambda d: d["spec"]["selectors"][0].update(cel={"expresion": "true"})),
        (
            "ResourceClaimTemplate",
            lambda d: d["spec"]["spec"]["devices"]["requests"][0].pop("name"),
        ),
    ],
)
def test_the_schemas_catch_a_broken_example(kind: str, break_it: Any) -> None:
    document = copy.deepcopy(example(kind))
    break_it(document)
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


def test_the_example_selects_the_driver_the_base_config_would_run() -> None:
    (widget,) = model.daemon_config()["devicePlugins"]
    driver = widget.get("draDriverName") or default_driver_name(widget["resourceName"])
    device_class = example("DeviceClass")
    assert device_class["metadata"]["name"] == driver
    assert (
        f'device.driver == "{driver}"' in device_class["spec"]["selectors"][0]["cel"]["expression"]
    )
    request = example("ResourceClaimTemplate")["spec"]["spec"]["devices"]["requests"][0]
    assert request["exactly"]["deviceClassName"] == driver
    assert (
        f'device.attributes["{driver}"]' in request["exactly"]["selectors"][0]["cel"]["expression"]
    )
    pod = example("Pod")["spec"]
    (claim,) = pod["resourceClaims"]
    assert (
        claim["resourceClaimTemplateName"] == example("ResourceClaimTemplate")["metadata"]["name"]
    )
    assert pod["containers"][0]["resources"]["claims"] == [
        {"name": claim["name"], "request": request["name"]}
    ]


@pytest.mark.parametrize(
    ("group", "resource", "verb"),
    [
        ("resource.k8s.io", "resourceslices", verb)
        for verb in ("get", "list", "watch", "create", "update", "delete")
    ]
    + [("resource.k8s.io", "resourceclaims", "get"), ("", "nodes", "get")],
)
def test_rbac_allows_what_the_dra_drivers_do(group: str, resource: str, verb: str) -> None:
    assert allows(roles()[("ClusterRole", "nodeplug-dra")]["rules"], group, resource, verb)


def test_the_dra_role_writes_nothing_but_slices() -> None:
    for rule in roles()[("ClusterRole", "nodeplug-dra")]["rules"]:
        if rule["resources"] != ["resourceslices"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def test_the_admission_policy_confines_the_daemon_to_its_nodes_slices() -> None:
    policy = model.one("ValidatingAdmissionPolicy")
    binding = model.one("ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    account = model.pod_spec()["serviceAccountName"]
    namespace = model.daemonset()["metadata"]["namespace"]
    (condition,) = policy["spec"]["matchConditions"]
    assert f'"system:serviceaccount:{namespace}:{account}"' in condition["expression"]
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    assert rule["resources"] == ["resourceslices"]
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert "authentication.kubernetes.io/node-name" in variables["userNode"]
    assert "oldObject" in variables["sliceNode"] and "spec.?nodeName" in variables["sliceNode"]
    assert policy["spec"]["failurePolicy"] == "Fail"


def test_the_daemon_gets_the_node_name_its_slices_carry() -> None:
    # The pool and owner of the slices is $NODE_NAME (deviceplugin.dra.names).
    assert model.field_ref("nodeplug", "NODE_NAME") == "spec.nodeName"
