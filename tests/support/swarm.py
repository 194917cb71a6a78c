"""A real multi-node Docker Swarm on one machine, for the cluster tests.

Each node is its own ``dockerd`` (with its own ``containerd``) in a network
namespace of its own; the nodes are joined by a Linux bridge living in a
"switch" namespace (not the host's: the host's FORWARD policy and bridge
netfilter would drop frames between nodes), and the host reaches every node
through one veth pair into that switch. A ``docker-registry`` (Debian's
distribution v2.8, see scripts/setup.sh) listens on the host's end of that
pair, so the host and every node reach it. Node 1 is the manager; the others
join as workers. The facts this follows are measured in
``../shared/CLUSTER-NOTES.md``.

Everything a cluster makes carries its id ``bsw-<run id[:6]><4 hex>``: the
network namespaces ``bsw-<id>-sw`` / ``bsw-<id>-nN``, the host's veth
``bsw<id>h``, the directories ``/run/bsw-<id>`` (sockets, pid files, exec
roots, logs, the owner file) and ``/var/lib/bsw-<id>`` (data roots, registry
storage), the cgroup parent ``/bsw-<id>-nN`` of each node's containers and the
hostname of each node. :func:`sweep_stale_clusters` removes only clusters whose
owner process (recorded in ``/run/bsw-<id>/owner``) is gone.

The machine's main Docker engine is only ever read from (``import_image``
saves an image out of it); it never becomes part of a swarm.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests

from tests.support.docker_engine import RUN_ID, engine

PREFIX = "bsw-"
RUN_BASE = pathlib.Path("/run")
DATA_BASE = pathlib.Path("/var/lib")
NETNS_DIR = pathlib.Path("/run/netns")
CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
LOCK_FILE = pathlib.Path("/run/bsw.lock")  # serialises address allocation between concurrent runs
REGISTRY_BIN_CANDIDATES = (
    os.environ.get("BERTH_DOCKER_REGISTRY", ""),
    "/opt/berth-docker-registry/usr/bin/docker-registry",
    "/usr/bin/docker-registry",
)
API_VERSION = "1.41"
MAIN_SOCKET = "/run/docker.sock"  # the machine's engine; inside a node, its own engine instead
SWITCH_NET = ipaddress.ip_network("10.201.0.0/16")  # one /24 of it per cluster: host .1, node i .(10+i)
SWARM_POOL = "10.216.0.0/16"  # overlay networks; exists only inside the node namespaces
HEARTBEAT_NS = 1_000_000_000  # 1 s dispatcher heartbeat: a dead node is Down in ~2.5 s
START_TIMEOUT = 60.0
_ID_RE = re.compile(r"bsw-?([0-9a-f]{10})")


class ClusterError(RuntimeError):
    """The cluster could not be built (the message carries the log tail)."""


@dataclasses.dataclass
class Node:
    name: str  # the node's hostname, hence its swarm node name
    address: str  # on the switch; reachable from the host
    docker_host: str  # unix:///run/bsw-<id>/nN.sock
    pid: int  # the node's dockerd (changes on restart_node)


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _process_start(pid: int) -> int | None:
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _deadline_loop(timeout: float, interval: float = 0.1) -> Iterator[int]:
    """Yields until ``timeout`` seconds have passed, sleeping ``interval``
    between rounds (a bounded poll)."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        yield n
        n += 1
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


class SwarmCluster:
    """``nodes`` dockerds in network namespaces, a registry, an initialised
    swarm (node 1 manager, the rest workers). Use as a context manager, or
    ``start()`` / ``stop()``; ``stop()`` is safe to call after any failure."""

    def __init__(self, nodes: int = 3, run_id: str | None = None) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("a cluster has 1 to 9 nodes")
        run = re.sub(r"[^0-9a-f]", "", (run_id or RUN_ID).lower())[:6].ljust(6, "0")
        self.id = run + secrets.token_hex(2)
        self.size = nodes
        self.run_dir = RUN_BASE / f"{PREFIX}{self.id}"
        self.data_dir = DATA_BASE / f"{PREFIX}{self.id}"
        self.switch_ns = f"{PREFIX}{self.id}-sw"
        self.host_link = f"bsw{self.id}h"
        self.nodes: list[Node] = []
        self.registry = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # node index -> dockerd
        self._registry_proc: subprocess.Popen[bytes] | None = None
        self._clients: dict[int, docker.DockerClient] = {}
        self.teardown_phases: dict[str, float] = {}  # seconds per step of the last stop()

    # -- names -------------------------------------------------------------
    def node_ns(self, i: int) -> str:
        return f"{PREFIX}{self.id}-n{i + 1}"

    def cgroup_parent(self, i: int) -> str:
        return f"/{PREFIX}{self.id}-n{i + 1}"

    @property
    def manager_host(self) -> str:
        return self.nodes[0].docker_host

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> SwarmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Builds the switch, the nodes, the registry and the swarm; on any
        failure tears down what it made and raises with the log tail."""
        registry_bin = registry_binary()
        try:
            self.run_dir.mkdir(mode=0o700)
            self.data_dir.mkdir(mode=0o700)
            # Written first, removed last: a sweep knows whose cluster this is.
            (self.run_dir / "owner").write_text(json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid())}))
            self._build_network()
            self._start_registry(registry_bin)
            for i in range(self.size):
                self._write_daemon_config(i)
                self._start_dockerd(i)
            for i in range(self.size):
                self._wait_dockerd(i)
            self._init_swarm()
        except BaseException:
            self.stop()
            raise

    def _build_network(self) -> None:
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = self._free_subnet()
            hosts = list(self.subnet.hosts())
            prefix = self.subnet.prefixlen
            _run("ip", "netns", "add", self.switch_ns)
            _run("ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch_ns, "link", "set", "lo", "up")
            _run("ip", "-n", self.switch_ns, "link", "set", "br0", "up")
            _run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "host", "netns", self.switch_ns)
            _run("ip", "addr", "add", f"{hosts[0]}/{prefix}", "dev", self.host_link)
            _run("ip", "link", "set", self.host_link, "up")
        _run("ip", "-n", self.switch_ns, "link", "set", "host", "master", "br0", "up")
        for i in range(self.size):
            ns, port = self.node_ns(i), f"n{i + 1}"
            address = str(hosts[9 + i + 1])
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", self.switch_ns, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            sock = self.run_dir / f"n{i + 1}.sock"
            self.nodes.append(Node(name=ns, address=address, docker_host=f"unix://{sock}", pid=0))

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of SWITCH_NET no route or address on the host overlaps,
        starting at one derived from the cluster id (under LOCK_FILE)."""
        used = []
        for line in _run("ip", "-4", "-o", "route", "show", "table", "all").stdout.splitlines():
            word = line.split()[0] if line.split() else ""
            if word and word[0].isdigit():
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(word, strict=False))
        for line in _run("ip", "-4", "-o", "addr").stdout.splitlines():
            parts = line.split()
            if "inet" in parts:
                used.append(ipaddress.ip_network(parts[parts.index("inet") + 1], strict=False))
        candidates = list(SWITCH_NET.subnets(new_prefix=24))
        start = int(hashlib.sha256(self.id.encode()).hexdigest(), 16) % len(candidates)
        for k in range(len(candidates)):
            net = candidates[(start + k) % len(candidates)]
            if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
                return net
        raise ClusterError(f"no free /24 left in {SWITCH_NET}")

    def _start_registry(self, binary: str) -> None:
        host = self._host_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        storage = self.data_dir / "registry"
        storage.mkdir()
        config = self.run_dir / "registry.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{host}:{port}'}}\n"
        )
        log = open(self.run_dir / "registry.log", "ab")
        self._registry_proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        log.close()
        self.registry = f"{host}:{port}"
        for _ in _deadline_loop(20):
            if self._registry_proc.poll() is not None:
                raise ClusterError(f"docker-registry exited:\n{_tail(self.run_dir / 'registry.log')}")
            try:
                if requests.get(f"http://{self.registry}/v2/", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
        raise ClusterError(f"docker-registry did not answer /v2/:\n{_tail(self.run_dir / 'registry.log')}")

    def _host_address(self) -> str:
        assert self.subnet is not None
        return str(next(self.subnet.hosts()))

    def _write_daemon_config(self, i: int) -> None:
        node_dir = self.run_dir / f"n{i + 1}"
        (node_dir / "cg").mkdir(parents=True)
        (self.data_dir / f"n{i + 1}").mkdir()
        config = {
            "bip": f"10.202.{i + 1}.1/24",
            "default-address-pools": [{"base": f"10.{210 + i}.0.0/16", "size": 24}],
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "cgroup-parent": self.cgroup_parent(i),
            "deprecated-key-path": str(self.data_dir / f"n{i + 1}" / "key.json"),
            "insecure-registries": [self.registry],
            "storage-driver": "overlay2",
            "log-level": "warn",
            "features": {"buildkit": False},
        }
        (node_dir / "daemon.json").write_text(json.dumps(config, indent=1))

    def _start_dockerd(self, i: int) -> None:
        """dockerd in node i's network namespace, in a mount and UTS namespace
        of its own: ``ip netns exec`` would remount /sys and hide the cgroups,
        so the cgroups are bound aside, a sysfs of this network namespace is
        mounted, and the cgroups are bound back."""
        n = f"n{i + 1}"
        node_dir = self.run_dir / n
        script = (
            "set -e\n"
            f"mount --rbind {CGROUP_ROOT} {node_dir}/cg\n"
            "mount -t sysfs sysfs /sys\n"
            f"mount --rbind {node_dir}/cg {CGROUP_ROOT}\n"
            f"umount -l {node_dir}/cg\n"
            f"hostname {self.nodes[i].name}\n"
            f"exec dockerd --config-file {node_dir}/daemon.json --data-root {self.data_dir / n}"
            f" --exec-root {node_dir}/exec --pidfile {node_dir}/dockerd.pid -H unix://{self.run_dir / n}.sock\n"
        )
        log = open(self.run_dir / f"{n}.log", "ab")
        proc = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / self.node_ns(i)}", "unshare", "--mount", "--uts",
             "--propagation", "slave", "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        self._procs[i] = proc
        self.nodes[i].pid = proc.pid  # nsenter, unshare and sh all exec: this is dockerd

    def _wait_dockerd(self, i: int, timeout: float = START_TIMEOUT) -> None:
        proc = self._procs[i]
        for _ in _deadline_loop(timeout, 0.1):
            if proc.poll() is not None:
                raise ClusterError(
                    f"dockerd of {self.nodes[i].name} exited ({proc.returncode}):\n{_tail(self.run_dir / f'n{i + 1}.log')}"
                )
            try:
                self.client(i).ping()
            except Exception:  # noqa: BLE001 - not listening yet
                self._drop_client(i)
                continue
            self._bind_engine_socket(i)
            return
        raise ClusterError(
            f"dockerd of {self.nodes[i].name} did not answer within {timeout:.0f} s:\n{_tail(self.run_dir / f'n{i + 1}.log')}"
        )

    def _bind_engine_socket(self, i: int) -> None:
        """Inside node i's mount namespace, /var/run/docker.sock is node i's
        own engine: a container that mounts the standard socket (a stack's
        scheduler) drives its node, never the machine's main engine."""
        if not os.path.exists(MAIN_SOCKET):
            return
        sock = self.nodes[i].docker_host.removeprefix("unix://")
        _run("nsenter", f"--target={self._procs[i].pid}", "--mount", "mount", "--bind", sock, MAIN_SOCKET)

    def _init_swarm(self) -> None:
        manager = self.client(0)
        try:
            manager.swarm.init(
                advertise_addr=self.nodes[0].address, listen_addr="0.0.0.0:2377",
                default_addr_pool=[SWARM_POOL], subnet_size=24, dispatcher_heartbeat_period=HEARTBEAT_NS,
            )
            manager.swarm.reload()
            token = manager.swarm.attrs["JoinTokens"]["Worker"]
            for i in range(1, self.size):
                self.client(i).swarm.join(
                    remote_addrs=[f"{self.nodes[0].address}:2377"], join_token=token,
                    advertise_addr=self.nodes[i].address, listen_addr="0.0.0.0:2377",
                )
        except docker.errors.APIError as exc:
            raise ClusterError(f"swarm init/join failed: {exc}\n{_tail(self.run_dir / 'n1.log')}") from exc
        self.wait_nodes_ready(timeout=30)

    # -- observation -------------------------------------------------------
    def client(self, i: int = 0) -> docker.DockerClient:
        """A docker-py client of node i's engine (cached; API 1.41)."""
        if i not in self._clients:
            self._clients[i] = docker.DockerClient(base_url=self.nodes[i].docker_host, version=API_VERSION, timeout=30)
        return self._clients[i]

    def _drop_client(self, i: int) -> None:
        c = self._clients.pop(i, None)
        if c is not None:
            c.close()

    def node_states(self) -> dict[str, tuple[str, str]]:
        """Hostname -> (Status.State, Availability) as the manager sees it."""
        return {
            n.attrs["Description"]["Hostname"]: (n.attrs["Status"]["State"], n.attrs["Spec"]["Availability"])
            for n in self.client(0).nodes.list()
        }

    def wait_node_state(self, i: int, state: str, timeout: float = 30) -> float:
        """Polls the manager until node i is ``state`` ("ready"/"down");
        returns the seconds it took. Raises ClusterError at the deadline."""
        t0 = time.monotonic()
        last: Any = None
        for _ in _deadline_loop(timeout, 0.05):
            last = self.node_states().get(self.nodes[i].name)
            if last and last[0] == state:
                return time.monotonic() - t0
        raise ClusterError(f"{self.nodes[i].name} not {state} within {timeout} s (last seen {last})")

    def wait_nodes_ready(self, timeout: float = 30) -> None:
        names = {n.name for n in self.nodes}
        last: dict[str, tuple[str, str]] = {}
        for _ in _deadline_loop(timeout, 0.05):
            last = self.node_states()
            if names <= {k for k, (state, _) in last.items() if state == "ready"}:
                return
        raise ClusterError(f"nodes not all ready within {timeout} s: {last}")

    # -- images ------------------------------------------------------------
    def import_image(self, ref: str) -> str:
        """Copies ``ref`` from the main engine (read only: ``docker save``)
        into the registry through node 1 (load, tag, push); returns
        ``REGISTRY/repo@sha256:…``, which every node can pull."""
        main = engine()
        node = self.client(0)
        loaded = node.images.load(main.images.get(ref).save(named=True))  # streamed, never held whole
        if not loaded:
            raise ClusterError(f"node 1 loaded nothing from {ref}")
        repo = ref.rsplit("@", 1)[0]
        name, _, tag = repo.rpartition(":") if ":" in repo.rsplit("/", 1)[-1] else (repo, "", "latest")
        target = f"{self.registry}/{name.rsplit('/', 1)[-1]}"
        loaded[0].tag(target, tag=tag)
        digest = ""
        for line in node.images.push(target, tag=tag, stream=True, decode=True):
            if "error" in line:
                raise ClusterError(f"push of {target}:{tag} failed: {line['error']}")
            digest = line.get("aux", {}).get("Digest", digest)
        if not digest:
            raise ClusterError(f"push of {target}:{tag} reported no digest")
        return f"{target}@{digest}"

    # -- faults ------------------------------------------------------------
    def kill_node(self, i: int) -> None:
        """SIGKILL node i's dockerd (its containerd follows it; the shims and
        containers survive until the dockerd restarts)."""
        proc = self._procs[i]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self._drop_client(i)

    def restart_node(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Starts node i's dockerd again and waits until it answers; it
        rejoins the swarm by itself (wait_node_state(i, "ready"))."""
        old = self._procs.get(i)
        if old is not None and old.poll() is None:
            raise ClusterError(f"{self.nodes[i].name}'s dockerd is still running")
        # The killed dockerd's containerd may still be finishing its exit.
        for _ in _deadline_loop(15, 0.1):
            if not _pids_in_netns(NETNS_DIR / self.node_ns(i), only=("containerd", "dockerd")):
                break
        self._start_dockerd(i)
        self._wait_dockerd(i, timeout)

    def link_down(self, i: int) -> None:
        """Cuts node i's cable to the switch."""
        _run("ip", "-n", self.switch_ns, "link", "set", f"n{i + 1}", "down")

    def link_up(self, i: int) -> None:
        _run("ip", "-n", self.switch_ns, "link", "set", f"n{i + 1}", "up")

    # -- teardown ----------------------------------------------------------
    def stop(self) -> None:
        """Tears everything down; idempotent and safe after a partial start."""
        for i in list(self._clients):
            self._drop_client(i)
        self.teardown_phases = _destroy(self.id, own=dict(self._procs), registry=self._registry_proc)
        self._procs.clear()
        self._registry_proc = None


# ---------------------------------------------------------------- teardown


def _pids_in_netns(ns_path: pathlib.Path, only: tuple[str, ...] | None = None) -> list[int]:
    try:
        target = os.stat(ns_path).st_ino
    except OSError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino != target:
                continue
            if only is not None and pathlib.Path(f"/proc/{entry.name}/comm").read_text().strip() not in only:
                continue
        except OSError:
            continue
        if _process_start(int(entry.name)) is not None:
            pids.append(int(entry.name))
    return pids


def _cgroup_dirs(cluster_id: str) -> list[pathlib.Path]:
    """Every cgroup directory of the cluster's nodes, deepest first."""
    found: list[pathlib.Path] = []
    try:
        controllers = list(CGROUP_ROOT.iterdir())
    except OSError:
        return []
    for controller in controllers:
        with contextlib.suppress(OSError):
            for top in controller.glob(f"{PREFIX}{cluster_id}-n*"):
                if top.is_dir():
                    found.extend(pathlib.Path(p) for p, _, _ in os.walk(top))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(cluster_id: str) -> set[int]:
    pids: set[int] = set()
    for d in _cgroup_dirs(cluster_id):
        with contextlib.suppress(OSError):
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return pids


def _pids_naming(cluster_id: str) -> list[int]:
    """Processes whose command line names the cluster's directories."""
    marks = (f"/run/{PREFIX}{cluster_id}".encode(), f"/var/lib/{PREFIX}{cluster_id}".encode())
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = pathlib.Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            pids.append(int(entry.name))
    return pids


def cluster_processes(cluster_id: str) -> list[int]:
    """Every live process of a cluster: its containers (by cgroup), every
    process in its namespaces, and those naming its directories."""
    pids = set(_cgroup_pids(cluster_id)) | set(_pids_naming(cluster_id))
    for ns in _netns_of(cluster_id):
        pids.update(_pids_in_netns(ns))
    return sorted(p for p in pids if _process_start(p) is not None)


def _netns_of(cluster_id: str) -> list[pathlib.Path]:
    with contextlib.suppress(OSError):
        return sorted(NETNS_DIR.glob(f"{PREFIX}{cluster_id}-*"))
    return []


def cluster_mounts(cluster_id: str) -> list[str]:
    """Mount points on the host carrying the cluster's id."""
    mark = f"{PREFIX}{cluster_id}"
    out = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if mark in point:
            out.append(point)
    return out


def cluster_leftovers(cluster_id: str) -> dict[str, list[str]]:
    """What of a cluster still exists on the machine (empty lists: nothing)."""
    links = [
        line.split(":")[1].strip().split("@")[0]
        for line in _run("ip", "-o", "link").stdout.splitlines()
        if f"bsw{cluster_id}" in line
    ]
    return {
        "namespaces": [p.name for p in _netns_of(cluster_id)],
        "processes": [str(p) for p in cluster_processes(cluster_id)],
        "mounts": cluster_mounts(cluster_id),
        "directories": [str(p) for p in (RUN_BASE / f"{PREFIX}{cluster_id}", DATA_BASE / f"{PREFIX}{cluster_id}") if p.exists()],
        "cgroups": [str(p) for p in _cgroup_dirs(cluster_id)],
        "links": links,
    }


def _kill(pids: list[int] | set[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _destroy(
    cluster_id: str,
    own: dict[int, subprocess.Popen[bytes]] | None = None,
    registry: subprocess.Popen[bytes] | None = None,
) -> dict[str, float]:
    """Removes every trace of one cluster; returns the seconds each step took.

    Nothing is kept, so nothing is stopped gracefully: the dockerds are
    SIGKILLed first (their containerds follow; no manager is left to restart
    a task), then the containers through their nodes' cgroup.procs, then
    whatever else runs in the cluster's namespaces or names its directories
    (shims, the registry); then cgroups, namespaces, the host veth and the
    directories go."""
    own = own or {}
    phases: dict[str, float] = {}
    t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        phases[name] = now - t
        t = now

    dockerds = {p.pid for p in own.values() if p.poll() is None}
    for ns in _netns_of(cluster_id):
        dockerds.update(_pids_in_netns(ns, only=("dockerd",)))
    _kill(dockerds)
    for proc in own.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    lap("dockerds")
    for _ in _deadline_loop(15, 0.05):
        pids = _cgroup_pids(cluster_id)
        if not pids:
            break
        _kill(pids)
    lap("containers")
    if registry is not None and registry.poll() is None:
        registry.kill()
    for _ in _deadline_loop(15, 0.05):
        left = cluster_processes(cluster_id)
        if not left:
            break
        _kill(left)
    if registry is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            registry.wait(timeout=10)
    lap("processes")
    for _ in _deadline_loop(10, 0.1):
        remaining = []
        for d in _cgroup_dirs(cluster_id):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                remaining.append(d)
        if not remaining:
            break
        _kill(_cgroup_pids(cluster_id))
    lap("cgroups")
    for ns in _netns_of(cluster_id):
        _run("ip", "netns", "delete", ns.name, check=False)
    _run("ip", "link", "delete", f"bsw{cluster_id}h", check=False)
    lap("network")
    for d in (DATA_BASE / f"{PREFIX}{cluster_id}", RUN_BASE / f"{PREFIX}{cluster_id}"):
        shutil.rmtree(d, ignore_errors=True)
    lap("directories")
    return phases


def _owner_alive(cluster_id: str) -> bool:
    try:
        owner = json.loads((RUN_BASE / f"{PREFIX}{cluster_id}" / "owner").read_text())
    except (OSError, ValueError):
        return False
    return owner.get("start") is not None and _process_start(int(owner["pid"])) == owner["start"]


def known_clusters() -> set[str]:
    """Ids of every cluster with any trace on the machine."""
    ids: set[str] = set()
    places: list[str] = []
    for base in (RUN_BASE, DATA_BASE, NETNS_DIR):
        with contextlib.suppress(OSError):
            places.extend(p.name for p in base.glob(f"{PREFIX}*"))
    with contextlib.suppress(OSError):
        for controller in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                places.extend(p.name for p in controller.glob(f"{PREFIX}*"))
    places.extend(line.split(":")[1].strip() for line in _run("ip", "-o", "link").stdout.splitlines() if "bsw" in line)
    for place in places:
        m = _ID_RE.match(place)
        if m:
            ids.add(m.group(1))
    return ids


def sweep_stale_clusters() -> list[str]:
    """Removes what crashed earlier runs left: every cluster whose owner
    process is gone. Live clusters (of this or a concurrent run) and anything
    not carrying the harness prefix are never touched. Returns the ids swept."""
    swept = []
    for cluster_id in sorted(known_clusters()):
        if _owner_alive(cluster_id):
            continue
        # A cluster being created writes its owner file first, so a missing
        # owner with a fresh directory may be a start in progress: leave it.
        run_dir = RUN_BASE / f"{PREFIX}{cluster_id}"
        with contextlib.suppress(OSError):
            if not (run_dir / "owner").exists() and time.time() - run_dir.stat().st_mtime < 10:
                continue
        _destroy(cluster_id)
        swept.append(cluster_id)
    return swept


def registry_binary() -> str:
    for candidate in REGISTRY_BIN_CANDIDATES:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ClusterError("no docker-registry binary: run scripts/setup.sh (it extracts Debian's docker-registry to /opt)")


def _harness_unavailable() -> str:
    if os.geteuid() != 0:
        return "the swarm harness needs root (network namespaces, dockerd)"
    for tool in ("ip", "nsenter", "unshare", "dockerd"):
        if shutil.which(tool) is None:
            return f"the swarm harness needs {tool}; run scripts/setup.sh"
    return ""


@pytest.fixture(scope="module")
def swarm_cluster() -> Iterator[SwarmCluster]:
    """A 3-node swarm for a test module: stale clusters of crashed runs are
    swept first, and the cluster is always torn down."""
    missing = _harness_unavailable()
    if missing:
        raise ClusterError(missing)
    sweep_stale_clusters()
    cluster = SwarmCluster(nodes=3)
    with cluster:
        yield cluster
