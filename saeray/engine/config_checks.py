"""Checks of a run configuration that span fields (RunConfig runs them when it is built): each error names the
keys and says how to fix them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig


def check_run(cfg: RunConfig) -> None:
    """Raise ConfigError for the first setting that cannot work with the others."""
    _check_saes(cfg)
    _check_tokens_and_data(cfg)
    _check_positions(cfg)
    _check_output(cfg)
    _check_workers(cfg)


def _plain_name(name: str) -> bool:
    """A name that is safe as one path component: it cannot climb out of or into directories."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _check_saes(cfg: RunConfig) -> None:
    names = [s.name for s in cfg.saes]
    if len(set(names)) != len(names):
        raise ConfigError(f"saes: names must be unique, got {names}")
    for i, s in enumerate(cfg.saes):
        if bool(s.path) == bool(s.release):
            raise ConfigError(f"saes[{i}] ({s.name}): give exactly one of `path` or `release` (+ `id`)")
        if s.release and not s.id:
            raise ConfigError(f"saes[{i}] ({s.name}): `release` needs an `id`")
        if s.threshold < 0:
            raise ConfigError(f"saes[{i}].threshold must be >= 0, got {s.threshold}")
        if not _plain_name(s.name):
            raise ConfigError(f"saes[{i}].name {s.name!r} must be a plain name (no '/', not starting with '.')")
    for g in cfg.positions.groups:  # group names become file names (diff's top_<group>_<metric>.csv)
        if not _plain_name(g):
            raise ConfigError(f"positions.groups: {g!r} must be a plain name (no '/', not starting with '.')")


def _check_tokens_and_data(cfg: RunConfig) -> None:
    if cfg.tokens.context_size is not None and cfg.tokens.context_size < 2:
        raise ConfigError(f"tokens.context_size must be >= 2, got {cfg.tokens.context_size}")
    if isinstance(cfg.tokens.batch_tokens, int) and cfg.tokens.batch_tokens < 1:
        raise ConfigError(f"tokens.batch_tokens must be 'auto' or >= 1, got {cfg.tokens.batch_tokens}")
    if cfg.data.shards is not None and cfg.data.shards < 1:
        raise ConfigError(f"data.shards must be >= 1 or null, got {cfg.data.shards}")
    if cfg.data.unit_bytes is not None and cfg.data.unit_bytes < 1:
        raise ConfigError(f"data.unit_bytes must be >= 1 or null, got {cfg.data.unit_bytes}")
    if cfg.data.unit_bytes is not None and cfg.data.shards is not None:
        raise ConfigError("data.unit_bytes and data.shards both set: give one (unit_bytes is the target size of a unit)")
    if cfg.data.token_column is not None and cfg.data.image_column is not None:
        raise ConfigError("data.token_column cannot be combined with data.image_column: image documents are built "
                          "by the processor from text")
    if cfg.data.token_column is not None and cfg.data.token_column in cfg.data.keep_columns:
        raise ConfigError(f"data.keep_columns must not repeat the token column {cfg.data.token_column!r}")
    if cfg.data.max_tokens is not None and cfg.data.max_tokens < 1:
        raise ConfigError(f"data.max_tokens must be >= 1 or null, got {cfg.data.max_tokens}")
    if cfg.data.token_column is None and cfg.data.text_column in cfg.data.keep_columns:
        raise ConfigError(f"data.keep_columns must not repeat the text column {cfg.data.text_column!r}")
    if cfg.data.image_column is not None:
        if cfg.data.image_column == cfg.data.text_column:
            raise ConfigError(f"data.image_column {cfg.data.image_column!r} must differ from data.text_column")
        if cfg.data.image_column in cfg.data.keep_columns:
            raise ConfigError(f"data.keep_columns must not repeat the image column {cfg.data.image_column!r}")
        if cfg.data.max_tokens is not None:
            raise ConfigError("data.max_tokens is not supported with data.image_column (it counts text tokens only): "
                              "limit the rows instead (fewer files, or a dataset slice)")
        if cfg.model.kind == "causal_lm":
            raise ConfigError("data.image_column needs a vision-language model: set model.kind to auto or image_text")
    reserved = {"doc_id", "n_tokens", "token_ids", "positions", "windows"}
    if reserved & set(cfg.data.keep_columns):
        raise ConfigError(f"data.keep_columns: {sorted(reserved & set(cfg.data.keep_columns))} are reserved names in docs")


def _check_positions(cfg: RunConfig) -> None:
    if cfg.positions.mode == "markers" and not cfg.positions.groups:
        raise ConfigError("positions.mode is 'markers' but positions.groups is empty: add e.g. "
                          "groups: {assistant: {marker: '<|im_start|>assistant', offset: 0}}")
    pc = cfg.positions
    sample_set = (pc.per_doc, pc.word_final, pc.within, pc.seed) != (1, False, None, 0)
    if pc.mode != "sample" and sample_set:
        raise ConfigError(f"positions.per_doc, word_final, within and seed are settings of mode 'sample' (mode is "
                          f"{pc.mode!r}): set positions.mode: sample, or remove them")
    if pc.per_doc < 1 or (pc.within is not None and pc.within < 1):
        raise ConfigError(f"positions.per_doc and positions.within must be >= 1, got {pc.per_doc}, {pc.within}")
    if pc.word_final and cfg.data.token_column is not None:
        raise ConfigError("positions.word_final needs the documents' text (where words end): it cannot be used with "
                          "data.token_column (pre-tokenized data); use data.text_column")
    if cfg.positions.mode != "markers" and cfg.positions.groups:
        raise ConfigError(f"positions.groups is only used with mode 'markers' (mode is {cfg.positions.mode!r})")


def _check_output(cfg: RunConfig) -> None:
    o = cfg.output
    if o.top_k < 0 or o.samples_per_bin < 0 or o.context_radius < 0:
        raise ConfigError(f"output.top_k, output.samples_per_bin and output.context_radius must be >= 0, got "
                          f"{o.top_k}, {o.samples_per_bin}, {o.context_radius}")
    if o.docs == "examples" and not (o.top_k or o.samples_per_bin):
        raise ConfigError("output.docs is 'examples' but output.top_k and output.samples_per_bin are 0: no example "
                          "is kept, so no context either. Set output.top_k (e.g. 20), or output.docs: none")


def _check_workers(cfg: RunConfig) -> None:
    if isinstance(cfg.workers, int) and cfg.workers < 1:
        raise ConfigError(f"workers must be 'auto' or >= 1, got {cfg.workers}")
    w = cfg.worker
    if w.prefetch_blocks < 0:
        raise ConfigError(f"worker.prefetch_blocks must be >= 0 (0: no prefetch), got {w.prefetch_blocks}")
    if w.cpus != "auto" and w.cpus <= 0:
        raise ConfigError(f"worker.cpus must be 'auto' or > 0, got {w.cpus}")
    if w.tokenizer_threads != "auto" and w.tokenizer_threads < 1:
        raise ConfigError(f"worker.tokenizer_threads must be 'auto' or >= 1, got {w.tokenizer_threads}")
    if cfg.worker_start_timeout_s <= 0:
        raise ConfigError(f"worker_start_timeout_s must be > 0, got {cfg.worker_start_timeout_s}")
    if cfg.max_workers is not None and cfg.max_workers < 1:
        raise ConfigError(f"max_workers must be >= 1 or null, got {cfg.max_workers}")
    if cfg.shard_timeout_s is not None and cfg.shard_timeout_s <= 0:
        raise ConfigError(f"shard_timeout_s must be > 0 or null, got {cfg.shard_timeout_s}")
