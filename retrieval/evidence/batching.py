"""The plumbing grid and dense evidence share: decode and prepare targets in worker threads, and
feed what they prepared through the model in full batches, handing each target its outputs in order.

Both stream: the model starts on the first full batch while the threads decode the next targets,
and at most a window of prepared targets waits in memory, so storing patch features for a whole
collection (`clearsight index --patches`) runs in constant memory with decoding and model overlapped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from PIL import Image

from retrieval.errors import BadImage
from retrieval.evidence.types import Evidence, EvidenceConfig, EvidenceTarget, unreadable
from retrieval.types import Float32Array

T = TypeVar("T")

#: Per-target preparation after decoding: (target, decoded image, displayed width, height) -> item.
Prepare = Callable[[EvidenceTarget, Image.Image, int, int], T]


def load_and_prepare(
    target: EvidenceTarget, prepare: Prepare[T], method: str, draft_size: int
) -> T | Evidence:
    """Decode one target (reduced towards `draft_size` where the format allows) and prepare it; an
    unreadable file becomes an `unreadable` note for `method` instead of an error."""
    try:
        image, width, height = target.load(draft_size=draft_size)
    except BadImage as exc:
        return unreadable(target, method, str(exc))
    return prepare(target, image, width, height)


def prepared_in_order(
    targets: Sequence[EvidenceTarget],
    prepare: Prepare[T],
    method: str,
    draft_size: int,
    config: EvidenceConfig,
) -> Iterator[T | Evidence]:
    """`load_and_prepare` of every target in `config.workers` threads, yielded in the targets' order.

    A bounded window of targets runs ahead of the consumer (two batches, as indexing does), so the
    threads keep decoding while the consumer runs the model, without holding every target at once.
    """
    window = max(config.batch_size * 2, config.workers * 4)
    with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="evidence") as pool:
        rest = iter(targets)
        inflight: deque[Future[T | Evidence]] = deque()
        try:
            for t in rest:
                inflight.append(pool.submit(load_and_prepare, t, prepare, method, draft_size))
                if len(inflight) >= window:
                    break
            while inflight:
                item = inflight.popleft().result()
                nxt = next(rest, None)
                if nxt is not None:
                    inflight.append(pool.submit(load_and_prepare, nxt, prepare, method, draft_size))
                yield item
        finally:  # the consumer stopped early or failed: do not decode what nobody will read
            for f in inflight:
                f.cancel()


def encode_in_batches(
    items: Iterable[T | Evidence],
    rows: Callable[[T], Float32Array],
    run: Callable[[Float32Array], Float32Array],
    batch_size: int,
) -> Iterator[tuple[T, Float32Array] | Evidence]:
    """Run `rows(item)` of every item through `run` in batches of exactly `batch_size` rows (the last
    one smaller), across item boundaries; yield each item with its outputs, in order, as soon as all
    of its rows are done. Notes (`Evidence`, e.g. unreadable images) pass through in their place."""
    waiting: deque[tuple[T, int] | Evidence] = deque()
    inputs: list[Float32Array] = []
    queued = 0
    done: list[Float32Array] = []
    ready = 0

    def release() -> Iterator[tuple[T, Float32Array] | Evidence]:
        nonlocal done, ready
        while waiting:
            head = waiting[0]
            if isinstance(head, Evidence):
                waiting.popleft()
                yield head
                continue
            item, n = head
            if n > ready:
                return
            waiting.popleft()
            block = (
                done[0] if len(done) == 1 else np.concatenate(done) if done else np.zeros((0,), np.float32)
            )
            rest = block[n:]
            done, ready = ([rest] if len(rest) else []), ready - n
            yield item, block[:n]

    for x in items:
        if isinstance(x, Evidence):
            waiting.append(x)
        else:
            r = rows(x)
            waiting.append((x, len(r)))
            inputs.append(r)
            queued += len(r)
            while queued >= batch_size:
                block = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
                done.append(run(block[:batch_size]))
                ready += batch_size
                rest = block[batch_size:]
                inputs, queued = ([rest] if len(rest) else []), len(rest)
        yield from release()
    if queued:
        done.append(run(inputs[0] if len(inputs) == 1 else np.concatenate(inputs)))
        ready += queued
    yield from release()
