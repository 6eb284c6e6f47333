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

from .batching import Batch
from .contexts import Document, Tokenization
from .feature_stats import FeatureStats, PairSums, reduce_pairs
from .models import Hooks, HookSite, run_to_hooks
from .partials import UnitExamples, to_host
from .resources import free_device_bytes
from .saes import ReconStats, active_entries, encode_chunk_tokens, encode_dense, encode_sparse

_KEY_SHIFT = 32  # a block's sort key: (rank of doc_id in the block) << 32 | pos
COMPACT_BATCHES = 8
"""A block that keeps no rows reduces its entries to (document, feature) pairs every this many batches' tokens
(Extractor._compact): ordinary blocks (a few batches of whole documents) never do; a long document's block
then holds memory for its pairs, not for all its entries."""


def hidden_at_positions(model: Any, sites: list[HookSite], batch: Batch, hooks: Hooks | None = None
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """Run `batch` (on the model's device) until every hook at `sites` has fired; per hook name and position
    group, the hidden states at the group's selected positions ([n, d], in the batch's selection order).
    Groups with no position in the batch are left out. `hooks`: hooks registered on `model` already (a
    worker's, for its life); None: registered for this pass alone. Extraction, SAE training and probing all
    read activations through this one path."""
    forward = hooks or functools.partial(run_to_hooks, model, sites)
    hidden = forward(batch.input_ids, batch.attention_mask, pixel_values=batch.pixel_values,
                     token_type_ids=batch.token_type_ids)
    chosen = [g for g in batch.selected if len(batch.sel_row[g])]
    return {name: {g: hs[batch.selected[g][0], batch.selected[g][1]] for g in chosen} for name, hs in hidden.items()}


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
            doc, pos, feat, val, rank = self._entries_of(parts)
            pre = block.pre.get(key)
            pf, pr, ppos, pmax, pair = st.add_docs(feat, rank, pos, val, block.counted[g], block.n_counted[g], pre)
            (doc, pos, feat, val, rank), pair = _with_kept(block.kept.get(key), pr * st.d_sae + pf, st.d_sae,
                                                           (doc, pos, feat, val, rank), pair)
            if key in self.examples:
                self.examples[key].add(pf, block.doc_ids[pr], ppos, pmax, (pair, pos, val))
            if self.last is not None:
                at = torch.nonzero(pos == block.last[g][rank]).squeeze(1)
                self.last[key].append(tuple(to_host(feat[at].to(torch.int32), doc[at], val[at])))
            if block.keep_rows:
                # (doc_id, pos, feature) order from two stable sorts on the device: by feature, then by the
                # token's key (rank of doc_id in the block << 32 | pos; doc ids themselves use 63 bits): a
                # quarter of the time of numpy's 3-key lexsort on CPU
                order = torch.sort(feat, stable=True).indices
                order = order[torch.sort((rank[order] << _KEY_SHIFT) | pos[order], stable=True).indices]
                cols = to_host(doc[order], pos[order].to(torch.int32), feat[order].to(torch.int32), val[order])
                out[key] = dict(zip(("doc_id", "pos", "feature", "value"), cols))
        return out

    def _entries_of(self, parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """(doc, pos, feature, value, rank) of a block's entries found so far, concatenated."""
        if parts:
            return tuple(torch.cat(p) for p in zip(*parts))
        z = torch.zeros(0, dtype=torch.int64, device=self.device)
        return z, z, z, torch.zeros(0, dtype=torch.float32, device=self.device), z

    def _compact(self, block: "_Block") -> None:
        """Reduce a long block's entries found so far to its (document, feature) pairs (`FeatureStats.add_docs`'s
        sums, maxima and their positions), keeping only the entries the block's end still reads: those within
        the examples' context radius of a pair's maximum, the last `radius` positions of each document (the
        left context of a maximum still to come: a document's windows run in position order), and those at a
        document's last counted position (last values). A document of any length then holds memory for its
        pairs, not for its tokens. Blocks that keep rows are not compacted (their rows are the output)."""
        for key, parts in block.found.items():
            if not parts:
                continue
            st, ex = self.stats[key], self.examples.get(key)
            doc, pos, feat, val, rank = self._entries_of(parts)
            pre = reduce_pairs(st.d_sae, feat, rank, pos, val, block.pre.get(key))
            (doc, pos, feat, val, rank), pair = _with_kept(block.kept.get(key), pre.key, st.d_sae,
                                                           (doc, pos, feat, val, rank), pre.inv)
            keep = torch.zeros(len(pos), dtype=torch.bool, device=pos.device)
            if ex is not None:
                top = torch.full((len(block.counted[key[1]]),), -1, dtype=pos.dtype, device=pos.device)
                top = top.scatter_reduce(0, rank, pos, "amax")
                keep |= ((pos - pre.ppos[pair]).abs() <= ex.radius) | (pos >= top[rank] - ex.radius)
            if self.last is not None:
                keep |= pos == block.last[key[1]][rank]
            block.kept[key] = tuple(t[keep] for t in (doc, pos, feat, val, rank))
            block.pre[key] = pre
            parts.clear()
        block.since = 0

    def _launch(self, batch: Batch, block: "_Block") -> "_InFlight":
        """Queue the batch's forward pass and dense encodes on the device (no host sync)."""
        self.forward_tokens += batch.n_tokens
        hidden = hidden_at_positions(self.model, self.sites, batch, self.hooks)
        item = _InFlight(batch, block)
        with record_function("saeray.sae"):
            for h in self.saes:
                at = hidden[h.site.name]
                for g in self.groups:
                    if g not in at:
                        continue
                    args = (h.sae, at[g], h.threshold, self.chunks[h.name], self.recon.get((h.name, g)))
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
        block = item.block
        block.left -= 1
        block.since += item.batch.n_tokens
        if block.left and not block.keep_rows and block.since >= COMPACT_BATCHES * self.batch_tokens:
            self._compact(block)

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


def _with_kept(kept: tuple[torch.Tensor, ...] | None, keys: torch.Tensor, d_sae: int,
               entries: tuple[torch.Tensor, ...], pair: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A compacted block's kept entries (already reduced into its pairs: for contexts and last values) before
    `entries` (doc, pos, feature, value, rank), and each entry's pair: `pair` for `entries`, the kept ones' found
    in the sorted pair `keys` (rank * d_sae + feature)."""
    if kept is None:
        return entries, pair
    pair = torch.cat([torch.searchsorted(keys, kept[4] * d_sae + kept[2]), pair])
    return tuple(torch.cat([a, b]) for a, b in zip(kept, entries)), pair


def in_flight(batch_tokens: int, saes: list[SAEHandle], device: torch.device, share: float = 0.25,
              report: Any = None) -> int:
    """Batches a GPU keeps queued ahead of the one the host reads: 2, or fewer when the queued batches'
    dense codes and masks (every SAE's, whole batches: (ahead + 1) x tokens x sum of d_sae x (bytes + 1))
    would pass `share` of the GPU's free memory, counting what PyTorch holds reserved but unused as free
    (resources.free_device_bytes: after a unit, its codes' blocks stay cached, not returned to the driver).
    0: each batch is encoded and read a chunk at a time, as on CPU, where nothing runs asynchronously and
    queued codes would only take memory. `report`: see free_device_bytes."""
    if device.type != "cuda":
        return 0
    per_batch = batch_tokens * sum(int(h.sae.cfg.d_sae) * (h.sae.dtype.itemsize + 1) for h in saes)
    free = free_device_bytes(device, report)
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
    since: int = 0
    """Tokens of the batches finished since the block's entries were last compacted (Extractor._compact)."""
    pre: dict[tuple[str, str], PairSums] = field(default_factory=dict)
    """Per (SAE, group) of a compacted block: the pairs of the entries compacted so far."""
    kept: dict[tuple[str, str], tuple[torch.Tensor, ...]] = field(default_factory=dict)
    """Per (SAE, group) of a compacted block: (doc, pos, feature, value, rank) of the entries kept (in `pre`)."""


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
