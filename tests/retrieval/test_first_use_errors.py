"""A newcomer's first hour, library side: model names that lead somewhere, readers that create nothing,
status that names failed files, and results that name their files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval import Collection, IngestConfig, Query, Searcher, hub
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.errors import ConfigError, IndexMissing, ModelUnavailable, NotEnoughData
from retrieval.ingest import ingest
from retrieval.registry import list_encoders
from retrieval.status import collection_status
from tests.helpers import make_folder

QUIET = IngestConfig(batch_size=4, workers=1, progress=False)


# -- model names -----------------------------------------------------------------------------------
def test_mistyped_registry_name_suggests_the_closest_and_no_download() -> None:
    with pytest.raises(ConfigError) as exc:
        create_encoder(EncoderConfig(model="clip-vit-b-99", device="cpu"))
    msg = str(exc.value)
    assert "did you mean clip-vit-b-32" in msg
    assert "download" not in msg and "\n" not in msg


def test_a_name_like_nothing_known_lists_the_registry() -> None:
    msg = hub.unknown_name("zzzz", [s.name for s in list_encoders()], "encoder")
    assert "did you mean" not in msg
    assert all(s.name in msg for s in list_encoders())


def test_close_names_are_case_insensitive_and_best_first() -> None:
    known = ["clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14"]
    assert hub.close_names("CLIP-VIT-B-32", known)[0] == "clip-vit-b-32"
    assert hub.close_names("clip-vit-b-33", known)[0] == "clip-vit-b-32"


def test_a_real_hub_id_gets_hf_download_advice() -> None:
    with pytest.raises(ModelUnavailable) as exc:
        create_encoder(EncoderConfig(model="clip-vit-b-32", device="cpu"))
    msg = str(exc.value)
    assert "hf download openai/clip-vit-base-patch32" in msg
    assert "huggingface-cli" not in msg  # not shipped by the huggingface_hub this project installs


def test_the_advised_command_exists_in_the_environment() -> None:
    import shutil
    import sys

    assert (Path(sys.executable).parent / "hf").exists() or shutil.which("hf")


def test_offline_mode_never_asks_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the hub was asked while HF_HUB_OFFLINE=1")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", boom)
    assert hub.offline_mode()
    assert hub.hub_has("openai/clip-vit-base-patch32") is False


def test_hub_probe_without_network_is_false_and_a_missing_repo_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # its import-time snapshot

    def no_network(*a: object, **k: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", no_network)
    assert hub.hub_has("openai/clip-vit-base-patch32") is False

    def not_found(*a: object, **k: object) -> None:
        import httpx2  # huggingface_hub's HTTP client

        url = "https://huggingface.co/api/models/someone/nothing-here"
        raise RepositoryNotFoundError(
            "404", response=httpx2.Response(404, request=httpx2.Request("GET", url))
        )

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", not_found)
    with pytest.raises(ModelUnavailable, match="no model 'someone/nothing-here'"):
        hub.hub_has("someone/nothing-here")


def test_cache_status_reads_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot laid out as huggingface_hub writes it counts as cached; config alone does not."""
    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text("{}")
    assert not hub.in_cache("someone/tiny")
    (snap / "model.safetensors").write_bytes(b"x")
    assert hub.in_cache("someone/tiny")
    assert not hub.in_cache("someone/other")


# -- readers create nothing --------------------------------------------------------------------------
def test_searcher_open_on_a_missing_data_dir_creates_nothing(tmp_path: Path, tiny_clip_dir: Path) -> None:
    ghost = tmp_path / "no" / "such"
    with pytest.raises(IndexMissing, match="no collection at") as exc:
        Searcher.open(ghost, model=str(tiny_clip_dir), device="cpu")
    assert "clearsight" not in str(exc.value) and "--" not in str(exc.value)  # library terms only
    assert not ghost.exists() and not (tmp_path / "no").exists()
    with pytest.raises(IndexMissing):
        collection_status(ghost)
    assert not (tmp_path / "no").exists()


def test_an_existing_empty_folder_is_not_a_collection(tmp_path: Path, tiny_clip_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexMissing):
        Searcher.open(tmp_path / "empty", model=str(tiny_clip_dir), device="cpu")
    assert list((tmp_path / "empty").iterdir()) == []


def test_indexing_an_empty_folder_says_so_and_searching_it_too(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("not an image")
    said: list[str] = []
    with Collection(tmp_path / "data") as col:
        s = ingest(tmp_path / "nothing", col, encoder, QUIET, log=said.append)
    assert s.scanned == 0
    assert any("no image files under" in m and "jpg" in m for m in said)
    searcher = Searcher.open(tmp_path / "data", encoder=encoder)
    with pytest.raises(NotEnoughData, match="holds no indexed images"):
        searcher.search(Query(text="a red square"))
    searcher.collection.close()


# -- status ------------------------------------------------------------------------------------------
def test_status_names_every_failed_file_with_its_reason(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    make_folder(root, 3)
    raw = (root / "img_0000.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    (root / "empty.png").write_bytes(b"")
    with Collection(tmp_path / "data") as col:
        ingest(root, col, encoder, IngestConfig(batch_size=4, workers=1, progress=False, factory="hnsw"))
    st = collection_status(tmp_path / "data")
    d = st.to_dict()
    json.dumps(d)  # the CLI prints it as is
    assert d["counts"] == {"pending": 0, "indexed": 3, "failed": 2}
    failed = {Path(f["path"]).name: f["reason"] for f in d["failed"]}
    assert set(failed) == {"truncated.jpg", "empty.png"} and all(failed.values())
    assert d["model"]["name"] == str(encoder.info.name)
    assert d["index"]["kind"] == "hnsw" and d["index"]["params"]["hnsw_m"] == 32
    assert d["index"]["params"]["ef_search"] > 0 and d["index"]["vectors"] == 3
    assert d["roots"] == [str(root)]
    assert collection_status(tmp_path / "data", failed_limit=1).failed_truncated
    with pytest.raises(ValueError):
        collection_status(tmp_path / "data", failed_limit=-1)


# -- results name their files -------------------------------------------------------------------------
def test_hits_carry_file_name_and_path_relative_to_the_indexed_folder(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    make_folder(root / "trip" / "day1", 2)
    make_folder(root, 2, start=5)
    (root / "captions.jsonl").write_text(
        json.dumps({"image": "trip/day1/img_0000.jpg", "captions": ["a red square"]}) + "\n"
    )
    with Collection(tmp_path / "data") as col:
        ingest(root, col, encoder, QUIET)
    s = Searcher.open(tmp_path / "data", encoder=encoder)
    hits = s.search(Query(text="a red square", top_k=4)).results
    rel = {h.relative_path for h in hits}
    assert rel == {"trip/day1/img_0000.jpg", "trip/day1/img_0001.jpg", "img_0005.jpg", "img_0006.jpg"}
    assert all(h.file_name == Path(h.path).name and h.to_dict()["file_name"] for h in hits)
    caps = s.search_captions(Query(text="a red square", top_k=1)).results
    assert caps[0].to_dict()["relative_path"] == "trip/day1/img_0000.jpg"
    s.collection.close()


def test_relative_path_prefers_the_deepest_root_and_falls_back_to_the_name(tmp_path: Path) -> None:
    with Collection(tmp_path / "data") as col:
        cat = col.catalog
        assert cat.relative_path("/x/y/z.jpg") == "z.jpg"  # nothing recorded: the file name
        cat.add_root("/x")
        cat.add_root("/x/y")
        cat.add_root("/x/y")  # recorded once
        assert cat.roots() == ["/x/y", "/x"]
        assert cat.relative_path("/x/y/z.jpg") == "z.jpg"
        assert cat.relative_path("/x/w/z.jpg") == "w/z.jpg"
        assert cat.relative_path("/xy/z.jpg") == "z.jpg"  # a sibling with a common prefix is not inside
        cat.set_meta("roots", "not json")
        assert cat.roots() == []
