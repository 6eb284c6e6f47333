"""A run directory in S3: moto's S3 API server on 127.0.0.1, started and stopped by these tests.

Object stores have no rename, so shard files go up under attempt-unique names and the
completion marker, one object written last, lists them. Checked here: a run into S3 gives
exactly the rows and statistics of a local run; readers read only listed files; a driver
killed in the middle of a commit (at an exact request, by the server) leaves nothing
visible, and the rerun (Ray actors uploading their own shards) finishes only the missing
shards and deletes the leftovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from helpers import base_config
from s3_server import S3Server, is_object_write

from saeray.analysis.stats import features, reconstruction, scan_activations, scan_docs, write_features
from saeray.engine import config
from saeray.engine.store import LOCK, RunDir
from saeray.executors import run

KEYS = ["sae", "group", "doc_id", "pos", "feature"]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ref(tiny, tmp_path_factory) -> str:
    """The same config run into a local directory, in process: what every S3 run must equal."""
    out = str(tmp_path_factory.mktemp("s3ref") / "ref")
    run(config.from_dict(_raw(tiny, out)), executor="local")
    return out


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    s3.hook = None
    return s3


def _raw(tiny, out: str, **over) -> dict:
    saes = [{"name": "a", "path": str(tiny["sae_standard"])}, {"name": "m", "path": str(tiny["sae_mlp"])}]
    over = {"data__shards": 3, "output__reconstruction": True, **over}
    return base_config(tiny["llama"], saes, tiny["data"], out, **over)


def _rows(run_dir: str) -> pl.DataFrame:
    return scan_activations(run_dir).collect().sort(KEYS)


def _assert_same_outputs(got: str, want: str, atol: float = 0.0) -> None:
    """Same rows, documents, statistics and reconstruction; values equal, or to `atol` where the run
    computed them with other thread counts (Ray actors: another summation order in the kernels)."""
    a, b = _rows(got), _rows(want)
    assert a.height > 0 and a.drop("value").equals(b.drop("value"))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=0, atol=atol)
    print(f"rows compared: {a.height}")
    assert scan_docs(got).collect().sort("doc_id").equals(scan_docs(want).collect().sort("doc_id"))
    _assert_same_stats(features(got).collect(), features(want).collect(), rtol=1e-9 if atol == 0 else 1e-5)
    ra, rb = reconstruction(got), reconstruction(want)
    np.testing.assert_allclose(ra["mse"].to_numpy(), rb["mse"].to_numpy(), rtol=1e-9 if atol == 0 else 1e-5)


def _assert_same_stats(fa: pl.DataFrame, fb: pl.DataFrame, rtol: float = 1e-9) -> None:
    """Counts exactly; float moments to summation-order rounding (Polars sums in parallel)."""
    assert fa.height == fb.height > 0
    for col in ("sae", "group", "feature", "n_tokens", "n_active", "n_docs_active"):
        assert fa[col].to_list() == fb[col].to_list(), col
    for col in ("mean", "mean_active", "std", "max", "density"):
        np.testing.assert_allclose(fa[col].fill_null(np.nan).to_numpy(), fb[col].fill_null(np.nan).to_numpy(),
                                   rtol=rtol, atol=1e-12, err_msg=col)
    if rtol == 1e-9:  # the same values: the same argmax
        for col in ("max_doc_id", "max_pos"):
            assert fa[col].to_list() == fb[col].to_list(), col


def _assert_only_listed(s3: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under the run is the manifest, a marker, complete.json, or a file some marker lists; listed
    files exist."""
    objects = s3.keys(bucket, prefix + "/")
    markers = {k: json.loads(v) for k, v in objects.items() if k.startswith(f"{prefix}/completions/")}
    listed = {f"{prefix}/{f}" for m in markers.values() for files in m["files"].values() for f in files}
    assert listed <= set(objects), sorted(listed - set(objects))
    merge = json.loads(objects[f"{prefix}/merged.json"]) if f"{prefix}/merged.json" in objects else {"files": {}}
    listed |= {f"{prefix}/{f}" for files in merge["files"].values() for f in files}
    stray = set(objects) - listed - set(markers) - {f"{prefix}/manifest.json", f"{prefix}/features.parquet",
                                                      f"{prefix}/complete.json", f"{prefix}/merged.json"}
    assert not stray, sorted(stray)
    for m in markers.values():  # attempt-unique names: every listed file carries its attempt id
        assert all(f.rsplit(".", 2)[-2] == m["attempt"] for files in m["files"].values() for f in files)
    return objects


def test_run_into_s3_equals_local_run(tiny, ref, s3_env):
    s3 = s3_env
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/runs/r1"
    start = len(s3.requests)
    result = run(config.from_dict(_raw(tiny, uri)), executor="local")
    assert sorted(result.done) == [0, 1_000_000, 2_000_000] and result.run_dir == uri
    # No rename on S3: nothing was copied server-side or deleted during a clean run (but the driver's lock).
    methods = [(m, q) for m, p, q in s3.requests[start:] if not p.endswith("/" + LOCK)]
    assert not any(m == "DELETE" or (m == "POST" and q == "delete") for m, q in methods)
    assert not any("x-id=CopyObject" in q for _, q in methods)

    objects = _assert_only_listed(s3, bucket, "runs/r1")
    assert sum(k.startswith("runs/r1/completions/") for k in objects) == 3
    _assert_same_outputs(uri, ref)
    # stats written back into the bucket and readable by Polars
    assert write_features(uri) == f"{uri}/features.parquet"
    _assert_same_stats(pl.read_parquet(f"{uri}/features.parquet"), features(ref).collect())

    # Rerunning the same config skips everything and writes nothing.
    before = len(s3.requests)
    again = run(config.from_dict(_raw(tiny, uri)), executor="local")
    assert again.skipped == [0, 1_000_000, 2_000_000] and not again.done
    assert not any(m in ("PUT", "POST", "DELETE") for m, p, _ in s3.requests[before:] if not p.endswith("/" + LOCK))
    assert LOCK not in {k.rsplit("/", 1)[-1] for k in s3.keys(bucket)}  # released

    # diff (with its per-document test) and top examples read the markers' file lists: the same on S3
    from saeray.analysis.diff import diff_runs
    from saeray.analysis.top import interval_examples, top_examples
    from saeray.report.data import activation_histograms

    here, there = diff_runs(ref, ref), diff_runs(uri, uri)
    assert here.columns == there.columns and here["class"].equals(there["class"])
    for c in ("t", "p", "q", "d_density", "n_docs_a"):
        np.testing.assert_allclose(there[c].fill_null(np.nan).to_numpy(), here[c].fill_null(np.nan).to_numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=c)
    feats = list(range(64))
    assert top_examples(uri, feats, k=5).equals(top_examples(ref, feats, k=5))
    assert top_examples(uri, feats, k=5, source="rows").equals(top_examples(ref, feats, k=5))
    assert interval_examples(uri, feats).equals(interval_examples(ref, feats))
    h_ref = activation_histograms(ref, feats, sae="a", group="all")
    h_s3 = activation_histograms(uri, feats, sae="a", group="all")
    assert h_ref.keys() == h_s3.keys() and all(np.array_equal(h_ref[f][1], h_s3[f][1]) for f in h_ref)


def test_foreign_and_other_runs_refused_in_s3(tiny, tmp_path, s3_env):
    s3 = s3_env
    bucket = s3.new_bucket()
    s3.client().put_object(Bucket=bucket, Key="data/notes.txt", Body=b"mine")
    from saeray.engine.store import RunDirError

    with pytest.raises(RunDirError, match="not a saeray run directory"):
        run(config.from_dict(_raw(tiny, f"s3://{bucket}/data")), executor="local")
    assert s3.keys(bucket) == {"data/notes.txt": b"mine"}


def test_doctored_marker_cannot_point_outside_the_run(tiny, tmp_path, s3_env):
    s3 = s3_env
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/r"
    run(config.from_dict(_raw(tiny, uri, data__shards=1)), executor="local")
    c = s3.client()
    marker = json.loads(c.get_object(Bucket=bucket, Key="r/completions/00000.json")["Body"].read())
    marker["files"]["stats"] = ["stats/../../elsewhere/secret.parquet"]
    c.put_object(Bucket=bucket, Key="r/completions/00000.json", Body=json.dumps(marker).encode())
    from saeray.engine.store import RunDirError

    with pytest.raises(RunDirError, match="not a stats file of shard 0"):
        features(uri)


# ---- a driver killed mid-commit (subprocess, killed by the server at an exact request) ------------


def _driver(cfg_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg_path), "--local"], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def _kill_at(s3: S3Server, prefix: str, nth: int, procs: list[subprocess.Popen]) -> None:
    """Kill the driver when it sends its nth object write under `prefix`; that write never lands."""
    seen = [0]

    def hook(environ: dict) -> bool:
        if not (is_object_write(environ) and environ["PATH_INFO"].startswith(prefix)):
            return False
        seen[0] += 1
        if seen[0] != nth:
            return False
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait()
        return True

    s3.hook = hook


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_driver_killed_mid_commit_rerun_completes_only_missing(tiny, ref, tmp_path, s3_env):
    s3 = s3_env
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/run"
    raw = _raw(tiny, uri)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, **s3.env()}
    procs: list[subprocess.Popen] = []
    # Object writes of a run: the driver's lock, the manifest, then per shard 6 files (activations, docs, stats,
    # recon, examples, hist) and its marker. The driver dies at write 2 + 7 + 7 = 16, shard 1's marker: shard 0 is
    # committed, shard 1's files are all up, but its commit point never lands.
    _kill_at(s3, f"/{bucket}/run/", 16, procs)
    log = tmp_path / "driver.log"
    procs.append(_driver(cfg_path, env, log))
    procs[-1].wait(timeout=180)
    s3.hook = None
    assert procs[-1].returncode == -signal.SIGKILL, log.read_text()[-3000:]
    rd = RunDir(uri)
    assert rd.committed() == {0}
    objects = s3.keys(bucket, "run/")
    listed = {f"run/{f}" for fs in rd.completion(0)["files"].values() for f in fs}
    leftovers = sorted(k for k in objects if k.startswith(("run/activations/shard=1000000/", "run/docs/shard=1000000/",
                                                           "run/stats/1000000.", "run/recon/1000000.",
                                                           "run/examples/1000000.", "run/hist/1000000.")))
    assert len(leftovers) == 6 and not set(leftovers) & listed  # shard 1's complete but uncommitted files
    # Readers see shard 0 only, never the leftovers.
    rows = _rows(uri)
    assert rows.height == rd.completion(0)["rows"] and rows["doc_id"].max() < 20  # shard 0: documents 0-19
    assert rows.equals(_rows(ref).filter(pl.col("doc_id") < 20))
    assert features(uri).collect()["n_tokens"].max() == sum(rd.completion(0)["counted_tokens"].values()) // 2
    marker0 = objects["run/completions/00000.json"]
    # The rerun, on Ray actors that upload their own shards, does only what is missing, leaves shard 0's
    # commit untouched, and deletes the leftovers.
    with open(tmp_path / "rerun.log", "w") as f:
        rerun = subprocess.run([sys.executable, "-m", "saeray.cli", "run", str(cfg_path), "--workers", "2"], env=env,
                               stdout=f, stderr=subprocess.STDOUT, timeout=400)
    out = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0 and "2 units processed, 1 already committed" in out, out[-3000:]
    assert {rd.completion(i)["pid"] for i in (1_000_000, 2_000_000)}.isdisjoint({procs[-1].pid, os.getpid()})  # done by the actors
    objects = _assert_only_listed(s3, bucket, "run")
    assert objects["run/completions/00000.json"] == marker0
    _assert_same_outputs(uri, ref, atol=1e-5)
