"""The walk of a real photo library: hidden and NAS thumbnail folders, excludes, links, every skip counted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from retrieval import Collection, IngestConfig, folders
from retrieval.errors import ConfigError
from retrieval.folders import Skips, WalkRules, check_excludes, walk
from retrieval.ingest import ingest
from retrieval.status import collection_status
from tests.helpers import draw_shape

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)


def _listed(root: Path, rules: WalkRules | None = None) -> tuple[list[str], Skips]:
    skips = Skips()
    found = [os.path.relpath(f.path, root) for f in walk(root, rules, skips) if f.error is None]
    return found, skips


def _library(tmp_path: Path) -> Path:
    """A NAS-like library: thumbnails beside the photos, trash, OS litter, a folder linked into another."""
    root = tmp_path / "photos"
    draw_shape(root / "2023" / "IMG_0100.jpg", 1)
    draw_shape(root / "2024" / "IMG_0001.jpg", 2)
    draw_shape(root / "2024" / "IMG_0002.heic.jpg", 3)
    draw_shape(root / "@eaDir" / "IMG_0001.jpg" / "SYNOPHOTO_THUMB_XL.jpg", 2)
    draw_shape(root / "2024" / "@eaDir" / "IMG_0001.jpg" / "SYNOPHOTO_THUMB_M.jpg", 2)
    draw_shape(root / ".thumbnails" / "normal" / "abc.png", 2, fmt="PNG")
    draw_shape(root / ".Trash-1000" / "files" / "old.jpg", 4)
    draw_shape(root / ".hidden.jpg", 5)
    draw_shape(root / "2024" / "._IMG_0001.jpg", 2)  # AppleDouble
    (root / "2024" / "Thumbs.db").write_bytes(b"\x00" * 16)
    (root / "2024" / ".DS_Store").write_bytes(b"\x00" * 16)
    (root / "2024" / "clip.MOV").write_bytes(b"\x00" * 16)
    (root / "2024" / "raw.cr2").write_bytes(b"\x00" * 16)
    (root / "2024" / "IMG_0001.xmp").write_text("<x/>")
    (root / "2023" / "link2024").symlink_to("../2024")  # the case: must not replace 2024/
    (root / "2023" / "alias.jpg").symlink_to("../2024/IMG_0001.jpg")
    os.link(root / "2024" / "IMG_0001.jpg", root / "2024" / "zz_hardlink.jpg")
    (root / "2024" / "again").symlink_to("..")  # a loop back to the indexed folder
    (root / "up").symlink_to(tmp_path)  # a folder that holds the indexed one
    return root


def test_a_real_library_lists_each_photo_once_under_its_real_path(tmp_path: Path) -> None:
    root = _library(tmp_path)
    found, skips = _listed(root)
    assert found == ["2023/IMG_0100.jpg", "2024/IMG_0001.jpg", "2024/IMG_0002.heic.jpg"]
    assert skips.files == {
        "hidden": 1,  # .hidden.jpg
        "thumbnails or system": 3,  # ._IMG_0001.jpg, Thumbs.db, .DS_Store
        "unsupported format": 2,
        "sidecar or metadata": 1,
        "duplicate link": 2,  # alias.jpg, the hard link
    }
    assert skips.unsupported_types == {".mov": 1, ".cr2": 1}
    assert skips.folders == {
        "thumbnails or system": 4,  # two @eaDir, .thumbnails, .Trash-1000
        "duplicate link": 1,  # 2023/link2024
        "link loop": 2,  # 2024/again (the indexed folder itself), up (holds it)
    }
    assert skips.linked_targets == []


def test_the_real_folder_wins_whatever_the_name_order(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    draw_shape(root / "b-real" / "IMG_0001.jpg", 1)
    (root / "a-link").symlink_to("b-real")  # sorts first, as the 2023/link2024 does
    found, skips = _listed(root)
    assert found == ["b-real/IMG_0001.jpg"] and skips.folders == {"duplicate link": 1}


def test_a_root_named_through_a_link_keeps_its_name(tmp_path: Path) -> None:
    real = tmp_path / "real"
    draw_shape(real / "x" / "a.jpg", 1)
    (real / "x-again").symlink_to("x")
    named = tmp_path / "named"
    named.symlink_to(real)
    found = [f.path for f in walk(named)]
    assert found == [str(named / "x" / "a.jpg")]


def test_links_outside_the_folder_are_followed_once_under_the_links_path(tmp_path: Path) -> None:
    outside = tmp_path / "nas"
    draw_shape(outside / "a.jpg", 1)
    draw_shape(outside / "sub" / "b.jpg", 2)
    root = tmp_path / "photos"
    draw_shape(root / "own.jpg", 3)
    (root / "nas").symlink_to(outside)
    (root / "nas-again").symlink_to(outside)
    (root / "nas-sub").symlink_to(outside / "sub")  # already reached through nas/
    (root / "single.jpg").symlink_to(outside / "a.jpg")  # a file reached through nas/ too
    found, skips = _listed(root)
    # each file once, under the first path the walk meets (a folder's files, then its folders by name)
    assert found == ["own.jpg", "single.jpg", "nas-sub/b.jpg"]
    assert sorted(os.path.realpath(root / p) for p in found) == sorted(
        str(p.resolve()) for p in (outside / "a.jpg", outside / "sub" / "b.jpg", root / "own.jpg")
    )
    assert skips.folders == {"duplicate link": 2}  # nas-again/, nas/sub/
    assert skips.files == {"duplicate link": 1}  # nas/a.jpg
    real = outside.resolve()
    assert sorted(skips.linked_targets) == sorted(map(str, (real, real / "sub", real / "a.jpg")))


def test_a_loop_through_outside_links_ends(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    draw_shape(a / "1.jpg", 1)
    draw_shape(b / "2.jpg", 2)
    (a / "to-b").symlink_to(b)
    (b / "to-a").symlink_to(a)  # back into the indexed folder: a loop
    found, skips = _listed(a)
    assert found == ["1.jpg", "to-b/2.jpg"] and skips.folders == {"link loop": 1}


def test_hidden_folders_can_be_included_but_system_folders_never(tmp_path: Path) -> None:
    root = _library(tmp_path)
    found, _ = _listed(root, WalkRules(include_hidden=True))
    assert ".hidden.jpg" in found
    assert not any("@eaDir" in p or ".thumbnails" in p or ".Trash" in p for p in found)


@pytest.mark.parametrize(
    ("patterns", "kept"),
    [
        (("2023",), ["2024/a.jpg", "2024/raw/c.png", "b.PNG"]),
        (("*.png",), ["2023/x.jpg", "2024/a.jpg"]),  # case ignored
        (("2024/raw",), ["2023/x.jpg", "2024/a.jpg", "b.PNG"]),
        (("raw/",), ["2023/x.jpg", "2024/a.jpg", "b.PNG"]),  # a trailing slash names the folder
        (("*/raw/*", "X.JPG"), ["2024/a.jpg", "b.PNG"]),
    ],
)
def test_excludes_match_names_at_any_depth_or_paths(
    tmp_path: Path, patterns: tuple[str, ...], kept: list[str]
) -> None:
    root = tmp_path / "photos"
    for rel in ("2023/x.jpg", "2024/a.jpg", "2024/raw/c.png", "b.PNG"):
        draw_shape(root / rel, 1, fmt="PNG" if rel.lower().endswith("png") else "JPEG")
    found, skips = _listed(root, WalkRules(exclude=patterns))
    assert sorted(found) == sorted(kept)
    assert sum(skips.files.values()) + sum(skips.folders.values()) >= 1
    assert set(skips.files) | set(skips.folders) == {"excluded"}


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ([""], "empty"),
        (["  "], "empty"),
        (["/home/me/Private"], "absolute"),
        (["~/x"], "absolute"),
        (["../other"], "climbs out"),
        (["a/../../b"], "climbs out"),
        (["a\x00b"], "control character"),
        (["a\nb"], "control character"),
        (["x" * 300], "characters"),
        ([f"p{i}" for i in range(65)], "at most 64"),
    ],
)
def test_bad_exclude_patterns_are_refused(bad: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        check_excludes(bad)
    with pytest.raises(ConfigError, match=why):
        IngestConfig(exclude=tuple(bad))


def test_excludes_are_normalised() -> None:
    assert check_excludes([" raw/ ", "*.png", "raw"]) == ("raw", "*.png")


def test_ingest_saves_excludes_and_counts_skips_in_summary_and_status(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = _library(tmp_path)
    data = tmp_path / "data"
    with Collection(data) as col:
        s = ingest(root, col, encoder, IngestConfig(batch_size=4, progress=False, exclude=("2023",)))
        assert s.accounts() and s.scanned == 2 and s.failed == 0
        assert s.exclude == ["2023"] and s.skipped_folders["excluded"] == 1
        assert s.skipped["unsupported format"] == 2 and s.unsupported_types == {".mov": 1, ".cr2": 1}
        d = json.loads(json.dumps(s.to_dict()))
        assert d["skipped"]["thumbnails or system"] == 3 and d["skipped_folders"]["thumbnails or system"] == 4
        # a re-index without --exclude (as a watch batch runs it) walks with the saved globs
        again = ingest(root, col, encoder, QUIET)
        assert again.exclude == ["2023"] and again.scanned == 2 and again.deleted == 0
    st = collection_status(data)
    assert st.excludes == {str(root): ["2023"]}
    skipped = st.to_dict()["skipped"]
    assert isinstance(skipped, dict) and skipped["folders"]["excluded"] == 1
    assert skipped["files"]["hidden"] == 1
    with Collection(data) as col:  # an empty list forgets them: 2023 comes back
        s = ingest(root, col, encoder, IngestConfig(batch_size=4, progress=False, exclude=()))
        assert s.new == 1 and s.exclude == [] and "excluded" not in s.skipped_folders
        assert folders.saved_rules(col.catalog, str(root)) == WalkRules()
        paths = {r.path for r in col.catalog.iter_images("indexed")}
    kept = ("2023/IMG_0100.jpg", "2024/IMG_0001.jpg", "2024/IMG_0002.heic.jpg")
    assert paths == {str(root / p) for p in kept}


def test_excluding_a_folder_drops_what_was_indexed_there(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    draw_shape(root / "keep" / "a.jpg", 1)
    draw_shape(root / "drop" / "b.jpg", 2)
    with Collection(tmp_path / "data") as col:
        assert ingest(root, col, encoder, QUIET).encoded == 2
        s = ingest(root, col, encoder, IngestConfig(batch_size=4, progress=False, exclude=("drop",)))
        assert s.deleted == 1 and s.scanned == 1
        assert [r.path for r in col.catalog.iter_images("indexed")] == [str(root / "keep" / "a.jpg")]


def test_a_hand_edited_bad_saved_glob_is_refused(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    draw_shape(root / "a.jpg", 1)
    with Collection(tmp_path / "data") as col:
        col.catalog.set_meta(folders.RULES_KEY, json.dumps({str(root): {"exclude": ["../up"]}}))
        with pytest.raises(ConfigError, match="climbs out"):
            ingest(root, col, encoder, QUIET)
