"""Caption precision and batching: what `auto` picks per device (the CPU's flags faked, so the answer does
not depend on the machine running the suite), how big a batch each device gets, the next batch prepared
while one generates, and bf16 and int8 agreeing with fp32 on the demo's captioner, which was really trained.

Agreement on random weights proves nothing (every caption is noise), so the demo's recipe trains a BLIP
on the synthetic scenes and its held-out scenes are captioned in each precision: the share of captions
true of their scene (`synthetic.caption_holds`) must stay within 3 points of fp32's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from explainer.captions.captioner import (
    AUTO_PLAIN_CPU,
    CPU_BATCH,
    CaptionerConfig,
    GenerationSettings,
    auto_batch_size,
    caption_precision,
    create_captioner,
    prefetch,
)
from explainer.errors import ConfigError
from retrieval.demo.blip import BlipRecipe
from retrieval.demo.recipes import DEMO_SCENES, train_scene_captioner
from retrieval.demo.synthetic import Scene, caption_holds, generate_scenes, write_scenes
from retrieval.encoders import base as encoder_base

GIB = 1024**3


@pytest.fixture()
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_base, "cpu_has_native_bf16", lambda: True)


@pytest.fixture()
def plain_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_base, "cpu_has_native_bf16", lambda: False)


def test_auto_on_a_cpu_with_native_bf16_is_bf16(bf16_cpu: None) -> None:
    assert caption_precision("cpu") == caption_precision("cpu", "auto") == "bf16"
    assert caption_precision("cuda:0", "auto") == "fp16"
    assert caption_precision("cpu", "fp32") == "fp32"  # an explicit choice always wins
    assert caption_precision("cpu", "int8") == "int8"


def test_auto_on_a_plain_cpu_is_the_measured_fastest_that_agrees(plain_cpu: None) -> None:
    assert caption_precision("cpu", None) == AUTO_PLAIN_CPU == "int8"  # never emulated bf16, 3-4x slower
    assert caption_precision("cpu", "auto", width=768) == "int8"  # BLIP-base
    assert caption_precision("cpu", "auto", width=64) == "fp32"  # too narrow for int8 to pay


@pytest.mark.parametrize("bad", ["fp8", "int4", "float32"])
def test_unknown_caption_precisions_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="unknown caption precision"):
        caption_precision("cpu", bad)


def test_int8_is_refused_on_a_gpu() -> None:
    with pytest.raises(ConfigError, match="CPU only"):
        caption_precision("cuda", "int8")


@pytest.mark.parametrize(
    ("device", "memory", "batch"),
    [
        ("cpu", None, CPU_BATCH),
        ("cuda", 16 * GIB, 8),
        ("cuda:1", 40 * GIB, 16),
        ("cuda", 80 * GIB, 32),
        ("cuda", 139 * GIB, 64),
        ("cuda", 1024 * GIB, 128),
    ],
)
def test_the_batch_grows_with_the_device(device: str, memory: int | None, batch: int) -> None:
    assert auto_batch_size(device, memory) == batch


def test_an_explicit_batch_size_wins_and_bad_ones_are_refused() -> None:
    assert CaptionerConfig(batch_size=3).resolved_batch_size() == 3
    assert CaptionerConfig(device="cpu").resolved_batch_size() == CPU_BATCH
    with pytest.raises(ConfigError, match="batch size"):
        CaptionerConfig(batch_size=0)


def test_prefetch_prepares_the_next_batch_while_the_current_one_is_used() -> None:
    started: dict[int, threading.Event] = {i: threading.Event() for i in range(4)}

    def prepare(i: int) -> int:
        started[i].set()
        return i * 10

    got = []
    for value in prefetch(range(4), prepare):
        i = value // 10
        if i + 1 < 4:
            # the consumer has not asked for item i+1, yet it is being prepared already
            assert started[i + 1].wait(30), f"item {i + 1} was not prepared while item {i} was in use"
        got.append(value)
    assert got == [0, 10, 20, 30]


def test_prefetch_raises_an_error_where_its_item_would_come() -> None:
    def prepare(i: int) -> int:
        if i == 2:
            raise ValueError("bad batch")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad batch"):
        for v in prefetch(range(4), prepare):
            seen.append(v)
    assert seen == [0, 1]


# -- agreement on a trained captioner -------------------------------------------------------------

#: The demo's scenes with a third of the training set, and half the demo's steps: 35% of captions true
#: after 500 steps (retrieval/demo/recipes.py), enough for a 3-point tolerance to mean something.
SCENES = replace(DEMO_SCENES, n_train=800, n_val=20, n_test=200)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Scene], Path]]:
    root = tmp_path_factory.mktemp("caption-precision")
    jsonl = write_scenes(SCENES, root / "scenes", progress=False)
    model = root / "blip"
    train_scene_captioner(jsonl, model, BlipRecipe(steps=500))
    yield model, [s for s in generate_scenes(SCENES) if s.split == "test"], root / "scenes"


def _true_share(model: Path, scenes: list[Scene], root: Path, precision: str) -> float:
    cfg = CaptionerConfig(
        model=str(model), device="cpu", precision=precision, batch_size=32, generation=GenerationSettings()
    )
    cap = create_captioner(cfg)
    try:
        images = [Image.open(root / s.path).convert("RGB") for s in scenes]
        texts = cap.caption(images)
    finally:
        cap.close()
    return sum(caption_holds(t, s) for t, s in zip(texts, scenes, strict=True)) / len(scenes)


def test_bf16_and_int8_agree_with_fp32_on_the_trained_captioner(
    trained: tuple[Path, list[Scene], Path],
) -> None:
    model, scenes, root = trained
    shares = {p: _true_share(model, scenes, root, p) for p in ("fp32", "bf16", "int8")}
    print(
        f"\ntrue captions of {len(scenes)} held-out scenes: "
        + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
    )
    assert shares["fp32"] >= 0.2  # the captioner learned something: otherwise agreement means nothing
    assert abs(shares["bf16"] - shares["fp32"]) <= 0.03
    assert abs(shares["int8"] - shares["fp32"]) <= 0.03


def test_the_captioner_runs_in_the_precision_auto_picks(
    trained: tuple[Path, list[Scene], Path], plain_cpu: None
) -> None:
    model, _, _ = trained
    cap = create_captioner(CaptionerConfig(model=str(model), device="cpu", precision="auto"))
    try:
        assert getattr(cap, "precision", None) == "fp32"  # the demo's BLIP is 64 wide: int8 would not pay
    finally:
        cap.close()
