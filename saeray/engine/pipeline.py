"""Work that runs ahead of the model: an iterator drained by a background thread into a bounded queue.

The worker's reading, decompression, tokenization and batch building run in such a thread while its
own thread runs the model, so a GPU does not wait for the CPU between blocks. The queue holds at most
`depth` items (blocks of ~4 batches): memory stays flat however long the unit is. The libraries that
do the heavy lifting (the Rust tokenizer, zstd, Parquet, torch) release the GIL while they work.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class Prefetch(Generic[T]):
    """Iterate `source` in a daemon thread, up to `depth` items ahead of the consumer.

    An exception in `source` is raised in the consumer at the point it would have been raised
    inline (after the items before it). `close` (or leaving a `with` block, or the consumer's
    exception) stops the thread at its next item. `waited` counts the seconds the consumer spent
    waiting for items: the time the model sat idle for want of input.
    """

    def __init__(self, source: Iterable[T], depth: int, name: str = "saeray-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.waited = 0.0
        self._thread = threading.Thread(target=self._fill, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._source:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((_DONE, e))
            return
        self._put((_DONE, None))

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                t0 = time.perf_counter()
                item, error = self._queue.get()
                self.waited += time.perf_counter() - t0
                if item is _DONE:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the item it is making) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()  # unblock a put
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        close = getattr(self._source, "close", None)
        if close is not None:  # a generator's finally blocks run here, in the consumer's thread
            close()

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
