"""Read-side analyses of finished run directories: per-feature statistics (`stats`), top examples
(`top`), run-to-run diffs (`diff`, `transfer`), labelled-group separation (`separate`), their
shared tests (`significance`) and latent search (`explore`). Analyses read run directories only:
they never import the executors or the worker, and never load a model."""
