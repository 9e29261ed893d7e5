"""Dataset loaders on small fixture files of every supported format, problems planted on purpose."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from retrieval.errors import ConfigError
from retrieval.training.datasets import (
    DatasetItem,
    LoadReport,
    format_report,
    list_formats,
    load_dataset,
    normalise_split,
)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def _by_id(items: list[DatasetItem]) -> dict[str, DatasetItem]:
    return {item.image_id: item for item in items}


# --------------------------------------------------------------------------- general


def test_list_formats_names_every_loader() -> None:
    assert list_formats() == ["flickr8k", "kaggle", "karpathy", "coco", "rsicd", "jsonl"]


def test_unknown_format_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"unknown dataset format 'flickr9k'.*flickr8k"):
        load_dataset("flickr9k", tmp_path / "a.txt", tmp_path)


def test_missing_annotation_file_and_images_folder_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="annotation file not found"):
        load_dataset("jsonl", tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(ConfigError, match="images folder not found"):
        load_dataset("jsonl", tmp_path / "c.jsonl", tmp_path / "no-images")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("dev", "val"), ("Validation", "val"), (" val ", "val"), ("all", None), (None, None), ("test", "test")],
)
def test_split_spellings_are_normalised(given: str | None, expected: str | None) -> None:
    assert normalise_split(given) == expected


# --------------------------------------------------------------------------- flickr8k


@pytest.fixture
def flickr8k(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "Images"
    _png(images / "a.jpg")
    _png(images / "b.jpg")
    text = tmp_path / "text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text(
        "a.jpg#0\tA dog runs .\n"
        "a.jpg#1\tA brown dog on grass .\n"
        "\n"
        "b.jpg#0\tTwo children play .\n"
        "b.jpg#1\t   \n"
        "c.jpg#0\tAn image that is not on disk .\n"
    )
    (text / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("c.jpg\n")
    return text / "Flickr8k.token.txt", images


def test_flickr8k_loads_all_with_splits_and_reports_problems(flickr8k: tuple[Path, Path]) -> None:
    token, images = flickr8k
    ds = load_dataset("flickr8k", token, images)
    assert ds.format == "flickr8k"
    items = _by_id(ds.items)
    assert list(items) == ["a.jpg", "b.jpg"]
    assert items["a.jpg"].captions == ("A dog runs .", "A brown dog on grass .")
    assert items["a.jpg"].path == images / "a.jpg"
    assert items["a.jpg"].split == "train"
    assert items["b.jpg"].captions == ("Two children play .",)
    assert items["b.jpg"].split == "val"
    assert ds.report.n_images == 2
    assert ds.report.n_captions == 3
    assert ds.report.missing_images.count == 1
    assert ds.report.missing_images.examples == (str(images / "c.jpg"),)
    assert ds.report.empty_captions.count == 1
    assert ds.report.empty_captions.examples == ("b.jpg",)


@pytest.mark.parametrize("split", ["dev", "val", "validation"])
def test_flickr8k_dev_split_aliases(flickr8k: tuple[Path, Path], split: str) -> None:
    token, images = flickr8k
    ds = load_dataset("flickr8k", token, images, split=split)
    assert [item.image_id for item in ds.items] == ["b.jpg"]
    assert ds.split == "val"


def test_flickr8k_test_split_counts_its_missing_image(flickr8k: tuple[Path, Path]) -> None:
    token, images = flickr8k
    ds = load_dataset("flickr8k", token, images, split="test")
    assert ds.items == []
    assert ds.report.missing_images.count == 1


def test_flickr8k_accepts_the_folder_holding_the_token_file(flickr8k: tuple[Path, Path]) -> None:
    token, images = flickr8k
    ds = load_dataset("flickr8k", token.parent, images, split="train")
    assert [item.image_id for item in ds.items] == ["a.jpg"]


def test_flickr8k_unknown_split_and_missing_split_file(flickr8k: tuple[Path, Path]) -> None:
    token, images = flickr8k
    with pytest.raises(ConfigError, match="unknown Flickr8k split 'holdout'"):
        load_dataset("flickr8k", token, images, split="holdout")
    (token.parent / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(ConfigError, match=r"Flickr_8k\.testImages\.txt not found"):
        load_dataset("flickr8k", token, images, split="test")


def test_flickr8k_line_without_tab_names_the_line(tmp_path: Path) -> None:
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\tfine\na.jpg#1 no tab here\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_dataset("flickr8k", token, tmp_path)


# --------------------------------------------------------------------------- kaggle


def test_kaggle_csv_keeps_commas_and_quotes(tmp_path: Path) -> None:
    images = tmp_path / "Images"
    _png(images / "a.jpg")
    _png(images / "b.jpg")
    captions = tmp_path / "captions.txt"
    with captions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerow(["a.jpg", "A dog, wet and happy, shakes ."])
        writer.writerow(["a.jpg", 'A sign reads "no dogs" .'])
        writer.writerow(["b.jpg", ""])
        writer.writerow(["missing.jpg", "Nobody saved this image ."])
    with captions.open("a") as f:
        f.write("b.jpg,An unquoted caption, with a comma .\n")
    ds = load_dataset("kaggle", captions, images)
    items = _by_id(ds.items)
    assert items["a.jpg"].captions == ("A dog, wet and happy, shakes .", 'A sign reads "no dogs" .')
    assert items["b.jpg"].captions == ("An unquoted caption, with a comma .",)
    assert items["a.jpg"].split is None
    assert ds.report.empty_captions.count == 1
    assert ds.report.missing_images.count == 1
    assert load_dataset("kaggle", captions, images, split="all").report.n_captions == 3


def test_kaggle_refuses_splits_and_bad_headers(tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("image,caption\na.jpg,A dog .\n")
    with pytest.raises(ConfigError, match="no splits"):
        load_dataset("kaggle", captions, tmp_path, split="train")
    captions.write_text("filename,text\na.jpg,A dog .\n")
    with pytest.raises(ConfigError, match="header 'image,caption'"):
        load_dataset("kaggle", captions, tmp_path)


def test_kaggle_row_without_caption_names_the_line(tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("image,caption\na.jpg,A dog .\nb.jpg\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_dataset("kaggle", captions, tmp_path)


# --------------------------------------------------------------------------- karpathy


def _sentences(*raw: str) -> list[dict[str, object]]:
    return [{"raw": r, "tokens": r.lower().split()} for r in raw]


def test_karpathy_flickr_style_with_duplicates_and_blank_captions(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _png(images / name)
    data = {
        "images": [
            {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": _sentences("one", "two")},
            {"filename": "b.jpg", "imgid": 1, "split": "val", "sentences": _sentences("three")},
            {"filename": "a.jpg", "imgid": 2, "split": "train", "sentences": _sentences("four")},
            {"filename": "c.jpg", "imgid": 3, "split": "test", "sentences": _sentences("  ", "")},
        ],
        "dataset": "flickr8k",
    }
    ann = tmp_path / "dataset_flickr8k.json"
    ann.write_text(json.dumps(data))
    ds = load_dataset("karpathy", ann, images)
    items = _by_id(ds.items)
    assert items["a.jpg"].captions == ("one", "two", "four")
    assert ds.report.duplicate_ids.count == 1
    assert ds.report.duplicate_ids.examples == ("a.jpg",)
    assert "c.jpg" not in items
    assert ds.report.empty_captions.count == 2
    assert ds.report.images_without_captions.examples == ("c.jpg",)
    assert [i.image_id for i in load_dataset("karpathy", ann, images, split="dev").items] == ["b.jpg"]
    with pytest.raises(ConfigError, match=r"unknown split 'holdout'.*test, train, val"):
        load_dataset("karpathy", ann, images, split="holdout")


def test_karpathy_coco_style_uses_filepath_and_train_includes_restval(tmp_path: Path) -> None:
    images = tmp_path / "coco"
    _png(images / "val2014" / "COCO_val2014_1.jpg")
    _png(images / "train2014" / "COCO_train2014_2.jpg")
    _png(images / "val2014" / "COCO_val2014_3.jpg")
    data = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_1.jpg",
                "split": "restval",
                "sentences": _sentences("restval image"),
                "cocoid": 1,
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_2.jpg",
                "split": "train",
                "sentences": [{"tokens": ["only", "tokens"]}],
                "cocoid": 2,
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_3.jpg",
                "split": "test",
                "sentences": _sentences("test image"),
                "cocoid": 3,
            },
        ]
    }
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps(data))
    train = load_dataset("karpathy", ann, images, split="train")
    assert [i.image_id for i in train.items] == [
        "val2014/COCO_val2014_1.jpg",
        "train2014/COCO_train2014_2.jpg",
    ]
    assert train.items[0].path == images / "val2014" / "COCO_val2014_1.jpg"
    assert train.items[1].captions == ("only tokens",)
    assert [i.split for i in train.items] == ["restval", "train"]
    restval = load_dataset("karpathy", ann, images, split="restval")
    assert len(restval.items) == 1
    test = load_dataset("karpathy", ann, images, split="test")
    assert test.items[0].captions == ("test image",)


def test_karpathy_malformed_json_and_structure(tmp_path: Path) -> None:
    ann = tmp_path / "dataset_flickr8k.json"
    ann.write_text('{"images": [\n{"filename": "a.jpg",}\n]}')
    with pytest.raises(ConfigError, match=r"not valid JSON.*line 2"):
        load_dataset("karpathy", ann, tmp_path)
    ann.write_text(json.dumps({"images": [{"filename": "a.jpg"}]}))
    with pytest.raises(ConfigError, match=r"images\[0\].*'sentences'"):
        load_dataset("karpathy", ann, tmp_path)
    ann.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_dataset("karpathy", ann, tmp_path)


# --------------------------------------------------------------------------- coco


def _coco(path: Path, images: list[tuple[int, str]], anns: list[tuple[int, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "info": {},
        "images": [{"id": i, "file_name": f, "width": 4, "height": 4} for i, f in images],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(anns)],
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    _png(images / "val2017" / "000001.jpg")
    _png(images / "000002.jpg")  # flat layout: directly under images/
    _png(images / "train2017" / "000010.jpg")
    ann = tmp_path / "annotations"
    _coco(
        ann / "captions_val2017.json",
        [(1, "000001.jpg"), (2, "000002.jpg"), (3, "000003.jpg"), (1, "000001.jpg")],
        [(1, "A cat ."), (2, "A bus ."), (1, "A cat on a mat ."), (3, "Not on disk ."), (99, "Orphan .")],
    )
    _coco(ann / "captions_train2017.json", [(10, "000010.jpg")], [(10, "A train .")])
    return ann, images


def test_coco_file_resolves_split_subfolder_and_flat_layout(coco: tuple[Path, Path]) -> None:
    ann, images = coco
    ds = load_dataset("coco", ann / "captions_val2017.json", images)
    items = _by_id(ds.items)
    assert list(items) == ["1", "2"]
    assert items["1"].path == images / "val2017" / "000001.jpg"
    assert items["2"].path == images / "000002.jpg"
    assert items["1"].captions == ("A cat .", "A cat on a mat .")
    assert items["1"].split == "val2017"
    assert ds.report.missing_images.count == 1
    assert ds.report.duplicate_ids.examples == ("1",)
    assert ds.report.orphan_captions.examples == ("99",)


def test_coco_folder_loads_every_file_or_the_requested_split(coco: tuple[Path, Path]) -> None:
    ann, images = coco
    assert {i.image_id for i in load_dataset("coco", ann, images).items} == {"1", "2", "10"}
    assert [i.image_id for i in load_dataset("coco", ann, images, split="train").items] == ["10"]
    assert {i.image_id for i in load_dataset("coco", ann, images, split="val2017").items} == {"1", "2"}
    with pytest.raises(ConfigError, match="no COCO captions file for split 'test'"):
        load_dataset("coco", ann, images, split="test")


def test_coco_file_of_another_split_is_refused(coco: tuple[Path, Path]) -> None:
    ann, images = coco
    with pytest.raises(ConfigError, match="holds split 'val2017', not 'train'"):
        load_dataset("coco", ann / "captions_val2017.json", images, split="train")


def test_coco_bad_caption_type_names_the_annotation(tmp_path: Path) -> None:
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1}]})
    )
    with pytest.raises(ConfigError, match=r"annotations\[0\].*'caption'"):
        load_dataset("coco", ann, tmp_path)


# --------------------------------------------------------------------------- rsicd


def test_rsicd_karpathy_like_and_coco_style(tmp_path: Path) -> None:
    images = tmp_path / "RSICD_images"
    _png(images / "airport_1.jpg")
    _png(images / "beach_2.jpg")
    karpathy = tmp_path / "dataset_rsicd.json"
    karpathy.write_text(
        json.dumps(
            {
                "images": [
                    {"filename": "airport_1.jpg", "split": "train", "sentences": _sentences("many planes .")},
                    {
                        "filename": "beach_2.jpg",
                        "split": "test",
                        "sentences": _sentences("waves .", "sand ."),
                    },
                ]
            }
        )
    )
    ds = load_dataset("rsicd", karpathy, images, split="test")
    assert ds.format == "rsicd"
    assert [(i.image_id, i.captions) for i in ds.items] == [("beach_2.jpg", ("waves .", "sand ."))]

    coco_style = _coco(tmp_path / "rsicd_coco.json", [(7, "airport_1.jpg")], [(7, "a runway .")])
    ds = load_dataset("rsicd", coco_style, images)
    assert [(i.image_id, i.path, i.captions) for i in ds.items] == [
        ("7", images / "airport_1.jpg", ("a runway .",))
    ]
    (tmp_path / "other.json").write_text(json.dumps({"foo": []}))
    with pytest.raises(ConfigError, match="not an RSICD file"):
        load_dataset("rsicd", tmp_path / "other.json", images)


# --------------------------------------------------------------------------- jsonl


def test_jsonl_relative_absolute_and_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    images = root / "images"
    _png(images / "a.png")
    _png(images / "sub" / "b.png")
    outside = _png(tmp_path / "elsewhere" / "c.png")
    ann = root / "captions.jsonl"
    lines = [
        {"image": "a.png", "captions": ["red square", " "], "split": "train", "license": 3},
        {"image": "sub/b.png", "captions": ["another"], "split": "validation"},
        {"image": str(outside), "captions": ["absolute"], "split": "val"},
        {"image": "gone.png", "captions": ["missing"], "split": "train"},
    ]
    ann.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    ds = load_dataset("jsonl", ann, images)
    assert [i.path for i in ds.items] == [images / "a.png", images / "sub" / "b.png", outside]
    assert ds.items[0].captions == ("red square",)
    assert ds.report.missing_images.count == 1
    assert ds.report.empty_captions.count == 1
    val = load_dataset("jsonl", ann, images, split="dev")
    assert [i.image_id for i in val.items] == ["sub/b.png", str(outside)]
    # Paths such as "images/a.png" written relative to the dataset folder also resolve.
    (root / "rooted.jsonl").write_text(json.dumps({"image": "images/a.png", "captions": ["x"]}) + "\n")
    assert load_dataset("jsonl", root / "rooted.jsonl", images).items[0].path == images / "a.png"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ('["a.png", ["x"]]', "line 2: expected a JSON object"),
        ('{"captions": ["x"]}', "line 2: expected a non-empty 'image'"),
        ('{"image": "a.png", "captions": "one string"}', "line 2: 'captions' must be a list"),
        ('{"image": "a.png", "captions": [1]}', "line 2: every caption must be a string"),
    ],
)
def test_jsonl_bad_lines_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    ann = tmp_path / "c.jsonl"
    ann.write_text(json.dumps({"image": "a.png", "captions": ["ok"]}) + "\n" + bad_line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_dataset("jsonl", ann, tmp_path)


def test_jsonl_split_without_split_information(tmp_path: Path) -> None:
    ann = tmp_path / "c.jsonl"
    ann.write_text(json.dumps({"image": "a.png", "captions": ["ok"]}) + "\n")
    with pytest.raises(ConfigError, match="no split information"):
        load_dataset("jsonl", ann, tmp_path, split="test")


# --------------------------------------------------------------------------- report


def test_format_report_gives_counts_and_examples(flickr8k: tuple[Path, Path]) -> None:
    token, images = flickr8k
    text = format_report(load_dataset("flickr8k", token, images).report)
    assert text.startswith("Loaded 2 images with 3 captions.")
    assert "1 listed image missing on disk (e.g. " in text
    assert "c.jpg" in text
    assert "1 empty caption dropped (e.g. b.jpg)" in text
    assert "\n" not in text


def test_format_report_of_a_clean_load() -> None:
    assert (
        format_report(LoadReport(n_images=1, n_captions=5))
        == "Loaded 1 image with 5 captions. No problems found."
    )


def test_report_keeps_at_most_five_examples(tmp_path: Path) -> None:
    ann = tmp_path / "c.jsonl"
    ann.write_text("".join(json.dumps({"image": f"{n}.png", "captions": ["x"]}) + "\n" for n in range(8)))
    report = load_dataset("jsonl", ann, tmp_path).report
    assert report.missing_images.count == 8
    assert len(report.missing_images.examples) == 5
