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
paths on storage that every node sees (or s3://). Rerunning the same command resumes: committed
units are skipped. Exit status: 0 done, 1 some units failed (the rest are committed), 2 bad
config, data or run directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python jobs/extract.py` puts jobs/ on sys.path, not the repo root; under `ray job submit`
# the repo is the job's working dir and saeray need not be pip-installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    """Join the job's Ray cluster, then do exactly what `saeray run` does (same options and exit codes)."""
    import ray

    from saeray import cli

    # Env vars the submitter already set (they are in this driver's environment) win;
    # ray.init refuses a runtime_env that repeats a key of the job's own.
    env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    ray.init(runtime_env={"env_vars": env} if env else None)  # RAY_ADDRESS (set by the job) picks the cluster
    return cli.main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
