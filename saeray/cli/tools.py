"""Commands that run a model themselves (saeray/tools): train-sae, probe, concept, logits, synth.

    saeray train-sae CONFIG --hook HOOK --out DIR [--arch topk|jumprelu] [--d-sae N] [--k K] ...
    saeray probe RUN --feature LIST --text "..."
    saeray concept RUN --example "..." [--counter "..."]
    saeray logits RUN --feature LIST
    saeray synth RUN_OR_CONFIG --features LIST --out DIR [--reference RUN] [--steps 200] [--seq-len 8]

`train-sae` and `synth` take their options from `TrainOptions` and `SynthOptions`, whose modules
import torch: they are loaded only when one of those commands runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .analyses import WHICH_SAE
from .featlist import feature_lists
from .options import Command, option
from .running import overrides

RUN_OR_CONFIG = "a run directory or a config (model + SAE)"


def _train_options() -> type:
    from ..tools.train import TrainOptions

    return TrainOptions


def _synth_options() -> type:
    from ..tools.synth import SynthOptions

    return SynthOptions


@dataclass(frozen=True, kw_only=True)
class TrainSaeArgs:
    """`saeray train-sae`'s own options; the training ones are `TrainOptions`' fields."""

    config: str = option(help="a run config: its model, data and tokens sections are used (saes may be empty)",
                         positional=True)
    out: str = option(help="new directory for the SAE (sae-lens disk format)")
    set: list[str] = overrides()


def train_sae(a: TrainSaeArgs, opts: Any) -> int:
    import json

    from ..engine import config
    from ..tools.train import train

    report = train(config.load(a.config, a.set), opts, a.out)
    print(json.dumps(report["held_out"], indent=2))
    out = report["outside_texts"]
    print(f"texts outside the corpus ({out['tokens']:,} tokens): explained variance {out['explained_variance']:.3f}, "
          f"L0 {out['l0']:.1f}")
    print(f"saved {a.out} (sae-lens disk format; training report in {a.out}/saeray_training.json)")
    return 0


@dataclass(frozen=True, kw_only=True)
class ProbeArgs:
    run: str = option(help=RUN_OR_CONFIG, positional=True)
    feature: list[str] = feature_lists()
    text: list[str] | None = option(None, "a text to probe (repeatable)")
    file: str | None = option(None, "texts, one per line")
    sae: str | None = option(None, WHICH_SAE)
    counted_only: bool = option(False, "hide tokens a run would not count (special tokens)")
    csv: str | None = option(None, "write the token-by-token table to this CSV")


def _csv(frame: Any, path: str | None) -> int:
    """Write the command's table to `path` when one was given; the command's exit status."""
    if path:
        frame.write_csv(path)
        print(f"wrote {path}")
    return 0


def _texts(a: ProbeArgs) -> list[str]:
    texts = list(a.text or [])
    if a.file:
        from pathlib import Path

        texts += [line for line in Path(a.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("give texts with --text \"...\" (repeatable) or --file FILE (one text per line)")
    return texts


def probe(a: ProbeArgs) -> int:
    import polars as pl

    from ..tools.probe import probe as probe_texts
    from .featlist import parse_features

    frame = probe_texts(a.run, _texts(a), parse_features(a.feature), sae=a.sae)
    if a.counted_only:
        frame = frame.filter(pl.col("counted"))
    for (feature, text), g in frame.group_by(["feature", "text"], maintain_order=True):
        shown = " ".join(f"{t}({v:.3g})" if v else t for t, v in zip(g["token"], g["value"]))
        print(f"feature {feature} text {text}: {shown}")
    return _csv(frame, a.csv)


@dataclass(frozen=True, kw_only=True)
class ConceptArgs:
    run: str = option(help=RUN_OR_CONFIG, positional=True)
    example: list[str] = option(help="a text showing the concept (repeatable)")
    counter: list[str] | None = option(None, "a text without it (repeatable)")
    reference: str | None = option(None, "instead of counter-examples: compare with this run's feature means")
    sae: str | None = option(None, WHICH_SAE)
    k: int = option(20, "features listed (the highest scores)")
    csv: str | None = option(None, "write the table to this CSV")


def concept(a: ConceptArgs) -> int:
    import polars as pl

    from ..tools.probe import concept_features

    frame = concept_features(a.run, a.example, counter_examples=a.counter or None, sae=a.sae, k=a.k,
                             reference_run=a.reference)
    with pl.Config(tbl_rows=a.k):
        print(frame)
    return _csv(frame, a.csv)


@dataclass(frozen=True, kw_only=True)
class LogitsArgs:
    run: str = option(help="a run directory", positional=True)
    feature: list[str] = feature_lists()
    k: int = option(10, "tokens listed per direction (promoted, suppressed)")
    sae: str | None = option(None, WHICH_SAE)
    csv: str | None = option(None, "write the table to this CSV")
    save: bool = option(False, "also save them with the run (RUN/logits.parquet): reports then show them without "
                               "loading the model")


def logits(a: LogitsArgs) -> int:
    from ..analysis.saved_logits import write_logits
    from ..tools.logits import logit_effects_for_run
    from .featlist import parse_features

    frame = logit_effects_for_run(a.run, parse_features(a.feature), sae=a.sae, k=a.k)
    for (feature, direction), g in frame.group_by(["feature", "direction"], maintain_order=True):
        print(f"feature {feature} {direction}: " + ", ".join(f"{t!r} {v:+.3g}" for t, v in zip(g["token"], g["logit"])))
    if a.save:
        print(f"saved with the run: {write_logits(a.run, frame)}")
    return _csv(frame, a.csv)


@dataclass(frozen=True, kw_only=True)
class SynthArgs:
    """`saeray synth`'s own options; the optimization ones are `SynthOptions`' fields."""

    run: str = option(help="a run directory (model, SAE and real maxima) or a config (model + SAE)", positional=True)
    features: list[str] = feature_lists("--features")
    out: str = option(help="directory for synth.parquet, synth.csv and synth.png")
    reference: str | None = option(None, "run whose real maxima are compared (default: RUN when it is a run)")
    sae: str | None = option(None, WHICH_SAE)
    group: str | None = option(None, "position group of the reference run (default: its only one, else `all`)")


def synth(a: SynthArgs, opts: Any) -> int:
    import polars as pl

    from ..tools.synth import synth as maximize
    from ..tools.synth_output import write_synth
    from .featlist import parse_features

    frame = maximize(a.run, parse_features(a.features), sae=a.sae, reference=a.reference, group=a.group, options=opts)
    paths = write_synth(frame, a.out, opts)
    for row in frame.iter_rows(named=True):
        real = "" if row["real_max"] is None else f"  real max {row['real_max']:.4g}"
        ratio = "" if row["ratio"] is None else f"  ratio {row['ratio']:.3g}"
        print(f"feature {row['feature']}: synthetic {row['synth_activation']:.4g}{real}{ratio}  "
              f"hard {row['hard_activation']:.4g} {''.join(row['hard_tokens'])!r}")
    known = frame.filter(pl.col("real_max").is_not_null())
    if known.height:
        beat = int((known["synth_activation"] > known["real_max"]).sum())
        print(f"synthetic > real maximum for {beat}/{known.height} features ({beat / known.height:.0%}); "
              f"hard tokens > real maximum for {int((known['hard_activation'] > known['real_max']).sum())}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


COMMANDS = (
    Command("train-sae", "train an SAE (sae-lens) on activations streamed by saeray's engine",
            (TrainSaeArgs, _train_options), train_sae),
    Command("probe", "a feature's activation on new texts, token by token", (ProbeArgs,), probe),
    Command("concept", "features for a concept given example texts", (ConceptArgs,), concept),
    Command("logits", "tokens a feature's decoder direction promotes and suppresses", (LogitsArgs,), logits),
    Command("synth", "synthetic maximizers: soft inputs optimized per feature, nearest tokens, compared with a run's "
            "real maxima", (SynthArgs, _synth_options), synth),
)
