"""The fine-tune guard judges on rsum and mean rank and treats a loss at ln(batch) as collapse, so a
collapsed model is refused even from a chance-level start (where one lucky R@1 used to let it through)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from retrieval.demo.synthetic import SyntheticConfig, write_scenes
from retrieval.demo.tiny import make_clip
from retrieval.training.datasets import load_dataset
from retrieval.training.finetune import (
    HISTORY_FILE,
    PLOT_FILE,
    FinetuneRefused,
    _better,
    _key,
    finetune,
    is_collapsed,
    side_by_side,
)
from retrieval.training.types import FinetuneConfig


def _summary(t2i_r1: float, rsum: float, mean_rank: float) -> dict[str, float]:
    return {"t2i_r1": t2i_r1, "i2t_r1": 0.0, "rsum": rsum, "mean_rank": mean_rank}


def test_loss_at_or_above_ln_batch_is_collapse() -> None:
    assert is_collapsed(math.log(64), 64)
    assert is_collapsed(math.log(64) * 0.99, 64)
    assert is_collapsed(math.log(64) + 2.0, 64)  # worse than guessing learned nothing either
    assert not is_collapsed(math.log(64) * 0.9, 64)
    assert not is_collapsed(None, 64) and not is_collapsed(0.1, 1)


def test_rsum_decides_not_one_lucky_r1() -> None:
    start = _summary(t2i_r1=4 / 795, rsum=60.0, mean_rank=300.0)
    lucky = _summary(t2i_r1=5 / 795, rsum=40.0, mean_rank=390.0)
    assert _key(lucky) < _key(start)
    same_rsum = _summary(t2i_r1=0.0, rsum=60.0, mean_rank=250.0)
    assert _key(same_rsum) > _key(start)  # mean rank breaks the tie, lower is better


def test_an_epoch_that_learned_beats_a_collapsed_one() -> None:
    good, great = _summary(0.1, 50.0, 20.0), _summary(0.2, 90.0, 10.0)
    assert _better(good, False, great, True)
    assert not _better(great, True, good, False)
    assert _better(great, False, good, False)
    assert "mean rank" in side_by_side(good, great)


@pytest.fixture(scope="module")
def chance_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("guard")
    start = make_clip(root / "start", "tiny", seed=0)  # random weights: retrieval at chance
    jsonl = write_scenes(SyntheticConfig(n_train=256, n_val=64, n_test=0, image_size=64, seed=2), root / "d")
    return start, jsonl


def test_a_collapsed_run_from_a_chance_level_start_is_refused_unless_forced(
    chance_start: tuple[Path, Path], tmp_path: Path
) -> None:
    """lr 1.0 drives the loss to ln(batch) (measured 3.558 then 3.466 = ln 32); text→image R@1 still went
    up by luck (1.2% -> 1.6%), which the old R@1-first guard took as an improvement and wrote."""
    start, jsonl = chance_start
    train, val = (load_dataset("jsonl", jsonl, jsonl.parent, s) for s in ("train", "val"))
    config = FinetuneConfig(epochs=2, lr=1.0, batch_size=32, warmup=0, threads=1, progress=False)
    said: list[str] = []
    with pytest.raises(FinetuneRefused, match=r"collapsed.*ln\(batch\) = 3\.466") as exc:
        finetune(str(start), train, val, tmp_path / "out", config, log=said.append)
    result = exc.value.result
    assert result.best_collapsed and all(e.collapsed for e in result.history)
    assert not (tmp_path / "out").exists()
    # one line per epoch, the start included, with its validation figures
    assert [line.split(":")[0] for line in said] == ["epoch 0 (start)", "epoch 1/2", "epoch 2/2"]
    assert all("rsum" in line and "R@1" in line for line in said)

    from dataclasses import replace

    forced = finetune(str(start), train, val, tmp_path / "out", replace(config, force=True))
    assert forced.written and any("collapsed (force)" in n for n in forced.notes)
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert history["best_collapsed"] and history["chance_loss"] == pytest.approx(math.log(32))
    assert (tmp_path / "out" / PLOT_FILE).read_bytes().startswith(b"\x89PNG")
