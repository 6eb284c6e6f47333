"""Row-free partials of a work unit: example documents per feature and activation histograms.

Written beside each unit's statistics and merged exactly, whatever the unit split or order, so
`top`, interval examples, histograms and feature cards work on statistics-only runs:

* top: per (sae, group, feature) the `output.top_k` documents with the highest maximum of the
  feature (ties: smaller doc_id), each with the position of that maximum (ties: smaller pos).
  Documents never span units, so the run's top k are the top k of the units' top k.
* samples: per (sae, group, feature, bin of the document's maximum) the `output.samples_per_bin`
  documents with the smallest draw (a hash of (doc_id, feature): the same documents whichever
  units hold them). A smallest-draws sample of a union of bins is the smallest draws of the bins'
  samples, so an interval made of whole bins is sampled exactly from the partials.
* hist: per (sae, group, feature, bin) the number of counted positions whose value falls in the bin.

Bins are fixed and log-spaced (`EDGES`: 8 per decade from 1e-4 to 1e4), the same for every run,
so bins of different units and runs add. Bin 0 holds values <= 0, bin b (1..65) the interval
(EDGES[b-1], EDGES[b]], bin 66 values above 1e4.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .saes import nonzero_sized

BINS_PER_DECADE = 8
EDGES = np.concatenate([[0.0], 10.0 ** (np.arange(-4 * BINS_PER_DECADE, 4 * BINS_PER_DECADE + 1) / BINS_PER_DECADE)]
                       ).astype(np.float32)
"""Upper edges of the value bins (float32, compared with float32 values): 0, 1e-4, 10^(-31/8), ..., 1e4."""
N_BINS = len(EDGES) + 1

EXAMPLES_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("feature", pa.int32()), ("kind", pa.string()),
    ("bin", pa.int16()), ("draw", pa.int64()), ("doc_id", pa.int64()), ("pos", pa.int32()), ("value", pa.float32()),
    ("ctx_offset", pa.list_(pa.int32())), ("ctx_value", pa.list_(pa.float32())),
])
HIST_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("feature", pa.int32()), ("bin", pa.int16()), ("count", pa.int64()),
])

LAST_VALUES_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("feature", pa.int32()), ("doc_id", pa.int64()),
    ("value", pa.float32()),
])

DEFINITIONS = {
    "value_bins": "fixed log-spaced bins, 8 per decade: bin 0 holds values <= 0, bin b in 1..65 the values in "
                  "(EDGES[b-1], EDGES[b]] with EDGES = [0, 1e-4, 10^(-31/8), ..., 1e4], bin 66 values above 1e4",
    "hist": "per (sae, group, feature, bin): counted positions whose active value falls in the bin (values > 0 only)",
    "doc_max": "per (feature, document): the largest active value of the feature in the document, at the "
               "smallest position that reaches it",
    "top": "per (sae, group, feature): the output.top_k documents with the largest doc_max (ties: smaller doc_id)",
    "draw": "splitmix64 of (doc_id, feature), shifted right by one bit (a non-negative int64): a seeded "
            "pseudo-random draw per document and feature, the same in any unit split",
    "samples": "per (sae, group, feature, bin of doc_max): the output.samples_per_bin documents with the smallest "
               "(draw, doc_id)",
    "doc_value": "per (feature, document with counted positions): the sum of the feature's values over the "
                 "document's counted positions of the group / the number of those positions (0 if it never fires)",
    "ctx_offset, ctx_value": "the feature's active values in the example's document at positions pos - "
                             "output.context_radius .. pos + output.context_radius, as (position - pos, value); "
                             "positions absent are inactive or not counted (0)",
    "lastvals": "per (sae, group, feature, document): the feature's value at the document's last counted position "
                "of the group, where it is not 0 (output.last_values; what `separate` reads without rows: AUROC "
                "and its held-out classifier need each document's value, which no fixed-size summary keeps)",
    "n_docs, doc_sum, doc_m2": "per (sae, group, feature) over the unit's documents with counted positions: their "
                               "number, the sum of doc_value and the sum of squared deviations of doc_value from "
                               "the unit's mean; merged across units with Chan's formula",
}

_C1, _C2 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
_M1, _M2, _C3 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x165667B19E3779F9
_BIG = torch.iinfo(torch.int64).max


def chan_m2(m2: str, n: str, part_mean: str, mean: str) -> Any:
    """Polars: the merged centred sum of squares of parts (column `m2` each, over `n` values with mean
    `part_mean`) around the merged `mean`: sum_i [m2_i + n_i (mean_i - mean)^2], the many-way form of Chan's
    formula (aggregated per group, e.g. within `group_by(...).agg`). Every merge of m2 and doc_m2 goes through it."""
    import polars as pl

    return (pl.col(m2) + pl.col(n) * (pl.col(part_mean) - pl.col(mean)) ** 2).sum()


def value_bins_np(values: np.ndarray) -> np.ndarray:
    """Bin (int16) of each value (compared as float32, the engine's value type)."""
    return np.searchsorted(EDGES, np.asarray(values, dtype=np.float32), side="left").astype(np.int16)


def value_bins(values: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
    """Bin (int64) of each value (`edges`: `EDGES` as a tensor; default its copy on the values' device)."""
    edges = edges_on(values.device) if edges is None else edges
    return torch.searchsorted(edges, values.float().contiguous(), right=False)


@lru_cache(maxsize=None)
def edges_on(device: torch.device) -> torch.Tensor:
    """`EDGES` as a tensor on `device` (one copy per device)."""
    return torch.from_numpy(EDGES).to(device)


def bin_edges(b: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high] value range of bins (bin 0: (-inf, 0]; the last bin: (1e4, inf))."""
    lo = np.concatenate([[-np.inf], EDGES]).astype(np.float64)
    hi = np.concatenate([EDGES, [np.inf]]).astype(np.float64)
    return lo[b], hi[b]


def draws_np(doc_id: np.ndarray, feature: np.ndarray, seed: int = 0) -> np.ndarray:
    """`draw` of (doc_id, feature) pairs: splitmix64 >> 1 (int64, non-negative). The partials use seed 0."""
    d = np.asarray(doc_id).astype(np.int64).view(np.uint64)
    f = np.asarray(feature).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        x = (d * np.uint64(_C1)) ^ (f * np.uint64(_C2)) ^ (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(_C3))
        x ^= x >> np.uint64(30)
        x *= np.uint64(_M1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(_M2)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(1)).astype(np.int64)


def intervals(lo_bin: np.ndarray, hi_bin: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Interval (0..n-1) of bin `b` for a feature whose documents' maxima occupy bins lo_bin..hi_bin: the span
    of bins (span = hi - lo + 1) is cut into n runs of whole bins, i = floor((b - lo) n / span); interval i
    holds bins lo + ceil(i span / n) .. lo + ceil((i + 1) span / n) - 1 (with fewer bins than n, some none)."""
    span = hi_bin.astype(np.int64) - lo_bin + 1
    return ((b.astype(np.int64) - lo_bin) * n // span).astype(np.int32)


def interval_bins(lo_bin: np.ndarray, hi_bin: np.ndarray, i: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) bin of interval i (see `intervals`)."""
    span = hi_bin.astype(np.int64) - lo_bin + 1
    i = i.astype(np.int64)
    return lo_bin + -(-i * span // n), lo_bin + -(-(i + 1) * span // n) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def draws(doc_id: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """`draws_np` on int64 tensors (multiplication wraps modulo 2^64 in torch, as in uint64)."""
    x = (doc_id * _signed(_C1)) ^ (feature.long() * _signed(_C2))
    x = x ^ _shr(x, 30)
    x = x * _signed(_M1)
    x = x ^ _shr(x, 27)
    x = x * _signed(_M2)
    x = x ^ _shr(x, 31)
    return _shr(x, 1)


def _first_per_group(group: torch.Tensor, keys: list[tuple[torch.Tensor, bool]], k: int) -> torch.Tensor:
    """Indices of the first `k` entries of each group under the ordering `keys` (most significant first;
    True = descending), ties kept in input order; the group ids of the result ascend."""
    order = torch.arange(len(group), device=group.device)
    for key, desc in reversed(keys):
        order = order[torch.sort(key[order], stable=True, descending=desc).indices]
    order = order[torch.sort(group[order], stable=True).indices]
    g = group[order]
    rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g, right=False)
    return order[rank < k]


def _merge_lists(old: list[torch.Tensor], new: list[torch.Tensor], n_groups: int, order: Any, k: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
    """Merge `new` entries into kept lists `old` (parallel columns, column 0 the group): per group the first k under
    `order(*columns)` (keys for `_first_per_group`). Only the groups `new` touches are re-sorted. Returns (the lists,
    the kept entries of the touched groups or None, which of `new` were kept).

    Two host syncs on a GPU: the count of kept entries in touched groups (their complement is then gathered by
    `nonzero_sized`), and `_first_per_group`'s count of entries that stay."""
    if not new[0].numel():
        return old, None, torch.zeros(0, dtype=torch.bool, device=new[0].device)
    touched = torch.zeros(n_groups, dtype=torch.bool, device=new[0].device)
    touched[new[0]] = True
    hit = touched[old[0]]
    at = torch.nonzero(hit).squeeze(1)
    n_old = len(at)
    rest = nonzero_sized(~hit, len(hit) - n_old).squeeze(1)
    both = [torch.cat([o[at], n]) for o, n in zip(old, new)]
    sel = _first_per_group(both[0], order(*both), k)
    kept = [t[sel] for t in both]
    flag = torch.zeros(len(both[0]), dtype=torch.bool, device=sel.device)
    flag[sel] = True
    return [torch.cat([o[rest], t]) for o, t in zip(old, kept)], kept, flag[n_old:]


def on_host(t: torch.Tensor) -> bool:
    """Whether `t` lives in host memory, where an output sized by the data costs no sync: the one test that
    picks the CPU's faster variant of an operation over the GPU's sync-free one (the sync-count test turns it
    off to count a GPU's syncs on CPU tensors)."""
    return t.device.type == "cpu"


def add_counts(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`out` (int64) plus how often each of its indexes occurs in `idx`, in place: bincount on CPU (the fastest
    there); on a GPU a scatter-add into `out`, since CUDA's bincount reads the input's range back to the host."""
    if on_host(idx):
        return out.add_(torch.bincount(idx, minlength=len(out)))
    return out.scatter_add_(0, idx, torch.ones_like(idx))


def counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in `idx` (int64 [n])."""
    return add_counts(torch.zeros(n, dtype=torch.int64, device=idx.device), idx)


def _threshold(current: torch.Tensor, group: torch.Tensor, key: torch.Tensor, k: int, reduce: str, fill: Any
               ) -> torch.Tensor:
    """The entry bar per group: `reduce` (amin/amax) of the kept keys where a group holds k, else unchanged."""
    full = counts(group, len(current)) >= k
    bar = torch.full_like(current, fill).scatter_reduce(0, group, key, reduce)
    return torch.where(full, bar, current)


HOST_READS = {"transfers": 0}
"""Device-to-host transfers made through `to_host` (tests read it: one per call, whatever the tensors)."""


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """The 1-D `tensors` as numpy arrays, read from the device in one transfer (on a GPU, one sync instead of one
    per tensor): integers go as int64, floats as their float64 bits, in one buffer cut apart on the host. Their
    dtypes come back as they were (float32 values are exact in float64)."""
    HOST_READS["transfers"] += 1
    if all(t.device.type == "cpu" for t in tensors):  # already on the host: no copy
        return [t.reshape(-1).numpy() for t in tensors]
    return packed_to_host(tensors)


def packed_to_host(tensors: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """`to_host`'s single transfer: the tensors packed into one int64 buffer, copied, and cut apart."""
    flat = [t.reshape(-1) for t in tensors]
    packed = torch.cat([t.double().view(torch.int64) if t.is_floating_point() else t.to(torch.int64) for t in flat])
    host = packed.cpu().numpy()
    out, at = [], 0
    for t in flat:
        part = host[at:at + t.numel()]
        at += t.numel()
        want = np.dtype(str(t.dtype).removeprefix("torch."))
        out.append(part.view(np.float64).astype(want) if t.is_floating_point() else part.astype(want, copy=False))
    return out


class UnitExamples:
    """Top documents and binned samples of one (SAE, position group) over a unit, kept on the device.

    `add` takes a block's (feature, document) pairs: the document's maximum of the feature and its position.
    Entries that cannot enter (below a full top list's k-th value, or a draw above a full bin's largest)
    are dropped first, so after the first blocks each block sorts few entries."""

    COMPACT_ROWS = 1 << 20
    """Contexts are compacted (those of examples pushed out dropped) once they pass this many rows and 4x the
    rows kept at the last compaction."""

    def __init__(self, d_sae: int, top_k: int, per_bin: int, device: torch.device, radius: int = 0):
        self.d_sae, self.k, self.m, self.radius = d_sae, top_k, per_bin, radius
        self.contexts: list[np.ndarray] = []
        """Per block: (feature, doc_id, offset, value) of the entries near the kept examples' maxima (int64 x 4
        columns, value as float64 bits), kept until the unit's examples are known (compacted as they grow)."""
        self._ctx_rows = self._ctx_kept = 0
        empty = lambda dt: torch.empty(0, dtype=dt, device=device)  # noqa: E731
        self.top = [empty(torch.int64), empty(torch.int64), empty(torch.int64), empty(torch.float32)]
        """feature, doc_id, pos, value"""
        self.kth = torch.full((d_sae,), float("-inf"), dtype=torch.float32, device=device)
        self.samples = [empty(torch.int64), empty(torch.int64), empty(torch.int64), empty(torch.int64),
                        empty(torch.float32)]
        """feature * N_BINS + bin, draw, doc_id, pos, value"""
        self.mth = torch.full((d_sae * N_BINS,) if per_bin else (0,), _BIG, dtype=torch.int64, device=device)

    def add(self, feat: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor, value: torch.Tensor,
            entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fold in a block's (feature, document) pairs; `entries` = (pair index, pos, value) of the block's
        active entries, for the contexts of the pairs that enter."""
        if not feat.numel():
            return
        entered = torch.zeros(len(feat), dtype=torch.bool, device=feat.device)
        if self.k:
            cand = torch.nonzero(value >= self.kth[feat]).squeeze(1)
            self.top, kept = self._merge(self.top, [feat[cand], doc[cand], pos[cand], value[cand]])
            entered[cand] = kept  # candidates are distinct: no mask indexing (a host sync on a GPU)
        if self.m:
            gid = feat * N_BINS + value_bins(value)
            dr = draws(doc, feat)
            cand = torch.nonzero(dr <= self.mth[gid]).squeeze(1)
            self.samples, kept = self._merge_samples([gid[cand], dr[cand], doc[cand], pos[cand], value[cand]])
            entered[cand] |= kept
        if entries is not None:  # the contexts of the pairs that made it into the lists (for now)
            pair, epos, evalue = entries
            near = torch.nonzero(entered[pair] & ((epos - pos[pair]).abs() <= self.radius)).squeeze(1)
            pair, epos, evalue = pair[near], epos[near], evalue[near]
            f, d, off, v = to_host(feat[pair], doc[pair], epos - pos[pair], evalue.double())
            self.contexts.append(np.stack([f, d, off, v.view(np.int64)], axis=1))
            self._ctx_rows += len(pair)
            if self._ctx_rows > max(self.COMPACT_ROWS, 4 * self._ctx_kept):
                self._compact()

    def _compact(self) -> None:
        """Drop the contexts of examples no longer kept (pushed out of a top list or a bin's sample)."""
        import polars as pl

        kept = pl.DataFrame({"f": torch.cat([self.top[0], self.samples[0] // N_BINS]).cpu().numpy(),
                             "d": torch.cat([self.top[1], self.samples[2]]).cpu().numpy()}).unique()
        c = np.concatenate(self.contexts)
        rows = pl.DataFrame({"f": c[:, 0], "d": c[:, 1], "i": np.arange(len(c))}).join(kept, on=["f", "d"], how="semi")
        self.contexts = [c[np.sort(rows["i"].to_numpy())]]
        self._ctx_rows = self._ctx_kept = len(self.contexts[0])

    def _merge(self, old: list[torch.Tensor], new: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the top lists with `new` merged in, which of `new` are in them); the k-th values follow."""
        lists, kept, survived = _merge_lists(old, new, self.d_sae, lambda f, d, p, v: [(v, True), (d, False)], self.k)
        if kept is not None:
            self.kth = _threshold(self.kth, kept[0], kept[3], self.k, "amin", float("inf"))
        return lists, survived

    def _merge_samples(self, new: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the bins' samples with `new` merged in, which of `new` are in them); the largest kept draws follow."""
        lists, kept, survived = _merge_lists(self.samples, new, len(self.mth),
                                             lambda g, dr, d, p, v: [(dr, False), (d, False)], self.m)
        if kept is not None:
            self.mth = _threshold(self.mth, kept[0], kept[1], self.m, "amax", -1)
        return lists, survived

    def to_table(self, sae: str, group: str) -> pa.Table:
        f, d, p, v = (t.cpu().numpy() for t in self.top)
        g, dr, sd, sp, sv = (t.cpu().numpy() for t in self.samples)
        n_top, n_s = len(f), len(g)
        feature = np.concatenate([f, g // N_BINS]).astype(np.int32)
        ctx_offset, ctx_value = self._contexts(feature, np.concatenate([d, sd]))
        table = pa.table({
            "sae": pa.array([sae] * (n_top + n_s), pa.string()),
            "group": pa.array([group] * (n_top + n_s), pa.string()),
            "feature": feature,
            "kind": pa.array(["top"] * n_top + ["sample"] * n_s, pa.string()),
            "bin": np.concatenate([value_bins_np(v), g % N_BINS]).astype(np.int16),
            "draw": np.concatenate([draws_np(d, f), dr]).astype(np.int64),
            "doc_id": np.concatenate([d, sd]).astype(np.int64),
            "pos": np.concatenate([p, sp]).astype(np.int32),
            "value": np.concatenate([v, sv]).astype(np.float32),
            "ctx_offset": ctx_offset, "ctx_value": ctx_value,
        }, schema=EXAMPLES_SCHEMA)
        return table.sort_by([("feature", "ascending"), ("kind", "descending"), ("bin", "ascending"),
                              ("value", "descending"), ("doc_id", "ascending")])

    def _contexts(self, feature: np.ndarray, doc: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """(ctx_offset, ctx_value) list arrays for the kept examples (feature, doc), in offset order."""
        import polars as pl

        kept = pl.DataFrame({"feature": feature.astype(np.int64), "doc_id": doc.astype(np.int64)})
        c = np.concatenate(self.contexts) if self.contexts else np.empty((0, 4), np.int64)
        ctx = (pl.DataFrame({"feature": c[:, 0], "doc_id": c[:, 1], "off": c[:, 2].astype(np.int32),
                             "val": np.ascontiguousarray(c[:, 3]).view(np.float64).astype(np.float32)})
               .unique(["feature", "doc_id", "off"]).sort("feature", "doc_id", "off")
               .group_by("feature", "doc_id", maintain_order=True).agg("off", "val"))
        got = kept.join(ctx, on=["feature", "doc_id"], how="left", maintain_order="left")
        off = got["off"].fill_null(pl.Series([[]], dtype=pl.List(pl.Int32)).first())
        val = got["val"].fill_null(pl.Series([[]], dtype=pl.List(pl.Float32)).first())
        return off.to_arrow().cast(pa.list_(pa.int32())), val.to_arrow().cast(pa.list_(pa.float32()))

    def kept_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(doc_id, pos) of every kept example (for output.docs: examples)."""
        d = torch.cat([self.top[1], self.samples[2]]).cpu().numpy()
        p = torch.cat([self.top[2], self.samples[3]]).cpu().numpy()
        return d, p


def last_values_table(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], sae: str, group: str) -> pa.Table:
    """LAST_VALUES_SCHEMA rows from per-block (feature, doc_id, value) arrays, in (feature, doc_id) order."""
    if parts:
        f, d, v = (np.concatenate(c) for c in zip(*parts))
    else:
        f, d, v = np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.float32)
    order = np.lexsort((d, f))
    n = len(f)
    return pa.table({"sae": pa.array([sae] * n, pa.string()), "group": pa.array([group] * n, pa.string()),
                     "feature": f[order].astype(np.int32), "doc_id": d[order].astype(np.int64),
                     "value": v[order].astype(np.float32)}, schema=LAST_VALUES_SCHEMA)


def hist_table(counts: torch.Tensor, sae: str, group: str) -> pa.Table:
    """The nonzero cells of a (d_sae x N_BINS) count matrix as HIST_SCHEMA rows."""
    c = counts.cpu().numpy()
    f, b = np.nonzero(c)
    n = len(f)
    return pa.table({"sae": pa.array([sae] * n, pa.string()), "group": pa.array([group] * n, pa.string()),
                     "feature": f.astype(np.int32), "bin": b.astype(np.int16), "count": c[f, b].astype(np.int64)},
                    schema=HIST_SCHEMA)
