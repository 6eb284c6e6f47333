"""The Pile at test scale: a budget of 5% of a mini-Pile (`train/NN.jsonl.zst`, one zstd frame per file)
read from local disk and from an S3 server on 127.0.0.1, by 1 and 4 workers; a worker SIGKILLed mid-unit;
a driver killed and rerun; a server that drops requests for a while. Every run gives exactly the rows of a
one-process reference over the documents the budget defines (tests/pile.py), and reads about the
compressed bytes those documents take.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import polars as pl
import pytest
import yaml
from helpers import base_config, kill_worker_of
from pile import budget_documents, total_tokens, write_mini_pile
from reference import assert_same_rows, reference_rows
from s3_server import S3Server

from saeray.analysis.stats import scan_activations, scan_docs
from saeray.engine import config
from saeray.engine.plan import prepare
from saeray.engine.storage import READ
from saeray.executors import run

pytestmark = pytest.mark.slow
UNIT_BYTES = 32 << 10


@pytest.fixture(scope="module")
def pile(tiny, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("pile")
    p = write_mini_pile(root / "data")
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    total = total_tokens(p, tok)
    budget = total // 20
    ids, texts, lengths, covered = budget_documents(p, tok, budget)
    want = reference_rows(tiny["llama"], tiny["sae_standard"], texts, doc_ids=ids, lengths=lengths, context_size=24)
    compressed = sum(f.stat().st_size for f in p.files)
    print(f"mini-Pile: {len(p.files)} files, {compressed:,} bytes compressed, {total:,} tokens; budget {budget:,} "
          f"tokens = {len(ids):,} documents, ~{covered:,} compressed bytes")
    return SimpleNamespace(pile=p, budget=budget, ids=ids, covered=covered, want=want)


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


def _raw(tiny, pile, dataset: str, out: str, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], dataset, out,
                       data__max_tokens=pile.budget, data__unit_bytes=UNIT_BYTES, data__keep_columns=["meta"], **over)


def _rows(run_dir: str) -> pl.DataFrame:
    return scan_activations(run_dir).collect()


def _check_outputs(run_dir: str, pile) -> None:
    assert_same_rows(_rows(run_dir).drop("sae", "group"), pile.want)
    docs = scan_docs(run_dir).collect().sort("doc_id")
    assert docs["doc_id"].to_list() == pile.ids and docs["n_tokens"].sum() == pile.budget
    assert docs.schema["meta"] == pl.Struct({"pile_set_name": pl.String})


def _upload(s3: S3Server, pile) -> str:
    bucket = s3.new_bucket()
    c = s3.client()
    for f in pile.pile.files:
        c.put_object(Bucket=bucket, Key=f"pile/train/{f.name}", Body=f.read_bytes())
    return bucket


def test_local_disk_one_and_four_workers(tiny, pile, tmp_path, ray_session):
    one = run(config.from_dict(_raw(tiny, pile, str(pile.pile.root), str(tmp_path / "one"))), executor="local")
    _check_outputs(str(tmp_path / "one"), pile)
    ran = one.bytes_read - one.plan_bytes
    print(f"1 worker: {len(one.done)} units; read {one.plan_bytes:,} bytes to plan (the first rows of the first "
          f"file: its columns) and {ran:,} to run, for ~{pile.covered:,} covered: {ran / pile.covered:.2f}x")
    assert ran <= 1.5 * pile.covered and one.plan_bytes <= 256 << 10
    assert len(one.done) >= 8  # the budget ends inside the first file, many units before it

    four = run(config.from_dict(_raw(tiny, pile, str(pile.pile.root), str(tmp_path / "four"))), workers=4,
               executor="ray")
    _check_outputs(str(tmp_path / "four"), pile)
    assert sorted(four.done) == sorted(one.done)
    pids = {s["pid"] for s in four.done.values()}
    ran = four.bytes_read - four.plan_bytes
    print(f"4 workers: {len(four.done)} units on {len(pids)} worker processes, {four.beyond_budget} read past the "
          f"budget; read {four.plan_bytes:,} bytes to plan and {ran:,} to run: {ran / pile.covered:.2f}x")
    assert len(pids) == 4 and four.beyond_budget <= 4  # every worker had units; at most ~one unit each wasted
    assert ran <= 1.5 * pile.covered


def test_s3_one_and_four_workers(tiny, pile, tmp_path, s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = _upload(s3, pile)
    dataset = f"s3://{bucket}/pile"
    data = f"/{bucket}/pile/"
    sent0 = s3.sent(data)
    prepare(config.from_dict(_raw(tiny, pile, dataset, str(tmp_path / "one"))))
    planning = s3.sent(data) - sent0
    one = run(config.from_dict(_raw(tiny, pile, dataset, str(tmp_path / "one"))), executor="local")
    _check_outputs(str(tmp_path / "one"), pile)
    served = s3.sent(data) - sent0 - 2 * planning
    print(f"S3, 1 worker: the server sent {planning:,} bytes of data files to plan and {served:,} to run, for "
          f"~{pile.covered:,} covered: {served / pile.covered:.2f}x (the storage layer counted "
          f"{one.plan_bytes:,} + {one.bytes_read - one.plan_bytes:,})")
    assert served <= 1.5 * pile.covered and planning <= 256 << 10

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_raw(tiny, pile, dataset, str(tmp_path / "four"))))
    sent0 = s3.sent(data)
    proc = subprocess.run([sys.executable, "-m", "saeray.cli", "run", str(cfg_path), "--workers", "4"],
                          env={**os.environ, **s3.env()}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _check_outputs(str(tmp_path / "four"), pile)
    served = s3.sent(data) - sent0 - planning
    print(f"S3, 4 workers: the server sent {planning:,} bytes to plan and {served:,} to run: "
          f"{served / pile.covered:.2f}x")
    assert served <= 1.5 * pile.covered


def test_worker_killed_mid_unit(tiny, pile, tmp_path, ray_session):
    out = tmp_path / "run"
    killed: list[int] = []

    t = threading.Thread(target=kill_worker_of, args=(out, "00003", killed, 300))  # unit 3, mid-unit
    t.start()
    result = run(config.from_dict(_raw(tiny, pile, str(pile.pile.root), str(out))), workers=2, executor="ray")
    t.join()
    assert killed, "the test never caught unit 3 in flight"
    assert not result.errors and result.done[3]["pid"] != killed[0]
    _check_outputs(str(out), pile)
    redone = result.done[3]["tokens"]
    mean = sum(s["tokens"] for s in result.done.values()) / len(result.done)
    print(f"worker killed mid-unit: at most {redone:,} tokens processed twice (the killed unit; mean unit {mean:,.0f})")
    assert redone <= 2 * mean


def test_driver_killed_rerun_plans_nothing(tiny, pile, tmp_path):
    out = tmp_path / "run"
    raw = _raw(tiny, pile, str(pile.pile.root), str(out))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg_path), "--local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "completions").glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in (out / "completions").glob("*.json")}
    result = run(config.from_dict(raw), executor="local")
    print(f"driver killed after {len(before)} units; rerun: planning read {result.plan_bytes} bytes, "
          f"{len(result.done)} units processed, {len(result.skipped)} skipped")
    assert result.plan_bytes == 0 and len(result.skipped) == len(before) >= 3
    assert not set(result.done) & set(result.skipped)
    assert all((out / "completions" / k).read_text() == v for k, v in before.items())
    _check_outputs(str(out), pile)


def test_server_drops_requests_for_a_while(tiny, pile, tmp_path, s3, monkeypatch, caplog):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = _upload(s3, pile)
    gets = {"n": 0, "refused": 0}

    def hook(environ: dict) -> bool:  # after the 5th data read, refuse the next 15 (s3fs's own retries give up)
        if environ["REQUEST_METHOD"] != "GET" or not environ["PATH_INFO"].startswith(f"/{bucket}/pile/train/"):
            return False
        gets["n"] += 1
        if 5 < gets["n"] <= 20:
            gets["refused"] += 1
            return True
        return False

    s3.hook = hook
    READ.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="saeray.engine.storage"):
            run(config.from_dict(_raw(tiny, pile, f"s3://{bucket}/pile", str(tmp_path / "run"))), executor="local")
    finally:
        s3.hook = None
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    print(f"server refused {gets['refused']} requests; saeray retried {READ.retries} reads, e.g. {retries[:1]}")
    assert gets["refused"] > 0 and READ.retries > 0 and retries
    _check_outputs(str(tmp_path / "run"), pile)
