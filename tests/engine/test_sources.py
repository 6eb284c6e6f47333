"""Data files as work units: every compression the Pile's mirrors use, doc ids that do not depend on unit
size, one-line errors for corrupt files, and pre-tokenized datasets equal to the same documents as text."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import base_config
from reference import assert_same_rows, read_rows

from saeray.engine import config, reading, sources
from saeray.engine.config import DataConfig
from saeray.engine.plan import prepare
from saeray.engine.storage import READ
from saeray.executors import run
from saeray.executors.tasks import unit_stream

COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" + (b"\n" if i % 7 == 3 else b"") for i, r in enumerate(rows))


def _all_rows(dataset: str, unit_bytes: int, columns: list[str]) -> list[tuple[int, dict]]:
    cfg = DataConfig(dataset=dataset, unit_bytes=unit_bytes)
    files, fmt = reading.list_dataset(cfg)
    plan = reading.plan(cfg, files, fmt)
    out = []
    for f in range(len(plan.files)):
        for task, payload in unit_stream(plan, f, set()):
            out += list(reading.unit_rows(plan, cfg, task, payload, columns))
    return out


@pytest.mark.parametrize("ext", list(COMPRESS))
def test_every_compression_gives_the_same_rows_for_any_unit_size(tmp_path, ext):
    rows = [{"text": f"document {i} " + "word " * (i % 13), "label": i % 3} for i in range(200)]
    d = tmp_path / "d"
    d.mkdir()
    (d / f"a.jsonl{ext}").write_bytes(COMPRESS[ext](_jsonl(rows[:120])))
    (d / f"b.jsonl{ext}").write_bytes(COMPRESS[ext](_jsonl(rows[120:])))
    want = [((0 << 32) | i, r) for i, r in enumerate(rows[:120])] + [((1 << 32) | i, r) for i, r in enumerate(rows[120:])]
    for unit_bytes in (1, 100, 1000, 1 << 20):
        assert _all_rows(str(d), unit_bytes, ["text", "label"]) == want


def test_text_files_every_line_is_a_row(tmp_path):
    t = tmp_path / "t.txt.gz"
    t.write_bytes(gzip.compress(b"first line\r\nsecond\n\nfourth \xff bad utf8"))
    got = _all_rows(str(t), 8, ["text"])
    assert got == [(0, {"text": "first line"}), (1, {"text": "second"}), (2, {"text": ""}),
                   (3, {"text": "fourth \ufffd bad utf8"})]


def test_units_are_cut_at_line_ends_deterministically(tmp_path):
    f = tmp_path / "x.jsonl.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress(_jsonl([{"text": "y" * (i * 37 % 300)} for i in range(500)])))
    cut = [(u.k, u.row_start, u.n_rows, u.byte_start, u.n_bytes) for u, _ in sources.line_units(str(f), 0, "json", 4096)]
    again = [(u.k, u.row_start, u.n_rows, u.byte_start, u.n_bytes)
             for u, _ in sources.line_units(str(f), 0, "json", 4096, block_size=999)]
    assert cut == again and len(cut) > 5 and all(n >= 4096 for *_, n in cut[:-1])
    assert sum(u[2] for u in cut) == 500


def test_corrupt_and_truncated_files_name_the_file_and_where(tmp_path):
    rows = _jsonl([{"text": "z" * 50 + str(i)} for i in range(3000)])
    good = zstandard.ZstdCompressor().compress(rows)
    bad = tmp_path / "cut.jsonl.zst"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(sources.DataError, match=r"cut\.jsonl\.zst: cannot decompress at compressed byte [\d,]+ "
                                                r"\(after line [\d,]+\).*truncated or corrupt"):
        _all_rows(str(bad), 1 << 20, ["text"])
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(b"this is not gzip data at all" * 10)
    with pytest.raises(sources.DataError, match=r"bad\.jsonl\.gz: cannot decompress at compressed byte"):
        _all_rows(str(gz), 1 << 20, ["text"])
    js = tmp_path / "j.jsonl"
    js.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(sources.DataError, match=r"j\.jsonl line 3 is not valid JSON"):
        _all_rows(str(js), 1 << 20, ["text"])


def test_planning_reads_only_metadata_and_first_rows(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    rng = np.random.default_rng(0)
    blob = zstandard.ZstdCompressor().compress(_jsonl([{"text": rng.bytes(200).hex()} for _ in range(5000)]))
    for i in range(5):
        (d / f"{i:02d}.jsonl.zst").write_bytes(blob)
    cfg = DataConfig(dataset=str(d))
    READ.reset()
    files, fmt = reading.list_dataset(cfg)
    assert READ.bytes == 0 and [f.size for f in files] == [len(blob)] * 5 and all(f.version for f in files)
    reading.plan(cfg, files, fmt)
    # the first rows of the first file, nothing more (zstd emits whole blocks of up to 128 KiB)
    assert 0 < READ.bytes <= 256 << 10 < len(blob)


# ---- pre-tokenized datasets -------------------------------------------------------------------------


def _tokenized(tiny, tmp_path: Path, with_bos: bool) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in tiny["docs"]]
    if with_bos:  # every other row already starts with BOS: it must not get a second one
        ids = [[tok.bos_token_id, *x] if i % 2 else x for i, x in enumerate(ids)]
    d = tmp_path / "tok"
    d.mkdir()
    bounds = np.linspace(0, len(ids), 4).astype(int)
    for i in range(3):
        a, b = bounds[i], bounds[i + 1]
        pq.write_table(pa.table({"input_ids": pa.array(ids[a:b], pa.list_(pa.int32())),
                                 "kind": ["code" if j % 2 else "prose" for j in range(a, b)]}),
                       d / f"part-{i}.parquet", row_group_size=7)
    return d


def test_pretokenized_parquet_equals_text(tiny, tmp_path):
    saes = [{"name": "a", "path": str(tiny["sae_standard"])}]
    text = tmp_path / "text"
    run(config.from_dict(base_config(tiny["llama"], saes, tiny["data"], text, data__keep_columns=["kind"])),
        executor="local")
    tok = tmp_path / "tokens"
    raw = base_config(tiny["llama"], saes, _tokenized(tiny, tmp_path, with_bos=True), tok,
                      data__token_column="input_ids", data__keep_columns=["kind"], data__max_tokens=10**9)
    run(config.from_dict(raw), executor="local")
    assert_same_rows(read_rows(tok), read_rows(text), atol=1e-6)
    import polars as pl

    a = pl.read_parquet(str(text / "docs" / "**" / "*.parquet")).sort("doc_id")
    b = pl.read_parquet(str(tok / "docs" / "**" / "*.parquet")).sort("doc_id")
    assert a.select("doc_id", "n_tokens", "token_ids", "kind").equals(b.select("doc_id", "n_tokens", "token_ids", "kind"))
    # the budget comes from list lengths: 300 tokens, the same documents as from text
    small = tmp_path / "small"
    run(config.from_dict({**raw, "data": {**raw["data"], "max_tokens": 300}, "output": {"dir": str(small)}}),
        executor="local")
    c = pl.read_parquet(str(small / "docs" / "**" / "*.parquet")).sort("doc_id")
    assert c["n_tokens"].sum() == 300 and c["doc_id"].to_list() == a["doc_id"].to_list()[:c.height]


def test_bad_token_column_is_one_line_error_and_no_run_dir(tiny, tmp_path):
    saes = [{"name": "a", "path": str(tiny["sae_standard"])}]
    d = tmp_path / "bad"
    d.mkdir()
    pq.write_table(pa.table({"input_ids": [["a", "b"], ["c"]]}), d / "strings.parquet")
    out = tmp_path / "run"
    with pytest.raises(sources.DataError, match=r"token_column 'input_ids' has type list<element: string>, not a "
                                                r"list of integers"):
        prepare(config.from_dict(base_config(tiny["llama"], saes, d, out, data__token_column="input_ids")))
    (d / "strings.parquet").unlink()
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 3], [4, 99999]], pa.list_(pa.int64()))}), d / "big.parquet")
    with pytest.raises(sources.DataError, match=r"token id 99999, outside the model's vocabulary \(0\.\.\d+\)"):
        run(config.from_dict(base_config(tiny["llama"], saes, d, out, data__token_column="input_ids")),
            executor="local")
    assert not out.exists()
    j = tmp_path / "j.jsonl"
    j.write_text('{"ids": [1, 2, 100000]}\n')
    with pytest.raises(sources.DataError, match=r"j\.jsonl line 1: token id 100000 is outside"):
        prepare(config.from_dict(base_config(tiny["llama"], saes, j, out, data__token_column="ids")))
    assert not out.exists()
    with pytest.raises(sources.DataError, match="column 'nope' is not in the dataset"):
        prepare(config.from_dict(base_config(tiny["llama"], saes, j, out, data__token_column="nope")))


def test_hub_code_path_resolves_a_local_folder_in_the_piles_layout(tmp_path, monkeypatch):
    """A hub id resolves through `datasets.load_dataset_builder` (which also takes a local folder) to data
    files, which then take the same fsspec path as URLs: what `monology/pile-uncopyrighted` does on the hub."""
    train = tmp_path / "pile" / "train"
    train.mkdir(parents=True)
    for i in range(3):
        (train / f"{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            _jsonl([{"text": f"file {i} row {r}", "meta": {"pile_set_name": "Pile-CC"}} for r in range(5)])))
    monkeypatch.setattr(reading, "_is_path", lambda spec: False)  # as for a hub id
    monkeypatch.setattr(reading, "_looks_local", lambda spec: False)
    cfg = DataConfig(dataset=str(tmp_path / "pile"), split="train", keep_columns=("meta",))
    files, fmt = reading.list_dataset(cfg)
    assert fmt == "json" and [Path(f.url).name for f in files] == ["00.jsonl.zst", "01.jsonl.zst", "02.jsonl.zst"]
    assert all(f.size > 0 and f.version for f in files)
    with pytest.raises(sources.DataError, match="no split 'validation'"):
        reading.list_dataset(DataConfig(dataset=str(tmp_path / "pile"), split="validation"))


class _Files:
    """An HTTP server on 127.0.0.1 serving bytes from memory with Range requests (as object stores do)."""

    def __init__(self, files: dict[str, bytes]):
        import http.server
        import threading

        served = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _body(self) -> bytes | None:
                data = served.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                return data

            def do_HEAD(self):
                data = self._body()
                if data is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("ETag", f'"{len(data)}-{hash(data) & 0xffff}"')
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()

            def do_GET(self):
                data = self._body()
                if data is None:
                    return
                rng = self.headers.get("Range")
                if rng:
                    a, b = rng.split("=")[1].split("-")
                    a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
                    data = data[a:b + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_https_urls_read_through_the_same_path(tmp_path):
    rows = [{"text": f"served {i} " + "x" * (i % 50)} for i in range(400)]
    blob = zstandard.ZstdCompressor().compress(_jsonl(rows))
    server = _Files({"pile/00.jsonl.zst": blob})
    try:
        got = _all_rows(f"{server.url}/pile/00.jsonl.zst", 2000, ["text"])
        assert got == [(i, r) for i, r in enumerate(rows)]
        (info,) = reading.list_dataset(DataConfig(dataset=f"{server.url}/pile/00.jsonl.zst"))[0]
        assert info.size == len(blob) and info.version.startswith("etag:")
    finally:
        server.close()
