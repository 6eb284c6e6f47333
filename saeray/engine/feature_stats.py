"""Mergeable per-feature statistics of one (SAE, position group), kept on the device while a unit runs.

Counts, mean and m2 (Chan's formula in float64), the maximum and where it is, a histogram of values, and
per-document moments; `to_table` is a unit's `stats` partial (partials.DEFINITIONS)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from . import partials
from .partials import N_BINS, add_counts, counts, hist_table, value_bins

_NO_KEY = torch.iinfo(torch.int64).max

STATS_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("feature", pa.int32()),
    ("n_tokens", pa.int64()), ("n_active", pa.int64()), ("n_docs_active", pa.int64()),
    ("sum", pa.float64()), ("m2", pa.float64()),
    ("max", pa.float32()), ("max_doc_id", pa.int64()), ("max_pos", pa.int32()),
    ("n_docs", pa.int64()), ("doc_sum", pa.float64()), ("doc_m2", pa.float64()),
])
"""Per-unit statistics; n_docs/doc_sum/doc_m2 are the per-document moments (partials.DEFINITIONS)."""


DENSE_PAIR_CELLS = 1 << 23
"""Blocks of at most this many documents x latents find their (document, feature) pairs on a dense grid (64 MiB of
float32 at most), larger ones by sorting."""


def segment_sum(index: torch.Tensor, values: torch.Tensor, size: int, deterministic: bool | None = None
                ) -> torch.Tensor:
    """[size] sums of `values` per `index` (index_add_), in an order that is the same every run: on a GPU,
    index_add_ adds float64 with atomics in whatever order threads arrive, so sums differ in the last bits
    from run to run. There (`deterministic` None: not on CPU) the values are sorted by index (stable) and each
    segment summed by torch.segment_reduce (CUB's segmented reduction, no atomics). On CPU index_add_ adds in
    order already."""
    if deterministic is None:
        deterministic = not partials.on_host(values)
    if not deterministic:
        return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    order = torch.sort(index, stable=True).indices
    lengths = counts(index, size)
    return torch.segment_reduce(values[order], "sum", lengths=lengths, unsafe=True)


@dataclass
class PairSums:
    """(document, feature) pairs of a set of entries, reduced: key = rank * d_sae + feature (ascending), the sum
    of the values (float64), the maximum and the smallest position holding it; `inv`: the pair of each entry
    of the last reduction."""

    key: torch.Tensor
    psum: torch.Tensor
    pmax: torch.Tensor
    ppos: torch.Tensor
    inv: torch.Tensor


def reduce_pairs(d: int, feat: torch.Tensor, rank: torch.Tensor, pos: torch.Tensor, val: torch.Tensor,
                 pre: PairSums | None = None) -> PairSums:
    """The (document, feature) pairs of the entries (feature, rank, pos, value), merged with the pairs `pre`
    of earlier entries: sums add, maxima and their smallest positions combine, as if every entry had been
    reduced at once (sums to float64 rounding)."""
    key = rank * d + feat
    if pre is not None:
        key = torch.cat([pre.key, key])
        val_all, pos_all = torch.cat([pre.pmax, val]), torch.cat([pre.ppos, pos])
        sums = torch.cat([pre.psum, val.double()])
    else:
        val_all, pos_all, sums = val, pos, val.double()
    uniq, inv_all = torch.unique(key, return_inverse=True)  # a host sync on a GPU
    pmax = torch.full((len(uniq),), float("-inf"), dtype=val_all.dtype, device=val_all.device).scatter_reduce(
        0, inv_all, val_all, "amax")
    psum, ppos = _sums_and_argmax(inv_all, sums, val_all, pos_all, pmax)
    n_pre = 0 if pre is None else len(pre.key)
    return PairSums(uniq, psum, pmax, ppos, inv_all[n_pre:])


def _sums_and_argmax(inv: torch.Tensor, sums: torch.Tensor, val: torch.Tensor, pos: torch.Tensor,
                     pmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (`inv`: each entry's pair; `pmax`: each pair's maximum): the sum of `sums`, and the smallest
    position holding the maximum."""
    n = len(pmax)
    at_max = torch.where(val == pmax[inv], pos, _NO_KEY)
    ppos = torch.full((n,), _NO_KEY, dtype=torch.int64, device=pos.device).scatter_reduce(0, inv, at_max, "amin")
    return segment_sum(inv, sums, n), ppos


class FeatureStats:
    """Mergeable per-feature partials for one (SAE, position group), kept on the device.

    mean/m2 are over all counted tokens (inactive tokens count as 0); m2 is the sum of
    squared deviations from the mean, merged across batches with Chan's formula in float64.
    max is over active values; ties go to the smallest (doc_id, pos).
    """

    def __init__(self, d_sae: int, device: torch.device):
        self.d_sae = d_sae
        self.n_tokens = 0
        z = dict(device=device)
        self.n_active = torch.zeros(d_sae, dtype=torch.int64, **z)
        self.n_docs = torch.zeros(d_sae, dtype=torch.int64, **z)
        self.mean = torch.zeros(d_sae, dtype=torch.float64, **z)
        self.m2 = torch.zeros(d_sae, dtype=torch.float64, **z)
        self.max = torch.full((d_sae,), float("-inf"), dtype=torch.float32, **z)
        self.max_doc = torch.full((d_sae,), _NO_KEY, dtype=torch.int64, **z)
        self.max_pos = torch.full((d_sae,), _NO_KEY, dtype=torch.int64, **z)
        self.hist = torch.zeros(d_sae * N_BINS + 1, dtype=torch.int64, **z)
        """(feature, value bin) counts, flat, and one spare cell for values <= 0."""
        self.doc_n = 0
        self.doc_mean = torch.zeros(d_sae, dtype=torch.float64, **z)
        self.doc_m2 = torch.zeros(d_sae, dtype=torch.float64, **z)

    def add(self, n: int, feat: torch.Tensor, val: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor) -> None:
        """Fold in a batch of `n` counted tokens whose active entries are (feat, val) at (doc, pos)."""
        if n == 0:
            return
        v = val.double()
        count = counts(feat, self.d_sae)
        s = segment_sum(feat, v, self.d_sae)
        mean_b = s / n
        dev = v - mean_b[feat]
        m2_b = segment_sum(feat, dev * dev, self.d_sae) + (n - count) * mean_b * mean_b
        na, nb = self.n_tokens, n
        tot = na + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / tot)
        self.m2 += m2_b + delta * delta * (na * nb / tot)
        self.n_tokens = tot
        self.n_active += count
        # the histogram of positive values, counted into place (others go to the spare cell: no mask indexing)
        cell = torch.where(val > 0, feat * N_BINS + value_bins(val), len(self.hist) - 1)
        add_counts(self.hist, cell)
        if feat.numel() and partials.on_host(feat):
            # Only entries >= their feature's running max can change it (ties included): after the first
            # batches few are, and the passes below touch only those. (On a GPU the mask would cost a sync.)
            keep = val >= self.max[feat]
            feat, val, doc, pos = feat[keep], val[keep], doc[keep], pos[keep]
        if feat.numel():
            bmax = torch.full_like(self.max, float("-inf")).scatter_reduce(0, feat, val, "amax")
            # ties go to the smallest (doc_id, pos): the smallest doc among the maxima, then its smallest pos
            # (entries that are not candidates carry _NO_KEY, which never lowers a minimum: no mask indexing,
            # which would cost a host sync on a GPU)
            hit = val == bmax[feat]
            bdoc = torch.full_like(self.max_doc, _NO_KEY).scatter_reduce(0, feat, torch.where(hit, doc, _NO_KEY), "amin")
            hit &= doc == bdoc[feat]
            bpos = torch.full_like(self.max_pos, _NO_KEY).scatter_reduce(0, feat, torch.where(hit, pos, _NO_KEY), "amin")
            tie = bmax == self.max
            better = (bmax > self.max) | (tie & (bdoc < self.max_doc)) | (tie & (bdoc == self.max_doc) & (bpos < self.max_pos))
            self.max = torch.where(better, bmax, self.max)
            self.max_doc = torch.where(better, bdoc, self.max_doc)
            self.max_pos = torch.where(better, bpos, self.max_pos)

    def add_docs(self, feat: torch.Tensor, rank: torch.Tensor, pos: torch.Tensor, val: torch.Tensor,
                 counted: torch.Tensor, n_counted_docs: int, pre: "PairSums | None" = None
                 ) -> tuple[torch.Tensor, ...]:
        """Fold in a set of whole documents: the active entries (feature, document's `rank` in the set, pos,
        value) and `counted` = each document's counted positions. Counts the documents per feature, folds in
        the per-document moments (doc_value, see partials.DEFINITIONS) and returns the (feature, document)
        pairs: (feature, rank, position of the document's maximum, that maximum, each entry's pair). `pre`:
        pairs of earlier entries of the same documents, already reduced (`reduce_pairs`)."""
        d = self.d_sae
        cells = len(counted) * d
        if pre is not None or (feat.numel() and cells > DENSE_PAIR_CELLS):  # by sorting (and merging `pre`)
            r = reduce_pairs(d, feat, rank, pos, val, pre)
            psum, pmax, ppos, inv = r.psum, r.pmax, r.ppos, r.inv
            pf, pr = r.key % d, r.key // d
        elif feat.numel():  # a dense (document x feature) grid: no sort
            key = rank * d + feat
            grid = torch.full((cells,), float("-inf"), dtype=val.dtype, device=val.device).scatter_reduce_(
                0, key, val, "amax")
            uniq = torch.nonzero(grid != float("-inf")).squeeze(1)  # ascending, as unique's; a host sync on a GPU
            lookup = torch.empty(cells, dtype=torch.int64, device=key.device)
            lookup[uniq] = torch.arange(len(uniq), device=key.device)
            inv = lookup[key]
            pmax = grid[uniq]
            psum, ppos = _sums_and_argmax(inv, val.double(), val, pos, pmax)
            pf, pr = uniq % d, uniq // d
        else:
            psum = torch.zeros(0, dtype=torch.float64, device=feat.device)
            pmax, pf, pr, ppos, inv = val, feat, rank, pos, rank
        docs_per_feature = counts(pf, d)
        self.n_docs += docs_per_feature
        if n_counted_docs:
            x = psum / counted[pr]
            s = segment_sum(pf, x, d)
            mean_b = s / n_counted_docs
            dev = x - mean_b[pf]
            m2_b = (segment_sum(pf, dev * dev, d)
                    + (n_counted_docs - docs_per_feature) * mean_b * mean_b)
            na, nb = self.doc_n, n_counted_docs
            delta = mean_b - self.doc_mean
            self.doc_mean += delta * (nb / (na + nb))
            self.doc_m2 += m2_b + delta * delta * (na * nb / (na + nb))
            self.doc_n = na + nb
        return pf, pr, ppos, pmax, inv

    def to_table(self, sae: str, group: str) -> pa.Table:
        max_doc = self.max_doc.cpu().numpy()
        seen = max_doc != _NO_KEY
        mx = self.max.cpu().numpy()
        return pa.table({
            "sae": pa.array([sae] * self.d_sae, pa.string()),
            "group": pa.array([group] * self.d_sae, pa.string()),
            "feature": pa.array(np.arange(self.d_sae, dtype=np.int32)),
            "n_tokens": pa.array(np.full(self.d_sae, self.n_tokens, dtype=np.int64)),
            "n_active": pa.array(self.n_active.cpu().numpy()),
            "n_docs_active": pa.array(self.n_docs.cpu().numpy()),
            "sum": pa.array(self.mean.cpu().numpy() * self.n_tokens),
            "m2": pa.array(self.m2.cpu().numpy()),
            "max": pa.array(mx, mask=~seen),
            "max_doc_id": pa.array(max_doc, mask=~seen),
            "max_pos": pa.array(np.where(seen, self.max_pos.cpu().numpy(), 0).astype(np.int32), mask=~seen),
            "n_docs": pa.array(np.full(self.d_sae, self.doc_n, dtype=np.int64)),
            "doc_sum": pa.array(self.doc_mean.cpu().numpy() * self.doc_n),
            "doc_m2": pa.array(self.doc_m2.cpu().numpy()),
        }, schema=STATS_SCHEMA)

    def hist_table(self, sae: str, group: str) -> pa.Table:
        return hist_table(self.hist[:-1].view(self.d_sae, N_BINS), sae, group)
