"""The pure core: (model, SAEs, documents) -> sparse activation rows + per-feature partials.

No Ray here. Everything per token stays on the device: hidden states are gathered at the
selected positions, encoded in chunks, and only the active (row, feature, value) triples
and per-feature accumulators leave the encoder. Partials merge with Chan's formula.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.profiler import record_function

from .contexts import Batch, Document, Tokenization
from .models import Hooks, HookSite, run_to_hooks
from .partials import N_BINS, UnitExamples, hist_table, value_bins
from .saes import ReconStats, active_entries, encode_chunk_tokens, encode_dense, encode_sparse

_KEY_SHIFT = 32  # a block's sort key: (rank of doc_id in the block) << 32 | pos
_NO_KEY = torch.iinfo(torch.int64).max

STATS_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("feature", pa.int32()),
    ("n_tokens", pa.int64()), ("n_active", pa.int64()), ("n_docs_active", pa.int64()),
    ("sum", pa.float64()), ("m2", pa.float64()),
    ("max", pa.float32()), ("max_doc_id", pa.int64()), ("max_pos", pa.int32()),
    ("n_docs", pa.int64()), ("doc_sum", pa.float64()), ("doc_m2", pa.float64()),
])
"""Per-unit statistics; n_docs/doc_sum/doc_m2 (per-document moments, partials.DEFINITIONS) since issue 16."""


def counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in `idx` (int64 [n])."""
    return add_counts(torch.zeros(n, dtype=torch.int64, device=idx.device), idx)


def add_counts(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`out` (int64) plus how often each of its indexes occurs in `idx`, in place: bincount on CPU (the fastest
    there); on a GPU a scatter-add into `out`, since CUDA's bincount reads the input's range back to the host."""
    if idx.device.type == "cpu":
        return out.add_(torch.bincount(idx, minlength=len(out)))
    return out.scatter_add_(0, idx, torch.ones_like(idx))


DENSE_PAIR_CELLS = 1 << 23
"""Blocks of at most this many documents x latents find their (document, feature) pairs on a dense grid (64 MiB of
float32 at most), larger ones by sorting."""


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
        s = torch.zeros(self.d_sae, dtype=torch.float64, device=v.device).index_add_(0, feat, v)
        mean_b = s / n
        dev = v - mean_b[feat]
        m2_b = torch.zeros_like(s).index_add_(0, feat, dev * dev) + (n - count) * mean_b * mean_b
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
        if feat.numel() and feat.device.type == "cpu":
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
                 counted: torch.Tensor, n_counted_docs: int) -> tuple[torch.Tensor, ...]:
        """Fold in a set of whole documents: the active entries (feature, document's `rank` in the set, pos,
        value) and `counted` = each document's counted positions. Counts the documents per feature, folds in
        the per-document moments (doc_value, see partials.DEFINITIONS) and returns the (feature, document)
        pairs: (feature, rank, position of the document's maximum, that maximum, each entry's pair)."""
        d = self.d_sae
        if feat.numel():
            key = rank * d + feat
            cells = len(counted) * d
            if cells <= DENSE_PAIR_CELLS:  # a dense (document x feature) grid: no sort
                grid = torch.full((cells,), float("-inf"), dtype=val.dtype, device=val.device).scatter_reduce_(
                    0, key, val, "amax")
                uniq = torch.nonzero(grid != float("-inf")).squeeze(1)  # ascending, as unique's; a host sync on a GPU
                lookup = torch.empty(cells, dtype=torch.int64, device=key.device)
                lookup[uniq] = torch.arange(len(uniq), device=key.device)
                inv = lookup[key]
                pmax = grid[uniq]
            else:
                uniq, inv = torch.unique(key, return_inverse=True)  # a host sync on a GPU
                pmax = torch.full((len(uniq),), float("-inf"), dtype=val.dtype, device=val.device).scatter_reduce(
                    0, inv, val, "amax")
            n = len(uniq)
            psum = torch.zeros(n, dtype=torch.float64, device=feat.device).index_add_(0, inv, val.double())
            at_max = torch.where(val == pmax[inv], pos, _NO_KEY)
            ppos = torch.full((n,), _NO_KEY, dtype=torch.int64, device=pos.device).scatter_reduce(0, inv, at_max, "amin")
            pf, pr = uniq % d, uniq // d
        else:
            psum = torch.zeros(0, dtype=torch.float64, device=feat.device)
            pmax, pf, pr, ppos, inv = val, feat, rank, pos, rank
        docs_per_feature = counts(pf, d)
        self.n_docs += docs_per_feature
        if n_counted_docs:
            x = psum / counted[pr]
            s = torch.zeros(d, dtype=torch.float64, device=x.device).index_add_(0, pf, x)
            mean_b = s / n_counted_docs
            dev = x - mean_b[pf]
            m2_b = (torch.zeros_like(s).index_add_(0, pf, dev * dev)
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


@dataclass
class SAEHandle:
    name: str
    sae: Any
    site: HookSite
    threshold: float


class Extractor:
    """Runs blocks of whole documents through the model and SAEs."""

    def __init__(self, model: Any, saes: list[SAEHandle], tok: Tokenization, *, batch_tokens: int,
                 device: torch.device, encode_chunk: int | None = None, reconstruction: bool = False,
                 hooks: Hooks | None = None, ahead: int | None = None, top_k: int = 0, per_bin: int = 0,
                 radius: int = 0, last_values: bool = False):
        """`hooks`: the worker's hooks on `model` (registered once for its life); None: for each batch.
        `encode_chunk`: rows of dense code at once (None: `saes.encode_chunk_tokens` for each SAE).
        `ahead`: batches launched before the host waits on the one before (None: `in_flight`).
        `top_k`, `per_bin`, `radius`: example documents kept per feature and their context (partials.UnitExamples;
        top_k and per_bin 0: none). `last_values`: keep each document's nonzero values at its last counted position
        per (SAE, group) in `last` (partials.DEFINITIONS lastvals)."""
        self.model = model
        self.saes = saes
        self.tok = tok
        self.batch_tokens = batch_tokens
        self.device = device
        self.sites = list({h.site.name: h.site for h in saes}.values())
        self.hooks = hooks
        self.chunks = {h.name: encode_chunk or encode_chunk_tokens(int(h.sae.cfg.d_sae), h.sae.dtype, device)
                       for h in saes}
        self.groups = tok.group_names
        self.stats = {(h.name, g): FeatureStats(int(h.sae.cfg.d_sae), device) for h in saes for g in self.groups}
        self.examples = ({k: UnitExamples(st.d_sae, top_k, per_bin, device, radius) for k, st in self.stats.items()}
                         if top_k or per_bin else {})
        self.last: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] | None = (
            {k: [] for k in self.stats} if last_values else None)
        """Per (SAE, group), per block: (feature, doc_id, value) at the documents' last counted positions."""
        self.recon = ({(h.name, g): ReconStats(int(h.sae.cfg.d_in), device) for h in saes for g in self.groups}
                      if reconstruction else {})
        self.forward_tokens = 0
        self.ahead = in_flight(batch_tokens, saes, device) if ahead is None else ahead
        self._flight: deque[_InFlight] = deque()
        self._blocks: deque[_Block] = deque()

    def process(self, docs: list[Document], keep_rows: bool, batches: list[Batch] | None = None
                ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """Run one block of whole documents to the end; update statistics; return {(sae, group): rows}
        when `keep_rows`. `batches`: the documents' batches built ahead on the host, else built here."""
        done = self.push(docs, keep_rows, batches) + self.drain()
        return done[-1][1]

    def push(self, docs: list[Document], keep_rows: bool, batches: list[Batch] | None = None
             ) -> list[tuple[list[Document], dict[tuple[str, str], dict[str, np.ndarray]]]]:
        """Start a block of whole documents; return the blocks finished meanwhile, in order, as (docs, rows).

        Up to `ahead` batches stay in flight: a batch's forward pass and encoder are queued on the device
        before the host waits for the previous batch's active entries (its one sync), so the device is
        never idle while the host folds statistics or finishes a block. Blocks finish in order; `drain`
        finishes the rest."""
        if batches is None:
            batches = self.tok.batches(docs, self.batch_tokens)
        all_ids = np.fromiter((d.doc_id for d in docs), np.int64, len(docs))
        order = np.argsort(all_ids, kind="stable")
        counted = {g: np.fromiter((len(docs[i].groups.get(g, ())) for i in order), np.int64, len(docs))
                   for g in self.groups}
        n_counted = {g: int((c > 0).sum()) for g, c in counted.items()}
        ids, counted_t = torch.from_numpy(all_ids[order]), {g: torch.from_numpy(c) for g, c in counted.items()}
        last = ({g: torch.from_numpy(np.fromiter((int(docs[i].groups[g][-1]) if c else -1 for i, c in zip(order, cs)),
                                                 np.int64, len(docs))) for g, cs in counted.items()}
                if self.last is not None else {})
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the batches in flight
            ids = ids.pin_memory().to(self.device, non_blocking=True)
            counted_t = {g: c.pin_memory().to(self.device, non_blocking=True) for g, c in counted_t.items()}
            last = {g: c.pin_memory().to(self.device, non_blocking=True) for g, c in last.items()}
        block = _Block(docs, keep_rows, len(batches), {k: [] for k in self.stats}, ids, counted_t, n_counted, last)
        self._blocks.append(block)
        done = []
        for batch in batches:
            with record_function("saeray.model"):  # scopes for torch.profiler (bench/throughput.py)
                self._flight.append(self._launch(batch.to(self.device), block))
            while len(self._flight) > self.ahead:
                self._finish(self._flight.popleft())
                done += self._finished()
        return done + self._finished()

    def drain(self) -> list[tuple[list[Document], dict[tuple[str, str], dict[str, np.ndarray]]]]:
        """Finish every batch in flight; the blocks that finishes, in order."""
        while self._flight:
            self._finish(self._flight.popleft())
        return self._finished()

    def _finished(self) -> list[tuple[list[Document], dict[tuple[str, str], dict[str, np.ndarray]]]]:
        out = []
        while self._blocks and self._blocks[0].left == 0:
            b = self._blocks.popleft()
            with record_function("saeray.rows"):
                out.append((b.docs, self._collect(b)))
        return out

    def _collect(self, block: "_Block") -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """Fold in a finished block's per-document partials (document counts and moments, example documents);
        when it keeps rows, its rows in (doc_id, pos, feature) order."""
        out = {}
        for key, parts in block.found.items():
            st = self.stats[key]
            g = key[1]
            if parts:
                doc, pos, feat, val, rank = (torch.cat(p) for p in zip(*parts))
            else:
                z = torch.zeros(0, dtype=torch.int64, device=self.device)
                doc, pos, feat, val, rank = z, z, z, torch.zeros(0, dtype=torch.float32, device=self.device), z
            pf, pr, ppos, pmax, pair = st.add_docs(feat, rank, pos, val, block.counted[g], block.n_counted[g])
            if key in self.examples:
                self.examples[key].add(pf, block.doc_ids[pr], ppos, pmax, (pair, pos, val))
            if self.last is not None:
                at = pos == block.last[g][rank]
                self.last[key].append((feat[at].to(torch.int32).cpu().numpy(), doc[at].cpu().numpy(),
                                       val[at].cpu().numpy()))
            if block.keep_rows:
                # (doc_id, pos, feature) order from two stable sorts on the device: by feature, then by the
                # token's key (rank of doc_id in the block << 32 | pos; doc ids themselves use 63 bits): a
                # quarter of the time of numpy's 3-key lexsort on CPU
                order = torch.sort(feat, stable=True).indices
                order = order[torch.sort((rank[order] << _KEY_SHIFT) | pos[order], stable=True).indices]
                out[key] = {"doc_id": doc[order].cpu().numpy(), "pos": pos[order].to(torch.int32).cpu().numpy(),
                            "feature": feat[order].to(torch.int32).cpu().numpy(), "value": val[order].cpu().numpy()}
        return out

    def _launch(self, batch: Batch, block: "_Block") -> "_InFlight":
        """Queue the batch's forward pass and dense encodes on the device (no host sync)."""
        self.forward_tokens += batch.n_tokens
        forward = self.hooks or functools.partial(run_to_hooks, self.model, self.sites)
        hidden = forward(batch.input_ids, batch.attention_mask, pixel_values=batch.pixel_values,
                         token_type_ids=batch.token_type_ids)
        item = _InFlight(batch, block)
        with record_function("saeray.sae"):
            for h in self.saes:
                hs = hidden[h.site.name]
                for g in self.groups:
                    if g not in batch.selected or len(batch.sel_row[g]) == 0:
                        continue
                    rows, cols = batch.selected[g][:2]
                    args = (h.sae, hs[rows, cols], h.threshold, self.chunks[h.name], self.recon.get((h.name, g)))
                    # nothing in flight (CPU): encode when read, one chunk's code in memory at a time
                    item.codes[(h.name, g)] = encode_dense(*args) if self.ahead else functools.partial(encode_sparse, *args)
        return item

    def _entries(self, item: "_InFlight", key: tuple[str, str]) -> tuple[torch.Tensor, ...]:
        """(row, feature, value) of the active entries of one (SAE, group) of a launched batch."""
        codes = item.codes.pop(key)
        return codes() if callable(codes) else active_entries(codes)

    def _finish(self, item: "_InFlight") -> None:
        """Wait for a launched batch's active entries and fold them into the statistics. Batches in flight: the
        wait is on the batch's own event (its counts), once per (SAE, group); none in flight: `nonzero` per
        encode chunk."""
        with record_function("saeray.sae"):
            for key in self._keys(item.batch):
                self._fold(item, key, *self._entries(item, key))
        item.block.left -= 1

    def _keys(self, batch: Batch) -> list[tuple[str, str]]:
        """The (SAE, group)s that have positions in the batch."""
        return [k for k in self.stats if k[1] in batch.selected and len(batch.sel_row[k[1]])]

    def _fold(self, item: "_InFlight", key: tuple[str, str], r: torch.Tensor, f: torch.Tensor, v: torch.Tensor) -> None:
        """Fold one (SAE, group)'s active entries (row in the group's positions, feature, value) into the
        statistics and keep them for the block's rows."""
        rows, _, doc, pos = item.batch.selected[key[1]]
        d, p = doc[r], pos[r]
        rank = torch.searchsorted(item.block.doc_ids, doc)[r]  # the document's index in its block
        self.stats[key].add(len(rows), f, v, d, p)
        item.block.found[key].append((d, p, f, v, rank))


def in_flight(batch_tokens: int, saes: list[SAEHandle], device: torch.device, share: float = 0.25) -> int:
    """Batches a GPU keeps queued ahead of the one the host reads: 2, or fewer when the queued batches'
    dense codes and masks (every SAE's, whole batches: (ahead + 1) x tokens x sum of d_sae x (bytes + 1))
    would pass `share` of the GPU's free memory (0: each batch is encoded and read a chunk at a time, as on
    CPU, where nothing runs asynchronously and queued codes would only take memory)."""
    if device.type != "cuda":
        return 0
    per_batch = batch_tokens * sum(int(h.sae.cfg.d_sae) * (h.sae.dtype.itemsize + 1) for h in saes)
    free = torch.cuda.mem_get_info(device)[0]
    for ahead in (2, 1):
        if (ahead + 1) * per_batch <= share * free:
            return ahead
    return 0


@dataclass
class _Block:
    """A block of whole documents whose batches are in flight or done."""

    docs: list[Document]
    keep_rows: bool
    left: int
    """Batches not finished yet."""
    found: dict[tuple[str, str], list[tuple[torch.Tensor, ...]]]
    doc_ids: torch.Tensor
    """The block's document ids, sorted, on the device."""
    counted: dict[str, torch.Tensor]
    """Per group: each document's counted positions (in `doc_ids` order), on the device."""
    n_counted: dict[str, int]
    """Per group: the block's documents with at least one counted position."""
    last: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per group (Extractor last_values): each document's last counted position (-1: none), in `doc_ids` order."""


@dataclass
class _InFlight:
    """A launched batch: its block and, per (SAE, group), the dense codes and masks not yet read."""

    batch: Batch
    block: _Block
    codes: dict[tuple[str, str], Any] = field(default_factory=dict)


RECON_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("n_tokens", pa.int64()), ("sse", pa.float64()),
    ("sum_sq", pa.float64()), ("l0_sum", pa.int64()), ("sum_x", pa.list_(pa.float64())),
    ("sq_err_hist", pa.list_(pa.int64())),
])


def recon_table(recon: dict[tuple[str, str], ReconStats]) -> pa.Table:
    keys = list(recon)
    return pa.table({
        "sae": [k[0] for k in keys], "group": [k[1] for k in keys],
        "n_tokens": [recon[k].n for k in keys], "sse": [recon[k].sse for k in keys],
        "sum_sq": [recon[k].sum_sq for k in keys], "l0_sum": [recon[k].l0 for k in keys],
        "sum_x": [recon[k].sum_x.cpu().tolist() for k in keys],
        "sq_err_hist": [recon[k].hist.cpu().tolist() for k in keys],
    }, schema=RECON_SCHEMA)
