"""The manifests agree with the daemon's config, with each other and with the credential
provider's files: names, paths, ports and permissions that are written in more than one
place are checked to be the same, so that changing one and forgetting another fails here
and not on a node."""

from __future__ import annotations

import re
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from credprovider.__main__ import _options
from csi.config import Mode
from daemon import config as daemon_config
from daemon.cli import DEFAULT_CONFIG
from daemon.csiplugin import CSI_PLUGIN_SUBDIR
from daemon.csiplugin import SHUTDOWN_GRACE as CSI_GRACE
from daemon.pluginwatcher import REGISTRY_SUBDIR
from daemon.pluginwatcher import SHUTDOWN_GRACE as REGISTRATION_GRACE
from deviceplugin import configkit
from deviceplugin.plugin import SHUTDOWN_GRACE as DEVICE_PLUGIN_GRACE
from tests.manifests import model

SIDECARS = ("csi-provisioner", "csi-snapshotter")
RESIZER = "csi-resizer"
# Keys of the daemon's config that the manifests depend on, spelt out in the ConfigMap.
DEPENDED_ON = ["kubeletDir", "devicePluginDir", "stateDir", "http.address", "cdi.dir"]
DEPENDED_ON += ["nodeFeatures.file"]
DEPENDED_ON += ["csi.driverName", "csi.pool.path", "csi.pool.image"]
# Seconds for Python to unwind the task group and exit once the servers have stopped.
EXIT_HEADROOM = 5
# mkfs of a large block volume on a loaded node, with room to spare.
SLOWEST_CALL_SECONDS = 30


def dig(document: dict[str, Any], dotted: str) -> Any:
    value: Any = document
    for key in dotted.split("."):
        value = value[key]
    return value


def setting(dotted: str) -> str:
    value = dig(model.daemon_config(), dotted)
    assert isinstance(value, str)
    return value


def driver() -> str:
    return setting("csi.driverName")


def csi_socket() -> str:
    return f"{setting('kubeletDir')}/{CSI_PLUGIN_SUBDIR}/{driver()}/csi.sock"


def sidecar_flags() -> dict[str, dict[str, str]]:
    return {name: model.flags(name) for name in SIDECARS}


# --- the daemon's config ----------------------------------------------------------------


@pytest.mark.parametrize("key", DEPENDED_ON)
def test_the_config_spells_out_what_the_manifests_depend_on(key: str) -> None:
    assert setting(key), f"{key} is left to the daemon's default"


def test_the_daemon_accepts_the_config_as_the_manifests_read_it(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(model.daemon_config_text())
    parsed = configkit.dumped(daemon_config.load(path))
    for key in DEPENDED_ON:
        assert dig(parsed, key) == setting(key), key


def test_the_node_name_the_daemonset_passes_becomes_the_csi_node_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NODE_NAME", "node-7.example")
    parsed = configkit.dumped(daemon_config.parse(model.daemon_config()))
    assert parsed["csi"]["nodeId"] == "node-7.example"


def test_the_daemon_and_the_sidecars_get_the_nodes_name() -> None:
    for name in ("nodeplug", *SIDECARS):
        assert model.field_ref(name, "NODE_NAME") == "spec.nodeName", name


def test_the_daemon_reads_the_mounted_config() -> None:
    config_path = Path(DEFAULT_CONFIG)
    found = model.mount_covering("nodeplug", str(config_path))
    assert found.volume["configMap"]["name"] == "nodeplug-config"
    assert Path(found.container_path) == config_path.parent  # no subPath: edits propagate
    assert "subPath" not in found.mount


# --- ports and probes ---------------------------------------------------------------------


def test_the_probes_and_the_port_follow_the_http_address() -> None:
    host, _, port = setting("http.address").rpartition(":")
    # The kubelet probes the pod's IP (the node's, with the host network), not loopback.
    assert host in {"0.0.0.0", "[::]"}
    nodeplug = model.container("nodeplug")
    (named,) = [p for p in nodeplug["ports"] if p["name"] == "http"]
    assert named["containerPort"] == int(port)
    probes = {kind: nodeplug[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = nodeplug["readinessProbe"]["httpGet"]
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert all(probe["port"] in {"http", int(port)} for probe in probes.values())


# --- host paths ---------------------------------------------------------------------------


def daemon_paths() -> list[str]:
    kubelet_dir = setting("kubeletDir")
    return [
        kubelet_dir,
        setting("devicePluginDir"),
        f"{kubelet_dir}/{REGISTRY_SUBDIR}",
        str(Path(csi_socket()).parent),
        setting("stateDir"),
        setting("csi.pool.path"),
        setting("csi.pool.image"),
        setting("cdi.dir"),
        str(Path(setting("nodeFeatures.file")).parent),
    ]


@pytest.mark.parametrize("path", daemon_paths())
def test_the_daemons_paths_are_the_hosts_at_the_same_place(path: str) -> None:
    assert model.host_path_of("nodeplug", path) == path
    assert not model.mount_covering("nodeplug", path).mount.get("readOnly", False)


@pytest.mark.parametrize("key", ["kubeletDir", "csi.pool.path"])
def test_mounts_the_daemon_makes_reach_the_host(key: str) -> None:
    # CSI publish targets below kubeletDir, and the pool's own loop mount (which must
    # outlive the container, or a restarted daemon would mount the image twice).
    found = model.mount_covering("nodeplug", setting(key))
    assert found.mount.get("mountPropagation") == "Bidirectional"
    assert model.container("nodeplug")["securityContext"]["privileged"] is True


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_the_sidecars_dial_the_daemons_csi_socket(sidecar: str) -> None:
    assert sidecar_flags()[sidecar]["--csi-address"] == csi_socket()
    assert model.host_path_of(sidecar, csi_socket()) == csi_socket()


def test_the_sidecars_are_the_only_other_containers() -> None:
    names = [c["name"] for c in model.pod_spec()["containers"]]
    assert sorted(names) == sorted(["nodeplug", *SIDECARS])


# --- the CSI objects and the sidecars -------------------------------------------------------


def test_the_csi_objects_name_the_driver() -> None:
    assert model.one("CSIDriver")["metadata"]["name"] == driver()
    assert model.one("StorageClass")["provisioner"] == driver()
    assert model.one("VolumeSnapshotClass")["driver"] == driver()


def test_the_csidriver_matches_what_runs() -> None:
    spec = model.one("CSIDriver")["spec"]
    names = {c["name"] for c in model.pod_spec()["containers"]}
    # No attach step: there is no csi-attacher to answer VolumeAttachments.
    assert spec["attachRequired"] is False and "csi-attacher" not in names
    # The scheduler reads capacity objects only if the provisioner publishes them.
    assert spec["storageCapacity"] is True
    assert sidecar_flags()["csi-provisioner"]["--enable-capacity"] == "true"
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    assert spec["podInfoOnMount"] is True
    assert spec["fsGroupPolicy"] == "File"


def test_volumes_are_created_where_their_pod_runs() -> None:
    storage_class = model.one("StorageClass")
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
    assert "allowedTopologies" not in storage_class


def test_nothing_sends_parameters_the_driver_would_refuse() -> None:
    # CreateVolume and CreateSnapshot reject every parameter (csi/controller.py).
    assert not model.one("StorageClass").get("parameters")
    assert not model.one("VolumeSnapshotClass").get("parameters")
    for flags in sidecar_flags().values():
        assert flags.get("--extra-create-metadata", "false") == "false"


def test_volume_expansion_is_offered_only_with_a_resizer() -> None:
    names = {c["name"] for c in model.pod_spec(model.deployment())["containers"]}
    expansion = model.one("StorageClass").get("allowVolumeExpansion", False)
    assert expansion == ("csi-resizer" in names)
    # Never beside the nodes' daemons: one resizer per node would each expand every volume.
    assert "csi-resizer" not in {c["name"] for c in model.pod_spec()["containers"]}


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_each_node_runs_its_own_sidecars(sidecar: str) -> None:
    flags = sidecar_flags()[sidecar]
    assert flags["--node-deployment"] == "true"
    # Leader election would leave all nodes but one without a working sidecar.
    assert flags.get("--leader-election", "false") == "false"


def go_duration(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match is not None, f"{value!r}: write sidecar durations as <n>s or <n>m"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_sidecar_timeouts_leave_room_for_the_slowest_call(sidecar: str) -> None:
    # Measured p99s are a few seconds at most (README "CSI driver"), but a create that
    # times out is retried by the sidecar and finds the first one still running: a
    # timeout shorter than a slow mkfs on a loaded node only adds retries.
    assert go_duration(sidecar_flags()[sidecar]["--timeout"]) >= SLOWEST_CALL_SECONDS


def test_the_provisioner_can_find_its_capacity_owner() -> None:
    flags = sidecar_flags()["csi-provisioner"]
    assert model.field_ref("csi-provisioner", "POD_NAME") == "metadata.name"
    assert model.field_ref("csi-provisioner", "NAMESPACE") == "metadata.namespace"
    # Level 1 from the pod is its controller, this DaemonSet: the walk reads both.
    assert flags["--capacity-ownerref-level"] == "1"
    role = roles()[("Role", "nodeplug-external-provisioner")]
    assert role["metadata"]["namespace"] == model.daemonset()["metadata"]["namespace"]
    assert allows(role["rules"], "", "pods", "get")
    assert allows(role["rules"], "apps", "daemonsets", "get")
    assert allows(role["rules"], "storage.k8s.io", "csistoragecapacities", "create")


# --- RBAC ---------------------------------------------------------------------------------


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in rules
    )


def roles() -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["kind"], r["metadata"]["name"]): r for r in model.objects("ClusterRole")} | {
        (r["kind"], r["metadata"]["name"]): r for r in model.objects("Role")
    }


# Which workload's service account each role is for: a sidecar's rights go to its own pod.
ROLE_HOLDERS = {
    "nodeplug-external-provisioner": "DaemonSet",
    "nodeplug-external-snapshotter": "DaemonSet",
    "nodeplug-dra": "DaemonSet",
    "nodeplug-external-resizer": "Deployment",
}


def test_rbac_binds_each_role_to_its_pods_service_account_and_nothing_else() -> None:
    namespace = model.daemonset()["metadata"]["namespace"]
    accounts = {
        kind: model.pod_spec(model.one(kind))["serviceAccountName"]
        for kind in ("DaemonSet", "Deployment")
    }
    assert len(set(accounts.values())) == 2, "the resizer's rights are not the nodes'"
    declared = {a["metadata"]["name"]: a["metadata"] for a in model.objects("ServiceAccount")}
    assert set(declared) == set(accounts.values())
    assert all(meta["namespace"] == namespace for meta in declared.values())
    bindings = model.objects("ClusterRoleBinding") + model.objects("RoleBinding")
    bound = set()
    for binding in bindings:
        reference = (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert reference in roles(), f"{binding['metadata']['name']} binds a missing role"
        account = accounts[ROLE_HOLDERS[reference[1]]]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        ]
        if binding["kind"] == "RoleBinding":
            assert binding["metadata"]["namespace"] == namespace
        bound.add(reference)
    assert bound == set(roles()), "a role that nothing binds"


@pytest.mark.parametrize(
    ("role", "group", "resource", "verb"),
    [
        ("nodeplug-external-provisioner", "", "persistentvolumes", "create"),
        ("nodeplug-external-provisioner", "", "persistentvolumes", "delete"),
        ("nodeplug-external-provisioner", "", "persistentvolumeclaims", "update"),
        ("nodeplug-external-provisioner", "storage.k8s.io", "csinodes", "watch"),
        ("nodeplug-external-provisioner", "snapshot.storage.k8s.io", "volumesnapshots", "update"),
        (
            "nodeplug-external-snapshotter",
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            "patch",
        ),
        (
            "nodeplug-external-snapshotter",
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents/status",
            "update",
        ),
        # external-resizer deploy/kubernetes/rbac.yaml
        ("nodeplug-external-resizer", "", "persistentvolumes", "patch"),
        ("nodeplug-external-resizer", "", "persistentvolumes", "watch"),
        ("nodeplug-external-resizer", "", "persistentvolumeclaims", "watch"),
        ("nodeplug-external-resizer", "", "persistentvolumeclaims/status", "patch"),
        ("nodeplug-external-resizer", "", "events", "create"),
        ("nodeplug-external-resizer", "storage.k8s.io", "volumeattributesclasses", "watch"),
    ],
)
def test_rbac_allows_what_the_sidecars_do(role: str, group: str, resource: str, verb: str) -> None:
    assert allows(roles()[("ClusterRole", role)]["rules"], group, resource, verb)


def test_rbac_grants_no_wildcards_and_no_secrets() -> None:
    for role in roles().values():
        for rule in role["rules"]:
            words = rule["apiGroups"] + rule["resources"] + rule["verbs"]
            assert "*" not in words, role["metadata"]["name"]
            assert "secrets" not in rule["resources"], role["metadata"]["name"]


# --- the kustomize base ---------------------------------------------------------------------


def test_the_kustomization_lists_every_file_and_only_those() -> None:
    on_disk = {p.name for p in model.MANIFESTS.iterdir() if p.is_file()} - {"kustomization.yaml"}
    listed = list(model.kustomization()["resources"])
    listed += [file for files in model.generator_files().values() for file in files]
    assert sorted(listed) == sorted(on_disk)


def test_everything_namespaced_is_in_nodeplugs_namespace() -> None:
    namespace = model.one("Namespace")
    name = namespace["metadata"]["name"]
    # The pod is privileged: only a namespace that admits privileged pods can run it.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for file, document in model.resources():
        expected = None if document["kind"] in model.CLUSTER_SCOPED else name
        assert document["metadata"].get("namespace") == expected, file
    generators = model.kustomization()["configMapGenerator"]
    generators += model.kustomization()["secretGenerator"]
    assert {g["namespace"] for g in generators} == {name}


def test_the_config_maps_and_secrets_the_pod_mounts_exist() -> None:
    config_maps = {c["metadata"]["name"] for c in model.objects("ConfigMap")}
    config_maps |= {g["name"] for g in model.kustomization()["configMapGenerator"]}
    secrets = {g["name"] for g in model.kustomization()["secretGenerator"]}
    for volume in model.volumes().values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets


# --- updates and shutdown ---------------------------------------------------------------------


def test_termination_grace_covers_the_daemons_shutdown() -> None:
    # Worst case: every server's grace one after the other, then the process exits.
    needed = CSI_GRACE + REGISTRATION_GRACE + DEVICE_PLUGIN_GRACE + EXIT_HEADROOM
    assert model.pod_spec()["terminationGracePeriodSeconds"] >= needed


def test_a_node_never_runs_two_daemons() -> None:
    rolling = model.daemonset()["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0
    assert model.pod_spec()["hostNetwork"] is True  # and so one host port per node


def test_images_are_pinned() -> None:
    project = tomllib.loads((model.ROOT / "pyproject.toml").read_text())["project"]
    for workload in (model.daemonset(), model.deployment()):
        spec = model.pod_spec(workload)
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            if container["name"] in (*SIDECARS, RESIZER):
                pattern = r"registry\.k8s\.io/sig-storage/[a-z-]+:v\d+\.\d+\.\d+"
                assert re.fullmatch(pattern, image), container["name"]
            else:
                assert image == f"nodeplug:{project['version']}", container["name"]


# --- the expansion controller (controller.yaml) ------------------------------------------------


def controller_setting(dotted: str) -> Any:
    return dig(model.daemon_config(model.CONTROLLER_CONFIG), dotted)


def resizer_flags() -> dict[str, str]:
    return model.flags(RESIZER, model.deployment())


def test_the_controller_config_is_a_controller_for_the_nodes_driver(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(model.daemon_config_text(model.CONTROLLER_CONFIG))
    # As `nodeplug controller` reads it, and as `nodeplug run` would.
    for mode in (Mode.CONTROLLER, None):
        parsed = daemon_config.load(path, mode)
        assert parsed.csi is not None and parsed.csi.mode is Mode.CONTROLLER
        assert parsed.csi.driver_name == driver()
        assert parsed.node_features.file is None
        assert not parsed.device_plugins


def test_the_controller_runs_nodeplug_controller_with_its_mounted_config() -> None:
    nodeplug = model.container("nodeplug", model.deployment())
    assert nodeplug["command"] == ["nodeplug", "controller", "--config", str(DEFAULT_CONFIG)]
    found = model.mount_covering("nodeplug", str(DEFAULT_CONFIG), model.deployment())
    assert found.volume["configMap"]["name"] == model.CONTROLLER_CONFIG
    assert Path(found.container_path) == DEFAULT_CONFIG.parent
    assert "subPath" not in found.mount


def test_the_resizer_dials_the_controllers_socket() -> None:
    endpoint = controller_setting("csi.endpoint")
    assert resizer_flags()["--csi-address"] == endpoint
    served = model.mount_covering("nodeplug", endpoint, model.deployment())
    dialled = model.mount_covering(RESIZER, endpoint, model.deployment())
    assert served.mount["name"] == dialled.mount["name"]
    assert served.container_path == dialled.container_path
    assert "emptyDir" in served.volume  # the pod's own: nothing of a node
    assert not dialled.mount.get("readOnly", False)  # connect() needs write access


def test_the_controller_and_the_resizer_run_as_one_user() -> None:
    # The socket is 0600, its owner's: the sidecar must be the same user to dial it.
    spec = model.pod_spec(model.deployment())
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in spec["containers"]:
        assert "runAsUser" not in container.get("securityContext", {}), container["name"]


def test_one_resizer_acts_at_a_time() -> None:
    assert model.deployment()["spec"]["replicas"] == 1
    assert resizer_flags()["--leader-election"] == "true"
    role = roles()[("Role", "nodeplug-external-resizer")]
    assert role["metadata"]["namespace"] == model.deployment()["metadata"]["namespace"]
    for verb in ("get", "create", "update"):
        assert allows(role["rules"], "coordination.k8s.io", "leases", verb)


def test_the_resizer_watches_pods_only_if_rbac_lets_it() -> None:
    rules = roles()[("ClusterRole", "nodeplug-external-resizer")]["rules"]
    watches_pods = resizer_flags().get("--handle-volume-inuse-error", "true") != "false"
    assert watches_pods == allows(rules, "", "pods", "watch")


def test_the_resizer_timeout_is_stated_and_wide() -> None:
    assert go_duration(resizer_flags()["--timeout"]) >= SLOWEST_CALL_SECONDS


def test_the_controllers_probes_follow_its_http_address() -> None:
    _, _, port = controller_setting("http.address").rpartition(":")
    nodeplug = model.container("nodeplug", model.deployment())
    (named,) = [p for p in nodeplug["ports"] if p["name"] == "http"]
    assert named["containerPort"] == int(port)
    assert nodeplug["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert nodeplug["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("livenessProbe", "readinessProbe"):
        assert nodeplug[kind]["httpGet"]["port"] in {"http", int(port)}


# --- the credential provider ------------------------------------------------------------------


def generated_source(source: str) -> tuple[str, str]:
    """(generator name, file) that a source path in the init container comes from."""
    found = model.mount_covering(model.INSTALLER, source)
    volume = found.volume
    name = volume["configMap"]["name"] if "configMap" in volume else volume["secret"]["secretName"]
    return name, str(Path(source).relative_to(found.container_path))


def test_the_kubelet_finds_the_provider_where_it_is_installed() -> None:
    # The source is the image's zipapp: tests/manifests/test_dockerfile.py checks it.
    source, mode = model.installs()[model.installed_binary()]
    assert mode == "0755"
    assert Path(source).name == model.provider()["name"]


def test_the_kubelet_reads_the_config_that_is_installed() -> None:
    source, mode = model.installs()[model.kubelet_flags()["--image-credential-provider-config"]]
    assert mode == "0644"  # the kubelet's config holds no secret
    name, file = generated_source(source)
    assert file in model.generator_files()[name]
    assert file == "credential-provider-config.yaml"


def test_the_provider_reads_the_config_that_is_installed() -> None:
    config, cache_dir = _options(model.provider()["args"])
    source, mode = model.installs()[config]
    assert mode == "0600"  # the provider refuses a config others can read
    name, file = generated_source(source)
    assert file in model.generator_files()[name]
    assert name in {g["name"] for g in model.kustomization()["secretGenerator"]}
    # Its cache is part of nodeplug's state on the node.
    assert cache_dir is not None and Path(cache_dir).is_relative_to(setting("stateDir"))


def test_the_init_container_installs_nothing_else() -> None:
    expected = {
        model.installed_binary(),
        model.kubelet_flags()["--image-credential-provider-config"],
        _options(model.provider()["args"])[0],
    }
    assert set(model.installs()) == expected


def run_install_script(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = model.container(model.INSTALLER)["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return subprocess.run(
        [*command, *arguments], capture_output=True, text=True, timeout=30, check=False
    )


def test_the_install_script_replaces_each_file_whole(tmp_path: Path) -> None:
    source = tmp_path / "provider"
    source.write_bytes(b"#!/usr/bin/env python3\nnew\n")
    target = tmp_path / "bin" / "provider"
    target.parent.mkdir()
    target.write_bytes(b"old")
    old_inode = target.stat().st_ino
    secret = tmp_path / "config.toml"
    secret.write_text("x = 1\n")
    result = run_install_script(
        str(source), str(target), "0755", str(secret), str(tmp_path / "bin" / "c.toml"), "0600"
    )
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == source.read_bytes()
    # Renamed over the old file, never rewritten in place: a running exec keeps its file.
    assert target.stat().st_ino != old_inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "bin" / "c.toml").stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["c.toml", "provider"]


def test_the_install_script_refuses_a_broken_argument_list(tmp_path: Path) -> None:
    source = tmp_path / "provider"
    source.write_text("x")
    result = run_install_script(str(source), str(tmp_path / "target"))
    assert result.returncode == 2
    assert "threes" in result.stderr
