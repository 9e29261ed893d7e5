"""The encoder interface every backend implements, and device selection shared by all models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.types import Float32Array

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


@runtime_checkable
class Encoder(Protocol):
    """A dual encoder mapping images and texts into one space.

    All outputs are float32, L2-normalised, shape (n, dim). `preprocess` is thread-safe and
    CPU-only so ingest can run it in worker threads while `encode_pixels` runs the model.
    """

    info: EncoderInfo
    device: str

    def preprocess(self, images: Sequence[Image.Image]) -> Float32Array: ...

    def encode_pixels(self, pixels: Float32Array) -> Float32Array: ...

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> Float32Array: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Float32Array: ...

    def close(self) -> None: ...


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


def default_dtype(device: str, precision: str | None = None) -> str:
    """Half precision on accelerators, float32 on the CPU (CPU half is slow and lossy)."""
    if precision and precision != "auto":
        if precision not in ("fp32", "fp16", "bf16"):
            from retrieval.errors import ConfigError

            raise ConfigError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
        return precision
    return "fp16" if device.startswith("cuda") or device == "mps" else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a `default_dtype` precision name (fp32, fp16, bf16)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
