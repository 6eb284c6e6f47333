"""bench/throughput.py at toy scale: it runs, and its table and JSON hold finite, positive, consistent figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "throughput.py"
sys.path.insert(0, str(ROOT / "bench"))

import throughput_paths as paths  # noqa: E402


def _run(args: list[str], out: Path, timeout: int) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH), *args, "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def _positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_attended_keys_equal_a_direct_count() -> None:
    for n in (1, 2, 7, 64, 130):
        for cap in (None, 1, 5, 64, 500):
            want = sum(min(i, cap) if cap else i for i in range(1, n + 1))
            assert paths._attended(n, cap) == want, (n, cap)


def test_gpu_sized_mode_at_toy_scale(tmp_path: Path) -> None:
    """The Gemma-2-2B-sized mode's code at toy size on CPU, every configuration: tokens/s through several units of
    several blocks, MFU, and FLOPs counted by hand (one SAE on layer 2; three on layers 1-3)."""
    report, stdout = _run(["--gpu-sized", "--scale", "toy", "--gpu-docs", "24", "--gpu-compile", "false"],
                          tmp_path / "gpu.json", timeout=400)
    d = report["model"]
    assert report["device"] == "cpu" and report["scale"] == "toy"
    assert list(report["configs"]) == ["16k-eager", "16k", "131k", "3x16k"]
    # FLOPs per token of one layer, counted from the config by hand:
    # q, o: d x (heads x head_dim); k, v: d x (kv_heads x head_dim); gate, up, down: d x d_mlp.
    hd, h, kv, dm, f = d["head_dim"], d["num_attention_heads"], d["num_key_value_heads"], d["hidden_size"], \
        d["intermediate_size"]
    per_layer = 2 * (2 * dm * h * hd + 2 * dm * kv * hd + 3 * dm * f)
    for name, (layers_run, n_saes, d_sae) in {"16k": (3, 1, 256), "131k": (3, 1, 2048), "3x16k": (4, 3, 256)}.items():
        r = report["configs"][name]
        fpt = r["flops_per_token"]
        assert r["saes"] == n_saes and r["d_sae"] == d_sae and r["units"] == 3
        assert fpt["linear"] == layers_run * per_layer
        assert fpt["sae_encoder"] == n_saes * 2 * dm * d_sae
        assert _positive(fpt["attention"]) and fpt["total"] == pytest.approx(sum(v for k, v in fpt.items() if k != "total"))
        for mode in ("stats_only", "rows"):
            m = r[mode]
            assert m["tokens"] > 0 and m["blocks"] >= 3 and _positive(m["seconds"]) and _positive(m["tokens_per_s"])
            assert m["mfu_vs_measured_matmul"] == pytest.approx(
                m["tokens_per_s"] * fpt["total"] / report["matmul"]["bfloat16"]["best_flops_per_s"])
        assert r["stats_only"]["tokens"] == r["rows"]["tokens"] and r["rows"]["rows"] > 0 == r["stats_only"]["rows"]
    assert "131k:" in stdout and report["targets"][0]["status"].startswith("not run on an H100")
    assert "MFU" in stdout and "not run on an H100" in stdout


@pytest.mark.slow
def test_cpu_benchmark_with_a_tiny_model(tmp_path: Path) -> None:
    """All CPU paths but sae-lens (no TransformerLens name for a random model) and Ray, a small aggregation."""
    args = ["--tiny", "--docs", "16", "--notebook-docs", "4", "--skip-ray", "--agg-rows", "20000",
            "--flops-seconds", "0.05", "--gemm-rows", "128", "--batch-tokens", "512", "--repeats", "2", "--rounds", "2"]
    report, stdout = _run(args, tmp_path / "t.json", timeout=600)
    p = report["paths"]
    assert set(p) == {"a_notebook", "c_worker_stats", "c_worker_activations"}
    for key, r in p.items():
        for field in ("tokens", "seconds", "tokens_per_s", "peak_rss_mb", "limit_fraction_bf16", "vs_notebook"):
            assert _positive(r[field]), (key, field, r.get(field))
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert len(r["repeat_seconds"]) == 2 and round(r["seconds"], 3) == min(r["repeat_seconds"]), (key, r)
        assert len(r["round_seconds"]) == 2 and round(r["seconds"], 3) == min(r["round_seconds"]), (key, r)
    # the same documents: the same tokens, and the notebook's are a prefix of them
    assert p["c_worker_stats"]["tokens"] == p["c_worker_activations"]["tokens"]
    assert 0 < p["a_notebook"]["tokens"] < p["c_worker_stats"]["tokens"]
    assert p["c_worker_activations"]["rows"] > 0 and p["c_worker_stats"]["rows"] == 0
    assert p["a_notebook"]["vs_notebook"] == pytest.approx(1.0)
    limit = report["limit"]
    assert limit["tokens_per_s"]["bfloat16"] == pytest.approx(
        limit["matmul_flops_per_s"]["bfloat16"] / report["facts"]["saeray"]["total"])
    prof = p["c_worker_stats"]["profile"]
    assert sum(k["share"] for k in prof["by_kind"].values()) == pytest.approx(1.0, abs=0.02)
    assert prof["top_ops"] and all(_positive(o["self_s"]) for o in prof["top_ops"])
    mo = p["c_worker_stats"]["model_only"]  # the model alone on the same documents: the same tokens
    assert mo["tokens"] == p["c_worker_stats"]["tokens"] and _positive(mo["tokens_per_s"])
    assert mo["limit_fraction_bf16"] == pytest.approx(mo["tokens_per_s"] / limit["tokens_per_s"]["bfloat16"])
    assert sum(k["share"] for k in mo["profile"]["by_kind"].values()) == pytest.approx(1.0, abs=0.02)
    assert report["aggregate"]["features"]["out_rows"] > 0
    assert {t["target"].split(" (")[0] for t in report["targets"]} >= {"saeray >= 20x the notebook loop"}
    assert "(a) notebook loop" in stdout and "targets:" in stdout


def test_simulated_gpu_mode_at_toy_scale(tmp_path: Path) -> None:
    """bench/throughput.py --simulate on a tiny model and corpus: labelled a simulation, every token of the
    corpus counted (against the tokenizer itself), and busy/idle/cores consistent."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import corpus, make_model
    from transformers import AutoTokenizer

    model = make_model(tmp_path / "model", "llama", n_layers=2)
    cfg_file = model / "config.json"  # the simulated job's 1,024-token context needs that many positions
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "max_position_embeddings": 1024}))
    texts = corpus(120, seed=3, max_words=300)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": texts, "kind": ["prose"] * len(texts)}), tmp_path / "data" / "part-0.parquet")
    out = tmp_path / "sim.json"
    done = subprocess.run([sys.executable, str(BENCH), "--simulate", "--model", str(model), "--data",
                           str(tmp_path / "data"), "--files", "2", "--unit-mb", "0.02", "--rounds", "1",
                           "--batch-tokens", "1024", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert all("[simulated H100]" in line for line in lines[:2]) and "SIMULATED GPU" in lines[2]
    report = json.loads(out.read_text())
    assert "simulated" in report["SIMULATION"]
    tok = AutoTokenizer.from_pretrained(model)
    want = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    paths_run = report["paths"]
    assert set(paths_run) == {"stats: serial (prefetch_blocks 0)", "stats: prefetch (prefetch_blocks 2, default)"}
    for r in paths_run.values():
        assert r["tokens"] == want and r["units"] > 2
        assert 0 < r["busy_fraction"] <= 1.0 and 0 <= r["idle_fraction"] < 1
        assert r["busy_fraction"] + r["idle_fraction"] <= 1.0 + 1e-6
        assert r["modeled_busy_s"] <= r["span_s"] and _positive(r["cores_host"]) and _positive(r["host_cpu_s_per_device_s"])
