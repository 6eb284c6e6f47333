"""Hostile and odd input. Each case is either processed correctly (each test says what correct is,
checked against the slow reference) or refused with a clear error before any shard is committed."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import WORDS, base_config, canonical_doc_ids, make_sae
from reference import assert_same_rows, reference_rows

from saeray.analysis.stats import features, scan_activations, scan_docs
from saeray.engine import config
from saeray.engine.data import DataError
from saeray.executors import run

ODD = [
    "",                                                        # empty
    "   ",                                                     # whitespace only
    "\n\t \r\n",
    None,                                                      # null
    "plain words here.",
    "<script>alert('x')</script> <b>bold</b> &amp; &lt;/div&gt; <!-- comment -->",
    "{{ user.name }} {% for x in items %}{{ x }}{% endfor %} ${HOME} $(rm -rf /) `id`",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",   # chat-template tokens as text
    "<bos><pad><eos> <pad> inside a document <eos>",                # this tokenizer's special tokens as text
    "nul \x00 byte, right-to-left \u202e override, emoji \U0001F389, combining e\u0301",
    " ".join(["mountain"] * 60),                              # longer than one context window (24 tokens)
]


def _tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llama"])


def _run(tiny, tmp_path: Path, data: Path, sae: str | Path = "sae_standard", name: str = "run", **over) -> Path:
    out = tmp_path / name
    sae_path = tiny[sae] if isinstance(sae, str) else sae
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(sae_path)}], data, out, **over)
    run(config.from_dict(raw), executor="local")
    return out


def _parquet(tmp_path: Path, texts: list, name: str = "data") -> Path:
    d = tmp_path / name
    d.mkdir()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), d / "a.parquet")
    return d


def test_odd_documents_are_processed_like_the_reference(tiny, tmp_path):
    """Correct: one docs row per dataset row in order (doc_id = row index), None read as an empty
    document, `n_tokens` = the tokenizer's count, activation rows equal to the slow reference. Markup
    and template syntax are plain text (nothing is rendered); special-token strings in the text become
    the special tokens (as Hugging Face tokenizers do, so chat-formatted corpora keep their structure)
    and, being special, are not counted positions."""
    out = _run(tiny, tmp_path, _parquet(tmp_path, ODD))
    tok = _tokenizer(tiny)
    texts = [t or "" for t in ODD]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    docs = scan_docs(out).collect().sort("doc_id")
    assert docs["doc_id"].to_list() == list(range(len(ODD)))
    assert docs["n_tokens"].to_list() == [len(i) for i in ids]
    assert docs["token_ids"].to_list() == ids
    assert ids[0] == [] and ids[3] == [] and ids[1] and ids[2]  # "" and None are empty; whitespace is text
    special = set(tok.all_special_ids)
    assert special & set(ids[7]) and special & set(ids[8])
    rows = scan_activations(out).collect()
    ref = reference_rows(tiny["llama"], tiny["sae_standard"], texts, context_size=24)
    assert_same_rows(rows.select("doc_id", "pos", "feature", "value"), ref, atol=1e-5)
    specials_at = {(d, p) for d, i in enumerate(ids) for p, t in enumerate(i) if t in special}
    assert not specials_at & set(zip(rows["doc_id"], rows["pos"]))
    counted = sum(t not in special for i in ids for t in i)
    assert features(out).collect()["n_tokens"].unique().to_list() == [counted]


def _invalid_utf8_files(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    raws = [b"valid start \xff\xfe invalid \xc3\x28 mountain", b"truncated \xe2\x82", b"fine text"]
    files = {}
    for fmt in ("text", "json", "parquet"):
        d = tmp_path / fmt
        d.mkdir()
        files[fmt] = d
    (files["text"] / "a.txt").write_bytes(b"\n".join(raws) + b"\n")
    # JSON escapes cannot carry raw bytes: put them between the quotes, as a broken exporter would
    (files["json"] / "a.jsonl").write_bytes(b"".join(b'{"text": "' + r + b'"}\n' for r in raws))
    data = b"".join(raws)
    offsets = np.cumsum([0] + [len(r) for r in raws]).astype(np.int32)
    arr = pa.Array.from_buffers(pa.string(), len(raws), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    pq.write_table(pa.table({"text": arr}), files["parquet"] / "a.parquet")
    return files, [r.decode("utf-8", errors="replace") for r in raws]


def test_invalid_utf8_is_read_as_replacement_characters_in_every_format(tiny, tmp_path):
    """Correct: each invalid byte sequence becomes U+FFFD (Python's 'replace'), the same in text,
    JSON lines and parquet; the documents are then ordinary text."""
    files, expected = _invalid_utf8_files(tmp_path)
    assert all("\ufffd" in t for t in expected[:2])
    tok = _tokenizer(tiny)
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in expected]
    rows = {}
    for fmt, d in files.items():
        out = _run(tiny, tmp_path, d, name=f"run-{fmt}")
        assert scan_docs(out).collect().sort("doc_id")["token_ids"].to_list() == want, fmt
        rows[fmt] = scan_activations(out).collect().sort("doc_id", "pos", "feature")
    assert rows["text"].equals(rows["json"]) and rows["text"].equals(rows["parquet"])
    ref = reference_rows(tiny["llama"], tiny["sae_standard"], expected, context_size=24)
    assert_same_rows(rows["parquet"].select("doc_id", "pos", "feature", "value"), ref, atol=1e-5)


@pytest.mark.parametrize("case", ["parquet-int", "parquet-binary", "json-number", "json-list", "json-broken",
                                  "json-not-object", "missing-column"])
def test_non_text_values_are_refused_with_file_and_line(tiny, tmp_path, case):
    d = tmp_path / "data"
    d.mkdir()
    good = [json.dumps({"text": f"fine {i}"}) for i in range(5)]
    if case.startswith("parquet") or case == "missing-column":
        pq.write_table(pa.table({"text": ["a fine document", "another one"]}), d / "a.parquet")
        column = {"parquet-int": pa.array([1, 2]), "parquet-binary": pa.array([b"\x00\x01", b"ok"], pa.binary()),
                  "missing-column": None}[case]
        table = pa.table({"text": column}) if column is not None else pa.table({"body": ["x", "y"]})
        pq.write_table(table, d / "b.parquet")
        where = str(d / "b.parquet")
    else:
        bad = {"json-number": '{"text": 12345}', "json-list": '{"text": ["a", "b"]}',
               "json-broken": '{"text": "unterminated', "json-not-object": '["text"]'}[case]
        (d / "a.jsonl").write_text("\n".join(good) + "\n")
        (d / "b.jsonl").write_text("\n".join(good[:3] + [bad] + good[3:]) + "\n")
        where = f"{d / 'b.jsonl'} line 4"
    message = {"parquet-int": "has type int64, not string", "parquet-binary": "has type binary, not string",
               "json-number": "holds int 12345, not a string", "json-list": "holds list", "json-broken": "is not valid JSON",
               "json-not-object": "is a JSON list", "missing-column": "column 'text' is not in"}[case]
    out = tmp_path / "run"
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], d, out)
    if case.startswith("json"):
        # Planning reads the first rows of the first file only (never the corpus): a bad line further on
        # fails its unit with one line naming the file and line; the other units commit.
        from saeray.engine.store import RunDir
        from saeray.executors import RunFailed

        with pytest.raises(RunFailed) as e:
            run(config.from_dict(raw), executor="local")
        assert where in str(e.value) and message in str(e.value), str(e.value)
        assert RunDir(out).committed() == {0}
        return
    with pytest.raises(DataError) as e:
        run(config.from_dict(raw), executor="local")
    assert where in str(e.value) and message in str(e.value), str(e.value)
    assert not out.exists()  # refused before the run directory, let alone a unit


@pytest.mark.parametrize("fmt", ["parquet", "json", "text"])
def test_dataset_with_zero_rows_is_refused(tiny, tmp_path, fmt):
    d = tmp_path / "data"
    d.mkdir()
    if fmt == "parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "a.parquet")
    else:
        (d / f"a.{'jsonl' if fmt == 'json' else 'txt'}").write_bytes(b"" if fmt == "text" else b"\n\n")
    out = tmp_path / "run"
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], d, out)
    with pytest.raises(DataError, match="has no rows"):
        run(config.from_dict(raw), executor="local")
    assert not out.exists()


# ---- scale: one huge document, a million tiny ones ------------------------------------------------
# Small TopK SAEs (k=2) close to the embeddings keep the model's share of the cost small: these tests
# are about what a corpus does to saeray (windows, batches, bookkeeping), not about FLOPs.


@pytest.fixture(scope="module")
def early_saes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("early")
    return {"post0": make_sae(root / "post0", "topk", 64, "blocks.0.hook_resid_post", seed=11, k=2),
            "pre0": make_sae(root / "pre0", "topk", 64, "blocks.0.hook_resid_pre", seed=12, k=2)}


def _window_reference(tiny, sae_dir: Path):
    """The slow computation for one window: [BOS] + ids[start:start+step] through HF, then sae.encode."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).eval()
    sae = SAE.load_from_disk(sae_dir)
    bos = _tokenizer(tiny).bos_token_id

    def window(token_ids: np.ndarray, start: int, step: int) -> dict[tuple[int, int], float]:
        ids = [bos] + token_ids[start:start + step].tolist()
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # output of layer 0
            acts = sae.encode(hidden)
        return {(start + j - 1, f): float(acts[j, f])
                for j in range(1, len(ids)) for f in torch.nonzero(acts[j]).flatten().tolist()}

    return window


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_single_5mb_document(tiny, tmp_path, early_saes):
    """Correct: one document of every token, cut into windows of `context_size` (BOS + 255 tokens) that
    are each the reference computation; statistics count every token."""
    rng = random.Random(5)
    words = "mountain feature energy planet python return sparse".split()
    text = " ".join(rng.choice(words) for _ in range(700_000))[:5_000_000]
    assert len(text.encode()) == 5_000_000
    d = _parquet(tmp_path, [text])
    out = _run(tiny, tmp_path, d, sae=early_saes["post0"], tokens__context_size=256, tokens__batch_tokens=32768)
    docs = scan_docs(out).collect()
    token_ids = np.array(docs["token_ids"][0], dtype=np.int64)
    assert docs.height == 1 and docs["n_tokens"][0] == len(_tokenizer(tiny)(text, add_special_tokens=False)["input_ids"])
    step = 255
    n_windows = -(-len(token_ids) // step)
    rows = scan_activations(out).collect()
    assert rows["pos"].max() < len(token_ids) and rows.height >= len(token_ids)
    f = features(out).collect()
    assert f["n_tokens"][0] == len(token_ids) and f["n_active"].sum() == rows.height
    # a sample of windows, the first and the (partial) last among them, against the slow computation
    reference = _window_reference(tiny, early_saes["post0"])
    for w in sorted({0, 1, n_windows // 2, n_windows - 2, n_windows - 1, *random.Random(1).sample(range(n_windows), 3)}):
        start = w * step
        want = reference(token_ids, start, step)
        got = rows.filter(pl.col("pos").is_between(start, start + step - 1))
        assert got.height == len(want), w
        for p, feat, v in got.select("pos", "feature", "value").iter_rows():
            assert abs(want[(p, feat)] - v) <= 1e-4 * max(1.0, abs(v)), (w, p, feat)


MANY = int(os.environ.get("SAERAY_MANY_DOCS", "20000"))
"""One-word documents in the scale test: 20,000 by default, SAERAY_MANY_DOCS=1000000 for a million."""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_many_one_word_documents(tiny, tmp_path, early_saes):
    """Correct: every document kept with its own doc_id, and each one's rows equal those of its word
    computed alone (documents never share a context), whatever the batch it landed in."""
    rng = random.Random(7)
    vocab = sorted(set(WORDS))
    words = [rng.choice(vocab) for _ in range(MANY)]
    d = tmp_path / "data"
    d.mkdir()
    for k in range(4):  # 4 files, one shard each
        pq.write_table(pa.table({"text": words[k * MANY // 4:(k + 1) * MANY // 4]}), d / f"part-{k}.parquet")
    out = _run(tiny, tmp_path, d, sae=early_saes["pre0"], tokens__batch_tokens=32768)
    docs = scan_docs(out).select("doc_id", "n_tokens").collect().sort("doc_id")
    ids = canonical_doc_ids(d)  # file index << 32 | row
    assert docs.height == MANY and docs["doc_id"].to_list() == ids
    ref = reference_rows(tiny["llama"], early_saes["pre0"], vocab, context_size=24)  # each word as its own document
    per_word = ref.rename({"doc_id": "word_id"}).with_columns(pl.col("word_id").cast(pl.Int64))
    index = {w: i for i, w in enumerate(vocab)}
    doc_words = pl.DataFrame({"doc_id": pl.Series(ids, dtype=pl.Int64),
                              "word_id": pl.Series([index[w] for w in words], dtype=pl.Int64)})
    want = doc_words.join(per_word, on="word_id").drop("word_id").sort("doc_id", "pos", "feature")
    got = scan_activations(out).select("doc_id", "pos", "feature", "value").collect().sort("doc_id", "pos", "feature")
    assert got.height == want.height > MANY
    assert got.select("doc_id", "pos", "feature").equals(want.select("doc_id", "pos", "feature"))
    assert float((got["value"] - want["value"]).abs().max()) <= 1e-4
