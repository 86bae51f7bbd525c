"""Every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an
unknown or misspelt field is an error, as `kubectl apply --validate=strict` would say).

VolumeSnapshotClass is a CRD kind that those schemas do not have. It is checked against
a schema written here from the CRD's v1 openAPIV3Schema (external-snapshotter,
client/config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml): required driver and
deletionPolicy (Delete or Retain), string parameters, no other fields, and metadata
against the real ObjectMeta schema.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Callable
from functools import cache
from importlib import resources as package_files
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.manifests import model

# The newest Kubernetes minor the installed kubernetes-validate has schemas for.
KUBERNETES_VERSION: str = kubernetes_validate.latest_version()
CRD_KINDS = {"VolumeSnapshotClass"}
_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

VOLUME_SNAPSHOT_CLASS_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
        "kind": {"const": "VolumeSnapshotClass"},
        "metadata": {
            "allOf": [
                {"$ref": f"{_DEFINITIONS_ID}#/$defs/{_OBJECT_META}"},
                {"required": ["name"], "not": {"required": ["namespace"]}},
            ]
        },
        "driver": {"type": "string", "minLength": 1},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@cache
def _object_meta_registry() -> Registry[Any]:
    # kubernetes-validate's own copy of the API definitions, for the version tested above.
    folder = f"v{KUBERNETES_VERSION}-local-strict"
    definitions = package_files.files("kubernetes_validate") / "kubernetes-json-schema"
    contents = json.loads((definitions / folder / "_definitions.json").read_text())
    registry: Registry[Any] = Registry().with_resource(
        _DEFINITIONS_ID, Resource.from_contents(contents)
    )
    return registry


def validate(document: dict[str, Any]) -> None:
    if document["kind"] in CRD_KINDS:
        jsonschema.Draft202012Validator(
            VOLUME_SNAPSHOT_CLASS_V1, registry=_object_meta_registry()
        ).validate(document)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def _label(item: tuple[str, dict[str, Any]]) -> str:
    file, document = item
    return f"{file}:{document['kind']}/{document['metadata']['name']}"


@pytest.mark.parametrize("item", model.resources(), ids=_label)
def test_every_manifest_matches_its_schema(item: tuple[str, dict[str, Any]]) -> None:
    validate(item[1])


def _pod(document: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = document["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("DaemonSet", lambda d: _pod(d).update(hostNetwrok=True)),
        ("DaemonSet", lambda d: _pod(d)["containers"][0].update(image=7)),
        ("CSIDriver", lambda d: d["spec"].update(attachRequired="no")),
        ("StorageClass", lambda d: d.pop("provisioner")),
        ("VolumeSnapshotClass", lambda d: d.update(deletionPolicy="Keep")),
        ("VolumeSnapshotClass", lambda d: d.update(deletionpolicy="Delete")),
        ("VolumeSnapshotClass", lambda d: d.pop("driver")),
        ("VolumeSnapshotClass", lambda d: d["metadata"].update(labels={"a": 1})),
        ("VolumeSnapshotClass", lambda d: d["metadata"].update(namespace="nodeplug-system")),
    ],
)
def test_the_checks_catch_a_broken_manifest(
    kind: str, break_it: Callable[[dict[str, Any]], None]
) -> None:
    document = copy.deepcopy(model.one(kind))
    break_it(document)
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its kustomize) absent")
def test_the_kustomize_build_is_valid_and_wires_the_generated_names() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(model.MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    documents = [d for d in yaml.safe_load_all(built) if d is not None]
    for document in documents:
        validate(document)
    namespace = model.one("Namespace")["metadata"]["name"]
    names = {(d["kind"], d["metadata"]["name"]) for d in documents}
    (daemonset,) = [d for d in documents if d["kind"] == "DaemonSet"]
    for volume in _pod(daemonset)["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in names
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in names
    for document in documents:
        expected = None if document["kind"] in model.CLUSTER_SCOPED else namespace
        assert document["metadata"].get("namespace") == expected, document["metadata"]
