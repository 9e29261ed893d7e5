"""Image preprocessing that follows a transformers image processor's config, fast and thread-safe.

transformers' processors, without torchvision, run a generic NumPy path that costs more than the
encoder on small models. This reproduces the same steps (resize, centre crop, rescale, normalise)
from the processor's own settings with Pillow and NumPy; tests compare it with the processor.

Ingest splits the steps in two: `preprocess_uint8` (decode workers) resizes only the region the
crop keeps, straight to the model's size, and hands over 8-bit pixels, 4x smaller than float32 and
free of per-image float work; `normalise` (the device) rescales, normalises and casts whole batches
at once. Together they give the pixels of `preprocess_one` within float rounding (tests check it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.types import Float32Array, UInt8Array

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PreprocessConfig:
    resize_shortest: int | None  # resize so the shorter side is this (CLIP style)
    resize_hw: tuple[int, int] | None  # or resize to exactly (height, width) (SigLIP style)
    crop_hw: tuple[int, int] | None
    resample: int
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_hw:
            return self.crop_hw
        if self.resize_hw:
            return self.resize_hw
        assert self.resize_shortest is not None
        return (self.resize_shortest, self.resize_shortest)

    @classmethod
    def from_processor(cls, ip: Any) -> PreprocessConfig:
        size = getattr(ip, "size", None) or {}
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        shortest = size.get("shortest_edge") if getattr(ip, "do_resize", True) else None
        hw = (size["height"], size["width"]) if "height" in size and getattr(ip, "do_resize", True) else None
        crop = None
        if getattr(ip, "do_center_crop", False):
            cs = getattr(ip, "crop_size", None) or {}
            cs = dict(cs) if not isinstance(cs, int) else {"height": cs, "width": cs}
            crop = (int(cs["height"]), int(cs["width"]))
        resample = getattr(ip, "resample", Image.Resampling.BICUBIC)
        resample = int(getattr(resample, "value", resample))
        rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
        mean = tuple(ip.image_mean) if getattr(ip, "do_normalize", True) else (0.0, 0.0, 0.0)
        std = tuple(ip.image_std) if getattr(ip, "do_normalize", True) else (1.0, 1.0, 1.0)
        return cls(shortest, hw, crop, resample, rescale, mean, std)


def resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) of a width x height image after the resize step."""
    if cfg.resize_hw:
        h, w = cfg.resize_hw
        return w, h
    if cfg.resize_shortest:
        s = cfg.resize_shortest
        if width <= height:
            return s, max(1, int(s * height / width))
        return max(1, int(s * width / height)), s
    return width, height


def crop_offsets(width: int, height: int, crop_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Centre crop of a width x height image to `crop_hw`: (pad_x, pad_y, left, top).

    An image smaller than the crop is first padded (like transformers does), `pad_x`/`pad_y` on the
    left/top; (`left`, `top`) is the crop's corner in the padded image.
    """
    ch, cw = crop_hw
    ph, pw = max(height, ch), max(width, cw)
    return (pw - width) // 2, (ph - height) // 2, (pw - cw) // 2, (ph - ch) // 2


def _resize(im: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    size = resized_size(im.width, im.height, cfg)
    if cfg.resize_hw:
        return im.resize(size, resample=cfg.resample)
    if size != im.size:
        # reducing_gap lets Pillow shrink big images in two fast steps (quality is unchanged to the eye)
        return im.resize(size, resample=cfg.resample, reducing_gap=3.0)
    return im


def _centre_crop(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    ch, cw = hw
    h, w = arr.shape[:2]
    pad_x, pad_y, left, top = crop_offsets(w, h, hw)
    if h < ch or w < cw:  # pad like transformers does for images smaller than the crop
        out = np.zeros((max(h, ch), max(w, cw), arr.shape[2]), dtype=arr.dtype)
        out[pad_y : pad_y + h, pad_x : pad_x + w] = arr
        arr = out
    return arr[top : top + ch, left : left + cw]


def preprocess_one(im: Image.Image, cfg: PreprocessConfig) -> Float32Array:
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(_resize(im, cfg), dtype=np.float32)
    if cfg.crop_hw:
        arr = _centre_crop(arr, cfg.crop_hw)
    mean = np.asarray(cfg.mean, dtype=np.float32) / cfg.rescale
    scale = np.asarray([cfg.rescale / s for s in cfg.std], dtype=np.float32)
    arr = (arr - mean) * scale
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> Float32Array:
    h, w = cfg.output_hw
    if not images:
        return np.zeros((0, 3, h, w), dtype=np.float32)
    return np.stack([preprocess_one(im, cfg) for im in images])


def _crop_box(im: Image.Image, cfg: PreprocessConfig) -> tuple[float, float, float, float] | None:
    """The source rectangle that resize-then-centre-crop keeps, or None when the crop pads.

    Resizing only this rectangle to the crop size maps every output pixel to the same source point,
    with the same filter scale, as resizing the whole image and cropping afterwards, at a fraction
    of the work (and never a pixel outside the crop).
    """
    if not cfg.crop_hw:
        return None
    rw, rh = resized_size(im.width, im.height, cfg)
    ch, cw = cfg.crop_hw
    if rw < cw or rh < ch:
        return None
    _, _, left, top = crop_offsets(rw, rh, cfg.crop_hw)
    sx, sy = im.width / rw, im.height / rh
    return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)


def preprocess_uint8(im: Image.Image, cfg: PreprocessConfig) -> UInt8Array:
    """Resized and centre-cropped RGB pixels, (H, W, 3) uint8: the work a decode worker does.

    `normalise` turns a stack of these into the model's input; the pair equals `preprocess_one`.
    """
    if im.mode != "RGB":
        im = im.convert("RGB")
    box = _crop_box(im, cfg)
    if box is not None:
        assert cfg.crop_hw is not None
        ch, cw = cfg.crop_hw
        if (cw, ch) == im.size and box == (0.0, 0.0, float(cw), float(ch)):
            return np.asarray(im, dtype=np.uint8)
        out = im.resize((cw, ch), resample=cfg.resample, box=box, reducing_gap=3.0)
        return np.asarray(out, dtype=np.uint8)
    arr = np.asarray(_resize(im, cfg), dtype=np.uint8)
    if cfg.crop_hw:
        arr = _centre_crop(arr, cfg.crop_hw)
    return np.ascontiguousarray(arr)


def normalise(batch: torch.Tensor, cfg: PreprocessConfig, dtype: torch.dtype) -> torch.Tensor:
    """(n, H, W, 3) uint8 on any device -> (n, 3, H, W) model input in `dtype` on the same device.

    The arithmetic is `preprocess_one`'s, in float32 and in the same order, so on a CPU the result
    is the same up to float rounding; the cast to the model's dtype comes last.
    """
    import torch

    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected an (n, H, W, 3) uint8 batch, got {tuple(batch.shape)} {batch.dtype}")
    mean = torch.tensor([m / cfg.rescale for m in cfg.mean], dtype=torch.float32, device=batch.device)
    scale = torch.tensor([cfg.rescale / s for s in cfg.std], dtype=torch.float32, device=batch.device)
    x = (batch.to(torch.float32) - mean).mul_(scale)
    return x.permute(0, 3, 1, 2).to(dtype=dtype, memory_format=torch.contiguous_format)
