"""A saeray run on a multi-node Ray cluster on this machine, losing a node in the middle of a shard.

    python tests/cluster_driver.py SPEC.json RESULT.json

Run by tests/executors/test_cluster_faults.py in its own process (a driver can join only one Ray cluster,
and the test session may already have one). SPEC holds `config` (a raw saeray config),
`temp_dir` (Ray's, short), `victim_shard`, `pid_glob` (where that shard's attempt writes
`worker.pid`) and `nodes`. The cluster is `ray.cluster_utils.Cluster`: a head with no CPUs
(it runs only the GCS and this driver) and `nodes` worker nodes with 1 CPU and 1 logical GPU
each, so `workers: auto` starts one actor per node. When an attempt at `victim_shard` is
running, the node that runs it is removed without grace (raylet, object store and workers
killed at once), a replacement node is added, and the run goes on. RESULT says what happened.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 * 1024 * 1024}
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def node_running(cluster: Cluster, pid: int):
    """The worker node whose raylet started process `pid` (Ray workers are the raylet's children)."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for node in cluster.worker_nodes:
        if raylet_pid(node) in ancestors:
            return node
    return None


def remove_victim(cluster: Cluster, pid_glob: str, events: dict, raylets: dict[str, int]) -> None:
    """If an attempt at the victim shard is running, remove its node without grace and add a new one."""
    for f in glob.glob(pid_glob):
        try:
            pid = int(Path(f).read_text().split()[0])
            node = node_running(cluster, pid)
        except (OSError, ValueError, psutil.Error):
            continue
        if node is None:
            continue
        raylet, t0 = raylet_pid(node), time.time()
        # A lost machine takes all its processes at once: kill the node's workers with its raylet,
        # or a worker that outlives its raylet by a moment could still commit the shard.
        for p in psutil.Process(raylet).children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
        cluster.remove_node(node, allow_graceful=False)
        events["removed"].append({"pid": pid, "raylet": raylet, "attempt": Path(f).parent.name,
                                  "seconds": round(time.time() - t0, 2)})
        t0 = time.time()
        raylets["replacement"] = raylet_pid(cluster.add_node(**NODE))
        events["replacement_joined_after_s"] = round(time.time() - t0, 1)
        return


def track_markers(run_dir: Path, events: dict, raylets: dict[str, int]) -> None:
    """Record which node committed each new marker (its worker lives until the run ends)."""
    for m in (run_dir / "completions").glob("*.json"):
        if m.stem in events["shard_node"]:
            continue
        try:
            pid = json.loads(m.read_text())["pid"]
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
        events["shard_node"][m.stem] = next((name for name, rp in list(raylets.items()) if rp in ancestors), "unknown")


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    events: dict = {"removed": []}
    # Ray's Cluster writes the head's address to /tmp/ray/ray_current_cluster whatever temp_dir says, and
    # fails on a fresh machine where no Ray has made /tmp/ray yet
    os.makedirs("/tmp/ray", exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "temp_dir": spec["temp_dir"],
        "object_store_memory": 80 * 1024 * 1024, "_system_config": FAST_FAILURE_DETECTION})
    try:
        for _ in range(spec["nodes"]):
            cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}})
        raylets = {f"node-{i}": raylet_pid(n) for i, n in enumerate(cluster.worker_nodes)}
        events["shard_node"] = {}
        run_dir = Path(spec["config"]["output"]["dir"])

        def drive() -> None:  # the saeray driver; the main thread manages the cluster (Ray needs that)
            from saeray.engine import config
            from saeray.executors import RunFailed, run

            t0 = time.time()
            try:
                result = run(config.from_dict(spec["config"]), executor="ray", progress_every=2.0)
                events.update(done=sorted(result.done), skipped=result.skipped, errors={})
            except RunFailed as e:
                events.update(failed=str(e))
            except Exception:  # noqa: BLE001 - report it to the test
                events["exception"] = traceback.format_exc()
            events["seconds"] = round(time.time() - t0, 1)

        driver = threading.Thread(target=drive)
        driver.start()

        def tracker() -> None:  # its own thread: replacing a node blocks the main thread for seconds
            while driver.is_alive():
                track_markers(run_dir, events, raylets)
                time.sleep(0.005)

        tracking = threading.Thread(target=tracker)
        tracking.start()
        while driver.is_alive():
            if not events["removed"]:
                remove_victim(cluster, spec["pid_glob"], events, raylets)
            time.sleep(0.005)
        tracking.join()
        events["raylets"] = raylets
        events["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
        events["victims_running"] = [r["pid"] for r in events["removed"] if _running(r["pid"])]
    except Exception:  # noqa: BLE001 - report it to the test
        events["exception"] = traceback.format_exc()
    finally:
        Path(result_path).write_text(json.dumps(events, indent=2))
        ray.shutdown()
        cluster.shutdown()
    return 0


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
