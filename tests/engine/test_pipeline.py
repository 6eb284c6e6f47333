"""The worker's pipeline parts alone: the prefetch thread, batched tokenization, host batches, and a
whole run with and without prefetch (identical outputs)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import base_config, make_tokenizer

from saeray import executors
from saeray.engine import config
from saeray.engine.config import PositionsConfig
from saeray.engine.contexts import Tokenization
from saeray.engine.pipeline import Prefetch


def test_prefetch_keeps_order_and_stays_within_depth():
    made = []

    def source():
        for i in range(50):
            made.append(i)
            yield i

    got = []
    with Prefetch(source(), depth=3) as p:
        for item in p:
            time.sleep(0.002)
            # made = items queued (<= 3) + the one being put + the ones consumed
            assert len(made) - len(got) <= 3 + 2
            got.append(item)
    assert got == list(range(50))


def test_prefetch_raises_the_source_error_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("bad row 3")

    got = []
    with pytest.raises(ValueError, match="bad row 3"):
        for item in Prefetch(source(), depth=2):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_close_stops_the_thread_and_runs_the_source_finally():
    closed = threading.Event()

    def source():
        try:
            for i in range(10_000):
                yield i
        finally:
            closed.set()

    p = Prefetch(source(), depth=2)
    it = iter(p)
    assert next(it) == 0
    p.close()
    assert not p._thread.is_alive()
    assert closed.is_set()


@pytest.mark.parametrize("which", ["tiny", "gemma-3-270m", "smollm2-135m-instruct"])
def test_encode_many_equals_encode(which, tmp_path):
    from saeray.assets import corpus
    from saeray.engine import embedded

    if which == "tiny":
        tok = make_tokenizer(tmp_path / "tok")
        texts = ["", "def return class", "x"] + [" ".join(["value", "list"] * n) for n in range(1, 40)]
    else:
        if not embedded.available(which):
            pytest.skip(f"embedded model {which} not installed")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(embedded.resolve(which)[0])
        by: dict[str, list[str]] = {}
        for d in corpus.shipped():
            by.setdefault(d["kind"], []).append(d["text"])
        texts = [""] + [t for kind in sorted(by) for t in by[kind][:60]]
    t = Tokenization(tok, PositionsConfig(), prepend_bos=False, context_size=64, exclude_special=True)
    many = t.encode_many(texts)
    assert len(many) == len(texts)
    for text, ids in zip(texts, many):
        assert ids.dtype == np.int32
        assert ids.tolist() == t.encode(text).tolist()


def test_host_batches_equal_device_batches(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    t = Tokenization(tok, PositionsConfig(), prepend_bos=True, context_size=16, exclude_special=True)
    docs = t.text_documents([(i, " ".join(["value"] * (3 + 7 * i)), {}) for i in range(6)])
    direct = t.batches(docs, 64, torch.device("cpu"))
    later = [b.to(torch.device("cpu")) for b in t.batches(docs, 64)]
    assert len(direct) == len(later) > 1
    for a, b in zip(direct, later):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert a.selected.keys() == b.selected.keys()
        for g in a.selected:
            for x, y in zip(a.selected[g], b.selected[g]):
                assert x.dtype == torch.int64 and torch.equal(x, y)


def test_text_documents_reject_non_strings(tmp_path):
    t = Tokenization(make_tokenizer(tmp_path / "tok"), PositionsConfig(), prepend_bos=True, context_size=16,
                     exclude_special=True)
    with pytest.raises(TypeError, match="doc 7: the text column holds int"):
        t.text_documents([(6, "value", {}), (7, 42, {})])


def _tables(run) -> dict[str, list]:
    return {part: [pq.read_table(f).to_pylist() for f in sorted(run.glob(pattern))]
            for part, pattern in (("activations", "activations/*/*.parquet"), ("docs", "docs/*/*.parquet"),
                                  ("stats", "stats/*.parquet"))}


def test_prefetch_on_and_off_give_identical_runs(tiny, tmp_path):
    """prefetch_blocks 0 (all in the model's thread) and 2 (reading/tokenizing/batching ahead): same rows,
    docs and statistics, byte for byte in value; blocks are small so a unit spans many of them."""
    runs = {}
    for depth in (0, 2):
        out = tmp_path / f"run{depth}"
        cfg = config.from_dict(base_config(tiny["llama"], [{"name": "s", "path": str(tiny["sae_standard"])}],
                                           tiny["data"], out, tokens__batch_tokens=64,
                                           worker={"prefetch_blocks": depth}))
        result = executors.run(cfg, executor="local")
        assert not result.errors
        runs[depth] = _tables(out)
    assert runs[0]["activations"] and any(len(t) for t in runs[0]["activations"])
    assert runs[0] == runs[2]
    import json

    marker = json.loads(next((tmp_path / "run2" / "completions").glob("*.json")).read_text())
    assert marker["sae_dtypes"] == {"s": "float32"} and marker["device"] == "cpu" and marker["attn_implementation"]


@pytest.mark.parametrize("sae_key", ["sae_standard", "sae_topk", "sae_jumprelu"])
def test_batches_in_flight_give_the_same_rows_and_statistics(tiny, sae_key):
    """The GPU's schedule (batches queued ahead, codes read by size with nonzero_static) run on CPU equals the
    one-batch-at-a-time path exactly: rows, statistics, per-document counts, reconstruction partials."""
    from saeray.engine import models, saes
    from saeray.engine.batching import blocks
    from saeray.engine.config import ModelConfig, SAEConfig
    from saeray.engine.extract import Extractor, SAEHandle

    cpu = torch.device("cpu")
    model, tok = models.load_model(ModelConfig(name=str(tiny["llama"]), dtype="float32"), cpu)
    sae_cfg = SAEConfig(name="s", path=str(tiny[sae_key]))
    info = saes.describe(sae_cfg)
    handle = SAEHandle("s", saes.load(sae_cfg, cpu), models.parse_hook(info.hook, 4), 0.0)
    t = Tokenization(tok, PositionsConfig(), prepend_bos=True, context_size=24, exclude_special=True)
    docs = t.text_documents([(i, text, {}) for i, text in enumerate(tiny["docs"])])
    out = {}
    for ahead in (0, 2):
        ext = Extractor(model, [handle], t, batch_tokens=64, device=cpu, reconstruction=True, ahead=ahead,
                        encode_chunk=16)  # several chunks a batch
        rows = []
        for block in blocks(docs, 200):
            rows += [r for _, r in ext.push(block, True)]
        rows += [r for _, r in ext.drain()]
        stats = ext.stats[("s", "all")].to_table("s", "all")
        recon = ext.recon[("s", "all")]
        out[ahead] = (rows, stats, (recon.n, recon.sse, recon.sum_sq, recon.l0, recon.hist.tolist()))
    (rows0, stats0, recon0), (rows2, stats2, recon2) = out[0], out[2]
    assert len(rows0) == len(rows2) > 3 and sum(len(r[("s", "all")]["doc_id"]) for r in rows0) > 0
    for a, b in zip(rows0, rows2):
        for col in ("doc_id", "pos", "feature", "value"):
            assert np.array_equal(a[("s", "all")][col], b[("s", "all")][col])
    assert stats0.equals(stats2) and recon0 == recon2
