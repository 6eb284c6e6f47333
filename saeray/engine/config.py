"""Run configuration: frozen dataclasses read from YAML, validated strictly.

Unknown keys and wrong types are errors that name the key and the valid choices, so a
typo never silently falls back to a default. `--set key.path=value` overrides are
applied to the raw mapping before validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from . import yamlfile

GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048

class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    """Short name of an embedded model, a hub id, a local directory, or a .gguf file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 where the device supports it (CPU and recent GPUs), else float16."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust the repository."""
    kind: Literal["auto", "causal_lm", "image_text"] = "auto"
    """auto: image_text when the model's config has a `vision_config` (PaliGemma, ...), else causal_lm.
    image_text loads AutoModelForImageTextToText + AutoProcessor and hooks the language model's layers."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2",
                                 "flash_attention_3"] = "auto"
    """The attention kernel. auto: on a GPU, flex_attention for a model that soft-caps attention logits (Gemma 2:
    flex applies the cap; sdpa cannot), else transformers' choice for the model class (sdpa where the class
    supports it, eager where sdpa would drop something the model needs); the worker logs the choice.
    flex_attention compiles its kernel on first use; flash_attention_2/3 need the flash-attn package and a GPU
    (flash_attention_2 applies the soft-cap too); sdpa on Gemma 2 is refused."""
    compile: Union[Literal["auto"], bool] = "auto"
    """Compile the model's forward (up to the deepest hooked layer) with torch.compile (inductor). The worker
    compiles at its start, before its first unit. On a GPU: one graph per batch shape (the batcher's buckets
    bound them), cached under $SAERAY_CACHE/inductor so a later worker loads them. On a CPU: one graph for
    every shape (dynamic shapes) with inductor's freezing (weights packed into the graph), which is not cached:
    each worker process compiles again, about 30 s for Gemma 3 270M to layer 6 on 2 cores. auto: on for a GPU,
    off on a CPU, where it pays only for runs of more than ~1M tokens per worker process
    (bench/throughput.py --compile: the compiled worker 1.15-1.35x eager's tokens/s). Results agree with eager
    within rounding (float32: 1e-5)."""


@dataclass(frozen=True)
class SAEConfig:
    name: str
    """The value of column `sae` in outputs."""
    path: str | None = None
    """A sae-lens disk directory (cfg.json + sae_weights.safetensors), or `shipped:NAME` for an SAE that comes with
    saeray (saeray/assets/saes/NAME: gemma-3-270m-res6, smollm2-135m-instruct-res15)."""
    release: str | None = None
    """A sae-lens pretrained release, e.g. gemma-scope-2b-pt-res-canonical (with `id`)."""
    id: str | None = None
    """The SAE id inside `release`, e.g. layer_12/width_16k/canonical."""
    hook: str | None = None
    """Hook name to read from; defaults to the SAE's own hook name."""
    dtype: Literal["auto", "float32", "tf32", "bfloat16", "float16"] = "auto"
    """Precision of the SAE encoder; inputs are cast to it. auto: tf32 on a GPU, float32 on a CPU. tf32: float32
    weights, the encoder's matrix products on a GPU's TF32 tensor cores (float32 on a CPU). float32: the exact
    reference everywhere (no TF32, unless worker.tf32). bench/sae_precision.py measures tf32's and bfloat16's
    agreement with float32. Each unit records the precision its worker resolved, and a worker that would resolve
    another one than the run's committed units refuses to start (one run, one precision)."""
    threshold: float = 0.0
    """A feature is active where |value| > threshold (0: any nonzero value)."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    """Hub dataset id, or local files: a file, a directory, or a glob."""
    format: Literal["auto", "parquet", "json", "text"] = "auto"
    """Local file format; auto picks it from the file extension."""
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Hub dataset split to read."""
    text_column: str = "text"
    """Column holding each document's text."""
    image_column: str | None = None
    """Column holding each document's image (an HF Image struct {bytes, path}, raw bytes, or a path string;
    relative paths are read from the data file's folder). Needs an image_text model; rows whose image is
    null run text-only. null: every document runs text-only."""
    keep_columns: tuple[str, ...] = ()
    """Dataset columns copied into docs (labels, categories)."""
    token_column: str | None = None
    """A pre-tokenized dataset: the column holding each document's token ids (a list of ints; Parquet or JSON
    lines). Each row is one document, as a text would be; a leading BOS is not doubled. Replaces text_column."""
    unit_bytes: int | None = None
    """Target size of a work unit in uncompressed bytes (default 64 MiB ~ 16M tokens ~ a minute of one H100 on
    Gemma-2-2B). Units are handed to workers as they free up; a worker that dies loses at most its unit."""
    shards: int | None = None
    """Instead of unit_bytes: about this many units (Parquet: rows split per file in proportion to its rows;
    JSON lines and text: unit_bytes = total stored size / shards, so compressed files give more)."""
    max_tokens: int | None = None
    """Token budget over the whole run: the leading documents in canonical order (files sorted, rows in file
    order) whose tokens sum to max_tokens; the document that reaches it is cut."""


@dataclass(frozen=True)
class TokensConfig:
    context_size: int | None = None
    """Longer documents are split into windows of this many tokens (BOS included).
    Default: the smallest context_size among the SAEs, else 1024."""
    batch_tokens: Union[Literal["auto"], int] = "auto"
    """Tokens per forward pass per worker (padding included). auto: 16384 on a GPU; on CPU 2048,
    which keeps a forward pass's activations in cache (bench/throughput.py on Gemma 3 270M, 2 cores:
    2048 runs 1.12x faster than 16384, which spends its extra time in cache-missing elementwise ops)."""

    def batch_tokens_on(self, device_type: str) -> int:
        """batch_tokens for a worker on this device type ('cuda', 'cpu', ...)."""
        if self.batch_tokens != "auto":
            return self.batch_tokens
        return GPU_BATCH_TOKENS if device_type == "cuda" else CPU_BATCH_TOKENS
    prepend_bos: bool | None = None
    """Prepend BOS to every window; default: what the SAEs were trained with (else True)."""
    exclude_special: bool = True
    """Leave special tokens (BOS/EOS/PAD/template tokens) out of outputs and statistics."""


@dataclass(frozen=True)
class MarkerGroup:
    marker: str
    """Token string to anchor on (one or several tokens; anchored at its last token)."""
    offset: int = 0
    """Position relative to the anchor (-1 = the token before it)."""


@dataclass(frozen=True)
class PositionsConfig:
    mode: Literal["all", "last", "markers", "modality", "sample"] = "all"
    """all: every counted token; last: the last counted token of each document;
    markers: the named groups below; modality: groups `image` (positions holding the model's image token,
    only in runs with data.image_column) and `text` (counted tokens that are not image tokens);
    sample: group `sample`, `per_doc` seeded random counted positions of each document (below)."""
    groups: dict[str, MarkerGroup] = field(default_factory=dict)
    """mode markers: group name -> the marker it anchors on, e.g. {assistant: {marker: "<|im_start|>assistant",
    offset: -1}}."""
    per_doc: int = 1
    """mode sample: positions drawn per document (all of its candidates when it has fewer)."""
    word_final: bool = False
    """mode sample: candidates are only tokens that end a whitespace-separated word (the character after the
    token is whitespace or the end of the text), as the 2% Pile filter of Ferrando et al. draws them."""
    within: Union[int, None] = None
    """mode sample: candidates are only positions < within (the published filter: 128, its context cut)."""
    seed: int = 0
    """mode sample: the draw is splitmix64 of (doc_id, pos, seed) (saeray.engine.partials.draws_np): the same
    positions for any unit split, worker count or batch size."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/example"
    """The run directory: a local path, a filesystem every node mounts at the same path, or s3://... (gs://...)."""
    activations: bool = True
    """false = statistics only (per-shard partials, no activation rows)."""
    reconstruction: bool = False
    """Also decode and keep mergeable reconstruction partials (MSE, explained variance, L0) per SAE."""
    top_k: int = 20
    """Example documents kept per feature and unit: the top_k with the largest maximum (saeray/engine/partials.py).
    `top` and feature cards read them (up to this k) when the run has no activation rows. 0: none."""
    samples_per_bin: int = 5
    """Example documents sampled per feature, unit and log-spaced bin of the document's maximum (interval
    examples read them). 0: none."""
    docs: Literal["all", "examples", "none"] = "all"
    """Token ids kept in docs: all = every document's; examples = only windows of context_radius tokens
    around each kept example (a statistics-only run then stores megabytes, not the corpus); none = no token
    ids (docs keeps doc_id, n_tokens, positions and the kept columns)."""
    context_radius: int = 32
    """output.docs: examples keeps positions pos - radius .. pos + radius of each example."""
    last_values: Union[Literal["auto"], bool] = "auto"
    """Keep each document's nonzero values at its last counted position per (SAE, group) (the `lastvals`
    partial: what `separate` reads when the run has no activation rows; documents x active latents rows, e.g.
    10k labelled documents x 80 = 800k). auto: when data.keep_columns keeps columns (labels to separate by)."""

    unit_partials: Literal["keep", "drop"] = "keep"
    """What happens to each unit's own row-free partials (stats, examples, hist, lastvals) once they are merged into
    the run-level tables (RUN/merged/, at the end of `saeray run` and by `saeray stats`; analyses read those). keep:
    the units keep theirs too, so a data file that changes later redoes only its own units. drop: deleted, so the
    run directory holds one set of examples per run, not one per unit (at 131k latents, gigabytes per billion
    tokens); a run resumed or extended after its merge merges its new units into the merged tables and ends with
    the tables of one uninterrupted run, but a run whose data files changed can then only be redone whole
    (--overwrite)."""

    row_order: Literal["document", "feature"] = "document"
    """Order of the activation rows in each unit's file. document: (sae, group, doc_id, pos, feature), as the
    model produced them. feature: runs of up to 8M rows sorted by (sae, group, feature, doc_id, pos) in row groups
    of 64k rows, so a reader of a few features (`top --feature F`) skips the other row groups by their statistics
    (1/128 of a run's rows per feature; sorting 8M rows takes the writer thread about 2 s on 2 cores)."""

    def keeps_last_values(self, data: "DataConfig") -> bool:
        return bool(data.keep_columns) if self.last_values == "auto" else bool(self.last_values)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker feeds its device; none of these change results (tf32 aside, which is in the fingerprint)."""

    prefetch_blocks: int = 2
    """Blocks of documents (about 4 forward batches each) read, tokenized and batched ahead of the model by a
    background thread, so the device never waits for the CPU. 0: all of it in the model's thread, one block
    after another (the serial path; bench/throughput.py --simulate compares the two)."""
    cpus: Union[Literal["auto"], float] = "auto"
    """CPUs each GPU worker reserves in Ray for its reading, tokenizing and batching threads. auto: the node's
    CPUs divided by its GPUs (the fewest any GPU node has). CPU workers get the cluster's CPUs divided among them."""
    tokenizer_threads: Union[Literal["auto"], int] = "auto"
    """Threads of the fast tokenizers' batch encode (Rust). auto: a GPU worker's CPUs minus one (the model's
    thread); 1 on a CPU worker, whose cores the model needs."""
    tf32: bool = False
    """Allow TF32 for float32 matmuls on GPUs (model and SAEs): faster, about 1e-3 relative error."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    saes: tuple[SAEConfig, ...] = ()
    """Required by `saeray run`; `saeray train-sae` reads only model, data and tokens."""
    tokens: TokensConfig = field(default_factory=TokensConfig)
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    workers: Union[Literal["auto"], int] = "auto"
    """auto = one worker per GPU, else one CPU worker; N = N workers."""
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    shard_timeout_s: float | None = None
    """Ray executor: a shard not done this many seconds after it started is treated as hung (its worker
    is killed and replaced, the shard retried). null: 10x the slowest finished shard's time per document
    times the shard's documents, at least 600 s; no limit until a shard has finished."""
    worker_start_timeout_s: float = 600.0
    """Ray executor: how long the run goes on while no worker runs and workers wait to be placed (no node has the
    GPU and CPUs they ask for: a node lost, the local raylet gone, a cluster still scaling up) before it stops
    with that cause, its committed units kept. 600 s leaves an autoscaler time to start a GPU node (typically
    3-8 minutes on a cloud). Workers loading their model do not count as waiting."""
    max_workers: int | None = None
    """Ray executor, `workers: auto`: the most GPU workers to ask for. null: one per GPU alive when the run starts.
    N: N GPU workers (at most one per unit) whatever is alive now; those no node can take yet wait to be placed,
    which is what a Ray autoscaler adds nodes for, and start as nodes join."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def __post_init__(self) -> None:
        from .config_checks import check_run  # (it imports this module)

        check_run(self)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# ---- parsing -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        near = difflib.get_close_matches(str(unknown[0]), list(fields), n=1, cutoff=0.6)
        guess = f" (did you mean {where}{near[0]}?)" if near else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}{guess}: valid keys here are {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set tokens.batch_tokens=4096")
        path, _, text = item.partition("=")
        value = yaml.safe_load(text) if text else None
        node = raw
        parts = path.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[int(part)]
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def from_dict(raw: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, raw, "")


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, resolve its relative paths (`resolve_relative`), apply overrides (whose paths
    stay relative to the current directory: they are typed there), and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yamlfile.read(path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if isinstance(raw, dict):
        resolve_relative(raw, path.resolve().parent)
    return from_dict(apply_overrides(raw, overrides or []))


def _local_relative(value: Any) -> bool:
    """A relative local path (not a URL, not absolute, not ~, not `shipped:`)."""
    return (isinstance(value, str) and bool(value) and "://" not in value and not value.startswith(("/", "~"))
            and not value.startswith("shipped:") and not os.path.isabs(value))


def _exists(path: str) -> bool:
    return bool(glob.glob(path, recursive=True)) if any(c in path for c in "*?[") else os.path.exists(path)


def _from_folder(value: Any, folder: Path) -> Any:
    """`value` read from the config file's folder when it names something there, else as it is (relative to the
    current directory, unchanged: the configs in jobs/configs name paths from the repository root, and a run's
    fingerprint holds the path as written)."""
    if not _local_relative(value):
        return value
    there = os.path.normpath(folder / value)
    if folder != Path.cwd().resolve() and _exists(there):
        return there
    return value


def resolve_relative(raw: dict[str, Any], folder: Path) -> None:
    """Relative paths in a config file name things in the config file's folder first, then in the current
    directory: data.dataset, saes[].path and model.name (when it names an existing directory or file there).
    output.dir is not resolved: it is relative to the current directory, like --out."""
    data, model = raw.get("data"), raw.get("model")
    if isinstance(data, dict) and "dataset" in data:
        data["dataset"] = _from_folder(data["dataset"], folder)
    if isinstance(model, dict) and "name" in model:
        model["name"] = _from_folder(model["name"], folder)
    for s in raw.get("saes") or []:
        if isinstance(s, dict) and "path" in s:
            s["path"] = _from_folder(s["path"], folder)
