"""The encoder interface every backend implements, and device selection shared by all models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.types import Float32Array, UInt8Array

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EncoderInfo:
    """What identifies an encoder's embedding space: stored in the index manifest."""

    name: str  # registry name, hub id, or local directory as the user gave it
    model_id: str  # hub id or absolute directory
    fingerprint: str  # changes whenever the weights change; keys embedding caches
    family: str  # "clip", "siglip", ...
    dim: int
    image_size: int
    patch_size: int
    context_length: int
    #: What the model computes in (fp32, bf16, fp16). Not part of the fingerprint: the embedding
    #: space is the same, and agreement across precisions is tested, so caches and indexes are shared.
    precision: str = "fp32"


@runtime_checkable
class Encoder(Protocol):
    """A dual encoder mapping images and texts into one space.

    All outputs are float32, L2-normalised, shape (n, dim). `preprocess` is thread-safe and
    CPU-only so ingest can run it in worker threads while `encode_pixels` runs the model.
    """

    @property
    def info(self) -> EncoderInfo: ...

    @property
    def device(self) -> str: ...

    def preprocess(self, images: Sequence[Image.Image]) -> Float32Array: ...

    def encode_pixels(self, pixels: Float32Array) -> Float32Array: ...

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> Float32Array: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Float32Array: ...

    def close(self) -> None: ...


@runtime_checkable
class FeedEncoder(Protocol):
    """An encoder that ingest can feed 8-bit batches: decode workers crop to `preprocess_uint8`'s
    (H, W, 3) uint8, the device normalises (`stage`, asynchronous where the device allows), and
    `encode_staged` runs the forward. `pre` is the preprocessing config worker processes need."""

    info: EncoderInfo
    device: str
    pre: Any

    def preprocess_uint8(self, image: Image.Image) -> UInt8Array: ...

    def stage(self, batch: UInt8Array) -> Any: ...

    def encode_staged(self, staged: Any) -> Float32Array: ...

    def ingest_batch_size(self) -> int: ...


def l2_normalise(x: Float32Array) -> Float32Array:
    """Row-normalise; zero rows stay zero rather than becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def select_device(requested: str | None = None) -> str:
    """Pick CUDA, then Apple MPS, then CPU; an explicit request is honoured or refused clearly."""
    import torch

    from retrieval.errors import ConfigError

    if requested and requested != "auto":
        dev = requested.lower()
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} requested but CUDA is not available on this machine")
        if dev == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' requested but Apple MPS is not available on this machine")
        if not (dev == "cpu" or dev == "mps" or dev.startswith("cuda")):
            raise ConfigError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
        return dev
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


#: What `--precision` accepts; `auto` resolves per device (see `default_dtype`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


#: The /proc/cpuinfo flags of a CPU that computes bf16 in hardware (AVX512-BF16 or AMX).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16(flags: Iterable[str], capability: str = "") -> bool:
    """Whether a CPU with these flags (or torch capability string) computes bf16 natively.

    Apart from the reading so tests can decide `auto` for any CPU, not only the one they run on.
    """
    return bool(BF16_FLAGS & set(flags)) or any(k in capability.upper() for k in ("BF16", "AMX"))


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, so bf16 is faster, not emulated.

    Without it, torch converts bf16 through fp32 in software and a bf16 model runs slower than fp32.
    Linux reports the flags in /proc/cpuinfo; elsewhere torch's own capability string is the hint.
    """
    if native_bf16(cpu_flags()):
        return True
    try:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return False
    return native_bf16((), capability)


def precision_facts() -> str:
    """One line saying what `auto` resolves to on this machine and why: printed atop the test run,
    so a log from any machine says which kind of CPU it came from."""
    device = select_device(None)
    picked = default_dtype(device)
    if device != "cpu":
        return f"precision: auto = {picked} ({device} device present)"
    found = sorted(BF16_FLAGS & cpu_flags())
    why = f"native bf16: {', '.join(found)}" if found else "no native bf16 (avx512_bf16/amx_bf16 absent)"
    if not found and picked == "bf16":
        why = "native bf16 per torch's CPU capability"
    return f"precision: auto = {picked} on this CPU ({why})"


def default_dtype(device: str, precision: str | None = None) -> str:
    """The precision to run a model in; `auto` (or None) picks what the hardware does fast and well.

    fp16 on CUDA and MPS; bf16 on a CPU with native bf16 (its agreement with fp32 on trained weights
    is checked by the tests); fp32 on other CPUs, where half types are emulated and slow.
    """
    if precision and precision != "auto":
        if precision not in PRECISIONS:
            from retrieval.errors import ConfigError

            raise ConfigError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        return precision
    if device.startswith("cuda") or device == "mps":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a `default_dtype` precision name (fp32, fp16, bf16)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
