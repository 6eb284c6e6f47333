"""Commands that read run directories (saeray/analysis): stats, top, explore, diff, transfer, separate.

    saeray stats RUN
    saeray top RUN --feature LIST [--k 10] [--out top.parquet --intervals 5]
    saeray explore RUN [--category COL] [--features LIST] --out DIR
    saeray diff RUN_A RUN_B --out DIR [--preset default|vlm_transfer] ...
    saeray transfer BASE VLM_TEXT VLM_IMAGE --out DIR [--active-value 0.1 ...]
    saeray separate RUN --label COL [--reference REF_RUN] [--max-density 0.02] --out DIR
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from . import console
from .featlist import feature_lists
from .options import Command, option

RUN_HELP = "a run directory"
ONLY_PAIR = "(default: the run's only one)"
WHICH_SAE = f"which SAE of the run {ONLY_PAIR}"


def run_dir() -> str:
    """The positional RUN most commands read."""
    return option(help=RUN_HELP, positional=True)


def source(help: str) -> str:
    """`--source auto|rows|partials`: where an analysis reads the documents' values from."""
    return option("auto", help, choices=("auto", "rows", "partials"))


@dataclass(frozen=True, kw_only=True)
class StatsArgs:
    run: str = run_dir()


def stats(a: StatsArgs) -> int:
    import polars as pl

    from ..analysis.stats import summary, summary_notes, training_gaps, write_features

    path = write_features(a.run)
    frame = pl.read_parquet(path)
    print(f"wrote {path} ({frame.height:,} rows)")
    table = summary(frame)
    with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=160):
        print(table)
    for line in summary_notes(table):
        print(line)
    for g in training_gaps(a.run):
        print(f"warning: SAE {g['sae']!r} (group {g['group']}) explains {g['explained_variance']:.2f} of the variance "
              f"on this run's {g['tokens']:,} tokens, far below the {g['report_explained_variance']:.2f} of its "
              f"training report on {g['report_tokens']:,} held-out tokens ({g['report']}): this text is unlike what "
              "it was trained on, and its features miss much of what the model computes here. Train one on your "
              "data with `saeray train-sae`, or use a wider SAE", file=sys.stderr)
    print(console.after_stats(a.run))
    return 0


@dataclass(frozen=True, kw_only=True)
class TopArgs:
    run: str = run_dir()
    feature: list[str] = feature_lists()
    k: int = option(10, "top contexts per feature")
    sae: str | None = option(None, "only this SAE of the run (default: all)")
    group: str | None = option(None, "only this position group (default: all)")
    before: int = option(10, "tokens of context before the max")
    after: int = option(10, "tokens of context after the max")
    intervals: int | None = option(None, "with --out: also sample BINS activation intervals", metavar="BINS")
    per_bin: int = option(3, "with --intervals: documents sampled per interval")
    seed: int = option(0, "interval sample seed (0: the one the partials hold)")
    source: str = source("activation rows or the units' example partials (auto: partials when they can answer)")
    no_decode: bool = option(False, "print token ids (skip loading the tokenizer)")
    out: str | None = option(None, "write the examples (with per-token activations) to this .parquet")


def top(a: TopArgs) -> int:
    import polars as pl

    from ..analysis.top import interval_examples, load_tokenizer, top_examples
    from .featlist import parse_features

    feats = parse_features(a.feature)
    tok = None if a.no_decode else load_tokenizer(a.run)
    window = (a.before, a.after)
    frame = top_examples(a.run, feats, sae=a.sae, group=a.group, k=a.k, window=window, tokenizer=tok, source=a.source)
    for row in frame.iter_rows(named=True):
        mark = row["pos"] - row["window_start"]
        if tok is not None:
            text = "".join(f"[[{t}]]" if i == mark else t for i, t in enumerate(row["tokens"]))
        else:
            text = " ".join(f"[[{t}]]" if i == mark else str(t) for i, t in enumerate(row["token_ids"]))
        print(f"{row['sae']}/{row['group']} feature {row['feature']} #{row['rank']}  doc {row['doc_id']} "
              f"pos {row['pos']}  max {row['value']:.4g}\n    {text!r}")
    if a.out:
        frames = [frame]
        if a.intervals:
            frames.append(interval_examples(a.run, feats, sae=a.sae, group=a.group, bins=a.intervals,
                                            per_bin=a.per_bin, seed=a.seed, window=window, tokenizer=tok,
                                            source=a.source))
        pl.concat(frames, how="diagonal_relaxed").write_parquet(a.out)
        print(f"wrote {a.out}")
    listed = ",".join(str(f) for f in feats)
    print(console.next_steps((f"saeray report {a.run} --features {listed} --out {a.run}/report",
                              "these features' cards in the HTML report"),
                             (f"saeray logits {a.run} --feature {listed}", "the tokens they promote and suppress")))
    return 0


@dataclass(frozen=True, kw_only=True)
class ExploreArgs:
    run: str = run_dir()
    category: str | None = option(None, "a docs column (data.keep_columns) to find specialists per category")
    features: str | None = option(None, "features for co-activation counts and the feature x document matrix")
    n: int = option(10, "rows per table")
    strong_frac: float = option(0.5, "'strong' = value >= this fraction of the feature's max")
    sae: str | None = option(None, WHICH_SAE)
    group: str | None = option(None, f"which position group {ONLY_PAIR}")
    out: str = option(help="directory for the tables (.parquet and .csv)")


def explore(a: ExploreArgs) -> int:
    from pathlib import Path

    import polars as pl

    from ..analysis import explore as queries
    from .featlist import parse_features

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"sae": a.sae, "group": a.group}
    tables = {"strongest": queries.strongest(a.run, n=a.n, **kw),
              "most_frequent": queries.most_frequent(a.run, n=a.n, **kw),
              "most_selective": queries.most_selective(a.run, n=a.n, strong_frac=a.strong_frac, **kw)}
    if a.category:
        tables["specialists"] = queries.category_specialists(a.run, a.category, n=a.n, strong_frac=a.strong_frac,
                                                             **kw)
    if a.features:
        feats = parse_features(a.features)
        tables["coactivation"] = queries.coactivation(a.run, feats, a.category, **kw)
        tables["feature_by_doc"] = queries.feature_by_doc_matrix(a.run, feats, a.category, **kw)
    with pl.Config(tbl_rows=a.n, tbl_width_chars=150):
        for name, frame in tables.items():
            frame.write_parquet(out / f"{name}.parquet")
            frame.write_csv(out / f"{name}.csv")
            if name != "feature_by_doc":
                print(f"== {name}\n{frame.head(a.n)}")
    print(f"wrote {', '.join(tables)} (.parquet + .csv) to {out}")
    return 0


THRESHOLDS = {"active_value": "a token counts when value > this",
              "active_fraction": "active when the fraction of tokens counted exceeds this",
              "new_ratio": "new_vision / new_text need mean > this x the base mean",
              "stable_rho": "stable when rho > this", "shifted_rho": "shifted when rho > this"}
"""The classification thresholds `diff` and `transfer` take; each defaults to a preset's (PRESETS in
saeray/analysis/diff.py)."""


def threshold(name: str, default: str) -> float | None:
    return option(None, f"{THRESHOLDS[name]} (default: {default})")


@dataclass(frozen=True, kw_only=True)
class DiffArgs:
    run_a: str = option(help="run A", positional=True)
    run_b: str = option(help="run B, compared with A", positional=True)
    out: str = option(help="directory for diff.parquet, diff.json and top_<group>_<metric>.csv")
    preset: str = option("default", "classification rules; vlm_transfer = workflow 1 (value > 0.1 on > 1% of tokens, "
                         "3x, 0.7/0.3)", choices=("default", "vlm_transfer"))
    pseudo: float = option(1.0, "pseudo-count (tokens) for log2 fold changes")
    active_value: float | None = threshold("active_value", "the preset's")
    active_fraction: float | None = threshold("active_fraction", "the preset's")
    new_ratio: float | None = threshold("new_ratio", "the preset's")
    stable_rho: float | None = threshold("stable_rho", "the preset's")
    shifted_rho: float | None = threshold("shifted_rho", "the preset's")
    top_k: int = option(100, "rows per top-increase table")
    no_significance: bool = option(False, "skip the per-document Welch tests")
    source: str = source("per-document moments from the units' partials (auto, when every unit has them) or the rows")


def diff(a: DiffArgs) -> int:
    import polars as pl

    from ..analysis.diff import write_diff

    out = write_diff(a.run_a, a.run_b, a.out, k=a.top_k, preset=a.preset, pseudo=a.pseudo,
                     active_value=a.active_value, active_fraction=a.active_fraction, new_ratio=a.new_ratio,
                     stable_rho=a.stable_rho, shifted_rho=a.shifted_rho, significance=not a.no_significance,
                     source=a.source)
    frame = pl.read_parquet(out)
    print(f"wrote {out} ({frame.height:,} rows) and top-change CSVs in {a.out}")
    with pl.Config(tbl_rows=30):
        print(frame.group_by("sae", "group", "class").len().sort("sae", "group", "class"))
    print(console.next_steps((f"saeray report {a.run_a} --vs {a.run_b} --out {a.out}/report",
                              "the diff's HTML report and figures")))
    return 0


@dataclass(frozen=True, kw_only=True)
class TransferArgs:
    base: str = option(help="the text model's run on text", positional=True)
    vlm_text: str = option(help="the vision-language model's run on the same text", positional=True)
    vlm_image: str = option(help="the vision-language model's run on image+text (positions.mode modality)",
                            positional=True)
    out: str = option(help="directory for transfer.parquet, transfer.csv, transfer.json")
    active_value: float | None = threshold("active_value", "the vlm_transfer preset of diff")
    active_fraction: float | None = threshold("active_fraction", "the vlm_transfer preset of diff")
    new_ratio: float | None = threshold("new_ratio", "the vlm_transfer preset of diff")
    stable_rho: float | None = threshold("stable_rho", "the vlm_transfer preset of diff")
    shifted_rho: float | None = threshold("shifted_rho", "the vlm_transfer preset of diff")


def transfer(a: TransferArgs) -> int:
    import polars as pl

    from ..analysis.transfer import write_transfer

    out = write_transfer(a.base, a.vlm_text, a.vlm_image, a.out, active_value=a.active_value,
                         active_fraction=a.active_fraction, new_ratio=a.new_ratio, stable_rho=a.stable_rho,
                         shifted_rho=a.shifted_rho)
    frame = pl.read_parquet(out)
    print(f"wrote {out} ({frame.height:,} rows), transfer.csv and transfer.json in {a.out}")
    with pl.Config(tbl_rows=30):
        print(frame.group_by("sae", "class").len().sort("sae", "class"))
    return 0


@dataclass(frozen=True, kw_only=True)
class SeparateArgs:
    run: str = run_dir()
    label: str = option(help="a docs column kept with data.keep_columns")
    positive: str | None = option(None, "the positive label value (default: True for booleans)")
    reference: str | None = option(None, "a run on a generic corpus; features too dense there are dropped")
    max_density: float = option(0.02, "with --reference: drop features whose density there exceeds this")
    reference_group: str | None = option(None, "position group of the reference run to read densities from")
    train_fraction: float = option(0.5, "fraction of each label's documents that selects features; the rest test "
                                        "the held-out classifier")
    seed: int = option(0, "seed of the train / held-out split")
    select_by: str = option("auroc", "score that ranks features on the training documents",
                            choices=("auroc", "f_diff", "cohens_d"))
    top_k: int = option(1, "features combined by the held-out classifier")
    source: str = source("documents' values from the activation rows or the units' lastvals partials (the same; "
                         "auto: partials when every unit has them)")
    out: str = option(help="directory for separation.parquet, separation.json and heldout.csv")


def separate(a: SeparateArgs) -> int:
    import polars as pl

    from ..analysis.separate import write_separation

    out = write_separation(a.run, a.out, label=a.label, positive=a.positive, reference=a.reference,
                           max_density=a.max_density, reference_group=a.reference_group,
                           train_fraction=a.train_fraction, seed=a.seed, select_by=a.select_by,
                           top_k=a.top_k, source=a.source)
    frame = pl.read_parquet(out)
    print(f"wrote {out} ({frame.height:,} features kept)")
    with pl.Config(tbl_rows=20, tbl_width_chars=160):
        key = "auroc" if "auroc" in frame.columns else frame.columns[-1]
        print(frame.sort((pl.col(key) - 0.5).abs(), descending=True).head(10))
    print(console.next_steps((f"saeray report {a.run} --separation {a.out} --out {a.out}/report",
                              "the separating features' HTML report")))
    return 0


COMMANDS = (
    Command("stats", "merge the units' partials into RUN/merged/ and RUN/features.parquet, and print a summary",
            (StatsArgs,), stats),
    Command("top", "top-activating contexts per feature", (TopArgs,), top),
    Command("explore", "strongest / most frequent / most selective features, category specialists, co-activation "
            "(a run in positions.mode last, with a category column)", (ExploreArgs,), explore),
    Command("diff", "per-feature differences between two runs of the same SAE(s)", (DiffArgs,), diff),
    Command("transfer", "feature transfer text model -> VLM (workflow 1): stable / shifted / new_vision / new_text "
            "from three runs of the same SAE(s)", (TransferArgs,), transfer),
    Command("separate", "features that separate labelled documents (last position by default)", (SeparateArgs,),
            separate),
)
