"""Feeding an encoder at the device's speed: uint8 batches in, normalised on the device, next batch in flight.

Decode workers hand over 8-bit, already cropped pixels (`preprocess_uint8`); here they become the
model's input. On a CUDA device each batch is copied into one of a few reused pinned (page-locked)
host buffers, sent with a non-blocking copy on a side stream, and normalised and cast on the GPU,
so the copy of batch k+1 runs while the forward of batch k does (`prefetched` orders the calls).
On a CPU the same normalisation runs vectorised on the whole batch into a reused buffer: fresh
multi-megabyte tensors per batch cost more in page faults than the arithmetic itself.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from retrieval.encoders.preprocess import PreprocessConfig
from retrieval.errors import BadQuery
from retrieval.types import UInt8Array

T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")

#: Pinned host buffers per feed: one being filled, one in flight, one spare.
PINNED_BUFFERS = 3
#: Batch sizes `auto` chooses between (the forward rate flattens out past the top one on a GPU).
CPU_BATCH = 32
GPU_BATCH_MAX = 512
GPU_BATCH_MIN = 32
#: Share of the free GPU memory a batch's activations may take when `auto` sizes it.
GPU_MEMORY_SHARE = 0.25


def check_uint8_batch(batch: UInt8Array, hw: tuple[int, int]) -> None:
    """An ingest batch must be (n, H, W, 3) uint8 at the encoder's input size."""
    h, w = hw
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.shape[1:] != (h, w, 3):
        shape = getattr(batch, "shape", None)
        raise BadQuery(
            f"uint8 pixel batch must have shape (n, {h}, {w}, 3) and dtype uint8, got {shape} "
            f"{getattr(batch, 'dtype', type(batch).__name__)}: build it with preprocess_uint8"
        )


@dataclass
class Staged:
    """A batch on its way to the model: the model input tensor once `ready` (a CUDA event) fires."""

    n: int
    tensor: Any  # (n, 3, H, W) in the model's dtype, on the model's device
    ready: Any = None  # torch.cuda.Event on CUDA; None where the tensor is ready at once
    host: Any = None  # the pinned buffer it came from, kept alive until the copy is done


class DeviceFeed:
    """Turns uint8 batches into model input on one device, reusing its buffers.

    Not thread-safe by itself: the encoder calls it under its lock.
    """

    def __init__(self, device: str, dtype: Any, cfg: PreprocessConfig) -> None:
        import torch

        self.device = device
        self.dtype = dtype
        self.cfg = cfg
        self.cuda = device.startswith("cuda")
        dev = torch.device(device)
        self._mean = torch.tensor([m / cfg.rescale for m in cfg.mean], dtype=torch.float32, device=dev)
        self._scale = torch.tensor([cfg.rescale / s for s in cfg.std], dtype=torch.float32, device=dev)
        self._mean, self._scale = self._mean.view(1, 3, 1, 1), self._scale.view(1, 3, 1, 1)
        self._cpu_bufs: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self._pinned: deque[tuple[Any, Any]] = deque()  # (pinned uint8 buffer, event of its last copy)
        self._stream = torch.cuda.Stream(device=dev) if self.cuda else None

    def _normalise_into(self, u8: Any, out32: Any) -> Any:
        """`preprocess.normalise`'s arithmetic, in place in `out32` (NCHW float32)."""
        out32.copy_(u8.permute(0, 3, 1, 2))
        return out32.sub_(self._mean).mul_(self._scale)

    def stage(self, batch: UInt8Array) -> Staged:
        import torch

        n = len(batch)
        if not self.cuda:
            key = tuple(batch.shape)
            bufs = self._cpu_bufs.get(key)
            if bufs is None:
                shape = (n, 3, batch.shape[1], batch.shape[2])
                f32 = torch.empty(shape, dtype=torch.float32)
                cast = f32 if self.dtype == torch.float32 else torch.empty(shape, dtype=self.dtype)
                self._cpu_bufs = {key: (f32, cast)}  # one shape at a time: the last batch may be short
                bufs = (f32, cast)
            f32, cast = bufs
            self._normalise_into(torch.from_numpy(batch), f32)
            if cast is not f32:
                cast.copy_(f32)
            return Staged(n, cast.to(self.device) if self.device != "cpu" else cast)
        host = self._pinned_buffer(batch.shape)
        host.numpy()[...] = batch  # one memcpy into page-locked memory: the copy below can be asynchronous
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dev_u8 = host.to(self.device, non_blocking=True)
            x = dev_u8.permute(0, 3, 1, 2).float().sub_(self._mean).mul_(self._scale).to(self.dtype)
            x = x.contiguous()
            ready = torch.cuda.Event()
            ready.record(self._stream)
        # the tensors were made on the side stream: tell the allocator the main stream uses them too
        x.record_stream(torch.cuda.current_stream(self.device))
        self._pinned.append((host, ready))
        return Staged(n, x, ready, host)

    def _pinned_buffer(self, shape: tuple[int, ...]) -> Any:
        """A pinned uint8 buffer of `shape` whose previous copy has finished (reused round robin)."""
        import torch

        while len(self._pinned) >= PINNED_BUFFERS:
            buf, ev = self._pinned.popleft()
            ev.synchronize()  # its copy is done: the buffer may be written again
            if tuple(buf.shape) == tuple(shape):
                return buf
        return torch.empty(shape, dtype=torch.uint8).pin_memory()

    def wait(self, staged: Staged) -> Any:
        """The staged tensor, with the current stream ordered after its copy."""
        if staged.ready is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(staged.ready)
        return staged.tensor


def prefetched(
    batches: Iterable[T],
    stage: Callable[[T], S],
    encode: Callable[[S], R],
    depth: int,
) -> Iterator[tuple[T, R]]:
    """(batch, encode(stage(batch))) in order, with `depth` batches staged ahead of the one encoded.

    With depth 1 the calls go stage(1), stage(2), encode(1), stage(3), encode(2), ...: on a GPU the
    copy of the next batch is queued before the forward of the current one, so they overlap. With
    depth 0 each batch is staged right before it is encoded (a CPU, where staging is compute too).
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    ahead: deque[tuple[T, S]] = deque()
    for batch in batches:
        ahead.append((batch, stage(batch)))
        if len(ahead) > depth:
            b, s = ahead.popleft()
            yield b, encode(s)
    while ahead:
        b, s = ahead.popleft()
        yield b, encode(s)


def prefetch_depth(device: str) -> int:
    """How many batches to stage ahead: one on a GPU (copy beside compute), none on a CPU."""
    return 1 if device.startswith("cuda") else 0


def auto_batch_size(device: str, image_size: int, patch_size: int, width: int, free_bytes: int | None) -> int:
    """The ingest batch size `auto` picks for a device.

    CPU (and MPS): 32, past which the forward rate stops growing on the CPUs measured (bench/RESULTS.md).
    CUDA: as large as a quarter of the free memory holds, between 32 and 512, a power of two: the
    forward of ViT-B/32 in fp16 runs 5x faster per image at 256 than at 32 on an H200. An image's
    activations are estimated from its token count and width (four widths live at the MLP's peak,
    in 2-byte halves), which over-estimates for safety.
    """
    if not device.startswith("cuda") or free_bytes is None:
        return CPU_BATCH
    tokens = (image_size // max(patch_size, 1)) ** 2 + 1
    per_image = tokens * max(width, 1) * 2 * 4 * 4  # fp16, MLP 4x width, a few tensors alive at once
    fits = int(free_bytes * GPU_MEMORY_SHARE // max(per_image, 1))
    size = GPU_BATCH_MIN
    while size * 2 <= min(fits, GPU_BATCH_MAX):
        size *= 2
    return size


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class RateMeter:
    """A running per-item seconds figure (exponential average), shared between threads."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self._lock = threading.Lock()

    def add(self, seconds: float, items: int = 1) -> None:
        if items < 1:
            return
        per = seconds / items
        with self._lock:
            self.value = per if self.value is None else self.value + self.alpha * (per - self.value)
