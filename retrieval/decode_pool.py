"""Decoding for ingest: how many workers, threads or processes, and what happens when one dies.

Each image's bytes are read and hashed in a thread of the ingest process (the catalog decides there
whether the content needs decoding at all), then decoded to the encoder's size and cropped to 8-bit
pixels (`decode_uint8`). On a small machine that runs in the same thread: Pillow releases the
interpreter lock while it decodes and resizes, and the encoder needs most of the cores. On a
machine with many cores, threads stop scaling on the interpreter lock, so each thread hands the
bytes to a process of its own and waits (`DecodePool`). A process that dies (out of memory, a
crashing codec) breaks its pool; the pool then says so once and decodes the rest in threads, so no
file is lost.

How many decodes run at once follows the measured rates on a GPU (`needed_workers`): enough to
decode as fast as the encoder encodes, plus a margin. On a CPU the decoders share the cores with
the encoder, whose threads stall together whenever one is preempted, so there they run at the
lowest priority (`yield_to_encoder`), and when the forward's threads cover every core they decode
only between forwards (`Gate`).
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from PIL import Image

from retrieval import imageio
from retrieval.encoders.preprocess import PreprocessConfig, preprocess_uint8
from retrieval.errors import BadImage
from retrieval.types import UInt8Array

try:  # optional: a faster JPEG path (libjpeg-turbo scaling in eighths); Pillow's draft mode otherwise
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the installation
    simplejpeg = None

#: Use processes from this many decode workers on (`decoder="auto"`); below it, threads.
PROCESS_FROM_WORKERS = 4
#: Decode capacity kept above the encoder's measured rate.
MARGIN = 1.25
DECODERS = ("auto", "threads", "processes")


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode needs to know; small and picklable, sent to processes with each job."""

    pre: PreprocessConfig | None  # None: an encoder that preprocesses for itself (no uint8 path)
    draft: int
    max_pixels: int
    fast_jpeg: bool = True  # JPEGs through simplejpeg's DCT scaling in eighths, where it is installed


@dataclass(frozen=True)
class DecodedPixels:
    width: int  # displayed size of the full image
    height: int
    pixels: UInt8Array  # (H, W, 3) at the encoder's input size


def decode_uint8(data: bytes, spec: DecodeSpec) -> DecodedPixels:
    """Decode at the encoder's size and crop: the CPU part of ingest.

    JPEGs go through libjpeg-turbo (simplejpeg) where it is installed, DCT-scaled as Pillow's draft
    mode would scale them (by halves), so the pixels equal those of the Pillow path. Anything else,
    and any JPEG that path declines (CMYK, over the pixel limit, unreadable), goes through
    `imageio.decode` and its reasons.
    """
    if spec.pre is None:
        raise ValueError("decode_uint8 needs the encoder's preprocessing config")
    fast = _scaled_jpeg(data, spec) if spec.fast_jpeg else None
    if fast is not None:
        return fast
    dec = imageio.decode(data, draft_size=spec.draft, max_pixels=spec.max_pixels)
    return DecodedPixels(dec.width, dec.height, preprocess_uint8(dec.image, spec.pre))


#: EXIF orientation -> the transpose that shows the image upright (as `ImageOps.exif_transpose`).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _scaled_jpeg(data: bytes, spec: DecodeSpec) -> DecodedPixels | None:
    """A JPEG decoded by simplejpeg at draft mode's scale (the largest halving keeping both sides >= the
    model's size), upright, cropped; None where this path does not apply (the caller decodes with Pillow)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or width * height > spec.max_pixels or min(width, height) < 1:
            return None
        orientation = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
        # The scale Pillow's draft mode picks (halves, never below the model's size on either side), so
        # the indexed pixels are those a query of the same photo gets; finer eighths would save decode
        # time on mid-sized photos but make a photo's query vector differ from its indexed one.
        div = next((d for d in (8, 4, 2) if min(width, height) // spec.draft >= d), 1)
        arr = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=-(-height // div), min_width=-(-width // div)
        )
    except (ValueError, OSError, SyntaxError):
        return None
    im = Image.fromarray(arr, "RGB")
    if orientation in _ORIENT:
        im = im.transpose(_ORIENT[orientation])
        if orientation >= 5:
            width, height = height, width
    assert spec.pre is not None
    return DecodedPixels(width, height, preprocess_uint8(im, spec.pre))


def max_workers(requested: int | None, cores: int, device: str) -> int:
    """Decode workers at most: as asked, or all cores (one left for the GPU's feeder with a GPU)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"decode workers must be at least 1, got {requested}")
        return requested
    return max(1, cores - 1) if device.startswith("cuda") else max(1, cores)


#: Niceness of decode threads beside a CPU encoder: the lowest priority, so they run on spare cycles.
YIELD_NICENESS = 19


def yield_to_encoder() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread); elsewhere, or if refused, no-op."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), YIELD_NICENESS)


def use_processes(decoder: str, workers: int) -> bool:
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: use {', '.join(DECODERS)}")
    return decoder == "processes" or (decoder == "auto" and workers >= PROCESS_FROM_WORKERS)


def needed_workers(decode_s: float | None, encode_s: float | None, cap: int) -> int:
    """Decodes to run at once so decoding keeps up with the encoder: its rate over one decoder's, with
    a margin, between 1 and `cap`. Unknown rates (nothing measured yet) give `cap`."""
    if not decode_s or not encode_s:
        return cap
    return max(1, min(cap, math.ceil(decode_s / encode_s * MARGIN)))


def _run_job(
    job: Callable[[bytes, DecodeSpec], DecodedPixels], data: bytes, spec: DecodeSpec
) -> DecodedPixels | tuple[str, str]:
    """In the worker process: a bad image comes back as (reason, detail), which pickles as it is
    (the exception would come back with its reason and detail run together)."""
    try:
        return job(data, spec)
    except BadImage as exc:
        return (exc.reason, exc.detail)


class DecodePool:
    """Runs `decode_uint8` in worker processes, or in the calling thread once the pool has broken.

    `decode` blocks its (ingest) thread until the process answers, so the threads' count is the
    number of decodes in flight. `job` is swappable so tests can crash a worker on purpose.
    """

    def __init__(
        self,
        workers: int,
        spec: DecodeSpec,
        log: Callable[[str], None] | None = None,
        job: Callable[[bytes, DecodeSpec], DecodedPixels] = decode_uint8,
    ) -> None:
        self.spec = spec
        self.job = job
        self.log = log
        self.broken: str | None = None  # why the pool stopped, once it has
        self._lock = threading.Lock()
        # spawn: a fork of a process running torch's thread pools can deadlock in the child
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )

    def decode(self, data: bytes) -> DecodedPixels:
        pool = self._pool
        if pool is not None and self.broken is None:
            try:
                out = pool.submit(_run_job, self.job, data, self.spec).result()
            except (BrokenProcessPool, RuntimeError) as exc:
                self._fall_back(exc)
            else:
                if isinstance(out, DecodedPixels):
                    return out
                raise BadImage(*out)
        return decode_uint8(data, self.spec)

    def _fall_back(self, exc: BaseException) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = f"{type(exc).__name__}: {exc}"
                if self.log:
                    self.log(
                        "a decode worker process died; decoding the rest in threads "
                        f"(no files are lost; slower on many cores): {self.broken}"
                    )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Limiter:
    """At most `limit` holders at once; the limit can change while threads wait (it follows the rates)."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._in_use = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self._limit = max(1, limit)
            self._cond.notify_all()

    def __enter__(self) -> Limiter:
        with self._cond:
            while self._in_use >= self._limit:
                self._cond.wait()
            self._in_use += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._in_use -= 1
            self._cond.notify_all()


class Gate:
    """Keeps decoders off the cores while a CPU forward that uses all of them runs.

    A decode that preempts one of torch's threads stalls the others at the next barrier, and a decode
    thread holding the interpreter lock delays the forward's Python between kernels; lowering the
    decoders' priority does not prevent either. When the forward's threads cover every core, decoding
    between forwards on all cores costs less wall time than decoding beside them (measured in
    bench/RESULTS.md), so decoders wait at the gate while it is shut. A decode already running when the
    gate shuts finishes (a few ms). Inactive, the gate never blocks (a GPU, or a forward that leaves
    cores free).
    """

    def __init__(self, active: bool) -> None:
        self.active = active
        self._open = threading.Event()
        self._open.set()

    def wait(self) -> None:
        if self.active:
            self._open.wait()

    @contextlib.contextmanager
    def shut(self) -> Iterator[None]:
        if not self.active:
            yield
            return
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()


def forward_fills_cores(device: str, cores: int) -> bool:
    """Whether a forward on `device` keeps every usable core busy (a CPU whose torch threads cover them)."""
    if device.startswith("cuda"):
        return False
    torch = sys.modules.get("torch")  # an encoder that runs without torch leaves the cores to decoding
    return torch is not None and int(torch.get_num_threads()) >= cores
