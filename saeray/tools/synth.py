"""Synthetic maximizers (workflow 3): soft input sequences optimized to make one feature fire.

For each feature, a sequence of `seq_len` free vectors in the model's token-embedding space
(after a fixed BOS when the SAE was trained with one) is optimized by gradient ascent
(Adam, all features of a batch at once, one sequence per feature) so that the feature's
value at the sequence's last position is as high as possible. Then each free vector is
replaced by its nearest real token (cosine similarity to the embedding matrix; special
tokens excluded) and the hard token sequence is run through the ordinary extraction path.

- The model stays frozen: gradients are taken with respect to the soft inputs only
  (`torch.autograd.grad`), so model parameters are neither updated nor given `.grad`.
- Soft inputs live where token embeddings live: they are rows of the embedding matrix's
  space, scaled by the model's own embedding scale (Gemma multiplies looked-up rows by
  sqrt(d_model) inside its embedding module, which `inputs_embeds` bypasses; the scale is
  measured from the module, not assumed). After every step each vector is projected back
  into the ball of radius `norm_quantile` of the real embeddings' norms, so the optimum
  cannot come from inflating the residual stream beyond what any token does.
- The objective is the SAE's pre-activation of the feature (its `hook_sae_acts_pre`): equal
  to the activation (up to a positive per-feature constant) wherever the feature is active,
  and still informative where a ReLU or threshold leaves it at 0. For TopK SAEs an inactive
  feature's objective is its margin to the k-th largest other value instead (everything
  grows together otherwise). What is reported is the real activation, `sae.encode` of the
  hooked value, the best over all steps.
- Sequences start as random real tokens (seeded), so step 0 is real text. The ascent leaves
  the token manifold rather than moving between tokens: on Gemma 3 270M the nearest token of
  an optimized vector is usually still its starting token, at cosine ~0.5 (any other token is
  below ~0.2), and the hard sequence seldom reproduces the activation. `hard_cosine` and
  `hard_activation` report how far off the optimum lies.
- A step that produces a non-finite value restores that feature's last good inputs, resets
  its Adam moments and halves its step size; no NaN is ever returned.

`real_max` is the feature's maximum over a run (`saeray stats`): the same SAE over real text.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import nn

from ..engine.models import HookSite, ModelError, capture, run_to_hooks
from .options import option, seed_option

log = logging.getLogger(__name__)

VOCAB_CHUNK = 32768


@dataclass(frozen=True)
class SynthOptions:
    """How `synth` optimizes; each field is also a `saeray synth` option (`seq_len` is `--seq-len`)."""

    seq_len: int = option(8, "free positions per sequence (after a BOS when the SAE expects one)")
    steps: int = option(200, "Adam steps")
    lr: float = option(0.1, "Adam step as a fraction of the embeddings' typical coordinate (rms norm / sqrt(d_model))")
    norm_quantile: float = option(0.99, "soft vectors stay within this quantile of the real token embeddings' norms")
    batch_features: int = option(32, "features optimized together (one forward/backward pass)")
    seed: int = seed_option("the initial sequences (random real tokens)")


SCHEMA = {"feature": pl.Int32, "synth_activation": pl.Float32, "hard_token_ids": pl.List(pl.Int32),
          "hard_tokens": pl.List(pl.String), "hard_cosine": pl.List(pl.Float32), "hard_activation": pl.Float32,
          "best_step": pl.Int32, "nan_restarts": pl.Int32}


def embedding_scale(model: nn.Module) -> float:
    """The factor the input-embedding module applies to looked-up rows (sqrt(d_model) for Gemma, else 1).

    Measured by running the module on a few ids; refused if the module is not a scaled lookup.
    """
    emb = model.get_input_embeddings()
    ids = torch.linspace(0, emb.weight.shape[0] - 1, 64).long().to(emb.weight.device)
    with torch.no_grad():
        out = emb(ids).double()
        rows = emb.weight[ids].double()
    scale = float((out * rows).sum() / (rows * rows).sum())
    err = float((out - scale * rows).norm() / out.norm())
    if not math.isfinite(scale) or err > 2e-2:
        raise ModelError(f"the input embedding {type(emb).__name__} is not a scaled table lookup "
                         f"(relative residual {err:.3g}): synthetic inputs need one")
    return scale


@dataclass
class _Space:
    """The token-embedding space: the table, its scale, the norm bound, and the candidate tokens."""

    weight: torch.Tensor
    scale: float
    radius: float
    rms_coord: float
    candidates: torch.Tensor
    """bool [vocab]: tokens a hard sequence may use (no special tokens)."""

    @classmethod
    def of(cls, model: nn.Module, special_ids: list[int], vocab: int, quantile: float) -> "_Space":
        w = model.get_input_embeddings().weight.detach()
        norms = torch.cat([w[a:a + VOCAB_CHUNK].float().norm(dim=1) for a in range(0, w.shape[0], VOCAB_CHUNK)])
        cand = torch.zeros(w.shape[0], dtype=torch.bool)
        cand[:min(vocab, w.shape[0])] = True
        cand[[i for i in special_ids if 0 <= i < w.shape[0]]] = False
        n = norms[cand.to(norms.device)].cpu()
        if n.numel() > 1_000_000:
            n = n[torch.randperm(n.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        radius = float(torch.quantile(n, quantile))
        return cls(w, embedding_scale(model), radius, float(n.pow(2).mean().sqrt()) / math.sqrt(w.shape[1]),
                   cand.to(w.device))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        n = z.norm(dim=-1, keepdim=True)
        return z * (self.radius / n.clamp_min(self.radius))

    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, cosines) [..] of the candidate tokens most cosine-similar to each vector of z [.., d]."""
        flat = torch.nn.functional.normalize(z.reshape(-1, z.shape[-1]).float(), dim=1)
        best_v = torch.full((flat.shape[0],), -math.inf, device=z.device)
        best_i = torch.zeros(flat.shape[0], dtype=torch.long, device=z.device)
        for a in range(0, self.weight.shape[0], VOCAB_CHUNK):
            rows = torch.nn.functional.normalize(self.weight[a:a + VOCAB_CHUNK].float(), dim=1)
            sim = flat @ rows.T
            sim[:, ~self.candidates[a:a + VOCAB_CHUNK]] = -math.inf
            v, i = sim.max(dim=1)
            better = v > best_v
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + a, best_i)
        return best_i.reshape(z.shape[:-1]), best_v.reshape(z.shape[:-1])


def _select(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return values.gather(1, features[:, None])[:, 0]


class _Objective:
    """Soft inputs -> (objective, activation) of each row's feature at the last position.

    The objective is the feature's pre-activation. For a TopK SAE an inactive feature is not
    helped by a pre-activation that grows no faster than the others', so there it is the
    margin to the k-th largest of the other features' values (what TopK ranks), until the
    feature enters the top k.
    """

    def __init__(self, model: nn.Module, sae: Any, site: HookSite, bos: torch.Tensor | None, scale: float):
        self.model, self.sae, self.site, self.bos, self.scale = model, sae, site, bos, scale
        self.dtype = model.get_input_embeddings().weight.dtype
        k = getattr(sae.cfg, "k", None)
        act_fn = getattr(sae, "activation_fn", None)
        self.k = int(k) if isinstance(k, int) and isinstance(act_fn, nn.Module) and 0 < k < sae.cfg.d_sae else 0

    def __call__(self, z: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = (z * self.scale).to(self.dtype)
        if self.bos is not None:
            emb = torch.cat([self.bos.expand(z.shape[0], 1, -1), emb], dim=1)
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        with capture(self.model, [self.site]) as captured:
            self.model(inputs_embeds=emb, attention_mask=mask, use_cache=False)
        if self.site.name not in captured:
            raise ModelError(f"hook {self.site.name} never fired during the forward pass")
        x = captured[self.site.name][:, -1].to(self.sae.dtype)
        pre: list[torch.Tensor] = []
        ranked: list[torch.Tensor] = []
        handles = [self.sae.hook_sae_acts_pre.register_forward_hook(lambda m, i, o: pre.append(o))]
        if self.k:
            handles.append(self.sae.activation_fn.register_forward_pre_hook(lambda m, i: ranked.append(i[0])))
        try:
            acts = self.sae.encode(x)
        finally:
            for h in handles:
                h.remove()
        value = _select(acts, features).float()
        if ranked:
            r = ranked[0].float()
            own = _select(r, features)
            kth = r.scatter(1, features[:, None], -math.inf).topk(self.k, dim=1).values[:, -1]
            return torch.where(value != 0, own, own - kth), value
        return (_select(pre[0], features).float() if pre else value), value


def _hard_activations(model: nn.Module, sae: Any, site: HookSite, ids: torch.Tensor, bos_id: int | None,
                      features: torch.Tensor) -> torch.Tensor:
    """Each row's feature at the last position of the hard sequence [BOS] + ids, as extraction computes it."""
    if bos_id is not None:
        ids = torch.cat([torch.full((ids.shape[0], 1), bos_id, dtype=ids.dtype, device=ids.device), ids], dim=1)
    hidden = run_to_hooks(model, [site], ids, torch.ones_like(ids))[site.name]
    with torch.inference_mode():
        return _select(sae.encode(hidden[:, -1].to(sae.dtype)), features).float()


def synthesize(model: nn.Module, sae: Any, site: HookSite, features: list[int], *, bos_id: int | None,
               special_ids: list[int], vocab: int, tokenizer: Any | None = None,
               options: SynthOptions = SynthOptions(),
               return_inputs: bool = False) -> pl.DataFrame | tuple[pl.DataFrame, torch.Tensor]:
    """Optimize one soft sequence per feature; see the module docstring.

    Returns per feature: synth_activation (best activation of the soft sequence), the
    hard tokens nearest to it (ids and decoded strings), hard_activation (the feature at
    the hard sequence's last token), hard_cosine (per position, the cosine similarity of the
    soft vector and its nearest token), best_step and nan_restarts. With `return_inputs`, also
    the best soft sequences [n_features, seq_len, d_model] in the embedding table's space
    (feed `inputs * embedding_scale(model)` after the BOS embedding to reproduce them).
    """
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in features if not 0 <= f < d_sae]
    if not features or bad:
        raise ValueError(f"features must be indices in 0-{d_sae - 1}, got {bad or features!r}")
    if options.seq_len < 1 or options.steps < 0 or options.lr <= 0 or options.batch_features < 1:
        raise ValueError(f"bad synth options {options}: need seq_len >= 1, steps >= 0, lr > 0, batch_features >= 1")
    if not 0 < options.norm_quantile <= 1:
        raise ValueError(f"norm_quantile must be in (0, 1], got {options.norm_quantile}")
    space = _Space.of(model, special_ids, vocab, options.norm_quantile)
    device = space.weight.device
    was_training = model.training
    model.eval()
    bos = None
    if bos_id is not None:
        with torch.no_grad():
            bos = model.get_input_embeddings()(torch.tensor([[bos_id]], device=device))
    objective = _Objective(model, sae, site, bos, space.scale)
    gen = torch.Generator().manual_seed(options.seed)
    cand_ids = space.candidates.nonzero()[:, 0].cpu()
    rows, inputs = [], []
    try:
        for a in range(0, len(features), options.batch_features):
            feats = features[a:a + options.batch_features]
            init_ids = cand_ids[torch.randint(len(cand_ids), (len(feats), options.seq_len), generator=gen)]
            z0 = space.weight[init_ids.to(device)].float()
            got, best_z = _optimize(objective, space, z0, feats, options, model, sae, site, bos_id)
            rows += got
            inputs.append(best_z)
    finally:
        model.train(was_training)
    frame = pl.DataFrame(rows, schema={k: v for k, v in SCHEMA.items() if k != "hard_tokens"}, orient="row")
    decode = (lambda ids: tokenizer.batch_decode([[i] for i in ids])) if tokenizer is not None else (lambda ids: None)
    tokens = pl.Series("hard_tokens", [decode(ids) for ids in frame["hard_token_ids"].to_list()],
                       dtype=pl.List(pl.String))
    frame = frame.insert_column(3, tokens)
    return (frame, torch.cat(inputs)) if return_inputs else frame


def _optimize(objective: _Objective, space: _Space, z0: torch.Tensor, feats: list[int], opts: SynthOptions,
              model: nn.Module, sae: Any, site: HookSite, bos_id: int | None) -> tuple[list[tuple], torch.Tensor]:
    """Adam with a per-row step size (halved on a non-finite step), keeping the best inputs per row."""
    n = len(feats)
    f = torch.tensor(feats, device=z0.device)
    z = space.project(z0.clone())
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    t = torch.zeros(n, 1, 1, device=z.device)
    lr = torch.full((n, 1, 1), opts.lr * space.rms_coord, device=z.device)
    best_val = torch.full((n,), -math.inf, device=z.device)
    best_z, best_step = z.clone(), torch.zeros(n, dtype=torch.long)
    restarts = torch.zeros(n, dtype=torch.long)
    b1, b2, eps = 0.9, 0.999, 1e-12
    for step in range(opts.steps + 1):
        zr = z.detach().requires_grad_(True)
        with torch.enable_grad():
            target, value = objective(zr, f)
            grad = torch.autograd.grad(target.sum(), zr)[0] if step < opts.steps else None
        value = value.detach()
        ok = torch.isfinite(value) & torch.isfinite(target.detach())
        if grad is not None:
            ok &= torch.isfinite(grad).flatten(1).all(dim=1)
        better = ok & (value > best_val)
        best_val = torch.where(better, value, best_val)
        best_z[better] = z[better]
        best_step[better.cpu()] = step
        if grad is None:
            break
        if step % 50 == 0:
            log.info("synth: step %d/%d, features %d-%d, best activation median %.4g", step, opts.steps,
                     feats[0], feats[-1], float(best_val.median()))
        bad = ~ok
        if bad.any():
            log.warning("synth: non-finite step %d for features %s: restoring and halving their step size",
                        step, [feats[i] for i in bad.nonzero()[:, 0].tolist()])
            restarts += bad.cpu().long()
            z[bad], m[bad], v[bad], t[bad] = best_z[bad], 0.0, 0.0, 0.0
            lr[bad] /= 2
            grad = torch.where(bad[:, None, None], torch.zeros_like(grad), grad)
        t += ok[:, None, None].float()
        g = grad.float()
        m = torch.where(ok[:, None, None], b1 * m + (1 - b1) * g, m)
        v = torch.where(ok[:, None, None], b2 * v + (1 - b2) * g * g, v)
        tc = t.clamp_min(1)
        update = lr * (m / (1 - b1 ** tc)) / ((v / (1 - b2 ** tc)).sqrt() + eps)
        z = space.project(z + torch.where(ok[:, None, None], update, torch.zeros_like(update)))
    if not torch.isfinite(best_val).all():
        lost = [feats[i] for i in (~torch.isfinite(best_val)).nonzero()[:, 0].tolist()]
        raise FloatingPointError(f"synth: features {lost} gave no finite activation even on real token "
                                 "embeddings: the model or SAE produces NaN/inf (check dtype: try float32)")
    hard, cosine = space.nearest(best_z)
    hard_val = _hard_activations(model, sae, site, hard, bos_id, f)
    return [(feats[i], float(best_val[i]), hard[i].tolist(), cosine[i].tolist(), float(hard_val[i]),
             int(best_step[i]), int(restarts[i])) for i in range(n)], best_z


def real_maxima(run: str | Path, sae_name: str, digest: str, features: list[int],
                group: str | None = None) -> pl.DataFrame:
    """feature, real_max (null where never active), real_group: each feature's maximum in a run of the same SAE."""
    from ..analysis.stats import features as run_features
    from ..engine.run import open_run

    saes = open_run(run).read_manifest()["resolved"]["saes"]
    same = [s["name"] for s in saes if s["digest"] == digest]
    if not same:
        raise ValueError(f"run {run} has no SAE with the weights of {sae_name!r} (it has "
                         f"{', '.join(s['name'] for s in saes)}): give a run extracted with the same SAE")
    name = sae_name if sae_name in same else same[0]
    frame = run_features(run).filter(pl.col("sae") == name).collect()
    groups = sorted(frame["group"].unique())
    if group is None:
        group = groups[0] if len(groups) == 1 else ("all" if "all" in groups else None)
    if group not in groups:
        raise ValueError(f"run {run} has position groups {', '.join(groups)}: choose one with group=")
    got = frame.filter(pl.col("group") == group).select("feature", pl.col("max").cast(pl.Float32).alias("real_max"))
    return (pl.DataFrame({"feature": features}, schema={"feature": pl.Int32})
            .join(got, on="feature", how="left").with_columns(pl.lit(group).alias("real_group")))


def synth(run_or_config: Any, features: list[int], *, sae: str | None = None, reference: str | Path | None = None,
          group: str | None = None, options: SynthOptions = SynthOptions(),
          device: torch.device | None = None) -> pl.DataFrame:
    """Synthetic maximizers for a run's (or a config's) model and SAE, compared with a run's real maxima.

    `reference` is the run whose feature maxima are compared (default: `run_or_config` when
    it is a run directory). Adds sae, hook, real_max, real_group, ratio = synth / real and
    hard_ratio = hard / real (null without a positive real maximum). Sorted by feature.
    """
    from .probe import Prober

    prober = Prober.open(run_or_config, sae=sae, device=device)
    setup = prober.setup
    bos_id = prober.tok.bos_id if setup.prepend_bos else None
    frame = synthesize(prober.model, prober.sae, prober.site, features, bos_id=bos_id,
                       special_ids=[int(i) for i in prober.run_tok.special_ids], vocab=len(prober.tokenizer),
                       tokenizer=prober.tokenizer, options=options)
    if reference is None and isinstance(run_or_config, (str, Path)) and (Path(run_or_config) / "manifest.json").is_file():
        reference = run_or_config
    if reference is not None:
        real = real_maxima(reference, setup.sae.name, setup.digest, features, group)
    else:
        real = pl.DataFrame({"feature": features, "real_max": [None] * len(features), "real_group": [None] * len(features)},
                            schema={"feature": pl.Int32, "real_max": pl.Float32, "real_group": pl.String})
    positive = pl.col("real_max") > 0
    return (frame.join(real, on="feature", how="left")
            .with_columns(pl.when(positive).then(pl.col("synth_activation") / pl.col("real_max")).alias("ratio"),
                          pl.when(positive).then(pl.col("hard_activation") / pl.col("real_max")).alias("hard_ratio"))
            .select(pl.lit(setup.sae.name).alias("sae"), pl.lit(setup.hook).alias("hook"), pl.all())
            .sort("feature"))
