"""Extract SAE activations and statistics for one config: the entrypoint for Ray jobs.

    python jobs/extract.py CONFIG [--out RUN] [--set key.path=value ...] [--workers N] [--overwrite]

One machine (starts a private Ray instance in this process, one actor per GPU or one CPU worker):

    python jobs/extract.py jobs/configs/CONFIG.yaml --out runs/NAME

A local Ray head (token auth on; the job's driver and actors run under the head):

    export RAY_AUTH_MODE=token
    ray get-auth-token --generate                     # once: writes ~/.ray/auth_token
    ray start --head --dashboard-host=127.0.0.1       # dashboard + Jobs API on http://127.0.0.1:8265
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".git", ".venv", "runs"]}' \\
        -- python jobs/extract.py jobs/configs/CONFIG.yaml --out $PWD/runs/NAME
    ray stop

A cluster (see cluster.yaml; run from the repo root):

    ray up cluster.yaml
    ray dashboard cluster.yaml                        # SSH tunnel to the head's 127.0.0.1:8265; keep it open
    export RAY_AUTH_MODE=token                        # in another shell
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".git", ".venv", "runs"]}' \\
        -- python jobs/extract.py jobs/configs/CONFIG.yaml --out /shared/runs/NAME
    ray down cluster.yaml

Under `ray job submit` the job sets RAY_ADDRESS, so `ray.init()` joins that cluster instead
of starting one. Paths in the config and --out are read on the cluster's nodes: use absolute
paths on storage that every node sees. Rerunning the same command resumes: committed shards
are skipped. Exit status: 0 done, 1 some shards failed (the rest are committed), 2 bad
config, data or run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# `python jobs/extract.py` puts jobs/ on sys.path, not the repo root; under `ray job submit`
# the repo is the job's working dir and saeray need not be pip-installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/extract.py", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run config")
    p.add_argument("--out", help="run directory (default: output.dir of the config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tokens.batch_tokens=4096 (repeatable)")
    p.add_argument("--workers", type=int, help="number of workers (default: config `workers`)")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds another run")
    return p.parse_args(argv)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {'; '.join(lines)}" if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import ray

        from saeray import config
        from saeray.executor import run

        cfg = config.load(args.config, args.set)  # fail on a bad config before touching Ray
        # Env vars the submitter already set (they are in this driver's environment) win;
        # ray.init refuses a runtime_env that repeats a key of the job's own.
        env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
        ray.init(runtime_env={"env_vars": env} if env else None)  # RAY_ADDRESS (set by the job) picks the cluster
        result = run(cfg, out=args.out, overwrite=args.overwrite, workers=args.workers, executor="ray",
                     progress_sink=print)
    except Exception as e:  # noqa: BLE001 - a job's failure is reported as one line and a status
        # RunFailed (some shards failed) is a RuntimeError: 1; config/data/run-dir errors: 2.
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1
    print(f"run {result.run_dir}: {len(result.done)} shards processed, {len(result.skipped)} already committed, "
          f"{result.tokens:,} tokens in {result.seconds:,.1f}s (fingerprint {result.fingerprint})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
