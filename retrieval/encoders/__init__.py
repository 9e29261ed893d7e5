"""Encoders: one interface, a registry of known models, and a factory."""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.encoders.base import (
    PRECISIONS,
    Encoder,
    EncoderInfo,
    cpu_has_native_bf16,
    default_dtype,
    l2_normalise,
    native_bf16,
    precision_facts,
    select_device,
)
from retrieval.registry import EncoderSpec, default_encoder, find_encoder, list_encoders

__all__ = [
    "PRECISIONS",
    "Encoder",
    "EncoderConfig",
    "EncoderInfo",
    "cpu_has_native_bf16",
    "create_encoder",
    "default_dtype",
    "l2_normalise",
    "list_encoders",
    "native_bf16",
    "precision_facts",
    "select_device",
]


@dataclass(frozen=True)
class EncoderConfig:
    """How to build an encoder: the model (registry name, hub id or local directory) and where to run it."""

    model: str | None = None  # None: the registry's default
    device: str | None = None  # None/"auto": CUDA, then MPS, then CPU
    #: None/"auto": fp16 on CUDA/MPS, bf16 on CPUs with native bf16, else fp32 (`default_dtype`)
    precision: str | None = None


def create_encoder(config: EncoderConfig | str | None = None) -> Encoder:
    """Build the encoder a config names. Raises ModelUnavailable with a how-to when weights are missing."""
    from retrieval.encoders.hf import HFDualEncoder

    if config is None or isinstance(config, str):
        config = EncoderConfig(model=config)
    spec: EncoderSpec | None
    name = config.model or default_encoder().name
    spec = find_encoder(name)
    return HFDualEncoder(name, spec, device=config.device, precision=config.precision)
