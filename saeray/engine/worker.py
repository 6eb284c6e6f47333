"""A unit worker: loads the model and SAEs once, then turns work units into committed outputs.

Ray-free; the Ray executor wraps it in an actor and the local executor calls it directly.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import config as config_mod
from . import models, saes
from .batching import blocks
from .contexts import Document, Tokenization
from .extract import Extractor, SAEHandle, in_flight
from .folder import OutputWriteError
from .images import load_image
from .pipeline import Prefetch
from .reading import check_token_ids, unit_rows
from .sources import split_doc_id
from .resources import bound_malloc, default_threads, peak_rss_mb, pick_device, tokenizer_threads
from .storage import READ, forwarded_env
from .store import RunDir
from .truncated import forward_to_hooks, resolve_compile
from .units import DataPlan, Task
from .writing import UnitFiles, docs_schema, write_partials

log = logging.getLogger(__name__)

BLOCK_BATCHES = 4
"""Documents are processed in blocks of about this many forward batches of tokens."""

TOKENIZE_CHARS = 1 << 18
"""Texts are tokenized in batches of about this many characters (one call into the Rust tokenizer)."""


class ShardWorker:
    """Turns work units into committed outputs: `count` (tokens of a unit, for the budget) and `process`."""

    CACHE_UNITS = 3
    extractor_class = Extractor
    """What runs the model and SAEs on a block (bench/throughput.py --simulate swaps in a timed stand-in)."""
    """Units tokenized by `count` whose documents are kept for the `process` call that follows."""

    def __init__(self, manifest: dict[str, Any], run_dir: str, threads: int | None = None):
        bound_malloc()
        torch.set_num_threads(threads or default_threads())
        self.manifest = manifest
        self.cfg = config_mod.from_dict(manifest["config"])
        self.plan = DataPlan.from_dict(manifest["plan"])
        self.run = RunDir(run_dir)
        self.device = pick_device()
        self.sae_dtypes = {s.name: saes.resolve_dtype(s.dtype, self.device) for s in self.cfg.saes}
        same_precision(self.run, self.sae_dtypes, self.device)  # before any weights are loaded
        # The Rust tokenizer reads these at its first batch encode (and forks disable its threads anyway).
        self.tokenizer_threads = tokenizer_threads(self.cfg.worker.tokenizer_threads, self.device)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.tokenizer_threads > 1 else "false"
        if self.tokenizer_threads > 1:
            os.environ["RAYON_NUM_THREADS"] = str(self.tokenizer_threads)
        if self.cfg.worker.tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.batch_tokens = self.cfg.tokens.batch_tokens_on(self.device.type)
        self.block_tokens = BLOCK_BATCHES * self.batch_tokens
        resolved = manifest["resolved"]
        self.model, tokenizer, processor = models.load_model_and_processor(self.cfg.model, self.device)
        self.vocab_size = models.vocab_size_of(self.model.config)
        n_layers = models.n_layers_of(self.model.config)
        self.handles = []
        for s, info in zip(self.cfg.saes, resolved["saes"]):
            sae = saes.load(s, self.device)
            self.handles.append(SAEHandle(s.name, sae, models.parse_hook(info["hook"], n_layers), s.threshold))
        # the model up to its deepest hooked layer, built once for the worker's life (see engine.truncated)
        self.hooks = forward_to_hooks(self.model, list({h.site.name: h.site for h in self.handles}.values()),
                                      compile=resolve_compile(self.cfg.model.compile, self.device))
        warm_up = getattr(self.hooks, "warm_up", None)  # compiling belongs to the worker's start, not to a unit
        compiled_s = warm_up(self.batch_tokens, resolved["context_size"]) if warm_up else 0.0
        if compiled_s:
            log.info("compiled the forward in %.1f s", compiled_s)
        # batches in flight, sized once from the memory left with the model and SAEs loaded (a later unit would
        # see the previous unit's cached blocks as taken)
        self.ahead = in_flight(self.batch_tokens, self.handles, self.device)
        # The model, tokenizer and libraries are ~400k long-lived Python objects: a full collection scans them
        # all (0.2 s, every thread stopped, the device idle). Frozen, later collections skip them.
        gc.collect()
        gc.freeze()
        log.info("worker on %s: model %s attention %s%s, SAEs %s, %d tokenizer threads", self.device,
                 self.cfg.model.name, getattr(self.model.config, "_attn_implementation", "?"),
                 " compiled" if getattr(self.hooks, "compiled", False) else "",
                 ", ".join(f"{h.name} {self.sae_dtypes[h.name]}" for h in self.handles), self.tokenizer_threads)
        self.tok = Tokenization(tokenizer, self.cfg.positions, prepend_bos=resolved["prepend_bos"],
                                context_size=resolved["context_size"], exclude_special=self.cfg.tokens.exclude_special,
                                processor=processor, images=self.cfg.data.image_column is not None,
                                image_token_id=models.image_token_id(self.model.config) if processor else None)
        self.keep_schema = self.plan.keep_arrow_schema()
        self.docs_schema = docs_schema(self.keep_schema)
        self._cache: dict[int, list[Document]] = {}
        self.input_notes: dict[int, dict[str, int]] = {}
        """unit -> INPUT_NOTES counts of its documents read so far."""
        self._ahead: dict[int, UnitInput] = {}
        """Units whose reading started before their `process` call (`then`)."""
        self._bytes_seen = READ.bytes

    # ---- documents of a unit -------------------------------------------------------------
    def _documents(self, task: Task, payload: bytes | None) -> Iterator[Document]:
        data = self.cfg.data
        image_column = data.image_column
        columns = [data.token_column or data.text_column, *data.keep_columns, *([image_column] if image_column else [])]
        url = self.plan.files[task.file].url
        texts: list[tuple[int, Any, dict[str, Any]]] = []  # text documents waiting for one batch encode
        chars = 0
        notes = self.input_notes[task.uid] = dict.fromkeys(INPUT_NOTES, 0)
        for doc_id, rec in unit_rows(self.plan, data, task, payload, columns):
            extras = {c: rec.get(c) for c in data.keep_columns}
            if data.token_column:
                ids = check_token_ids(f"{url} row {split_doc_id(doc_id)[1]}", rec.get(data.token_column), self.vocab_size)
                yield self.tok.from_ids(doc_id, ids, extras)
            elif image_column:
                image = load_image(rec.get(image_column), url, doc_id)
                yield self.tok.document(doc_id, _noted_text(rec.get(data.text_column), notes), extras, image=image)
            else:
                text = _noted_text(rec.get(data.text_column), notes)
                texts.append((doc_id, text, extras))
                chars += len(text) if isinstance(text, str) else 1
                if chars >= TOKENIZE_CHARS:
                    yield from self.tok.text_documents(texts)
                    texts, chars = [], 0
        if texts:
            yield from self.tok.text_documents(texts)

    def count(self, task: dict[str, Any], payload: bytes | None = None) -> int:
        """Tokens of every document of the unit (the budget's ledger); the documents are kept for `process`."""
        t = Task(**task)
        docs = list(self._documents(t, payload))
        self._cache[t.uid] = docs
        while len(self._cache) > self.CACHE_UNITS:
            self._cache.pop(next(iter(self._cache)))
        return sum(len(d.token_ids) for d in docs)

    def _budgeted(self, docs: Iterable[Document], prefix: int | None) -> Iterator[Document]:
        """The unit's documents inside the budget, given the tokens of all earlier units (None: no budget)."""
        budget = self.cfg.data.max_tokens
        if prefix is None or budget is None:
            yield from docs
            return
        total = prefix
        for d in docs:
            n = len(d.token_ids)
            if total + n >= budget:
                yield self.tok.cut(d, budget - total)
                return
            total += n
            yield d

    # ---- one unit ------------------------------------------------------------------------
    def process(self, task: dict[str, Any], payload: bytes | None = None, prefix: int | None = None,
                then: tuple[dict[str, Any], bytes | None] | None = None) -> dict[str, Any]:
        """Process one unit (under a budget: `prefix` = tokens of all earlier units) and commit it.

        `then`: the (task, payload) this worker processes next, without a budget: its reading and
        tokenizing start as soon as this unit's last block is prepared, so the device does not wait at
        the unit boundary (the local executor passes it)."""
        t = Task(**task)
        t0 = time.time()
        tmp = self.run.new_attempt(t.uid)
        source = self._ahead.pop(t.uid, None)
        self.close()  # reading started for a unit that did not come next: stopped before this one starts
        start_next = None
        if then is not None:
            nxt = Task(**then[0])
            start_next = lambda: self._ahead.__setitem__(nxt.uid, self._input(nxt, then[1], None))  # noqa: E731
        if source is None:
            source = self._input(t, payload, prefix, start_next)
        else:
            source.then = start_next  # (if it is prepared already, the next unit starts when it comes)
        try:
            summary = self._process(t, source, tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and _out_of_room(e):
                raise OutputWriteError(f"writing unit {t.uid}'s files in {tmp} failed: {e}") from e
            raise
        bytes_read, self._bytes_seen = READ.bytes - self._bytes_seen, READ.bytes
        summary.update(shard=t.uid, unit=t.to_dict(), prefix=prefix, seconds=round(time.time() - t0, 3),
                       bytes_read=bytes_read,
                       host=socket.gethostname(), pid=os.getpid(), fingerprint=self.manifest["fingerprint"],
                       peak_rss_mb=peak_rss_mb(), device=self.device.type,
                       credentials=sorted(forwarded_env()),  # the names this worker had, never the values
                       # what `auto` settings resolved to on this worker (a run resumed elsewhere may differ)
                       sae_dtypes=self.sae_dtypes,
                       attn_implementation=getattr(self.model.config, "_attn_implementation", None))
        self.run.commit(t.uid, tmp, summary)
        return summary

    def close(self) -> None:
        """Stop the reading started ahead for units not processed (their threads and blocks)."""
        for unit in self._ahead.values():
            if isinstance(unit.blocks, Prefetch):
                unit.blocks.close()
        self._ahead.clear()

    def _input(self, task: Task, payload: bytes | None, prefix: int | None, then: Any = None) -> "UnitInput":
        """The unit's blocks of documents with their host batches: read, tokenized and batched in a
        background thread, `worker.prefetch_blocks` ahead of the model (0: in the caller's thread, lazily).
        `then` is called in that thread once the last block is prepared."""
        cached = self._cache.pop(task.uid, None)
        docs = self._budgeted(cached if cached is not None else self._documents(task, payload), prefix)
        unit = UnitInput()
        unit.then = then
        pin = self.device.type == "cuda"

        def prepared() -> Iterator[tuple[list[Document], list]]:
            for block in blocks(unit.counted(docs), self.block_tokens):
                yield block, self.tok.batches(block, self.batch_tokens, pin=pin)
            if unit.then is not None:  # this unit is prepared: the next one starts reading
                unit.then()

        depth = self.cfg.worker.prefetch_blocks
        unit.blocks = Prefetch(prepared(), depth, name=f"saeray-prefetch-{task.uid}") if depth else prepared()
        return unit

    def _process(self, task: Task, source: "UnitInput", tmp: Path) -> dict[str, Any]:
        out = self.cfg.output
        ext = self.extractor_class(self.model, self.handles, self.tok, batch_tokens=self.batch_tokens,
                                   device=self.device, reconstruction=out.reconstruction, hooks=self.hooks,
                                   ahead=self.ahead,
                                   top_k=out.top_k, per_bin=out.samples_per_bin, radius=out.context_radius,
                                   last_values=out.keeps_last_values(self.cfg.data))
        files = UnitFiles(tmp, out, self.docs_schema, self.keep_schema)
        wait = 0.0  # seconds the model's thread spent getting its next block (prefetch: waiting for it)
        ok = False
        try:
            items = iter(source.blocks)
            while True:
                t0 = time.perf_counter()
                item = next(items, None)
                wait += time.perf_counter() - t0
                if item is None:
                    break
                block, batches = item
                for done in ext.push(block, out.activations, batches):
                    files.write(*done)
            for done in ext.drain():
                files.write(*done)
            files.finish(ext.examples.values())
            ok = True
        finally:
            if isinstance(source.blocks, Prefetch):
                source.blocks.close()
            files.close(failed=not ok)
        write_partials(ext, tmp)
        counted_tokens = {f"{sae}/{g}": st.n_tokens for (sae, g), st in ext.stats.items()}
        if self.tok.truncated:
            log.warning("unit %d: %d image documents were cut to tokens.context_size", task.uid, self.tok.truncated)
            self.tok.truncated = 0
        notes = {k: n for k, n in self.input_notes.pop(task.uid, {}).items() if n}
        return {**notes, "rows": files.n_rows, "docs": source.n_docs, "tokens": source.n_tokens,
                "forward_tokens": ext.forward_tokens, "counted_tokens": counted_tokens, "input_wait_s": round(wait, 3)}


def same_precision(run: RunDir, resolved: dict[str, str], device: torch.device) -> None:
    """Refuse to add units to a run whose committed units encoded an SAE at another precision than `resolved` (what
    this worker's saes[].dtype resolve to on `device`): one run holds one precision. The run's first committed unit
    stands for all (every worker checks this before its first unit). A unit committed before units recorded their
    precision ran on a CPU: float32, or its config's explicit dtype."""
    done = sorted(run.committed())
    if not done:
        return
    theirs = run.completion(done[0]).get("sae_dtypes")
    if not theirs:
        return
    differ = {name: (theirs[name], mine) for name, mine in resolved.items() if name in theirs and theirs[name] != mine}
    if differ:
        what = ", ".join(f"SAE {n!r} {t} in its units, {m} on this worker's {device.type}" for n, (t, m) in
                         differ.items())
        raise saes.PrecisionError(
            f"{run.root}: this worker would encode at another precision than the run's committed units ({what}). "
            "One run holds one precision: resume on the kind of device that started it, or set saes[].dtype to "
            f"the units' ({', '.join(sorted(set(t for t, _ in differ.values())))}) where the device has it")


INPUT_NOTES = ("no_text", "surrogates_replaced")
"""What a unit's marker counts about its input when nonzero: documents whose text was null or missing (kept as
documents of 0 tokens), and texts holding lone UTF-16 surrogates (not Unicode text: JSON can spell them as
\\ud800), each replaced by U+FFFD as invalid UTF-8 bytes are."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def describe_notes(markers: Iterable[dict[str, Any]]) -> list[str]:
    """One line per INPUT_NOTES count that is nonzero over the markers of a run."""
    total = {k: sum(m.get(k, 0) for m in markers) for k in INPUT_NOTES}
    lines = []
    if total["no_text"]:
        lines.append(f"{total['no_text']:,} documents had no text (null or missing data.text_column): kept as "
                     "documents of 0 tokens (each unit's marker counts them as no_text)")
    if total["surrogates_replaced"]:
        lines.append(f"{total['surrogates_replaced']:,} texts held lone UTF-16 surrogates, which are not Unicode "
                     "text: each was replaced by U+FFFD (markers count them as surrogates_replaced)")
    return lines


def _noted_text(text: Any, notes: dict[str, int]) -> Any:
    """The text as it is tokenized, counting in `notes` what INPUT_NOTES describes."""
    if text is None:
        notes["no_text"] += 1
    elif isinstance(text, str) and _SURROGATE.search(text):
        notes["surrogates_replaced"] += 1
        return _SURROGATE.sub("\ufffd", text)
    return text


class UnitInput:
    """A unit's prepared blocks (an iterator of (documents, host batches)) and the documents and tokens
    they held so far."""

    def __init__(self) -> None:
        self.blocks: Iterator[tuple[list[Document], list]] = iter(())
        self.n_docs = 0
        self.n_tokens = 0
        self.then: Any = None
        """Called (in the preparing thread) once the last block is prepared."""

    def counted(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.n_docs += 1
            self.n_tokens += len(doc.token_ids)
            yield doc


def _out_of_room(e: OSError) -> bool:
    """A write to the attempt folder failed for want of space or permission (pyarrow's errors carry the errno
    in their text only)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
        return True
    text = str(e).lower()
    return any(w in text for w in ("no space left", "quota exceeded", "read-only file system", "permission denied"))
