"""LAION checkpoints: registry entries by hub id, and local directories in OpenCLIP's layout.

No LAION weights can be downloaded here, so the layouts are rebuilt with a tiny CLIP: a directory
with both layouts (as LAION's hub repositories are) must load through transformers and index; a
directory with only OpenCLIP's files must be refused in one line that says what to do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.errors import ModelUnavailable
from retrieval.hub import openclip_only_message
from retrieval.registry import find_encoder, list_encoders
from tests.helpers import ROOT, make_folder

runner = CliRunner()

#: What open_clip.push_to_hf_hub writes for ViT-B-32 (only the fields the message reads matter here).
OPENCLIP_B32 = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def test_the_registry_names_laion_checkpoints_at_three_sizes() -> None:
    laion = {s.name: s for s in list_encoders() if s.hub_id.startswith("laion/")}
    assert set(laion) == {"laion-vit-b-32", "laion-vit-b-16", "laion-vit-l-14"}
    assert {(s.patch_size, s.dim) for s in laion.values()} == {(32, 512), (16, 512), (14, 768)}
    assert all(s.family == "clip" for s in laion.values())
    spec = find_encoder("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert spec is not None and spec.name == "laion-vit-b-32"


def test_every_laion_entry_has_its_published_figures_in_the_docs() -> None:
    doc = (ROOT / "docs" / "EVAL.md").read_text(encoding="utf-8")
    for spec in list_encoders():
        if spec.hub_id.startswith("laion/"):
            assert spec.hub_id in doc and f"`{spec.name}`" in doc


def test_a_laion_hub_id_without_weights_says_how_to_get_them() -> None:
    with pytest.raises(ModelUnavailable, match="hf download laion/CLIP-ViT-B-16"):
        create_encoder(EncoderConfig(model="laion-vit-b-16", device="cpu"))


def _openclip_files(directory: Path, config: dict[str, object] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(config or OPENCLIP_B32))
    (directory / "open_clip_model.safetensors").write_bytes(b"\0" * 64)  # never read: refused before


def test_an_openclip_only_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    d = tmp_path / "ViT-B-32-laion"
    _openclip_files(d)
    with pytest.raises(ModelUnavailable) as info:
        create_encoder(EncoderConfig(model=str(d), device="cpu"))
    message = str(info.value)
    assert "\n" not in message and "OpenCLIP checkpoint" in message
    assert "--model laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message  # the twin of its architecture
    r = runner.invoke(
        app,
        [
            "index",
            str(make_folder(tmp_path / "imgs", 2)[0].parent),
            "--model",
            str(d),
            "--data-dir",
            str(tmp_path / "data"),
        ],
    )
    assert r.exit_code != 0 and "OpenCLIP checkpoint" in r.output + r.stderr
    assert "Traceback" not in r.output + r.stderr


@pytest.mark.parametrize(
    "config",
    [{"model_cfg": {"vision_cfg": {"patch_size": 7, "width": 3, "layers": 1}}}, {"nonsense": 1}, None],
)
def test_unknown_or_malformed_openclip_configs_still_get_the_how_to(tmp_path: Path, config: object) -> None:
    d = tmp_path / "oc"
    d.mkdir()
    if config is None:
        (d / "open_clip_config.json").write_text("{not json")
    else:
        (d / "open_clip_config.json").write_text(json.dumps(config))
    message = openclip_only_message(d)
    assert message is not None and "clearsight models" in message and "no weights" in message


def test_a_directory_with_both_layouts_loads_through_transformers_and_indexes(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    both = tmp_path / "CLIP-hub-layout"
    shutil.copytree(tiny_clip_dir, both)
    _openclip_files(both)
    assert openclip_only_message(both) is None
    images = make_folder(tmp_path / "imgs", 3)[0].parent
    r = runner.invoke(
        app, ["index", str(images), "--model", str(both), "--data-dir", str(tmp_path / "data"), "-q"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "a red circle", "--data-dir", str(tmp_path / "data"), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["results"]) == 3
