"""A Ray cluster of several nodes on this machine, started with `ray start` (not ray.cluster_utils), so each node
is its own process tree with the environment and mount namespace the test gives it.

The head has no CPUs or GPUs (it runs the GCS only); each `add_node` starts a raylet that joins it, with its own
ports. `hidden` mounts an empty tmpfs over a directory for that node alone (`unshare -m`, root only): the node
sees another directory at the same path, as a node-local disk would. Drivers join with RAY_ADDRESS=`address`.
`stop()` ends only this cluster's processes (never `ray stop`, which ends every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil

VENV_BIN = str(Path(os.sys.executable).parent)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def can_hide_directories() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


def clean_env(drop_prefixes: tuple[str, ...] = ("RAY_", "PYTEST_"), drop: tuple[str, ...] = ()) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop}


class PrivateCluster:
    def __init__(self, env: dict[str, str] | None = None):
        self.tag = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="saeray-pc-", dir="/tmp")  # Ray's sockets need a short path
        self.env = {**(env if env is not None else clean_env()), "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0", "SAERAY_TEST_RAY_TAG": self.tag,
                    "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
        self.gcs = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.gcs}"
        self.raylets: list[int] = []
        self._start(["--head", f"--port={self.gcs}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
                     f"--temp-dir={self.temp_dir}"], self.env)

    def _start(self, args: list[str], env: dict[str, str], hidden: Path | None = None) -> None:
        """`ray start` a node; once more, after ending what the failed try left, when Ray reports that the node
        timed out during startup (a loaded 2-core machine sometimes makes a raylet miss Ray's own deadline)."""
        before = {p.pid for p in self._processes()}
        try:
            self._start_once(args, env, hidden)
        except RuntimeError as e:
            if "timed out during startup" not in str(e):
                raise
            for p in self._processes():
                if p.pid not in before:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            self._start_once(args, env, hidden)

    def _start_once(self, args: list[str], env: dict[str, str], hidden: Path | None = None) -> None:
        node_mgr, obj_mgr, agent_http, agent_grpc, metrics, rt_agent = free_ports(6)
        cmd = ["ray", "start", *args, f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
               "--object-store-memory=100000000", "--disable-usage-stats"]
        if hidden is not None:
            line = " ".join(f"'{a}'" for a in cmd)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs saeray-hidden '{hidden}' && exec {line}"]
        before = set(self._raylet_pids())
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        deadline = time.time() + 30
        while time.time() < deadline:
            new = set(self._raylet_pids()) - before
            if new:
                self.raylets.extend(sorted(new))
                return
            time.sleep(0.1)
        if "--head" not in args:
            raise RuntimeError("the node's raylet did not appear")

    def add_node(self, cpus: int = 1, gpus: int = 1, env: dict[str, str] | None = None,
                 hidden: Path | None = None) -> int:
        """Start a node; returns its raylet's pid."""
        env = {**(env if env is not None else self.env), "SAERAY_TEST_RAY_TAG": self.tag,
               "RAY_AUTH_MODE": "disabled", "PATH": self.env["PATH"]}
        self._start([f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"], env, hidden)
        return self.raylets[-1]

    def _processes(self) -> list[psutil.Process]:
        out = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []) or \
                        p.environ().get("SAERAY_TEST_RAY_TAG") == self.tag:
                    out[p.pid] = p
            except (psutil.Error, OSError):
                continue
        for p in list(out.values()):
            try:
                for c in p.children(recursive=True):
                    out.setdefault(c.pid, c)
            except psutil.Error:
                continue
        return [p for p in out.values() if p.pid != os.getpid()]

    def _raylet_pids(self) -> list[int]:
        pids = []
        for p in self._processes():
            try:
                if p.name() == "raylet":
                    pids.append(p.pid)
            except psutil.Error:
                continue
        return pids

    def node_of(self, pid: int) -> int | None:
        """The raylet (of this cluster) that process `pid` runs under."""
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.Error:
            return None
        return next((r for r in self.raylets if r in ancestors), None)

    def stop(self) -> None:
        for sig in ("terminate", "kill"):
            procs = self._processes()
            for p in procs:
                try:
                    getattr(p, sig)()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logs_text(self) -> str:
        """Everything Ray wrote under this cluster's temp dir (logs of every node), as text."""
        chunks = []
        for f in Path(self.temp_dir).rglob("*"):
            if f.is_file() and not f.is_symlink():
                try:
                    chunks.append(f.read_bytes().decode(errors="replace"))
                except OSError:
                    continue
        return "\n".join(chunks)
