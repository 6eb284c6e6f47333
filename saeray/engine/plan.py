"""Resolve a config into a checked plan before any work starts.

Everything that can be wrong with a run (bad hook, SAE/model width mismatch, missing
column, empty dataset) is found here, on the driver, from configs and file metadata
only: no weights are loaded and the run directory is not touched.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from . import models, partials, reading, saes
from .config import RunConfig
from .store import fingerprint
from .units import DataPlan

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 1024


class PlanError(ValueError):
    """The config is well-formed but the run it describes cannot work."""


@dataclass(frozen=True)
class Prepared:
    config: RunConfig
    plan: DataPlan
    saes: tuple[saes.SAEInfo, ...]
    prepend_bos: bool
    context_size: int
    n_layers: int
    fingerprint: str
    model_kind: str = "causal_lm"
    """causal_lm | image_text (a vision-language model: AutoModelForImageTextToText + AutoProcessor)."""
    image_token_id: int | None = None
    """Vision-language models: the token id whose positions hold image features."""
    settings_fingerprint: str = ""
    """The fingerprint without the data files' sizes and versions: equal when only file contents changed."""
    redo_files: tuple[int, ...] | None = None
    """When resuming a run whose data files changed under the same settings: the indices of the files whose
    committed units are stale (see `changed_files`); None otherwise."""

    def manifest(self) -> dict[str, Any]:
        import pyarrow
        import torch
        import transformers

        return {
            "saeray_version": __version__,
            "fingerprint": self.fingerprint,
            "settings_fingerprint": self.settings_fingerprint,
            "config": self.config.to_dict(),
            "resolved": {"prepend_bos": self.prepend_bos, "context_size": self.context_size,
                         "saes": [s.__dict__ for s in self.saes], "model_kind": self.model_kind,
                         "image_token_id": self.image_token_id},
            "plan": self.plan.to_dict(),
            "n_units": len(self.plan.units) if not self.plan.streamed else None,
            "definitions": {**DEFINITIONS, **partials.DEFINITIONS},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "pyarrow": pyarrow.__version__},
        }


DEFINITIONS = {
    "doc_id": "file_index << 32 | row: the data file's index in the sorted file list and the row's index within "
              "it (JSON lines: blank lines are not rows; text: every line is a row)",
    "unit": "a work unit: consecutive rows of one file, about data.unit_bytes uncompressed bytes; id = file_index * "
            "1,000,000 + its index within the file",
    "max_tokens": "the leading documents in canonical order (files sorted, rows in file order) whose text tokens sum "
                  "to data.max_tokens; the document that reaches it is cut to make the sum exact",
    "pos": "index into the document's text token ids (docs.token_ids); BOS added per window is not a position. "
           "Image documents (data.image_column) store the processor's whole sequence (image tokens, BOS, text, "
           "newline) and pos indexes it",
    "modality": "positions.mode modality: group image = positions whose token is the model's image token "
                "(resolved.image_token_id); group text = counted positions that are not image tokens",
    "image_documents": "run as the processor prepares them (pixel values; image + prompt form one bidirectional "
                       "prefix, token_type_ids 0); never split into windows, their text cut at context_size; "
                       "text documents of a vision-language model run causally, as a text model",
    "counted_tokens": "positions selected by the position mode; in modes all/last/modality special tokens "
                      "(BOS/EOS/PAD/template tokens) are excluded unless tokens.exclude_special is false",
    "sample_positions": "positions.mode sample: per document, the positions.per_doc candidates with the smallest "
                        "splitmix64 draw of (doc_id, pos, positions.seed); candidates are counted positions, < "
                        "positions.within when set, and with positions.word_final only tokens after which the text "
                        "has whitespace or ends (a whitespace-separated word's last token); the group's density is "
                        "then a rate over documents' sampled positions, not over all tokens",
    "active": "|value| > the SAE's threshold (default: value != 0)",
    "mean": "sum of values / counted tokens (inactive tokens count as 0)",
    "mean_active": "sum of values / active tokens",
    "std": "population standard deviation over counted tokens, merged with Chan's formula in float64",
    "max": "largest active value; ties go to the smallest (doc_id, pos)",
    "reconstruction": "output.reconstruction: per (sae, group) over counted tokens: mse = sum |x - x_hat|^2 / n "
                      "(squared L2 error per token, summed over dimensions); explained_variance = 1 - sum |x - x_hat|^2 / "
                      "sum |x - mean(x)|^2 (centred on the run's mean activation); l0 = mean active latents per token",
    "activations_order": "output.row_order document: within a file, rows are sorted by (sae, group, doc_id, pos, "
                         "feature) per row group; feature: rows are written in runs of up to writing.FeatureOrder."
                         "FLUSH_ROWS, each sorted by (sae, group, feature, doc_id, pos) and cut into row groups of "
                         "FeatureOrder.ROW_GROUP_ROWS, so a row group spans few features",
}


def _check_widths(sae_infos: list[saes.SAEInfo], d_model: int, n_layers: int) -> list[models.HookSite]:
    sites = []
    for s in sae_infos:
        site = models.parse_hook(s.hook, n_layers)
        if s.d_in != d_model:
            raise PlanError(f"SAE {s.name!r} has d_in={s.d_in} but {s.hook} of this model has width {d_model}: "
                            "pick an SAE trained on this model, or another model")
        sites.append(site)
    return sites


def _check_context(context_size: int, model_config: Any, from_config: bool) -> None:
    """A window longer than the model's positions would run past what it was trained for (or fail)."""
    tc = models.text_config(model_config)
    limit = next((int(getattr(tc, a)) for a in ("max_position_embeddings", "n_positions", "max_seq_len")
                  if getattr(tc, a, None)), None)
    if limit is not None and context_size > limit:
        where = "tokens.context_size" if from_config else "the SAEs' context_size (tokens.context_size unset)"
        raise PlanError(f"{where} is {context_size:,} tokens but the model has {limit:,} positions "
                        f"(max_position_embeddings): set tokens.context_size to at most {limit:,}")


def token_settings(cfg: RunConfig, infos: list[saes.SAEInfo]) -> tuple[bool, int]:
    """(prepend_bos, context_size): the config's values, else what the SAEs were trained with."""
    bos_wanted = {s.prepend_bos for s in infos if s.prepend_bos is not None}
    if cfg.tokens.prepend_bos is not None:
        prepend_bos = cfg.tokens.prepend_bos
    elif len(bos_wanted) > 1:
        raise PlanError("the SAEs disagree on prepend_bos: set tokens.prepend_bos explicitly")
    else:
        prepend_bos = bos_wanted.pop() if bos_wanted else True
    sizes = [s.context_size for s in infos if s.context_size]
    return prepend_bos, cfg.tokens.context_size or (min(sizes) if sizes else DEFAULT_CONTEXT)


def prepare(cfg: RunConfig, reuse: dict[str, Any] | None = None) -> Prepared:
    """Check the config against model/SAE/dataset metadata and plan the work units.

    `reuse`: the manifest of the run directory being resumed; when its fingerprint matches, its
    data plan is taken as it is (a resume reads no data to plan)."""
    if not cfg.saes:
        raise PlanError("saes: at least one SAE is required (a `path`, or a `release` and `id`)")
    model_config = models.load_config(cfg.model)
    kind = models.model_kind(cfg.model, model_config)
    if cfg.data.image_column and kind != "image_text":
        raise PlanError(f"data.image_column is set but {cfg.model.name!r} is not a vision-language model (its config "
                        "has no vision_config): use one (e.g. a PaliGemma model) or remove data.image_column")
    n_layers = models.n_layers_of(model_config)
    d_model = models.d_model_of(model_config)
    infos = []
    for s in cfg.saes:
        info = saes.describe(s)
        infos.append(info)
    _check_widths(infos, d_model, n_layers)

    prepend_bos, context_size = token_settings(cfg, infos)
    _check_context(context_size, model_config, cfg.tokens.context_size is not None)

    files, fmt = reading.list_dataset(cfg.data)  # what the store says about each file: no data is read
    identity = {
        "model": {k: v for k, v in cfg.model.__dict__.items() if k != "compile"},  # compiling changes no result
        # an SAE's precision as a CPU resolves it: what a GPU resolves (tf32 for auto) each unit records, and a
        # worker that resolves another one than the committed units refuses (worker.same_precision)
        "saes": [{**s.__dict__, "dtype": saes.resolve_dtype(s.dtype, torch.device("cpu")), "digest": i.digest,
                  "hook": i.hook} for s, i in zip(cfg.saes, infos)],
        "data": {**cfg.data.__dict__, "format": fmt, "files": [(f.url, f.size, f.version) for f in files]},
        "tokens": {"context_size": context_size, "prepend_bos": prepend_bos,
                   "exclude_special": cfg.tokens.exclude_special},
        "positions": cfg.to_dict()["positions"],
        "activations": cfg.output.activations,
        "reconstruction": cfg.output.reconstruction,
        # what each unit keeps beside its statistics
        **{k: getattr(cfg.output, k) for k in ("top_k", "samples_per_bin", "docs", "context_radius", "last_values",
                                                "row_order")},
        "tf32": cfg.worker.tf32,  # the other worker settings never change results
    }
    fp = fingerprint(identity)
    settings_fp = fingerprint({**identity, "data": {**identity["data"], "files": [f.url for f in files]}})
    redo = None
    if reuse is not None and reuse.get("fingerprint") == fp:
        plan = DataPlan.from_dict(reuse["plan"])  # a resume: the plan is in the run directory
        log.info("resuming: the data plan comes from the run directory's manifest")
    else:
        plan = reading.plan(cfg.data, files, fmt, models.vocab_size_of(model_config))
        if reuse is not None and reuse.get("settings_fingerprint") == settings_fp and "plan" in reuse:
            redo = changed_files(DataPlan.from_dict(reuse["plan"]), plan, budget=cfg.data.max_tokens is not None)
    image_token = models.image_token_id(model_config) if kind == "image_text" else None
    return Prepared(cfg, plan, tuple(infos), prepend_bos, context_size, n_layers, fp,
                    model_kind=kind, image_token_id=image_token, settings_fingerprint=settings_fp, redo_files=redo)


def changed_files(old: DataPlan, new: DataPlan, *, budget: bool) -> tuple[int, ...] | None:
    """The files whose units a resume must redo, when only data files' contents changed (same files by name and
    order, same format, unit size and kept columns); None when the plans differ in more than that.

    A file's identity is its URL, size and version (etag, or mtime where the store has no etag). Under a token
    budget a file's token count decides which documents of every later file are in the run, so the later
    files are redone too."""
    if ([f.url for f in old.files] != [f.url for f in new.files] or old.format != new.format
            or old.unit_bytes != new.unit_bytes or old.keep_schema != new.keep_schema):
        return None
    changed = [i for i, (a, b) in enumerate(zip(old.files, new.files)) if (a.size, a.version) != (b.size, b.version)]
    if budget and changed:
        return tuple(range(changed[0], len(new.files)))
    return tuple(changed)
