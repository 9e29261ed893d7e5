"""The search box's example fits the collection (issue 23): a user's photos are not coloured shapes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from explainer.server import create_app
from retrieval.demo.tiny import make_clip
from retrieval.paths import DEMO_MODEL_PREFIX
from tests.server_kit import build_collection, server_settings

SHAPES = "a red circle in the top left"


def _placeholder(data: Path, tmp: Path) -> str:
    with TestClient(create_app(server_settings(data, tmp))) as client:
        page = client.get("/")
    assert page.status_code == 200
    found = re.search(r'id="q"[^>]*placeholder="([^"]*)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


@pytest.mark.parametrize("demo", [False, True])
def test_the_example_query_fits_the_collection(tmp_path: Path, demo: bool) -> None:
    name = f"{DEMO_MODEL_PREFIX}clip" if demo else "my-clip"
    data = build_collection(tmp_path, make_clip(tmp_path / name, "tiny", seed=0), n=6)
    text = _placeholder(data, tmp_path)
    assert (SHAPES in text) == demo
    assert demo or "a dog on the beach" in text
