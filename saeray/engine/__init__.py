"""The engine: what one run computes and writes, on one worker.

Configuration (`config`), planning work units (`plan`, `units`, `reading`, `sources`, `storage`),
tokenizing into context windows (`contexts`), the model and its hooks (`models`, `embedded`), SAEs
(`saes`), encoding a batch (`extract`), the per-feature partial statistics (`partials`), the worker
that turns a unit into committed files (`worker`, `pipeline`, `images`) and the run directory
(`store`). The engine imports nothing from the other layers of saeray.
"""
