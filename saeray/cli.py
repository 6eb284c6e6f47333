"""The `saeray` command line.

    saeray run CONFIG [--out RUN] [--set key.path=value ...] [--workers N] [--overwrite] [--local]
    saeray stats RUN
    saeray demo [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _cmd_run(args: argparse.Namespace) -> int:
    from . import config
    from .executor import RunFailed, run

    cfg = config.load(args.config, args.set)
    try:
        result = run(cfg, out=args.out, overwrite=args.overwrite, workers=args.workers,
                     executor="local" if args.local else "ray", progress_sink=print)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"run {result.run_dir}: {len(result.done)} shards processed, {len(result.skipped)} already committed, "
          f"{result.tokens:,} tokens in {result.seconds:,.1f}s (fingerprint {result.fingerprint})")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    import polars as pl

    from .stats import summary, write_features

    path = write_features(args.run)
    frame = pl.read_parquet(path)
    print(f"wrote {path} ({frame.height:,} rows)")
    with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=160):
        print(summary(frame))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.out, args.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saeray", description="SAE feature extraction and analysis at corpus scale.")
    p.add_argument("--version", action="version", version=f"saeray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="extract SAE activations and statistics into a run directory")
    r.add_argument("config", help="YAML config (see jobs/configs/)")
    r.add_argument("--out", help="run directory (default: output.dir of the config)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tokens.batch_tokens=4096 (repeatable)")
    r.add_argument("--workers", type=int, help="number of workers (default: config `workers`, auto = one per GPU)")
    r.add_argument("--overwrite", action="store_true", help="replace a run directory that holds another run")
    r.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("stats", help="merge per-shard partials into RUN/features.parquet and print a summary")
    s.add_argument("run")
    s.set_defaults(fn=_cmd_stats)
    d = sub.add_parser("demo", help="the default job end to end, offline (currently on a tiny in-process model)")
    d.add_argument("--out", default="runs/demo", help="where assets and the run go (default runs/demo)")
    d.add_argument("--workers", type=int, help="number of Ray workers (default: one per GPU, else one)")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        # Config, plan, data and run-directory errors are user errors: one line, no traceback.
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
