"""`nodeplug doctor` against a made-up node it is pointed at (good and broken), against
real mounts, and on this machine as it is; it never changes anything."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from daemon import doctor, mountinfo
from daemon.doctor.kubelet import parse_flags, parse_version
from daemon.doctor.report import Report
from daemon.hostprobe import Host
from daemon.terminal import Status, Style

NODEPLUG = Path(sys.executable).with_name("nodeplug")
DRIVER = "local.csi.nodeplug.io"
KUBELET_PID = 4242


class Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok" if self.path == "/healthz" else b"not found"
        self.send_response(200 if body == b"ok" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def healthz() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zipapp") / "nodeplug-credential-provider"
    subprocess.run(
        [sys.executable, "-m", "credprovider.build", "-o", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def mount_line(mount_id: int, point: Path, fs: str, source: str, tags: str) -> str:
    return f"{mount_id} 1 0:{mount_id} / {point} rw {tags} - {fs} {source} rw"


@dataclass
class Node:
    """A node's layout under one directory: /proc, /sys, /etc, the kubelet, the pool."""

    root: Path
    config: Path
    host: Host
    healthz_port: int

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "var/lib/kubelet"

    @property
    def pool(self) -> Path:
        return self.root / "var/lib/nodeplug/pool"

    @property
    def state(self) -> Path:
        return self.root / "var/lib/nodeplug/state"

    @property
    def bin_dir(self) -> Path:
        return self.root / "usr/local/lib/kubelet/credential-provider"

    @property
    def etc(self) -> Path:
        return self.host.etc

    def kubelet_argv(self, **flags: str) -> None:
        argv = ["/usr/bin/kubelet"] + [f"--{name}={value}" for name, value in flags.items()]
        (self.host.proc / str(KUBELET_PID) / "cmdline").write_bytes(
            b"\0".join(arg.encode() for arg in argv) + b"\0"
        )

    def default_flags(self) -> dict[str, str]:
        return {
            "root-dir": str(self.kubelet_dir),
            "config": str(self.etc / "kubelet-config.yaml"),
            "image-credential-provider-config": str(self.etc / "credential-provider.yaml"),
            "image-credential-provider-bin-dir": str(self.bin_dir),
        }

    def kubelet_version(self, version: str) -> None:
        script = self.root / "kubelet-binary"
        script.write_text(f"#!/bin/sh\necho 'Kubernetes {version}'\n")
        script.chmod(0o755)

    def mounts(self, kubelet_tags: str = "shared:1", pool: bool = True) -> None:
        lines = [mount_line(1, Path("/"), "ext4", "/dev/vda", "shared:1")]
        lines.append(mount_line(2, self.kubelet_dir, "ext4", "/dev/vda", kubelet_tags))
        if pool:
            lines.append(mount_line(3, self.pool, "btrfs", "/dev/loop1", "shared:3"))
        (self.host.proc / "self" / "mountinfo").write_text("\n".join(lines) + "\n")

    def snapshot(self) -> dict[str, tuple[int, int, str]]:
        """Every path below root: mode, size, content hash (files)."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            info = path.lstat()
            digest = ""
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path)] = (info.st_mode, info.st_size, digest)
        return found


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def node(short_tmp: Path, healthz: int, zipapp: Path) -> Node:
    """A node on which every check passes."""
    root = short_tmp
    host = Host(
        proc=root / "proc",
        sys=root / "sys",
        dev=root / "dev",
        modules=root / "lib/modules",
        etc=root / "etc",
        kernel_release="6.1.0-test",
    )
    made = Node(root, root / "etc/nodeplug/config.yaml", host, healthz)
    # /proc: the kubelet's process, the kernel's filesystems, our mount table.
    (host.proc / str(KUBELET_PID)).mkdir(parents=True)
    (host.proc / "self").mkdir()
    write(host.proc / str(KUBELET_PID) / "comm", "kubelet\n")
    made.kubelet_version("v1.31.2")
    (host.proc / str(KUBELET_PID) / "exe").symlink_to(root / "kubelet-binary")
    made.kubelet_argv(**made.default_flags())
    write(host.proc / "filesystems", "nodev\tsysfs\nnodev\ttmpfs\n\text4\n\tbtrfs\n")
    made.mounts()
    # /sys: two loop devices, one in use; the pool's btrfs with quotas on.
    (host.sys / "block/loop0/loop").mkdir(parents=True)
    write(host.sys / "block/loop0/loop/backing_file", "/elsewhere.img\n")
    (host.sys / "block/loop1").mkdir(parents=True)
    (host.sys / "fs/btrfs/1234-abcd/devices/loop1").mkdir(parents=True)
    (host.sys / "fs/btrfs/1234-abcd/qgroups").mkdir()
    # The kubelet's directories and socket.
    (made.kubelet_dir / "device-plugins").mkdir(parents=True)
    (made.kubelet_dir / "plugins_registry").mkdir()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(made.kubelet_dir / "device-plugins/kubelet.sock"))
    write(made.etc / "kubelet-config.yaml", yaml.safe_dump({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz,
    }))  # fmt: skip
    # The pool and the daemon's state, private to root.
    for directory in (made.pool / "volumes", made.pool / "snapshots", made.state):
        directory.mkdir(parents=True, exist_ok=True)
    for directory in (made.pool, made.pool / "volumes", made.pool / "snapshots", made.state):
        directory.chmod(0o700)
    write(made.state / "csi-state.json", "{}", 0o600)
    # containerd with CDI on, reading our spec directory.
    cdi = root / "var/run/cdi"
    write(made.etc / "containerd/config.toml", (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        "  enable_cdi = true\n"
        f'  cdi_spec_dirs = ["/etc/cdi", "{cdi}"]\n'
    ))  # fmt: skip
    # The credential provider as the DaemonSet installs it.
    made.bin_dir.mkdir(parents=True)
    shutil.copy(zipapp, made.bin_dir / "nodeplug-credential-provider")
    provider_toml = write(
        made.etc / "nodeplug/credential-provider.toml",
        '[[static]]\nregistry = "registry.example.com"\nusername = "u"\npassword = "p"\n',
        0o600,
    )
    write(made.etc / "credential-provider.yaml", yaml.safe_dump({
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [{
            "name": "nodeplug-credential-provider",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "matchImages": ["registry.example.com"],
            "defaultCacheDuration": "5m",
            "args": [f"--config={provider_toml}"],
        }],
    }))  # fmt: skip
    write(made.config, yaml.safe_dump({
        "kubeletDir": str(made.kubelet_dir),
        "devicePluginDir": str(made.kubelet_dir / "device-plugins"),
        "stateDir": str(made.state),
        "cdi": {"dir": str(cdi)},
        "devicePlugins": [{
            "resourceName": "example.com/widget",
            "backend": "simulated",
            "config": {"count": 2},
            "cdi": True,
        }],
        "csi": {"driverName": DRIVER, "nodeId": "node-1", "pool": {"path": str(made.pool)}},
    }))  # fmt: skip
    return made


def failures(report: Report) -> dict[tuple[str, str], str]:
    return {(c.section, c.name): c.detail for c in report.checks if c.status is Status.FAIL}


def test_a_good_node_passes_every_check(node: Node) -> None:
    report = doctor.examine(node.config, node.host)
    assert failures(report) == {}
    assert report.ok
    statuses = {(c.section, c.name): c.status for c in report.checks}
    for name in ("process", "version", "healthz", "root dir", "device plugins", "features"):
        assert statuses[("kubelet", name)] is Status.OK, name
    for name in ("btrfs", "loop devices", "pool", "quotas", "file modes", "propagation"):
        assert statuses[("CSI", name)] is Status.OK, name
    assert statuses[("devices", "example.com/widget")] is Status.OK
    assert statuses[("devices", "containerd CDI")] is Status.OK
    assert statuses[("credential provider", "nodeplug-credential-provider")] is Status.OK
    version = next(c for c in report.checks if c.name == "version")
    assert version.detail == "Kubernetes v1.31.2"


def no_btrfs_pool(node: Node) -> None:
    node.mounts(pool=False)


def wrong_modes(node: Node) -> None:
    node.state.chmod(0o755)
    (node.state / "csi-state.json").chmod(0o644)


def missing_provider_binary(node: Node) -> None:
    (node.bin_dir / "nodeplug-credential-provider").unlink()


def propagation_private(node: Node) -> None:
    node.mounts(kubelet_tags="")


def propagation_slave(node: Node) -> None:
    node.mounts(kubelet_tags="master:1")


def no_btrfs_in_kernel(node: Node) -> None:
    write(node.host.proc / "filesystems", "nodev\tsysfs\n\text4\n")


def btrfs_as_a_module(node: Node) -> None:
    write(node.host.proc / "filesystems", "nodev\tsysfs\n\text4\n")
    write(node.root / "lib/modules/6.1.0-test/modules.dep", "kernel/fs/btrfs/btrfs.ko.zst: x\n")


def every_loop_device_busy(node: Node) -> None:
    (node.host.sys / "block/loop1/loop").mkdir()


def kubelet_too_old_for_cdi(node: Node) -> None:
    node.kubelet_version("v1.27.9")


def kubelet_1_28_without_the_gate(node: Node) -> None:
    node.kubelet_version("v1.28.3")


def kubelet_1_28_with_the_gate(node: Node) -> None:
    node.kubelet_version("v1.28.3")
    node.kubelet_argv(**node.default_flags(), **{"feature-gates": "DevicePluginCDIDevices=true"})


def serve_through_dra(node: Node, kubelet: str) -> None:
    config = yaml.safe_load(node.config.read_text())
    config["devicePlugins"][0]["api"] = "both"
    write(node.config, yaml.safe_dump(config))
    node.kubelet_version(kubelet)


def dra_on_a_1_31_kubelet(node: Node) -> None:
    serve_through_dra(node, "v1.31.4")


def dra_on_1_33_without_the_gate(node: Node) -> None:
    serve_through_dra(node, "v1.33.1")


def dra_on_1_33_with_the_gate_in_its_config(node: Node) -> None:
    serve_through_dra(node, "v1.33.1")
    kubelet_config = yaml.safe_load((node.etc / "kubelet-config.yaml").read_text())
    kubelet_config["featureGates"] = {"DynamicResourceAllocation": True}
    write(node.etc / "kubelet-config.yaml", yaml.safe_dump(kubelet_config))


def dra_on_1_34(node: Node) -> None:
    serve_through_dra(node, "v1.34.0")


def other_root_dir(node: Node) -> None:
    node.kubelet_argv(**{**node.default_flags(), "root-dir": "/srv/kubelet"})


def no_kubelet(node: Node) -> None:
    shutil.rmtree(node.host.proc / str(KUBELET_PID))


def healthz_down(node: Node) -> None:
    config = yaml.safe_load((node.etc / "kubelet-config.yaml").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        config["healthzPort"] = probe.getsockname()[1]  # closed again at once: refused
    write(node.etc / "kubelet-config.yaml", yaml.safe_dump(config))


def containerd_cdi_off(node: Node) -> None:
    write(node.etc / "containerd/config.toml", "version = 2\n")


def containerd_3_defaults_miss_our_dir(node: Node) -> None:
    write(node.etc / "containerd/config.toml", "version = 3\n")


def provider_config_invalid(node: Node) -> None:
    write(node.etc / "credential-provider.yaml", "kind: CredentialProviderConfig\nproviders: []\n")


def provider_toml_readable_by_others(node: Node) -> None:
    (node.etc / "nodeplug/credential-provider.toml").chmod(0o644)


def provider_binary_writable_by_others(node: Node) -> None:
    (node.bin_dir / "nodeplug-credential-provider").chmod(0o777)


def no_credential_flags(node: Node) -> None:
    flags = node.default_flags()
    del flags["image-credential-provider-config"], flags["image-credential-provider-bin-dir"]
    node.kubelet_argv(**flags)


def bad_nodeplug_config(node: Node) -> None:
    write(node.config, "devicePlugins: [{resourceName: nope}]\n")


@pytest.mark.parametrize(
    ("breakage", "failed", "says"),
    [
        (no_btrfs_pool, {("CSI", "pool")}, "is not a mount point"),
        (wrong_modes, {("CSI", "file modes")}, "state is 0755"),
        (missing_provider_binary, {("credential provider", "nodeplug-credential-provider")},
         "is missing: the kubelet refuses to start"),
        (propagation_private, {("CSI", "propagation")}, "(private): volumes mounted here"),
        (propagation_slave, {("CSI", "propagation")}, "(slave): volumes mounted here"),
        (no_btrfs_in_kernel, {("CSI", "btrfs")}, "this kernel has no btrfs"),
        (btrfs_as_a_module, set(), ""),
        (every_loop_device_busy, set(), ""),
        (kubelet_too_old_for_cdi, {("kubelet", "features")}, "needs kubelet 1.28+, this is 1.27"),
        (kubelet_1_28_without_the_gate, {("kubelet", "features")}, "DevicePluginCDIDevices"),
        (kubelet_1_28_with_the_gate, set(), ""),
        (dra_on_a_1_31_kubelet, {("kubelet", "features")}, "needs kubelet 1.32+, this is 1.31"),
        (dra_on_1_33_without_the_gate, {("kubelet", "features")}, "DynamicResourceAllocation"),
        (dra_on_1_33_with_the_gate_in_its_config, set(), ""),
        (dra_on_1_34, set(), ""),
        (other_root_dir, {("kubelet", "root dir")}, "--root-dir is /srv/kubelet"),
        (no_kubelet, {("kubelet", "process")}, "no kubelet process"),
        (healthz_down, {("kubelet", "healthz")}, "Connection refused"),
        (containerd_cdi_off, {("devices", "containerd CDI")}, "enable_cdi not set"),
        (containerd_3_defaults_miss_our_dir, {("devices", "containerd CDI")}, "is not among them"),
        (provider_config_invalid, {("credential provider", "provider config")}, "apiVersion None"),
        (provider_toml_readable_by_others,
         {("credential provider", "nodeplug-credential-provider")}, "group or others"),
        (provider_binary_writable_by_others,
         {("credential provider", "nodeplug-credential-provider")}, "is 0777"),
        (no_credential_flags, set(), ""),
        # The other checks then use the defaults (/var/lib/kubelet): not this node's.
        (bad_nodeplug_config,
         {("config", "config"), ("kubelet", "root dir"), ("kubelet", "device plugins"),
          ("kubelet", "plugin registry")}, "devicePlugins[0].backend"),
    ],
)  # fmt: skip
def test_each_broken_part_fails_its_own_check_with_a_remedy(
    node: Node, breakage: Callable[[Node], None], failed: set[tuple[str, str]], says: str
) -> None:
    breakage(node)
    report = doctor.examine(node.config, node.host)
    assert set(failures(report)) == failed, report.lines(Style(colour=False, symbols=True))
    assert report.ok is (not failed)
    failed_checks = [check for check in report.checks if check.status is Status.FAIL]
    assert all(check.remedy for check in failed_checks), failed_checks
    assert not failed or any(says in check.detail for check in failed_checks), failed_checks


@pytest.mark.parametrize(
    ("breakage", "warned"),
    [
        (btrfs_as_a_module, None),
        (every_loop_device_busy, ("CSI", "loop devices")),
        (no_credential_flags, ("credential provider", "kubelet flags")),
        (containerd_cdi_off, None),
    ],
)
def test_what_only_may_be_wrong_is_a_warning(
    node: Node, breakage: Callable[[Node], None], warned: tuple[str, str] | None
) -> None:
    breakage(node)
    report = doctor.examine(node.config, node.host)
    warnings = {(c.section, c.name) for c in report.checks if c.status is Status.WARN}
    assert warnings == ({warned} if warned else set())


def test_doctor_changes_nothing_on_the_node(node: Node) -> None:
    before = node.snapshot()
    doctor.examine(node.config, node.host)
    assert node.snapshot() == before


def test_the_output_names_each_problem_and_its_remedy(node: Node) -> None:
    propagation_private(node)
    lines = doctor.examine(node.config, node.host).lines(Style(colour=False, symbols=False))
    text = "\n".join(lines)
    assert "FAIL propagation" in text
    assert "-> mount the kubelet directory into the pod with mountPropagation" in text
    assert lines[-1].startswith("  FAIL summary") and "1 failed" in lines[-1]


@pytest.mark.parametrize(
    ("argv", "flags"),
    [
        (["kubelet", "--root-dir=/a", "--v", "2"], {"root-dir": "/a", "v": "2"}),
        (["kubelet", "--config", "/c", "--fail-swap-on"], {"config": "/c", "fail-swap-on": "true"}),
        (["kubelet", "--x=a=b", "-v=3"], {"x": "a=b", "v": "3"}),
    ],
)  # fmt: skip
def test_kubelet_flags_parse_as_pflag_reads_them(argv: list[str], flags: dict[str, str]) -> None:
    assert parse_flags(argv) == flags


@pytest.mark.parametrize(
    ("text", "version"),
    [("Kubernetes v1.31.2", (1, 31)), ("Kubernetes v1.28.0-eks-1", (1, 28)), ("", None)],
)
def test_kubelet_versions(text: str, version: tuple[int, int] | None) -> None:
    assert parse_version(text) == version


# --- real mounts ------------------------------------------------------------------------


@pytest.fixture
def bind_mounted(short_tmp: Path) -> Iterator[Path]:
    """A directory bind-mounted onto itself (a mount of its own), unmounted after."""
    directory = short_tmp / "kubelet"
    directory.mkdir()
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.mark.root
@pytest.mark.parametrize(
    ("make", "status"), [("--make-private", Status.FAIL), ("--make-shared", Status.OK)]
)
def test_propagation_of_a_real_mount(
    bind_mounted: Path, short_tmp: Path, make: str, status: Status
) -> None:
    subprocess.run(["mount", make, str(bind_mounted)], check=True)
    config = write(short_tmp / "config.yaml", yaml.safe_dump({
        "kubeletDir": str(bind_mounted),
        "csi": {"driverName": DRIVER, "nodeId": "n", "pool": {"path": str(short_tmp / "pool")}},
    }))  # fmt: skip
    report = doctor.examine(config)
    propagation = next(c for c in report.checks if c.name == "propagation")
    assert propagation.status is status, propagation
    assert str(bind_mounted) in propagation.detail
    real = mountinfo.containing(mountinfo.read(), bind_mounted)
    assert real is not None and real.mount_point == bind_mounted
    pool = next(c for c in report.checks if c.name == "pool")
    assert pool.status is Status.FAIL and "is not a mount point" in pool.detail


# --- this machine, as it is -----------------------------------------------------------------


# Paths doctor reads and must never create (other users may change mounts and loop
# devices meanwhile, so those are checked on the made-up node instead).
READ_ONLY_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/run/cdi"),
    Path("/etc/nodeplug"),
    Path("/var/lib/nodeplug"),
)


@pytest.mark.parametrize("output", ["json", "table"])
def test_on_this_machine_as_it_is(output: str, short_tmp: Path) -> None:
    before = {path: path.exists() for path in READ_ONLY_PATHS}
    result = subprocess.run(
        [str(NODEPLUG), "doctor", "--config", str(short_tmp / "absent.yaml"), "-o", output],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode in (0, 1), result.stderr
    if output == "json":
        document = json.loads(result.stdout)
        assert result.returncode == (0 if document["ok"] else 1)
        sections = {check["section"] for check in document["checks"]}
        assert sections == {"config", "kubelet", "CSI", "devices", "credential provider"}
        assert all(c["status"] in {"ok", "warn", "fail", "skip"} for c in document["checks"])
        assert any(c["name"] == "config" and c["status"] == "fail" for c in document["checks"])
    else:
        assert "\033[" not in result.stdout
        assert "summary" in result.stdout.splitlines()[-1]
    assert {path: path.exists() for path in READ_ONLY_PATHS} == before
    assert str(short_tmp) not in Path("/proc/self/mountinfo").read_text()
