"""Commands that present runs (saeray/report): the HTML report and exports for other tools.

    saeray report RUN [--vs RUN_B] [--separation DIR] [--category COL] [--features LIST] [--logits] --out DIR
    saeray export neuronpedia|delphi RUN --out DIR
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .analyses import ONLY_PAIR, WHICH_SAE, run_dir
from . import console
from .options import Command, option


@dataclass(frozen=True, kw_only=True)
class ReportArgs:
    run: str = option(help="the run (A when --vs is given)", positional=True)
    vs: str | None = option(None, "diff this run (B) against RUN; tables go to OUT/diff/", metavar="RUN_B")
    separation: str | None = option(None, "the --out directory of `saeray separate`", metavar="DIR")
    category: str | None = option(None, "a docs column: heatmap of the card features across documents by category")
    features: str | None = option(None, "features for the cards: 0,5,10 | 0-20 (default: top changes / separators "
                                  "/ highest means)")
    top: int = option(6, "cards when --features is not given")
    k: int = option(5, "top contexts per card")
    before: int = option(12, "tokens of context before a document's maximum")
    after: int = option(6, "tokens of context after it")
    sae: str | None = option(None, "SAE for cards and heatmap (default: the first)")
    group: str | None = option(None, "position group for cards and heatmap (default: the first)")
    preset: str = option("default", "diff classification", choices=("default", "vlm_transfer"))
    logits: bool = option(False, "compute the logit effects of card features not saved with the run (loads the "
                                 "model's weights)")
    out: str = option(help="directory for index.html, figures/ and diff/")


def report(a: ReportArgs) -> int:
    from ..report import write_report
    from .featlist import parse_features

    index = write_report(a.run, a.out, vs=a.vs, separation=a.separation,
                         features=parse_features(a.features) if a.features else None, top=a.top, k=a.k,
                         category=a.category, sae=a.sae, group=a.group, logits=a.logits,
                         preset=a.preset, window=(a.before, a.after))
    print(f"wrote {index} and PNG figures in {index.parent / 'figures'} (open {index.resolve().as_uri()})")
    print(console.next_steps((f"saeray export neuronpedia {a.run} --out DIR", "Neuronpedia dashboard files"),
                             (f"saeray export delphi {a.run} --out DIR",
                              "delphi's latent cache, for auto-interpretation")))
    return 0


@dataclass(frozen=True, kw_only=True)
class ExportArgs:
    format: str = option(help="neuronpedia: SAEDashboard's batch-N.json files; delphi: its latent cache",
                         positional=True, choices=("neuronpedia", "delphi"))
    run: str = run_dir()
    out: str = option(help="directory for the exported files")
    sae: str | None = option(None, WHICH_SAE)
    group: str | None = option(None, f"which position group {ONLY_PAIR}")
    features_per_batch: int = option(128, "neuronpedia: features per batch-N.json")
    features: str | None = option(None, "neuronpedia: only these features, e.g. 0,5,10 | 0-20 (default: all)")
    top_examples: int = option(20, "neuronpedia: top documents per feature")
    intervals: int = option(5, "neuronpedia: activation intervals per feature")
    per_interval: int = option(5, "neuronpedia: examples per interval")
    context: int | None = option(None, "neuronpedia: tokens either side of an example (default: the run's "
                                 "output.context_radius); fewer make smaller files")
    gzip: bool = option(False, "neuronpedia: write batch-N.json.gz (a fifth of the size on the demo's run)")
    splits: int = option(5, "delphi: latent ranges (safetensors files)")


def export(a: ExportArgs) -> int:
    from ..report.delphi import delphi
    from ..report.export import neuronpedia

    only_neuronpedia = {"--features": a.features is not None, "--top-examples": a.top_examples != 20,
                        "--intervals": a.intervals != 5, "--per-interval": a.per_interval != 5,
                        "--context": a.context is not None, "--gzip": a.gzip}
    if a.format == "delphi" and any(only_neuronpedia.values()):
        given = ", ".join(k for k, v in only_neuronpedia.items() if v)
        raise ValueError(f"{given}: options of `export neuronpedia`; delphi's cache holds every example the run kept "
                         "(drop them, or export neuronpedia)")
    if a.format == "neuronpedia":
        from .featlist import parse_features

        files = neuronpedia(a.run, a.out, sae=a.sae, group=a.group, features_per_batch=a.features_per_batch,
                            features=parse_features(a.features) if a.features else None, top=a.top_examples,
                            n_intervals=a.intervals, per_interval=a.per_interval, context=a.context,
                            compress=a.gzip)
    else:
        files = delphi(a.run, a.out, sae=a.sae, group=a.group, n_splits=a.splits)
    if not files:
        print("nothing written")
        return 0
    where = Path(os.path.commonpath([Path(f).parent for f in files]))  # delphi's go two folders below --out
    print(f"wrote {len(files)} files to {where} ({files[0].name} ... {files[-1].name})")
    return 0


COMMANDS = (
    Command("export", "a run for other tools: Neuronpedia dashboards (SAEDashboard's batch files) or delphi's latent "
            "cache", (ExportArgs,), export),
    Command("report", "offline HTML dashboard (index.html) and PNG figures for a run, a diff, a separation",
            (ReportArgs,), report),
)
