"""saeray: distributed batch processing for sparse-autoencoder feature analysis.

The layers, lowest first (each imports only from those below it; tests/test_layers.py checks):
`engine` (what one run computes), `assets` (shipped corpus, tiny models, SAEs), `analysis` (read-side
statistics of run directories) and `executors` (who runs the units), `tools` (model-running tools),
`report` (reports and exports), `cli`. See CONTRIBUTING.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

MOVED = {
    **{m: f"engine.{m}" for m in ("config", "plan", "data", "contexts", "models", "embedded", "saes", "extract",
                                   "store", "worker", "storage", "sources", "units", "reading", "partials",
                                   "pipeline", "images", "tokenstr")},
    **{m: f"assets.{m}" for m in ("tiny", "corpus", "textsources", "categories", "outside_texts")},
    **{m: f"analysis.{m}" for m in ("stats", "top", "diff", "separate", "transfer", "explore")},
    **{m: f"tools.{m}" for m in ("probe", "logits", "synth", "train")},
    "executor": "executors.driver", "pool": "executors.ray_pool", "actor": "executors.actor", "lock": "executors.lock",
    "signals": "executors.signals", "export": "report.export", "featlist": "cli.featlist", "demo": "cli.demo",
}
"""Modules of saeray 0.1.0's flat layout and where they live now: `import saeray.stats` still works (the same
module object as `saeray.analysis.stats`) with a DeprecationWarning, until the next release removes it."""


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `saeray.<old name>` to the module's new place."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the importlib protocol
        old = name.partition("saeray.")[2]
        if not name.startswith("saeray.") or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):  # noqa: ANN001
        new = f"saeray.{MOVED[spec.name.partition('saeray.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(new)
        module.__dict__.setdefault("_saeray_spec", module.__spec__)  # importlib sets __spec__ to the alias's
        return module

    def exec_module(self, module):  # noqa: ANN001 - the module is the new one, already executed: its own spec back
        module.__spec__ = module.__dict__.pop("_saeray_spec")

    def get_code(self, name):  # noqa: ANN001 - what `python -m saeray.<old name>` asks for
        raise ImportError(f"{name} moved to saeray.{MOVED[name.partition('saeray.')[2]]}: run "
                          f"`python -m saeray.{MOVED[name.partition('saeray.')[2]]}` instead")


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
