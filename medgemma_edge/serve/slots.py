"""Slots: N prompt caches (one decoder context each) over one pipeline, a bounded queue in front of them,
and the worker thread that runs one request's generation and hands its chunks to the event loop.

A request takes the free slot whose cache shares the longest prefix with its prompt (as llama-server
does), else the one used longest ago, so a conversation that comes back lands on its own KV cache and
prefills only its new turn. Waiting requests are served first come, first served.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from medgemma_edge.runtime.caches import Atom, PromptCache, positions

log = logging.getLogger(__name__)
SIMILARITY = 0.5  # share of a prompt a slot's cache must hold to be chosen over the least recently used slot


@dataclass(eq=False)
class Slot:
    index: int
    cache: PromptCache
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    # one long-lived worker thread per slot: its context is only ever touched from there, and memory stays
    # in one allocator arena instead of a new thread's per request
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="slot"))

    def shared(self, atoms: Sequence[Atom]) -> int:
        """Prompt positions this slot's cache could reuse for `atoms`."""
        return positions(atoms[:self.cache.shared_prefix(atoms)])


class SlotPool:
    """Admission (slots + queue bounded), then a slot per request. Used from the event loop only."""

    def __init__(self, caches: Sequence[PromptCache], max_queue: int,
                 on_change: Callable[[int, int], None] = lambda busy, queued: None) -> None:
        self.slots = [Slot(i, c) for i, c in enumerate(caches)]
        self.max_queue = max_queue
        self.admitted = 0  # generating or waiting
        self._waiters: deque[tuple[asyncio.Future[Slot], Sequence[Atom]]] = deque()
        self._on_change = on_change
        self._durations: deque[float] = deque(maxlen=32)

    @property
    def capacity(self) -> int:
        return len(self.slots) + self.max_queue

    @property
    def queued(self) -> int:
        return sum(1 for f, _ in self._waiters if not f.done())

    def admit(self) -> bool:
        """Count a request in, or refuse it (429) when every slot is busy and the queue is full."""
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the recent mean request time per slot, 1..60."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(60, round(mean * (self.queued + 1) / len(self.slots))))

    async def acquire(self, atoms: Sequence[Atom]) -> Slot:
        free = [s for s in self.slots if not s.busy]
        if free and not self.queued:
            return self._take(free, atoms)
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, atoms))
        self._changed()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot just as it gave up: pass it on
                self.release(fut.result())
            raise
        finally:
            self._waiters = deque(w for w in self._waiters if w[0] is not fut)
            self._changed()

    def release(self, slot: Slot, duration_s: float | None = None) -> None:
        slot.busy = False
        slot.last_used = time.monotonic()
        if duration_s is not None:
            self._durations.append(duration_s)
        while self._waiters:
            fut, atoms = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._take([s for s in self.slots if not s.busy], atoms))
                break
        self._changed()

    def _take(self, free: list[Slot], atoms: Sequence[Atom]) -> Slot:
        # the slot holding most of this prompt (a conversation coming back), else the one used longest ago, so
        # that a new conversation does not evict another's cache for the few template tokens every prompt shares
        # ref: llama-server's slot selection (--slot-prompt-similarity 0.5, then least recently used)
        best = max(free, key=lambda s: (s.shared(atoms), -s.last_used))
        n = positions(atoms)
        slot = best if n and best.shared(atoms) >= SIMILARITY * n else min(free, key=lambda s: s.last_used)
        slot.busy = True
        self._changed()
        return slot

    def _changed(self) -> None:
        self._on_change(sum(s.busy for s in self.slots), self.queued)


class Generation:
    """One request's generation in a worker thread; `events()` yields ("chunk", c), ("error", e) in order.

    `cancel()` stops it after the token being computed (a client gone, a timeout); `done` is called from
    the event loop once the thread has finished with the slot's cache.
    """

    def __init__(self, stream: Callable[[], Iterator[Any]], done: Callable[[], None], worker: ThreadPoolExecutor) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancel = threading.Event()
        self._stream, self._done = stream, done
        self.finished = asyncio.Event()
        self.ended = threading.Event()  # set by the worker when it no longer touches the slot's cache
        worker.submit(self._run)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _run(self) -> None:
        try:
            chunks = self._stream()
            try:
                for chunk in chunks:
                    self._put("chunk", chunk)
                    if self._cancel.is_set():
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers with it
            self._put("error", exc)
        finally:
            self.ended.set()
            self._put("end", None)
            try:
                self._loop.call_soon_threadsafe(self._finish)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits for the slot any more
                pass

    def _finish(self) -> None:
        self.finished.set()
        self._done()

    async def events(self) -> Any:
        while True:
            kind, value = await self._queue.get()
            if kind == "end":
                return
            yield kind, value
