"""`saeray train-sae`: train an SAE with sae-lens on activations streamed by saeray's engine.

Activations come from the same path extraction uses (dataset order, tokenization, BOS
per window, special tokens excluded, hooks that stop the forward pass early), so an SAE
trained here sees exactly what `saeray run` will feed it. Documents are split by doc_id:
the first `train_docs` rows train, the rest are held out for evaluation.

Explained variance is 1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 over the held-out counted
tokens (centred: the mean is the held-out mean activation vector).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..engine import data, models
from ..engine.batching import blocks
from ..engine.config import PositionsConfig, RunConfig
from ..engine.contexts import Tokenization
from ..engine.extract import hidden_at_positions
from ..engine.resources import pick_device
from .options import option, seed_option

log = logging.getLogger(__name__)


class TrainError(ValueError):
    """Training cannot start: bad options or output directory."""


@dataclass(frozen=True)
class TrainOptions:
    """How `train` trains an SAE; each field is also a `saeray train-sae` option (`d_sae` is `--d-sae`)."""

    hook: str = option(help="the hook whose activations the SAE learns, e.g. blocks.6.hook_resid_post")
    arch: str = option("topk", "SAE architecture", choices=("topk", "jumprelu"))
    d_sae: int = option(4096, "latents (the SAE's width)")
    k: int = option(32, "TopK: active latents per token")
    l0_coefficient: float = option(1.0, "JumpReLU: sparsity penalty coefficient")
    train_tokens: int = option(1_000_000, "activations collected for training")
    epochs: float = option(4.0, "passes over the collected activations")
    batch_size: int = option(4096, "activations per training step")
    lr: float = option(4e-4, "learning rate")
    eval_tokens: int = option(1_000_000, "held-out tokens for the evaluation")
    held_out_fraction: float = option(0.5, "last fraction of documents (in dataset order) held out for the evaluation")
    dead_window: int = option(25, "training steps without firing after which a latent counts as dead and the "
                                  "auxiliary loss (TopK's AuxK) starts pulling it back")
    aux_coefficient: float = option(1.0, "TopK: weight of the AuxK loss, which reconstructs the residual error from "
                                         "dead latents")
    normalize: str = option("expected_average_only_in", "input normalization while training (sae-lens; folded into "
                            "the saved weights, so the saved SAE takes raw activations)",
                            choices=("expected_average_only_in", "covariance_whitening", "none"))
    label_column: str = option("kind", "held-out figures are also reported per value of this dataset column, when "
                               "the dataset has it", cli=False)
    activation_cache: str | None = option(None, "keep the collected training activations here, keyed by everything "
                                          "that determines them; a rerun with other SAE options reuses them",
                                          metavar="DIR")
    max_norm_ratio: float | None = option(None, "train without activations whose norm exceeds R x the median (rare "
                                          "massive-norm tokens, whose squared errors would dominate the loss); the "
                                          "evaluation keeps them", metavar="R")
    seed: int = seed_option("the SAE's initialization and the batch order")


class Streamer:
    """Hook activations at counted positions, document by document, in dataset order."""

    def __init__(self, cfg: RunConfig, hook: str, context_size: int, prepend_bos: bool = True):
        self.cfg = cfg
        self.device = pick_device()
        self.model, tokenizer = models.load_model(cfg.model, self.device)
        self.site = models.parse_hook(hook, models.n_layers_of(self.model.config))
        self.tok = Tokenization(tokenizer, PositionsConfig(mode="all"), prepend_bos=prepend_bos,
                                context_size=context_size, exclude_special=cfg.tokens.exclude_special)
        self.plan = data.plan(cfg.data)

    def stream(self, start: int, end: int, max_tokens: int) -> Iterator[torch.Tensor]:
        """Yield [n, d_model] float32 activations for documents [start, end) until max_tokens."""
        for acts, _ in self.stream_labelled(start, end, max_tokens):
            yield acts

    def stream_labelled(self, start: int, end: int, max_tokens: int, label_column: str | None = None
                        ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Like `stream`, with each token's document label (the value of `label_column`, else "all")."""
        labels: dict[int, str] = {}

        def docs() -> Iterator[Any]:
            keep = (label_column,) if label_column else ()
            for doc_id, text, extras in data.iter_rows(self.plan, start, end, self.cfg.data.text_column, keep):
                labels[doc_id] = str(extras[label_column]) if label_column else "all"
                yield self.tok.document(doc_id, text if isinstance(text, str) else "", {})
        yield from self._limit(self._labelled(docs(), labels), max_tokens)

    def stream_texts(self, texts: list[str], max_tokens: int = 10**12) -> Iterator[torch.Tensor]:
        """[n, d_model] float32 activations of texts given here (each its own document)."""
        docs = (self.tok.document(i, t, {}) for i, t in enumerate(texts))
        for acts, _ in self._limit(self._labelled(docs, {i: "all" for i in range(len(texts))}), max_tokens):
            yield acts

    @staticmethod
    def _limit(it: Iterator[tuple[torch.Tensor, np.ndarray]], max_tokens: int
               ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        seen = 0
        for acts, lab in it:
            acts, lab = acts[: max_tokens - seen], lab[: max_tokens - seen]
            seen += len(acts)
            yield acts, lab
            if seen >= max_tokens:
                return

    def _labelled(self, docs: Iterator[Any], labels: dict[int, str]) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        for block in blocks(docs, 4 * self.cfg.tokens.batch_tokens_on(self.device.type)):
            yield from self._run(block, labels)

    def _run(self, docs: list, labels: dict[int, str]) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        for batch in self.tok.batches(docs, self.cfg.tokens.batch_tokens_on(self.device.type), self.device):
            x = hidden_at_positions(self.model, [self.site], batch)[self.site.name].get("all")
            if x is None:
                continue
            yield x.float(), np.array([labels[int(d)] for d in batch.sel_doc["all"]], dtype=object)


def _training_activations(st: Streamer, cfg: RunConfig, opts: TrainOptions, n_train_docs: int, context_size: int,
                          prepend_bos: bool) -> torch.Tensor:
    """[n, d_model] bf16 activations of the training documents, from the cache when it has them."""
    def collect() -> torch.Tensor:
        return torch.cat([a.to(torch.bfloat16).cpu() for a in st.stream(0, n_train_docs, opts.train_tokens)])

    if opts.activation_cache is None:
        return collect()
    from ..engine.store import fingerprint

    key = fingerprint({"model": cfg.model.__dict__, "hook": opts.hook, "context_size": context_size,
                       "prepend_bos": prepend_bos, "exclude_special": cfg.tokens.exclude_special,
                       "files": [(f.path, f.n_rows) for f in st.plan.files], "text_column": cfg.data.text_column,
                       "docs": n_train_docs, "tokens": opts.train_tokens})
    path = Path(opts.activation_cache) / f"activations-{key}.pt"
    if path.is_file():
        log.info("training activations from the cache %s", path)
        return torch.load(path, weights_only=True)
    acts = collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(acts, tmp)
    tmp.replace(path)
    return acts


def without_massive(acts: torch.Tensor, ratio: float) -> torch.Tensor:
    """The activations whose norm is at most `ratio` times the median norm (order kept)."""
    norms = acts.float().norm(dim=1)
    median = norms.median()
    keep = norms <= ratio * median
    log.info("training without %d activations of norm > %g x the median (%.1f)", int((~keep).sum()), ratio,
             float(median))
    return acts[keep]


def _shuffled_batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            yield acts[order[i:i + batch]].float()


def _training_sae(opts: TrainOptions, d_in: int, metadata: dict[str, Any]) -> Any:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(**metadata)
    common = dict(d_in=d_in, d_sae=opts.d_sae, normalize_activations=opts.normalize, metadata=meta)
    if opts.arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=opts.k, aux_loss_coefficient=opts.aux_coefficient, **common))
    if opts.arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=opts.l0_coefficient, **common))
    raise ValueError(f"--arch {opts.arch!r}: choose topk or jumprelu")


class _Moments:
    """Sums behind explained variance, L0 and dead latents over a set of tokens (float64)."""

    def __init__(self) -> None:
        self.n, self.sq_err, self.l0, self.s, self.s2, self.fired = 0, 0.0, 0.0, None, 0.0, None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, active: torch.Tensor) -> None:
        xd = x.double()
        self.s = xd.sum(0) if self.s is None else self.s + xd.sum(0)
        self.s2 += float((xd * xd).sum())
        self.sq_err += float(((x_hat.double() - xd) ** 2).sum())
        self.l0 += float(active.sum())
        fired = active.any(0)
        self.fired = fired if self.fired is None else self.fired | fired
        self.n += len(x)

    def figures(self) -> dict[str, float]:
        total_var = self.s2 - float((self.s * self.s).sum()) / self.n
        return {"tokens": self.n, "explained_variance": 1 - self.sq_err / total_var, "mse_per_token": self.sq_err / self.n,
                "l0": self.l0 / self.n, "dead_fraction": float((~self.fired).sum()) / len(self.fired)}


@torch.inference_mode()
def evaluate(sae: Any, batches: Iterator[Any]) -> dict[str, Any]:
    """Centred explained variance, MSE per token, L0 and dead-latent fraction over the batches.

    Batches are [n, d] tensors, or (tensor, labels) pairs: then `by_label` holds the same figures
    per label (EV centred on that label's own mean; dead = never fires on that label's tokens)."""
    total, parts = _Moments(), {}
    for b in batches:
        x, labels = b if isinstance(b, tuple) else (b, None)
        if len(x) == 0:
            continue
        x = x.to(sae.dtype)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        active = z != 0
        total.add(x, x_hat, active)
        if labels is not None:
            for lab in sorted(set(labels)):
                idx = torch.from_numpy(np.flatnonzero(labels == lab)).to(x.device)
                parts.setdefault(lab, _Moments()).add(x[idx], x_hat[idx], active[idx])
    if total.n == 0:
        raise ValueError("no tokens to evaluate on: lower --held-out-fraction's complement or add data")
    out: dict[str, Any] = total.figures()
    if parts:
        out["by_label"] = {lab: m.figures() for lab, m in sorted(parts.items())}
    return out


def evaluate_outside(sae: Any, st: Streamer) -> dict[str, Any]:
    """The figures on saeray's texts of kinds absent from the corpus (saeray/assets/outside_texts.py)."""
    from ..assets.outside_texts import TEXTS

    figures = evaluate(sae, st.stream_texts(list(TEXTS.values())))
    return {"texts": list(TEXTS), **figures}


def _has_column(plan: Any, column: str) -> bool:
    if plan.format != "parquet" or not plan.files:
        return False
    import pyarrow.parquet as pq

    return column in pq.read_schema(plan.files[0].path).names


def train(cfg: RunConfig, opts: TrainOptions, out: str | Path) -> dict[str, Any]:
    """Train, save in sae-lens' disk format under `out`, evaluate on held-out documents."""
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} is not empty: choose another --out or delete it")
    context_size = cfg.tokens.context_size or 1024
    prepend_bos = True if cfg.tokens.prepend_bos is None else cfg.tokens.prepend_bos
    torch.manual_seed(opts.seed)
    st = Streamer(cfg, opts.hook, context_size, prepend_bos)
    n_train_docs = math.floor(st.plan.n_rows * (1 - opts.held_out_fraction))
    if n_train_docs < 1 or n_train_docs >= st.plan.n_rows:
        raise TrainError(f"held_out_fraction {opts.held_out_fraction} leaves no train or no held-out documents")
    t0 = time.time()
    acts = _training_activations(st, cfg, opts, n_train_docs, context_size, prepend_bos)
    collect_s = time.time() - t0
    log.info("collected %d training activations in %.0fs", len(acts), collect_s)
    if opts.max_norm_ratio is not None:
        acts = without_massive(acts, opts.max_norm_ratio)
    metadata = {"hook_name": opts.hook, "model_name": cfg.model.name, "context_size": context_size,
                "prepend_bos": prepend_bos, "dataset_path": cfg.data.dataset}
    sae = _training_sae(opts, acts.shape[1], metadata)
    total = int(opts.epochs * len(acts)) // opts.batch_size * opts.batch_size
    tcfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=opts.batch_size, lr=opts.lr,
                            lr_warm_up_steps=max(1, total // opts.batch_size // 20),
                            lr_decay_steps=max(1, total // opts.batch_size // 5), lr_end=opts.lr / 10,
                            device=str(st.device), dead_feature_window=opts.dead_window, feature_sampling_window=1000,
                            n_batches_for_norm_estimate=min(100, max(1, len(acts) // opts.batch_size)),
                            logger=LoggingConfig(log_to_wandb=False))
    t1 = time.time()
    trained = SAETrainer(tcfg, sae, _shuffled_batches(acts, opts.batch_size, opts.seed)).fit()
    train_s = time.time() - t1
    n_collected = len(acts)
    del acts
    out.mkdir(parents=True, exist_ok=True)
    trained.save_inference_model(out)
    loaded = SAE.load_from_disk(out, device=str(st.device))  # evaluate exactly what users will load
    t2 = time.time()
    label = opts.label_column if _has_column(st.plan, opts.label_column) else None
    figures = evaluate(loaded, st.stream_labelled(n_train_docs, st.plan.n_rows, opts.eval_tokens, label))
    if "by_label" in figures:
        figures[f"by_{label}"] = figures.pop("by_label")
    outside = evaluate_outside(loaded, st)
    report = {"options": opts.__dict__, "model": cfg.model.name, "dataset": cfg.data.dataset,
              "train_docs": [0, n_train_docs], "held_out_docs": [n_train_docs, st.plan.n_rows],
              "train_tokens": n_collected, "training_samples": total, "held_out": figures, "outside_texts": outside,
              "seconds": {"collect": round(collect_s, 1), "train": round(train_s, 1), "eval": round(time.time() - t2, 1)}}
    (out / "saeray_training.json").write_text(json.dumps(report, indent=2))
    return report
