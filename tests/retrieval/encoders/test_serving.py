"""The stored text tower (NumPy) against the transformers reference, and the encoder that loads lazily."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.encoders import texttower
from retrieval.encoders.serving import ServingEncoder

TEXTS = ["a red circle in the top left", "A  BLUE square!", "", "a green triangle " * 40]


@pytest.fixture
def stored(tmp_path: Path, encoder) -> Path:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    data.mkdir()
    texttower.export(
        encoder.model, encoder.tokenizer, encoder.info, texttower.tower_dir(data, encoder.info.fingerprint)
    )
    return data


def test_tower_matches_transformers_at_fp32(encoder, stored: Path) -> None:  # type: ignore[no-untyped-def]
    tower = texttower.TextTower.open(texttower.tower_dir(stored, encoder.info.fingerprint))
    assert tower is not None and tower.info == encoder.info
    for text in TEXTS:  # the same tokens, truncation included
        assert tower.token_ids(text) == encoder.tokenize([text])["input_ids"][0].tolist()
    np.testing.assert_allclose(tower.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=2e-5)
    assert tower.encode_texts([]).shape == (0, encoder.info.dim)


def test_serving_encoder_answers_texts_without_loading_the_model(encoder, tiny_clip_dir, stored) -> None:  # type: ignore[no-untyped-def]
    served = ServingEncoder(str(tiny_clip_dir), stored, precision="fp32")
    assert not served.loaded and served.info == encoder.info and served.supports_patches
    np.testing.assert_allclose(served.encode_texts(TEXTS[:2]), encoder.encode_texts(TEXTS[:2]), atol=2e-5)
    assert not served.loaded
    image = Image.new("RGB", (40, 30), "red")
    np.testing.assert_allclose(served.encode_images([image]), encoder.encode_images([image]), atol=1e-5)
    assert served.loaded  # images need the full model; texts keep the stored tower's one path
    tower = texttower.TextTower.open(texttower.tower_dir(stored, encoder.info.fingerprint))
    assert tower is not None
    np.testing.assert_array_equal(served.encode_texts(TEXTS[:1]), tower.encode_texts(TEXTS[:1]))
    served.close()


def test_first_load_stores_the_tower_and_other_weights_ignore_it(
    tmp_path, tiny_clip_dir, other_clip_dir
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    data.mkdir()
    first = ServingEncoder(str(tiny_clip_dir), data, precision="fp32")
    assert first.loaded  # nothing stored yet: the model is loaded, and its tower written
    assert texttower.read_meta(texttower.tower_dir(data, first.info.fingerprint)) is not None
    first.close()
    assert not ServingEncoder(str(tiny_clip_dir), data, precision="fp32").loaded
    other = ServingEncoder(str(other_clip_dir), data, precision="fp32")
    assert other.loaded and other.info.fingerprint != first.info.fingerprint  # never the old weights
    other.close()


def test_a_damaged_tower_is_ignored(encoder, tiny_clip_dir, stored: Path) -> None:  # type: ignore[no-untyped-def]
    folder = texttower.tower_dir(stored, encoder.info.fingerprint)
    weights = folder / texttower.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    assert texttower.TextTower.open(folder) is None
    (folder / texttower.META).write_text("{not json")
    assert texttower.read_meta(folder) is None
    (folder / texttower.META).write_text(json.dumps({"format": texttower.FORMAT + 1}))
    assert texttower.read_meta(folder) is None
    served = ServingEncoder(str(tiny_clip_dir), stored, precision="fp32")
    assert served.loaded  # the model is still there: the tower is a cache
    served.close()


def test_only_clip_towers_with_known_activations_are_exported(encoder) -> None:  # type: ignore[no-untyped-def]
    assert texttower.exportable(encoder.model)
    act = encoder.model.config.text_config.hidden_act
    try:
        encoder.model.config.text_config.hidden_act = "gelu"  # exact erf GELU: not implemented here
        assert not texttower.exportable(encoder.model)
    finally:
        encoder.model.config.text_config.hidden_act = act
    assert not texttower.exportable(object())


def _modules_after(args: list[str]) -> dict[str, object]:
    """Run `clearsight ARGS` in a fresh interpreter; which heavy modules it imported, and its exit code."""
    probe = (
        "import sys\nfrom explainer.cli.app import main\nsys.argv = ['clearsight', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "heavy = ('torch', 'transformers', 'langchain_core', 'fastapi', 'explainer.server')\n"
        "import json\nloaded = [m for m in heavy if m in sys.modules]\n"
        "print('\\nMODULES ' + json.dumps({'code': code, 'loaded': loaded}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300)
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return json.loads(line.removeprefix("MODULES "))  # type: ignore[no-any-return]


def test_text_search_and_a_rescan_import_no_model_stack(tmp_path, tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (48, 40), colour).save(photos / f"{i}.png")
    data = tmp_path / "data"
    first = _modules_after(
        ["index", str(photos), "--model", str(tiny_clip_dir), "--data-dir", str(data), "--quiet"]
    )
    assert first["code"] == 0 and "torch" in first["loaded"]  # something to encode: the model loads
    again = _modules_after(["index", str(photos), "--data-dir", str(data), "--quiet"])
    assert again == {"code": 0, "loaded": []}
    search = _modules_after(["search", "a red square", "--data-dir", str(data), "--json"])
    assert search == {"code": 0, "loaded": []}


def test_a_searcher_opened_on_a_collection_warms_up_without_leaving_a_trace(tmp_path, tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    from retrieval.search import Query, Searcher
    from tests.helpers import index_shapes

    _, data, _ = index_shapes(tmp_path, tiny_clip_dir, 6)
    searcher = Searcher.open(data, precision="fp32")
    try:
        assert isinstance(searcher.encoder, ServingEncoder) and not searcher.encoder.loaded
        searcher.warm_up()
        assert searcher._calibrations  # the calibration is fitted before the first query asks for it
        assert len(searcher.cache.results) == 0 and len(searcher.cache.vectors) == 0
        assert not searcher.encoder.loaded  # a text query needs no image tower
        assert searcher.search(Query(text="a red circle", top_k=3)).results
    finally:
        searcher.close()
