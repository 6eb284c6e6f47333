"""cluster.yaml and jobs/extract.py: Ray's own config validation, and a real job on a local token-auth head.

The slow test starts a private Ray head (its own temp dir, ports, HOME and token file, so the
user's ~/.ray and /tmp/ray are untouched), submits `jobs/extract.py` with `ray job submit
--working-dir <repo>`, and checks the run directory and that the Jobs API refuses requests
without the token.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from private_cluster import free_ports

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
TOKEN_RE = re.compile(r"\b[0-9a-f]{64}\b")  # what `ray get-auth-token --generate` writes (secrets.token_hex(32))
JOB_TIMEOUT_S = 300
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 is never proxied


# ---- cluster.yaml (fast) -----------------------------------------------------------------


def _cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _start_commands(cfg: dict, key: str) -> str:
    cmds = cfg[key]
    return "\n".join(c for c in cmds if "ray start" in c)


def test_cluster_yaml_passes_ray_validation_and_locks_down_access():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_config()
    prepared = prepare_config(raw)
    validate_config(prepared)  # raises jsonschema.ValidationError on a bad config

    # The validation is real: an unknown top-level key is refused.
    with pytest.raises(Exception):
        validate_config(prepare_config({**raw, "not_a_ray_key": 1}))

    # A CPU head and GPU workers (1 GPU each).
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "head should be a CPU instance"
    assert workers and all(v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values())

    head_start = _start_commands(prepared, "head_start_ray_commands")
    worker_start = _start_commands(prepared, "worker_start_ray_commands")
    assert "--head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    # Token auth on every node: the env var is set on the `ray start` command itself.
    for cmd in (head_start, worker_start):
        assert re.search(r"(^|[;&|\s])RAY_AUTH_MODE=token\s+ray start\b", cmd), cmd
    # The token file reaches every node through file_mounts, from a path outside the repo.
    mounts = prepared["file_mounts"]
    token_mounts = {remote: local for remote, local in mounts.items() if remote.endswith("/.ray/auth_token")}
    assert token_mounts, f"no file_mount for ~/.ray/auth_token in {mounts}"
    for local in token_mounts.values():
        local_path = Path(os.path.expanduser(local)).resolve()
        assert REPO not in local_path.parents and local_path != REPO, f"token mount {local} is inside the repo"
    setup = "\n".join(prepared["setup_commands"])
    assert re.search(r"chmod 600 \S*\.ray/auth_token", setup)
    assert "pip install" in setup and "saeray" in setup


def _repo_files() -> list[Path]:
    """Files git would commit or `ray job submit --working-dir` would upload (ignored files excluded)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True, timeout=30).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    return [REPO / n for n in names if (REPO / n).is_file()]


def test_no_auth_token_in_repo():
    known = set()
    for path in (os.path.expanduser("~/.ray/auth_token"), os.environ.get("RAY_AUTH_TOKEN_PATH")):
        if path and os.path.isfile(path):
            known.add(Path(path).read_text().strip())
    if os.environ.get("RAY_AUTH_TOKEN"):
        known.add(os.environ["RAY_AUTH_TOKEN"].strip())
    known.discard("")
    assigned = re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?[0-9A-Za-z+/_-]{16,}")
    for f in _repo_files():
        assert f.name != "auth_token", f"token file committed: {f}"
        try:
            text = f.read_text(errors="ignore")
        except OSError:
            continue
        for tok in known:
            assert tok not in text, f"{f} contains the Ray auth token"
        assert not assigned.search(text), f"{f} sets RAY_AUTH_TOKEN to a literal value"
    for f in (CLUSTER_YAML, REPO / "jobs" / "extract.py"):
        assert not TOKEN_RE.search(f.read_text()), f"{f} contains something shaped like a token"


# ---- a real job on a local token-auth head (slow) ----------------------------------------


def _head_processes(sid: int, tag: str, temp_dir: str) -> list:
    """The processes of the head this test started, and everything they spawned.

    `ray start` ran as the leader of a new session, and Ray's daemons, agents and workers
    stay in it; job drivers get their own session but are children of a job supervisor.
    Retitled processes (ray::...) may lose their environment block, so the session id,
    the temp dir on the command line and the env tag are all used.
    """
    import psutil

    roots = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            ours = os.getsid(p.pid) == sid or temp_dir in " ".join(p.info["cmdline"] or [])
            if not ours:
                try:
                    ours = p.environ().get("SAERAY_TEST_RAY_TAG") == tag
                except (psutil.AccessDenied, OSError):
                    pass
            if ours:
                roots[p.pid] = p
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError, PermissionError):
            continue
    for p in list(roots.values()):
        try:
            for c in p.children(recursive=True):
                roots.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            continue
    return [p for p in roots.values() if p.pid != os.getpid()]


def _stop_head(sid: int, tag: str, temp_dir: str) -> list[str]:
    """End the head's processes (SIGTERM, then SIGKILL); returns any that are still running.

    Not `ray stop --force`: that ends every Ray process on the machine, including other
    sessions' clusters and tests that share it.
    """
    import psutil

    for _ in range(3):
        procs = [p for p in _head_processes(sid, tag, temp_dir) if _running(p)]
        if not procs:
            return []
        for sig in ("terminate", "kill"):
            for p in procs:
                try:
                    getattr(p, sig)()
                except psutil.NoSuchProcess:
                    pass
            deadline = time.time() + (5 if sig == "terminate" else 10)  # exited or a zombie (orphans may wait for init to reap them)
            while time.time() < deadline and any(_running(p) for p in procs):
                time.sleep(0.2)
            procs = [p for p in procs if _running(p)]
            if not procs:
                break
    return [_describe(p) for p in _head_processes(sid, tag, temp_dir) if _running(p)]


def _describe(p) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except Exception:  # noqa: BLE001 - gone meanwhile
        return str(p.pid)


def _running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def token_auth_head(tmp_path):
    """A local Ray head with token auth: {'dashboard': url, 'env': env for Ray CLIs, 'token': str}."""
    tag = uuid.uuid4().hex
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token_file = home / ".ray" / "auth_token"  # the default path under a private HOME
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    # Unix socket paths must stay short: a temp dir directly under /tmp, not under tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="saeray-ray-", dir="/tmp")
    venv_bin = str(Path(sys.executable).parent)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTEST_")) and k not in ("VIRTUAL_ENV_PROMPT",)}
    env.update({
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),  # the job's `python` is this venv's
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",  # the CLIs talk to the local dashboard directly
        "no_proxy": "127.0.0.1,localhost",
        "SAERAY_TEST_RAY_TAG": tag,
    })
    (gcs, dash, client, agent_http, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr) = free_ports(9)
    cmd = ["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--object-store-memory=200000000", "--disable-usage-stats"]
    # A new session: every daemon `ray start` leaves behind stays in it, so teardown can find
    # exactly this head's processes.
    starter = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    sid = starter.pid
    try:
        try:
            out, _ = starter.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            starter.kill()
            out, _ = starter.communicate()
        assert starter.returncode == 0, f"ray start failed:\n{out}"
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the dashboard's health check is open without the token
            try:
                with _NO_PROXY.open(f"{url}/api/gcs_healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.time() < deadline, "the dashboard did not come up in 120 s"
            time.sleep(1)
        yield {"dashboard": url, "env": env, "token": token, "home": home}
    finally:
        left = _stop_head(sid, tag, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still running: {left}"


def _http_status(url: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _NO_PROXY.open(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _write_inputs(tmp_path: Path) -> Path:
    from helpers import base_config, corpus, make_model, make_sae, write_dataset

    model = make_model(tmp_path / "model", "llama", n_layers=2)
    sae = make_sae(tmp_path / "sae", "standard", d_in=64, hook="blocks.1.hook_resid_post")
    data = write_dataset(tmp_path / "data", corpus(40, seed=3), n_files=2)
    cfg = base_config(model, [{"name": "res1", "path": str(sae)}], data, tmp_path / "run")
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_ray_job_submit_extract_on_token_auth_head(token_auth_head, tmp_path):
    import pyarrow.parquet as pq

    head, env, token = token_auth_head["dashboard"], token_auth_head["env"], token_auth_head["token"]
    config = _write_inputs(tmp_path)
    run_dir = tmp_path / "run"

    # The Jobs API refuses requests without the token (401) or with a wrong one (403).
    status, _ = _http_status(f"{head}/api/jobs/")
    assert status == 401, status
    status, _ = _http_status(f"{head}/api/jobs/", {"Authorization": f"Bearer {secrets.token_hex(32)}"})
    assert status == 403, status
    # A CLI that sends no token (auth off on the client side, no token file) is refused by the server.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token.update({"RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path / "empty-home")})
    refused = subprocess.run(["ray", "job", "list", "--address", head], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout
    assert re.search(r"401|[Uu]nauthori[sz]ed|[Aa]uthentication", refused.stdout + refused.stderr), refused.stderr

    submission_id = f"saeray-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]}
    submit = ["ray", "job", "submit", "--address", head, "--submission-id", submission_id,
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
              "--", "python", "jobs/extract.py", str(config)]
    t0 = time.time()
    try:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        logs = subprocess.run(["ray", "job", "logs", "--address", head, submission_id], env=env,
                              capture_output=True, text=True, timeout=60)
        pytest.fail(f"job did not finish in {JOB_TIMEOUT_S}s:\n{e.stdout}\n{logs.stdout[-5000:]}")
    elapsed = time.time() - t0
    output = done.stdout + done.stderr
    status = subprocess.run(["ray", "job", "status", "--address", head, submission_id], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, f"{status.stdout}\n--- job output ---\n{output[-8000:]}"
    assert done.returncode == 0, output[-8000:]
    assert "2 units processed" in output, output[-8000:]
    print(f"ray job submit -> SUCCEEDED in {elapsed:.1f}s")

    # The run directory: manifest, one completion marker per shard, activations/docs/stats files.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["n_units"] == 2
    markers = sorted(p.name for p in (run_dir / "completions").glob("*.json"))
    assert markers == ["00000.json", "1000000.json"]  # one unit per file: ids file * 1,000,000 + k
    n_docs = 0
    for shard in ("00000", "1000000"):
        marker = json.loads((run_dir / "completions" / f"{shard}.json").read_text())
        assert marker["fingerprint"] == manifest["fingerprint"]
        acts = list((run_dir / "activations" / f"shard={shard}").glob("*.parquet"))
        docs = list((run_dir / "docs" / f"shard={shard}").glob("*.parquet"))
        assert acts and docs and (run_dir / "stats" / f"{shard}.parquet").is_file()
        table = pq.read_table(docs)
        assert table.num_rows == marker["docs"]
        n_docs += table.num_rows
        assert pq.read_table(acts).num_rows == marker["rows"]
    assert n_docs == 40

    # With the token, the HTTP API answers, and the token is nowhere in what the job recorded.
    status, body = _http_status(f"{head}/api/jobs/", {"Authorization": f"Bearer {token}"})
    assert status == 200, body[:500]
    jobs = json.loads(body)
    assert any(j.get("submission_id") == submission_id and j.get("status") == "SUCCEEDED" for j in jobs)
    assert token not in body
    # The token was never written into the repo (the working dir that was uploaded).
    assert not any(token in f.read_text(errors="ignore") for f in _repo_files())
