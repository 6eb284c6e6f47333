"""Features on new texts, computed exactly as `saeray run` computes them (workflows 3 and 4).

`probe` shows one or several features on every token of a few texts (zeros included) so a
person can read them; `concept_features` ranks features for a concept given example texts.
Both reuse the run's own path: its tokenizer, BOS and context windows (`Tokenization`),
the forward pass stopped at the hook and gathered at the selected positions (`hidden_at_positions`,
as extraction does) and the SAE's own `encode`, so a probed value equals the row `saeray run`
wrote for the same document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch

from ..engine import config as config_mod
from ..engine.config import PositionsConfig, RunConfig, SAEConfig
from ..engine.contexts import Tokenization
from ..engine.extract import hidden_at_positions
from ..engine.models import load_model, n_layers_of, parse_hook
from ..engine.plan import token_settings
from ..engine.resources import pick_device
from ..engine.run import open_run
from ..engine.saes import describe, load

log = logging.getLogger(__name__)

ENCODE_CHUNK = 4096


@dataclass(frozen=True)
class Setup:
    """What decides a feature's value on a text: model, SAE, hook, BOS and window size."""

    config: RunConfig
    sae: SAEConfig
    hook: str
    digest: str
    prepend_bos: bool
    context_size: int


def pick_sae(cfg: RunConfig, name: str | None) -> SAEConfig:
    """The SAE called `name`, or the config's only SAE."""
    names = [s.name for s in cfg.saes]
    if name is None and len(cfg.saes) == 1:
        return cfg.saes[0]
    for s in cfg.saes:
        if s.name == name:
            return s
    what = "is not one of" if name is not None else "must be chosen among"
    raise ValueError(f"SAE {name!r} {what} the config's SAEs: {', '.join(names) or '(none)'}; pass sae=NAME")


def resolve(run_or_config: str | Path | RunConfig | dict[str, Any], sae: str | None = None) -> Setup:
    """A run directory (its manifest), a YAML config path, a RunConfig or a config dict -> Setup.

    For a config, BOS and window size follow the rules of `saeray run`: tokens.* when set,
    else what the SAEs were trained with (smallest context_size among them), else BOS and 1024.
    """
    if isinstance(run_or_config, (str, Path)) and (Path(run_or_config) / "manifest.json").is_file():
        manifest = open_run(run_or_config).read_manifest()
        cfg = config_mod.from_dict(manifest["config"])
        chosen = pick_sae(cfg, sae)
        r = manifest["resolved"]
        info = next(s for s in r["saes"] if s["name"] == chosen.name)
        return Setup(cfg, chosen, info["hook"], info["digest"], bool(r["prepend_bos"]), int(r["context_size"]))
    if isinstance(run_or_config, (str, Path)):
        if not Path(run_or_config).is_file():
            raise FileNotFoundError(f"{run_or_config} is neither a run directory (no manifest.json) nor a config file")
        cfg = config_mod.load(run_or_config)
    elif isinstance(run_or_config, dict):
        cfg = config_mod.from_dict(run_or_config)
    else:
        cfg = run_or_config
    chosen = pick_sae(cfg, sae)
    infos = {s.name: describe(s) for s in cfg.saes}
    prepend_bos, context_size = token_settings(cfg, list(infos.values()))
    info = infos[chosen.name]
    return Setup(cfg, chosen, info.hook, info.digest, prepend_bos, context_size)


class Prober:
    """A model and one SAE loaded once; encodes new texts the way extraction does."""

    def __init__(self, setup: Setup, *, device: torch.device | None = None):
        self.setup = setup
        self.device = device or pick_device()
        self.model, self.tokenizer = load_model(setup.config.model, self.device)
        self.sae = load(setup.sae, self.device)
        self.site = parse_hook(setup.hook, n_layers_of(self.model.config))
        # Every token is selected (special ones too) so that each is shown; `counted` says which a run keeps.
        self.tok = Tokenization(self.tokenizer, PositionsConfig(mode="all"), prepend_bos=setup.prepend_bos,
                                context_size=setup.context_size, exclude_special=False)
        self.run_tok = Tokenization(self.tokenizer, PositionsConfig(mode="all"), prepend_bos=setup.prepend_bos,
                                    context_size=setup.context_size,
                                    exclude_special=setup.config.tokens.exclude_special)

    @classmethod
    def open(cls, run_or_config: str | Path | RunConfig | dict[str, Any], *, sae: str | None = None,
             device: torch.device | None = None) -> "Prober":
        return cls(resolve(run_or_config, sae), device=device)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @torch.inference_mode()
    def dense(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Per forward batch: (text index [n], pos [n], codes [n, d_sae] float32 on the device), every token."""
        docs = [self.tok.document(i, t, {}) for i, t in enumerate(texts)]
        for batch in self.tok.batches(docs, self.setup.config.tokens.batch_tokens_on(self.device.type), self.device):
            x = hidden_at_positions(self.model, [self.site], batch)[self.site.name].get("all")
            if x is None:
                continue
            codes = torch.cat([self.sae.encode(x[a:a + ENCODE_CHUNK].to(self.sae.dtype)).float()
                               for a in range(0, x.shape[0], ENCODE_CHUNK)])
            yield batch.sel_doc["all"], batch.sel_pos["all"], codes

    def probe(self, texts: list[str], features: list[int]) -> pl.DataFrame:
        """Every token of every text x every feature: text, pos, token_id, token, counted, feature, value.

        `pos` indexes the text's tokens (no BOS), as in a run's activations; `counted` is
        False for tokens `saeray run` leaves out (special tokens, unless configured).
        Sorted by (feature, text, pos).
        """
        bad = [f for f in features if not 0 <= f < self.d_sae]
        if not features or bad:
            raise ValueError(f"features must be indices in 0-{self.d_sae - 1}, got {features!r}")
        feats = torch.tensor(features, device=self.device)
        parts = [(t, p, c[:, feats].cpu().numpy()) for t, p, c in self.dense(texts)]
        if not parts:
            text, pos, vals = np.empty(0, np.int64), np.empty(0, np.int32), np.empty((0, len(features)), np.float32)
        else:
            text, pos, vals = (np.concatenate(x) for x in zip(*parts))
        ids = [self.tok.encode(t) for t in texts]
        token_id = np.array([ids[t][p] for t, p in zip(text, pos)], dtype=np.int32)
        masks = [self.run_tok.counted(i) for i in ids]
        counted = np.array([masks[t][p] for t, p in zip(text, pos)], dtype=bool)
        token = self.tokenizer.batch_decode([[int(i)] for i in token_id])
        n, m = len(text), len(features)
        return pl.DataFrame({
            "text": np.tile(text.astype(np.int32), m), "pos": np.tile(pos.astype(np.int32), m),
            "token_id": np.tile(token_id, m), "token": token * m, "counted": np.tile(counted, m),
            "feature": np.repeat(np.asarray(features, dtype=np.int32), n),
            "value": vals.T.reshape(-1).astype(np.float32),
        }, schema={"text": pl.Int32, "pos": pl.Int32, "token_id": pl.Int32, "token": pl.String,
                   "counted": pl.Boolean, "feature": pl.Int32, "value": pl.Float32}).sort("feature", "text", "pos")

    def token_means(self, texts: list[str]) -> tuple[int, np.ndarray, np.ndarray]:
        """(counted tokens, mean code [d_sae], fraction active [d_sae]) over the texts' counted tokens."""
        total = torch.zeros(self.d_sae, dtype=torch.float64, device=self.device)
        active = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)
        n = 0
        masks = [self.run_tok.counted(self.tok.encode(t)) for t in texts]
        threshold = self.setup.sae.threshold
        for text, pos, codes in self.dense(texts):
            keep = np.array([masks[t][p] for t, p in zip(text, pos)], dtype=bool)
            c = codes[torch.from_numpy(keep).to(self.device)]
            n += c.shape[0]
            total += c.double().sum(0)
            active += ((c.abs() > threshold) if threshold > 0 else (c != 0)).sum(0)
        if n == 0:
            raise ValueError("the texts hold no counted tokens: give non-empty texts")
        return n, (total / n).cpu().numpy(), (active.double() / n).cpu().numpy()

    def concept(self, examples: list[str], *, counter_examples: list[str] | None = None, k: int = 20,
                reference_run: str | Path | None = None) -> pl.DataFrame:
        """See `concept_features`."""
        if counter_examples is not None and reference_run is not None:
            raise ValueError("give counter_examples or reference_run, not both")
        _, mean_in, frac_in = self.token_means(examples)
        cols: dict[str, Any] = {"feature": np.arange(self.d_sae, dtype=np.int32)}
        if counter_examples is not None:
            _, mean_out, frac_out = self.token_means(counter_examples)
        elif reference_run is not None:
            mean_out, frac_out = _reference_means(reference_run, self.setup, self.d_sae)
        else:
            mean_out, frac_out = np.zeros(self.d_sae), np.full(self.d_sae, np.nan)
        cols.update(score=mean_in - mean_out, mean_in=mean_in, mean_out=mean_out, frac_in=frac_in, frac_out=frac_out)
        return (pl.DataFrame(cols).with_columns(pl.col("frac_out").fill_nan(None))
                .sort(["score", "feature"], descending=[True, False]).head(k))


def _reference_means(run: str | Path, setup: Setup, d_sae: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature corpus mean and density of the same SAE (matched by digest) in a reference run."""
    from ..analysis.stats import features

    saes = open_run(run).read_manifest()["resolved"]["saes"]
    same = [s["name"] for s in saes if s["digest"] == setup.digest]
    if not same:
        raise ValueError(f"reference run {run} has no SAE with the weights of {setup.sae.name!r} "
                         f"(it has {', '.join(s['name'] for s in saes)}): extract it with the same SAE")
    frame = features(run).filter(pl.col("sae") == same[0]).collect()
    groups = sorted(frame["group"].unique())
    group = "all" if "all" in groups else (groups[0] if len(groups) == 1 else None)
    if group is None:
        raise ValueError(f"reference run {run} has groups {', '.join(groups)} but no `all`: extract it with "
                         "positions.mode: all")
    frame = frame.filter(pl.col("group") == group)
    mean, density = np.zeros(d_sae), np.zeros(d_sae)
    mean[frame["feature"].to_numpy()] = frame["mean"].to_numpy()
    density[frame["feature"].to_numpy()] = frame["density"].to_numpy()
    return mean, density


def probe(run_or_config: str | Path | RunConfig | dict[str, Any], texts: list[str], features: list[int], *,
          sae: str | None = None) -> pl.DataFrame:
    """Features' values on every token of new texts (zeros included); see `Prober.probe`."""
    return Prober.open(run_or_config, sae=sae).probe(texts, features)


def concept_features(run_or_config: str | Path | RunConfig | dict[str, Any], examples: list[str], *,
                     counter_examples: list[str] | None = None, sae: str | None = None, k: int = 20,
                     reference_run: str | Path | None = None) -> pl.DataFrame:
    """Top-k features for a concept given example texts.

    score = mean activation over the examples' counted tokens minus the same over the
    counter-examples' tokens, or minus the feature's corpus mean in `reference_run` (same
    SAE, group `all`), or minus 0 when neither is given. Columns: feature, score, mean_in,
    mean_out, frac_in, frac_out (fraction of tokens where the feature is active; the
    reference run's density; null when there is nothing to compare with).
    """
    return Prober.open(run_or_config, sae=sae).concept(examples, counter_examples=counter_examples, k=k,
                                                       reference_run=reference_run)
