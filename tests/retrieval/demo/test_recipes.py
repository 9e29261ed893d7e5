"""The training recipes' building blocks: grid positions and BLIP training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from explainer.captions.captioner import CaptionerConfig, GenerationSettings, create_captioner
from retrieval.demo.blip import BlipRecipe, make_blip, train_blip
from retrieval.demo.synthetic import SyntheticConfig, generate_scenes, render_scene, write_scenes
from retrieval.demo.tiny import DEFAULT_WORDS, TinyArch, grid_position_table, make_clip
from retrieval.errors import ConfigError
from retrieval.training.datasets import load_dataset


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
