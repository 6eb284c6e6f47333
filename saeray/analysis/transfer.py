"""Feature transfer from a text model to its vision-language variant.

Three runs under the same SAE(s): the base text model on text, the VLM on the same text, the
VLM on image+text documents. Per SAE, feature and condition, all position groups of a run
count together (the multimodal run's `image` and `text`): counted tokens, mean, max and the
fraction of tokens above `active_value`; then a class per feature (see DEFINITIONS). The
thresholds default to `saeray.analysis.diff.PRESETS["vlm_transfer"]` and are written into the output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from ..engine.run import open_run
from .diff import PRESETS
from .stats import features, reconstruction, scan_activations
from .tables import check_same_saes, with_neuronpedia, write_parquet_with_meta

log = logging.getLogger(__name__)

CONDITIONS = ("base", "vlm_text", "vlm_image")
CLASSES = ("new_vision", "new_text", "stable", "shifted", "dead", "other")
THRESHOLDS = ("active_value", "active_fraction", "new_ratio", "stable_rho", "shifted_rho")
KEYS = ["sae", "feature"]

DEFINITIONS = {
    "conditions": "base: the text model on text; vlm_text: the VLM on the same text; vlm_image: the VLM on "
                  "image+text documents. Each condition pools all position groups of its run (image + text)",
    "n_tokens_<c>": "counted tokens of condition c (all its position groups)",
    "mean_<c>": "sum of the feature's values / n_tokens_<c> (inactive tokens count as 0)",
    "max_<c>": "largest value of the feature in condition c (null if it never fires)",
    "frac_above_<c>": "fraction of counted tokens with value > active_value",
    "active_<c>": "frac_above_<c> > active_fraction",
    "rho": "min(mean_base, mean_vlm_text) / max(mean_base, mean_vlm_text); null when the larger is 0",
    "class": "first that applies: new_vision: active only in vlm_image and mean_vlm_image > new_ratio * mean_base; "
             "new_text: active in vlm_text, not in base, and mean_vlm_text > new_ratio * mean_base; stable: active "
             "in base and vlm_text, rho > stable_rho; shifted: active in both, shifted_rho < rho <= stable_rho; "
             "dead: active in no condition; other: none of these",
}


def resolve_thresholds(**given: float | None) -> dict[str, float | None]:
    """The vlm_transfer preset's thresholds with the given (non-None) values in their place."""
    unknown = set(given) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown thresholds {sorted(unknown)}: valid are {', '.join(THRESHOLDS)}")
    return {k: (given[k] if given.get(k) is not None else PRESETS["vlm_transfer"][k]) for k in THRESHOLDS}


def condition_table(run: str | Path, active_value: float | None) -> pl.DataFrame:
    """Per (sae, feature) over all position groups of `run`: n_tokens, mean, max, frac_above."""
    f = features(run).group_by(KEYS).agg(
        pl.col("n_tokens").sum(), (pl.col("mean").fill_nan(0.0) * pl.col("n_tokens")).sum().alias("_sum"),
        pl.col("max").max(), pl.col("n_active").sum().alias("_n_above"))
    if active_value is not None:
        above = (scan_activations(run).filter(pl.col("value") > active_value)
                 .group_by(KEYS).agg(pl.len().alias("_n_above")))
        f = f.drop("_n_above").join(above, on=KEYS, how="left")
    safe = pl.when(pl.col("n_tokens") > 0)
    return (f.with_columns(safe.then(pl.col("_sum") / pl.col("n_tokens")).otherwise(0.0).alias("mean"),
                           safe.then(pl.col("_n_above").fill_null(0) / pl.col("n_tokens")).otherwise(0.0)
                           .alias("frac_above"))
            .select(*KEYS, "n_tokens", "mean", "max", "frac_above").collect())


def _check_runs(runs: dict[str, str | Path]) -> None:
    check_same_saes(runs["base"], runs["vlm_text"])
    check_same_saes(runs["base"], runs["vlm_image"])
    for name, run in runs.items():
        mode = open_run(run).read_manifest()["config"]["positions"]["mode"]
        if mode == "markers":
            raise ValueError(f"{name} run {run} was extracted with positions.mode markers, whose groups may overlap: "
                             "extract the transfer conditions with positions.mode modality (or all)")
    groups = set(features(runs["vlm_image"]).select("group").unique().collect()["group"])
    if "image" not in groups:
        log.warning("vlm_image run %s has no `image` position group (groups %s): extract it with data.image_column "
                    "and positions.mode modality to count image tokens", runs["vlm_image"], sorted(groups))


def transfer(base_run: str | Path, vlm_text_run: str | Path, vlm_image_run: str | Path,
             **thresholds: float | None) -> pl.DataFrame:
    """Per (sae, feature): each condition's statistics, rho and the transfer class (see DEFINITIONS).

    Thresholds (active_value, active_fraction, new_ratio, stable_rho, shifted_rho) default to the
    vlm_transfer preset. Raises ValueError if the runs' SAEs differ.
    """
    th = resolve_thresholds(**thresholds)
    runs = {"base": base_run, "vlm_text": vlm_text_run, "vlm_image": vlm_image_run}
    _check_runs(runs)
    frame = None
    for c, run in runs.items():
        t = condition_table(run, th["active_value"])
        t = t.rename({col: f"{col}_{c}" for col in t.columns if col not in KEYS})
        frame = t if frame is None else frame.join(t, on=KEYS, how="inner")
    col = lambda name, c: pl.col(f"{name}_{c}")  # noqa: E731
    frame = frame.with_columns(*[(col("frac_above", c) > th["active_fraction"]).alias(f"active_{c}") for c in CONDITIONS])
    mn = pl.min_horizontal(col("mean", "base"), col("mean", "vlm_text"))
    mx = pl.max_horizontal(col("mean", "base"), col("mean", "vlm_text"))
    frame = frame.with_columns(pl.when(mx != 0).then(mn / mx).otherwise(None).alias("rho"))
    ab, at, ai, rho = col("active", "base"), col("active", "vlm_text"), col("active", "vlm_image"), pl.col("rho")
    r = th["new_ratio"]
    klass = (pl.when(~ab & ~at & ai & (col("mean", "vlm_image") > r * col("mean", "base"))).then(pl.lit("new_vision"))
             .when(~ab & at & (col("mean", "vlm_text") > r * col("mean", "base"))).then(pl.lit("new_text"))
             .when(ab & at & (rho > th["stable_rho"])).then(pl.lit("stable"))
             .when(ab & at & (rho > th["shifted_rho"]) & (rho <= th["stable_rho"])).then(pl.lit("shifted"))
             .when(~ab & ~at & ~ai).then(pl.lit("dead"))
             .otherwise(pl.lit("other")).alias("class"))
    frame = frame.with_columns(klass)
    stats = [f"{m}_{c}" for c in CONDITIONS for m in ("n_tokens", "mean", "max", "frac_above", "active")]
    return with_neuronpedia(frame.select(*KEYS, *stats, "rho", "class"), base_run).sort(KEYS)


def reconstruction_by_condition(runs: dict[str, str | Path]) -> pl.DataFrame | None:
    """saeray.analysis.stats.reconstruction of each run made with output.reconstruction, with a `condition` column."""
    parts = []
    for c, run in runs.items():
        try:
            parts.append(reconstruction(run).with_columns(pl.lit(c).alias("condition")))
        except FileNotFoundError:
            log.info("%s run %s has no reconstruction partials (output.reconstruction: false)", c, run)
    if not parts:
        return None
    frame = pl.concat(parts, how="diagonal_relaxed")
    return frame.select("condition", *[c for c in frame.columns if c != "condition"])


def transfer_metadata(runs: dict[str, str | Path], th: dict[str, Any]) -> dict[str, Any]:
    """What a transfer table means: runs and their fingerprints, thresholds, definitions."""
    return {"runs": {c: str(r) for c, r in runs.items()},
            "fingerprints": {c: open_run(r).read_manifest()["fingerprint"] for c, r in runs.items()},
            "thresholds": th, "definitions": DEFINITIONS}


def write_transfer(base_run: str | Path, vlm_text_run: str | Path, vlm_image_run: str | Path, out_dir: str | Path,
                   **thresholds: float | None) -> Path:
    """Write out_dir/transfer.parquet (metadata under 'saeray.transfer'), transfer.csv, transfer.json and,
    when the runs kept reconstruction partials, reconstruction.parquet + .csv (one row per condition and group)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"base": base_run, "vlm_text": vlm_text_run, "vlm_image": vlm_image_run}
    th = resolve_thresholds(**thresholds)
    frame = transfer(base_run, vlm_text_run, vlm_image_run, **th)
    meta = transfer_metadata(runs, th)
    meta["counts"] = {s: dict(d.group_by("class").len().sort("class").iter_rows())
                      for (s,), d in frame.group_by("sae")}
    recon = reconstruction_by_condition(runs)
    if recon is not None:
        recon.write_parquet(out / "reconstruction.parquet")
        recon.drop("sq_err_hist").write_csv(out / "reconstruction.csv")
        meta["reconstruction"] = "reconstruction.parquet: MSE per token, explained variance, L0 and the squared-error "\
                                 "histogram (edges saeray.engine.saes.ReconStats.BINS) per condition and position group"
    write_parquet_with_meta(frame, out / "transfer.parquet", "saeray.transfer", meta)
    frame.write_csv(out / "transfer.csv")
    (out / "transfer.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out / "transfer.parquet"
