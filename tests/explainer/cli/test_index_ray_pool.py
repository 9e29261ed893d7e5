"""`clearsight index --engine ray` stops the actors it started when the run fails before ingest takes them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from explainer.cli.index import index_folder
from retrieval.distributed import ingest as ray_ingest_module
from retrieval.errors import ConfigError
from tests.helpers import make_folder


class FakePool:
    started: ClassVar[list[FakePool]] = []

    def __init__(self, cfg: object, encoder_config: object) -> None:
        self.closed = 0
        FakePool.started.append(self)

    def close(self) -> None:
        self.closed += 1


class NoPatchEncoder:
    """A driver encoder of a family without patch embeddings (what `--patches` refuses)."""

    supports_patches = False
    info = SimpleNamespace(family="siglip")


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> list[FakePool]:
    FakePool.started = []
    monkeypatch.setattr(ray_ingest_module, "EncoderPool", FakePool)
    return FakePool.started


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    make_folder(tmp_path / "photos", 2)
    return tmp_path / "photos"


def test_a_refused_patches_run_stops_the_actors(
    tmp_path: Path, photos: Path, fake_ray: list[FakePool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_ingest_module, "driver_encoder", lambda pool, col, cfg: NoPatchEncoder())
    with pytest.raises(ConfigError, match="--patches"):
        index_folder(photos, tmp_path / "data", engine="ray", patches=True, progress=False)
    assert len(fake_ray) == 1 and fake_ray[0].closed == 1


def test_a_driver_that_cannot_load_stops_the_actors(
    tmp_path: Path, photos: Path, fake_ray: list[FakePool], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(pool: object, col: object, cfg: object) -> object:
        raise ConfigError("the actors could not load the model")

    monkeypatch.setattr(ray_ingest_module, "driver_encoder", broken)
    with pytest.raises(ConfigError, match="could not load"):
        index_folder(photos, tmp_path / "data", engine="ray", progress=False)
    assert len(fake_ray) == 1 and fake_ray[0].closed == 1


def test_ray_ingest_gets_the_pool_and_the_command_does_not_close_it_twice(
    tmp_path: Path, photos: Path, fake_ray: list[FakePool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_ingest_module, "driver_encoder", lambda pool, col, cfg: NoPatchEncoder())
    seen: list[object] = []

    def fake_ingest(*args: object, pool: FakePool, **kwargs: object) -> object:
        seen.append(pool)
        pool.close()  # as ray_ingest does when it ends
        raise RuntimeError("stop after the hand-over")

    monkeypatch.setattr(ray_ingest_module, "ray_ingest", fake_ingest)
    with pytest.raises(RuntimeError, match="hand-over"):
        index_folder(photos, tmp_path / "data", engine="ray", progress=False)
    assert seen == fake_ray and fake_ray[0].closed == 1
