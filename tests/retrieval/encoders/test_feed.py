"""The uint8 hand-over: crops made by decode workers plus normalisation on the device give the model the
same input as the float path, batches are sized from the device, and staging runs ahead in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from retrieval.encoders import Encoder
from retrieval.encoders.base import FeedEncoder
from retrieval.encoders.feed import (
    CPU_BATCH,
    GPU_BATCH_MAX,
    GPU_BATCH_MIN,
    DeviceFeed,
    auto_batch_size,
    prefetch_depth,
    prefetched,
)
from retrieval.encoders.preprocess import PreprocessConfig, normalise, preprocess_one, preprocess_uint8
from retrieval.errors import BadQuery

CLIP = PreprocessConfig(
    224,
    None,
    (224, 224),
    3,
    1 / 255,
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour, shapes and noise: resampling differences show on it as on a photo."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse((x, y, x + w // 4, y + h // 4), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(im, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def as_model_input(u8: np.ndarray, cfg: PreprocessConfig = CLIP) -> np.ndarray:
    return normalise(torch.from_numpy(np.ascontiguousarray(u8)), cfg, torch.float32).numpy()


def test_normalising_uint8_on_the_device_is_the_float_path_when_no_resampling_happens() -> None:
    im = photo(224, 224)
    u8 = preprocess_uint8(im, CLIP)
    assert u8.dtype == np.uint8 and u8.shape == (224, 224, 3)
    np.testing.assert_allclose(as_model_input(u8[None])[0], preprocess_one(im, CLIP), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (640, 427), (300, 300), (225, 500)])
def test_cropping_before_resizing_gives_the_float_paths_pixels_within_resampling_rounding(
    size: tuple[int, int],
) -> None:
    im = photo(*size, seed=size[0])
    got = as_model_input(preprocess_uint8(im, CLIP)[None])[0]
    want = preprocess_one(im, CLIP)
    levels = np.abs(got - want) * np.asarray(CLIP.std, np.float32)[:, None, None] * 255  # back to 0..255
    assert got.shape == want.shape
    assert levels.mean() < 0.5, levels.mean()  # the same image: rounding, not a shift or a blur
    assert (levels > 2.5).mean() < 0.005  # a rare pixel at a clipped overshoot may differ more


def test_images_smaller_than_the_crop_are_padded_like_the_float_path() -> None:
    pads = PreprocessConfig(None, None, (64, 64), 3, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    im = photo(40, 30)
    np.testing.assert_allclose(
        as_model_input(preprocess_uint8(im, pads)[None], pads)[0], preprocess_one(im, pads), atol=1e-6
    )


def test_normalise_refuses_what_is_not_an_nhwc_uint8_batch() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalise(torch.zeros((1, 3, 8, 8), dtype=torch.uint8), CLIP, torch.float32)
    with pytest.raises(ValueError, match="uint8"):
        normalise(torch.zeros((1, 8, 8, 3), dtype=torch.float32), CLIP, torch.float32)


def test_cpu_feed_reuses_its_buffers_and_gives_normalise_s_result() -> None:
    feed = DeviceFeed("cpu", torch.float32, CLIP)
    a = np.stack([preprocess_uint8(photo(300, 240, s), CLIP) for s in range(3)])
    first = feed.stage(a).tensor.clone()
    second = feed.stage(a[::-1].copy()).tensor
    np.testing.assert_array_equal(first.numpy(), as_model_input(a))
    np.testing.assert_array_equal(second.numpy(), as_model_input(a[::-1].copy()))
    bf16 = DeviceFeed("cpu", torch.bfloat16, CLIP).stage(a).tensor
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, torch.from_numpy(as_model_input(a)).to(torch.bfloat16))


def test_the_encoder_encodes_uint8_batches_as_it_encodes_float_ones(encoder: Encoder) -> None:
    assert isinstance(encoder, FeedEncoder)
    images = [photo(90 + 10 * i, 70, seed=i) for i in range(5)]
    u8 = np.stack([encoder.preprocess_uint8(im) for im in images])
    got = encoder.encode_staged(encoder.stage(u8))
    want = encoder.encode_pixels(encoder.preprocess(images))
    assert got.shape == want.shape
    assert float((got * want).sum(axis=1).min()) > 0.999


@pytest.mark.parametrize("surgery", [True, False])
def test_one_pass_gives_the_embeddings_and_the_patch_features_of_two(encoder: Encoder, surgery: bool) -> None:
    """Indexing stores patch features from the pass that makes the embeddings: the same numbers as
    `encode_staged` and `patch_embeddings` on the same input (fp32, pinned by the fixture)."""
    assert isinstance(encoder, FeedEncoder)
    images = [photo(90 + 10 * i, 70, seed=i) for i in range(4)]
    u8 = np.stack([encoder.preprocess_uint8(im) for im in images])
    vecs, patches = encoder.encode_staged_with_patches(encoder.stage(u8), surgery=surgery)  # type: ignore[attr-defined]
    np.testing.assert_allclose(vecs, encoder.encode_staged(encoder.stage(u8)), atol=1e-5)
    side = encoder.info.image_size // encoder.info.patch_size
    assert patches.shape == (4, side, side, encoder.info.dim)
    want = encoder.patch_embeddings(as_model_input(u8, encoder.pre), surgery=surgery)  # type: ignore[attr-defined]
    np.testing.assert_allclose(patches, want, atol=1e-5)
    empty_vecs, empty_patches = encoder.encode_staged_with_patches(encoder.stage(u8[:0]))  # type: ignore[attr-defined]
    assert empty_vecs.shape == (0, encoder.info.dim) and empty_patches.shape == (
        0,
        side,
        side,
        encoder.info.dim,
    )


def test_the_encoder_refuses_a_float_or_mis_sized_uint8_batch(encoder: Encoder) -> None:
    assert isinstance(encoder, FeedEncoder)
    h, w = encoder.pre.output_hw
    with pytest.raises(BadQuery, match="preprocess_uint8"):
        encoder.stage(np.zeros((2, h, w, 3), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(BadQuery, match="preprocess_uint8"):
        encoder.stage(np.zeros((2, h + 1, w, 3), dtype=np.uint8))
    with pytest.raises(BadQuery, match="preprocess_uint8"):
        encoder.stage(np.zeros((2, 3, h, w), dtype=np.uint8))


def test_prefetch_stages_the_next_batch_before_encoding_the_current_one() -> None:
    calls: list[str] = []

    def stage(b: int) -> int:
        calls.append(f"stage {b}")
        return b * 10

    def encode(s: int) -> int:
        calls.append(f"encode {s // 10}")
        return s + 1

    out = list(prefetched([1, 2, 3], stage, encode, depth=1))
    assert out == [(1, 11), (2, 21), (3, 31)]
    assert calls == ["stage 1", "stage 2", "encode 1", "stage 3", "encode 2", "encode 3"]
    calls.clear()
    assert [b for b, _ in prefetched([1, 2], stage, encode, depth=0)] == [1, 2]
    assert calls == ["stage 1", "encode 1", "stage 2", "encode 2"]
    assert list(prefetched([], stage, encode, depth=1)) == []
    with pytest.raises(ValueError, match="depth"):
        list(prefetched([1], stage, encode, depth=-1))


def test_prefetch_depth_follows_the_device() -> None:
    assert prefetch_depth("cuda") == 1 and prefetch_depth("cuda:1") == 1
    assert prefetch_depth("cpu") == 0 and prefetch_depth("mps") == 0


def test_auto_batch_size_is_fixed_on_a_cpu_and_grows_with_free_gpu_memory() -> None:
    assert auto_batch_size("cpu", 224, 32, 768, None) == CPU_BATCH
    assert auto_batch_size("mps", 224, 32, 768, None) == CPU_BATCH
    sizes = [auto_batch_size("cuda", 224, 32, 768, gib << 30) for gib in (0, 1, 4, 16, 80)]
    assert sizes == sorted(sizes)
    assert sizes[0] == GPU_BATCH_MIN and sizes[-1] == GPU_BATCH_MAX
    assert all(s & (s - 1) == 0 for s in sizes)  # powers of two
    # a larger model (ViT-L/14 at 336 px: 577 tokens, width 1024) gets a smaller batch from the same memory
    assert auto_batch_size("cuda", 336, 14, 1024, 4 << 30) < auto_batch_size("cuda", 224, 32, 768, 4 << 30)


def test_ingest_batch_size_on_the_cpu(encoder: Encoder) -> None:
    assert isinstance(encoder, FeedEncoder)
    assert encoder.ingest_batch_size() == CPU_BATCH
