"""saeray: distributed batch processing for sparse-autoencoder feature analysis.

The layers, lowest first (each imports only from those below it; tests/test_layers.py checks):
`engine` (what one run computes), `assets` (shipped corpus, tiny models, SAEs), `analysis` (read-side
statistics of run directories) and `executors` (who runs the units), `tools` (model-running tools),
`report` (reports and exports), `cli`. See CONTRIBUTING.md.
"""

from __future__ import annotations

__version__ = "0.2.0"
