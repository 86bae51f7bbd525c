"""The deployment as the tests read it: manifests/ (a kustomize base) and the Dockerfile.

Plain functions over the files as they are in the tree, so that each test states one
fact about how the pieces fit and fails naming the piece that moved.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

Document = dict[str, Any]
CLUSTER_SCOPED = frozenset(
    {"Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass"}
    | {"VolumeSnapshotClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
)


def load_all(path: Path) -> list[Document]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


@cache
def kustomization() -> Document:
    document: Document = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return document


def generator_files() -> dict[str, list[str]]:
    """Generated ConfigMap/Secret name -> the files it is made of."""
    generators = kustomization().get("configMapGenerator", [])
    generators += kustomization().get("secretGenerator", [])
    return {g["name"]: list(g["files"]) for g in generators}


@cache
def _resources() -> tuple[tuple[str, Document], ...]:
    return tuple(
        (name, document)
        for name in kustomization()["resources"]
        for document in load_all(MANIFESTS / name)
    )


def resources() -> list[tuple[str, Document]]:
    """(file name, document) for every object the kustomization lists."""
    return list(_resources())


def objects(kind: str) -> list[Document]:
    return [d for _, d in _resources() if d["kind"] == kind]


def one(kind: str) -> Document:
    (found,) = objects(kind)
    return found


def daemonset() -> Document:
    return one("DaemonSet")


def deployment() -> Document:
    """The expansion controller's Deployment (controller.yaml)."""
    return one("Deployment")


def pod_spec(workload: Document | None = None) -> Document:
    """The pod template of a workload: the DaemonSet unless another is given."""
    spec: Document = (workload or daemonset())["spec"]["template"]["spec"]
    return spec


def container(name: str, workload: Document | None = None) -> Document:
    spec = pod_spec(workload)
    everything: list[Document] = spec["containers"] + spec.get("initContainers", [])
    (found,) = [c for c in everything if c["name"] == name]
    return found


def volumes(workload: Document | None = None) -> dict[str, Document]:
    return {v["name"]: v for v in pod_spec(workload)["volumes"]}


@dataclass(frozen=True)
class Mount:
    container_path: str
    volume: Document
    mount: Document

    @property
    def host_path(self) -> str | None:
        host: dict[str, str] | None = self.volume.get("hostPath")
        return None if host is None else host["path"]


def mounts(container_name: str, workload: Document | None = None) -> list[Mount]:
    by_name = volumes(workload)
    return [
        Mount(m["mountPath"], by_name[m["name"]], m)
        for m in container(container_name, workload).get("volumeMounts", [])
    ]


def mount_covering(container_name: str, path: str, workload: Document | None = None) -> Mount:
    """The mount that `path` (in the container) falls under: the deepest one."""
    candidates = [
        m for m in mounts(container_name, workload) if Path(path).is_relative_to(m.container_path)
    ]
    assert candidates, f"{container_name} mounts nothing that holds {path}"
    return max(candidates, key=lambda m: len(Path(m.container_path).parts))


def host_path_of(container_name: str, path: str) -> str:
    """Where `path` in the container is on the host (it must be under a hostPath mount)."""
    found = mount_covering(container_name, path)
    assert found.host_path is not None, f"{path} in {container_name} is not on the host"
    return str(Path(found.host_path) / Path(path).relative_to(found.container_path))


def flags(container_name: str, workload: Document | None = None) -> dict[str, str]:
    """A container's `--name=value` arguments (a bare `--name` maps to "")."""
    result = {}
    for argument in container(container_name, workload).get("args", []):
        name, _, value = argument.partition("=")
        assert name.startswith("--"), f"{container_name}: {argument!r} is not --name=value"
        result[name] = value
    return result


def env(container_name: str) -> dict[str, Document]:
    return {e["name"]: e for e in container(container_name).get("env", [])}


def field_ref(container_name: str, variable: str) -> str:
    reference: str = env(container_name)[variable]["valueFrom"]["fieldRef"]["fieldPath"]
    return reference


def daemon_config_text(name: str = "nodeplug-config") -> str:
    """A daemon's config file as its ConfigMap holds it (the nodes' unless named)."""
    (config_map,) = [c for c in objects("ConfigMap") if c["metadata"]["name"] == name]
    text: str = config_map["data"]["config.yaml"]
    return text


def daemon_config(name: str = "nodeplug-config") -> Document:
    document: Document = yaml.safe_load(daemon_config_text(name))
    return document


CONTROLLER_CONFIG = "nodeplug-controller-config"


# --- the credential provider ------------------------------------------------------------

CREDENTIAL_PROVIDER_CONFIG = MANIFESTS / "credential-provider-config.yaml"
INSTALLER = "install-credential-provider"


def kubelet_flags() -> dict[str, str]:
    """The kubelet flags that credential-provider-config.yaml tells the admin to set."""
    text = CREDENTIAL_PROVIDER_CONFIG.read_text()
    return dict(re.findall(r"(--image-credential-provider-(?:config|bin-dir))=(\S+)", text))


def provider() -> Document:
    (only,) = load_all(CREDENTIAL_PROVIDER_CONFIG)[0]["providers"]
    found: Document = only
    return found


def installed_binary() -> str:
    """Where the kubelet looks for the provider: its bin dir, then the provider's name."""
    return f"{kubelet_flags()['--image-credential-provider-bin-dir']}/{provider()['name']}"


def installs() -> dict[str, tuple[str, str]]:
    """Host path the init container installs -> (source in the container, mode)."""
    arguments = container(INSTALLER)["args"]
    assert len(arguments) % 3 == 0
    triples = [arguments[i : i + 3] for i in range(0, len(arguments), 3)]
    return {host_path_of(INSTALLER, target): (source, mode) for source, target, mode in triples}


# --- Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comments may sit inside a continued instruction too
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    return lines


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order) of the Dockerfile."""
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(DOCKERFILE.read_text()):
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            arguments[name] = default
        elif word == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert match, f"cannot read FROM {rest}"
            stages.append(Stage(match.group(1), match.group(2)))
        else:
            assert stages, f"{word} before the first FROM"
            stages[-1].instructions.append((word, rest))
    return arguments, stages


def copy_arguments(rest: str) -> tuple[dict[str, str], list[str], str]:
    """COPY's (--options, sources, destination), shell form."""
    words = shlex.split(rest)
    options = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return options, paths[:-1], paths[-1]
