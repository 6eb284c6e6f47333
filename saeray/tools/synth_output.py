"""What `saeray synth` writes: synth.parquet (options in its metadata), synth.csv and synth.png."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ..analysis.tables import write_parquet_with_meta

if TYPE_CHECKING:
    from .synth import SynthOptions


def plot(frame: pl.DataFrame, path: str | Path) -> Path:
    """PNG: synthetic (soft and hard) vs real maximum per feature with y = x, or bars without real maxima."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    sae, hook = frame["sae"][0], frame["hook"][0]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    real = frame.filter(pl.col("real_max").is_not_null())
    if real.height:
        x = real["real_max"].to_numpy()
        ax.scatter(x, real["synth_activation"].to_numpy(), label="soft sequence (synthetic)", color="tab:red")
        ax.scatter(x, real["hard_activation"].to_numpy(), label="nearest hard tokens", color="tab:blue", marker="x")
        for fx, fy, feat in zip(x, real["synth_activation"].to_numpy(), real["feature"].to_list()):
            ax.annotate(str(feat), (fx, fy), fontsize=7, xytext=(2, 2), textcoords="offset points")
        top = float(np.nanmax(np.concatenate([x, real["synth_activation"].to_numpy(),
                                              real["hard_activation"].to_numpy(), [0.0]])))
        ax.plot([0, top * 1.05], [0, top * 1.05], color="gray", linestyle="--", label="y = x")
        beat = int((real["synth_activation"] > real["real_max"]).sum())
        ax.set_xlabel("real maximum over the run")
        ax.set_ylabel("activation at the last position")
        ax.set_title(f"Synthetic vs real maxima, {sae} @ {hook}\nsynthetic > real for {beat}/{real.height} features")
    else:
        idx = np.arange(frame.height)
        ax.bar(idx - 0.2, frame["synth_activation"].to_numpy(), 0.4, label="soft sequence (synthetic)", color="tab:red")
        ax.bar(idx + 0.2, frame["hard_activation"].to_numpy(), 0.4, label="nearest hard tokens", color="tab:blue")
        ax.set_xticks(idx, [str(f) for f in frame["feature"].to_list()], rotation=90, fontsize=7)
        ax.set_xlabel("feature")
        ax.set_ylabel("activation at the last position")
        ax.set_title(f"Synthetic maxima, {sae} @ {hook}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_synth(frame: pl.DataFrame, out: str | Path, options: SynthOptions | None = None) -> dict[str, Path]:
    """DIR/synth.parquet (options in its metadata), synth.csv (tokens joined by '|') and synth.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"options": asdict(options) if options else None,
            "definitions": "synth_activation: best activation of the soft sequence at its last position; "
                           "hard_activation: the same for its nearest real tokens (cosine similarity, "
                           "special tokens excluded; hard_cosine per position); ratio = synth / real_max, "
                           "hard_ratio = hard / real_max; real_max: the feature's max over the reference run"}
    paths = {"parquet": out / "synth.parquet", "csv": out / "synth.csv", "png": out / "synth.png"}
    write_parquet_with_meta(frame, paths["parquet"], "saeray.synth", meta)
    frame.with_columns(pl.col("hard_token_ids").cast(pl.List(pl.String)).list.join("|"),
                       pl.col("hard_tokens").list.join("|"),
                       pl.col("hard_cosine").list.eval(pl.element().round(3).cast(pl.String)).list.join("|")
                       ).write_csv(paths["csv"])
    plot(frame, paths["png"])
    return paths
