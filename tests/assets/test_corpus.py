"""The corpus shipped in saeray/assets/data/: what `saeray corpus`, the demo and `train-sae` read.

It must equal what its recipe builds from the sources (the shipped SAEs were trained on that corpus
and hold out its second half), and it must build on a machine without those sources.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from saeray.assets import corpus, textsources

SAES = Path(__file__).resolve().parents[2] / "saeray" / "assets" / "saes"


def _rows(d: Path) -> list[dict[str, str]]:
    return [r for f in sorted(d.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def _sources_or_skip() -> list[dict[str, str]]:
    meta = corpus.shipped_metadata()
    if sys.version.split()[0] != meta["sources"]["stdlib"]["python"]:
        pytest.skip(f"the shipped corpus was built on Python {meta['sources']['stdlib']['python']}; "
                    f"this is {sys.version.split()[0]}, whose stdlib differs")
    for name, info in textsources.SOURCES.items():
        if textsources.package_version(info["package"]) != meta["sources"][name]["version"]:
            pytest.skip(f"{info['package']} {meta['sources'][name]['version']} (the shipped corpus' source) "
                        "is not installed")
    return corpus.from_sources()


def test_shipped_file_is_small_and_described():
    meta = corpus.shipped_metadata()
    docs = corpus.shipped()
    assert corpus.DATA.stat().st_size < 4 * 2**20
    assert len(docs) == meta["documents"]
    assert sum(len(d["text"]) for d in docs) == sum(v["chars"] for v in meta["by_kind"].values()) > 8_000_000
    for name, info in meta["sources"].items():
        assert info["licence"], name
        assert info.get("version") or info.get("python"), name


@pytest.mark.slow
def test_shipped_corpus_equals_the_from_sources_build(tmp_path):
    docs = _sources_or_skip()
    shipped = corpus.shipped()
    assert len(shipped) == len(docs)
    assert shipped == docs  # same documents in the same order
    # the shipped SAEs' split: every training report's held-out documents are the same ones
    for report in SAES.glob("*/saeray_training.json"):
        start, end = json.loads(report.read_text())["held_out_docs"]
        assert end == len(docs)
        assert shipped[start:end] == docs[start:end]
    # and the parquet files `saeray corpus` writes are byte for byte those of a build from the sources
    built = corpus.build(tmp_path / "shipped")
    corpus._write(docs, tmp_path / "sources", 8, corpus.COLUMNS)
    for f in sorted(built.glob("part-*.parquet")):
        assert f.read_bytes() == (tmp_path / "sources" / f.name).read_bytes(), f.name


def test_demo_corpus_builds_without_the_sources(tmp_path, monkeypatch):
    """No Debian packages, no stdlib to read: the demo's datasets still come out, equal to the shipped corpus."""
    from saeray.cli import demo

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(textsources, "package_version", lambda package: None)
    monkeypatch.setattr(textsources, "PYDOC", empty)
    monkeypatch.setattr(textsources, "FORTUNES", empty)
    monkeypatch.setattr(textsources, "SOURCES", {k: {**v, "path": str(empty)} for k, v in textsources.SOURCES.items()})
    monkeypatch.setattr(corpus, "stdlib_files", lambda: [])
    with pytest.raises(textsources.MissingSource):
        corpus.from_sources()

    data = demo.split_corpus(tmp_path / "demo")
    shipped = corpus.shipped()
    assert _rows(tmp_path / "demo" / "corpus") == shipped
    prose = pl.read_parquet(str(data["prose"] / "*.parquet"))
    code = pl.read_parquet(str(data["code"] / "*.parquet"))
    assert prose.height + code.height == len(shipped)
    assert set(prose["kind"]) == set(corpus.PROSE_KINDS) and set(code["kind"]) == {"code"}
    assert code["text"].to_list() == [d["text"] for d in shipped if d["kind"] == "code"]
    meta = json.loads((tmp_path / "demo" / "corpus" / "_corpus.json").read_text())
    assert meta["sources"] == corpus.shipped_metadata()["sources"]


def test_a_damaged_corpus_file_is_refused(tmp_path):
    data = tmp_path / "corpus.jsonl.zst"
    docs = corpus.shipped()[:20]
    corpus.write_data(docs, {"stdlib": {"licence": "PSF-2.0"}}, data)
    assert corpus.shipped(data) == docs
    meta = json.loads((tmp_path / "corpus.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "corpus.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        corpus.shipped(data)
