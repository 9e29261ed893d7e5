"""The training recipes' building blocks: hard-negative batch order, grid positions, BLIP training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from explainer.captions.captioner import CaptionerConfig, GenerationSettings, create_captioner
from retrieval.errors import ConfigError
from retrieval.testing.blip import BlipRecipe, make_blip, train_blip
from retrieval.testing.synthetic import SyntheticConfig, generate_scenes, render_scene, write_scenes
from retrieval.testing.tiny import DEFAULT_WORDS, TinyArch, grid_position_table, make_clip
from retrieval.training.datasets import load_dataset
from retrieval.training.finetune import FinetuneConfig, epoch_order


def _words(n: int) -> list[frozenset[str]]:
    scenes = generate_scenes(SyntheticConfig(n_train=n, n_val=0, n_test=0, seed=3))
    return [frozenset(s.captions[0].split()) for s in scenes]


def test_hard_batches_keep_every_item_once_and_gather_near_captions() -> None:
    words = _words(320)
    rng = np.random.default_rng(0)
    order = epoch_order(words, 32, 0.5, rng)
    assert sorted(order.tolist()) == list(range(320))
    shared_hard, shared_random = [], []
    for b in range(0, 320, 32):
        batch = order[b : b + 32]
        anchor = words[int(batch[0])]
        gathered = [words[int(i)] for i in batch[1:16]]
        assert anchor not in gathered and len(set(gathered)) == len(gathered)  # no false negatives
        shared_hard.append(np.mean([len(anchor & w) for w in gathered]))
        shared_random.append(np.mean([len(anchor & words[int(i)]) for i in rng.permutation(320)[:15]]))
    assert np.mean(shared_hard) > np.mean(shared_random) + 1  # nearer than chance by more than a word


def test_no_hard_fraction_is_a_plain_shuffle() -> None:
    words = _words(64)
    a = epoch_order(words, 16, 0.0, np.random.default_rng(5))
    b = np.random.default_rng(5).permutation(64)
    assert a.tolist() == b.tolist()
    with pytest.raises(ConfigError, match="hard_fraction"):
        FinetuneConfig(hard_fraction=1.5)


def test_grid_positions_start_distinct_and_smooth(tmp_path: Path) -> None:
    table = grid_position_table(4, 64)
    assert table.shape == (17, 64) and torch.all(table[0] == 0)
    patches = table[1:]
    distances = torch.cdist(patches, patches)
    assert torch.all(distances + torch.eye(16) * 99 > 1e-3)  # every patch has its own vector
    assert distances[0, 1] < distances[0, 3]  # neighbours are nearer than far patches
    path = make_clip(tmp_path / "clip", TinyArch(image_size=32, patch_size=8, grid_positions=True))
    from transformers import CLIPModel

    weight = CLIPModel.from_pretrained(str(path)).vision_model.embeddings.position_embedding.weight
    assert torch.allclose(weight, table)
    with pytest.raises(ConfigError, match="divisible by 4"):
        grid_position_table(3, 30)


@pytest.mark.slow
def test_blip_training_lowers_the_loss_and_loads_as_a_captioner(tmp_path: Path) -> None:
    jsonl = write_scenes(
        SyntheticConfig(n_train=48, n_val=0, n_test=0, seed=0), tmp_path / "scenes", progress=False
    )
    items = load_dataset("jsonl", jsonl, jsonl.parent, "train").items
    model = make_blip(tmp_path / "blip", "demo", words=DEFAULT_WORDS, seed=0)
    result = train_blip(model, items, BlipRecipe(steps=40, batch_size=16, warmup=5))
    assert result.steps == 40 and result.last_loss < result.first_loss / 2
    captioner = create_captioner(
        CaptionerConfig(model=str(model), device="cpu", generation=GenerationSettings(max_new_tokens=12))
    )
    try:
        scene = generate_scenes(SyntheticConfig(n_train=1, n_val=0, n_test=0, seed=0))[0]
        caption = captioner.caption([render_scene(scene)])[0]
    finally:
        captioner.close()
    words = caption.split()
    assert words and set(words) <= set(DEFAULT_WORDS) | {"photography"}  # the scenes' language


def test_blip_recipe_is_validated() -> None:
    with pytest.raises(ConfigError):
        BlipRecipe(steps=0)
    with pytest.raises(ConfigError):
        BlipRecipe(lr=0)
