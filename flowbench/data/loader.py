"""Input off the critical path: batches gathered and moved to the device ahead of the step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from flowbench.data.base import ArraySplit

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """The batches of ``split`` at ``index_batches``, gathered ahead of the consumer on a thread.

    Call pattern::

        with Prefetcher(data.train, index_batches, device) as batches:
            for pixels in batches:            # uint8 [n, C, H, W], already on ``device``
                loss = train_step(pixels)

    ``index_batches`` is any iterable of index arrays (a generator over the seeded epoch
    permutation, say). A background thread gathers each batch from the split's memory map and,
    when ``device`` is CUDA, gathers it straight into pinned memory and copies it with
    ``non_blocking=True`` on a stream of its own; the consumer's stream waits for that copy
    only when it takes the batch. Up to ``depth`` batches wait ready in a queue.

    - Deterministic: the batches are exactly ``split.batch(idx).to(device)`` of a plain loop over
      ``index_batches``, in the same order.
    - The thread draws from ``index_batches`` up to ``depth + 1`` items ahead of the consumer, so
      state that iterable advances (an epoch position to checkpoint) runs ahead too: count the
      batches the consumer took instead of reading it.
    - An exception while gathering (a bad index) or raised by ``index_batches`` itself is raised
      in the consumer, at the batch it concerns, after the batches before it.
    - ``close()`` (also on leaving the ``with`` block, or once the batches run out) stops the
      thread and joins it; it is safe to call more than once.
    """

    def __init__(self, split: ArraySplit, index_batches: Iterable, device: str | torch.device = "cpu", depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.split, self.device = split, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the thread must name the device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._closed = False
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(
            target=self._produce, args=(iter(index_batches),), daemon=True, name="flowbench-prefetch"
        )
        self._thread.start()

    def _produce(self, index_batches: Iterator) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)  # per thread: the pinned copies' device
            for indices in index_batches:
                if self._stop.is_set() or not self._put(self._gather(np.asarray(indices))):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._put(_Failure(err))
            return
        self._put(_DONE)

    def _put(self, item) -> bool:
        """Queue ``item``; False when closed while waiting for room (the consumer is gone)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _gather(self, indices: np.ndarray):
        if self._stream is None:
            return self.split.batch(indices).to(self.device)
        pinned = torch.empty((len(indices), *self.split.image_shape), dtype=torch.uint8, pin_memory=True)
        self.split.batch(indices, out=pinned)
        with torch.cuda.stream(self._stream):
            on_device = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return on_device, ready

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        if self._closed:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        if self._stream is None:
            return item
        pixels, ready = item
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)
        pixels.record_stream(consumer)  # its memory is not reused before the consumer's work on it ends
        return pixels

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        while True:  # drop what was prefetched, so the thread's pending put returns at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
