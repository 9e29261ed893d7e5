"""Loaders for captioned-image datasets, all returning one structure.

Evaluation and fine-tuning should not care whether captions came from the official Flickr8k token
file, a Kaggle CSV, a Karpathy split, COCO JSON, RSICD or a user's JSONL: every loader parses its
file into records, and one shared pipeline merges duplicates, selects the split, drops blank captions
and checks the images exist. Problems in real datasets (missing files, repeated ids, empty captions)
are counted in a `LoadReport` rather than raised, because one bad line in a 40k-caption file should not
stop an evaluation; only an unusable file or option raises `ConfigError`.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retrieval.errors import ConfigError
from retrieval.training.sniff import guess_formats

#: How many examples of each problem a report keeps: enough to find the pattern, short enough to print.
MAX_EXAMPLES = 5

_SPLIT_ALIASES = {"dev": "val", "validation": "val", "valid": "val", "val": "val"}
_ALL = "all"


@dataclass(frozen=True)
class DatasetItem:
    """One image with its captions; `image_id` is the dataset's own identifier (file name, COCO id...)."""

    image_id: str
    path: Path
    captions: tuple[str, ...]
    split: str | None


@dataclass(frozen=True)
class Issue:
    """How often one kind of problem occurred, with a few examples to look at."""

    count: int = 0
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadReport:
    """What was kept and what was dropped or merged, so a surprising metric can be traced to the data."""

    n_images: int
    n_captions: int
    missing_images: Issue = Issue()
    duplicate_ids: Issue = Issue()
    empty_captions: Issue = Issue()
    images_without_captions: Issue = Issue()
    orphan_captions: Issue = Issue()


@dataclass(frozen=True)
class LoadedDataset:
    items: list[DatasetItem]
    format: str
    report: LoadReport
    split: str | None = None
    annotations: Path | None = None  # the annotation file it was read from, for the report's provenance


@dataclass
class _Record:
    """A parsed image entry before the shared clean-up; `candidates` are the paths it may live at."""

    image_id: str
    candidates: tuple[Path, ...]
    captions: list[str]
    split: str | None


@dataclass
class _Parsed:
    records: list[_Record]
    orphans: list[str] = field(default_factory=list)


class _Tally:
    """Mutable counter behind an `Issue`."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)

    def freeze(self) -> Issue:
        return Issue(self.count, tuple(self.examples))


# --------------------------------------------------------------------------- splits


def normalise_split(split: str | None) -> str | None:
    """Map user spellings to one name, so `--split dev` works on a file that says "val"; None means all."""
    if split is None:
        return None
    name = split.strip().lower()
    if name in ("", _ALL):
        return None
    return _SPLIT_ALIASES.get(name, name)


def _split_matches(have: str | None, want: str) -> bool:
    """Lenient match: "val" selects COCO's "val2017", and "train" includes Karpathy's "restval".

    Karpathy's COCO training set is by convention train + restval (113,287 images), so asking for
    "train" without restval would silently train on a quarter less data than published baselines.
    """
    got = normalise_split(have)
    if got is None:
        return False
    if got == want or normalise_split(re.sub(r"\d+$", "", got)) == want:
        return True
    return want == "train" and got == "restval"


# --------------------------------------------------------------------------- file reading


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(f"{what} not found: {path} (check the path passed as annotations)")
    if path.is_dir():
        raise ConfigError(f"{what} expected, got a directory: {path} (pass the file itself)")


def _read_text(path: Path, what: str) -> str:
    _check_file(path, what)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _read_json(path: Path, what: str) -> dict[str, Any]:
    text = _read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object at the top level")
    return data


def _list_field(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list under {key!r}, found {type(value).__name__}")
    return value


def _str_field(obj: Any, key: str, where: str) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty {key!r}, found {value!r}")
    return value


def _require_no_split(fmt: str, split: str | None) -> None:
    if normalise_split(split) is not None:
        raise ConfigError(f"the {fmt} format has no splits; got split {split!r} (omit it or pass 'all')")


# --------------------------------------------------------------------------- format parsers


_FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _parse_flickr8k(annotations: Path, images: Path, split: str | None) -> _Parsed:
    token = annotations / "Flickr8k.token.txt" if annotations.is_dir() else annotations
    text = _read_text(token, "Flickr8k token file")
    want = normalise_split(split)
    if want is not None and want not in _FLICKR8K_SPLIT_FILES:
        raise ConfigError(f"unknown Flickr8k split {split!r}; use train, dev (val), test or all")
    split_of: dict[str, str] = {}
    for name, filename in _FLICKR8K_SPLIT_FILES.items():
        split_file = token.parent / filename
        if not split_file.exists():
            if name == want:
                raise ConfigError(
                    f"split file {filename} not found beside {token} (needed for split {split!r})"
                )
            continue
        for line in _read_text(split_file, "Flickr8k split file").splitlines():
            if line.strip():
                split_of[line.strip()] = name
    grouped: dict[str, _Record] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            raise ConfigError(
                f"{token}, line {lineno}: expected 'IMAGE.jpg#N<TAB>caption', found {line[:80]!r}"
            )
        name = key.rsplit("#", 1)[0].strip() if "#" in key else key.strip()
        record = grouped.get(name)
        if record is None:
            record = grouped[name] = _Record(name, (images / name,), [], split_of.get(name))
        record.captions.append(caption)
    return _Parsed(list(grouped.values()))


def _parse_kaggle(annotations: Path, images: Path, split: str | None) -> _Parsed:
    _require_no_split("kaggle", split)
    text = _read_text(annotations, "Kaggle captions file")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
        raise ConfigError(f"{annotations}: expected the header 'image,caption', found {header!r}")
    grouped: dict[str, _Record] = {}
    try:
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2 or not row[0].strip():
                raise ConfigError(
                    f"{annotations}, line {reader.line_num}: expected 'image,caption', found {row!r}"
                )
            name = row[0].strip()
            # Image names never hold commas, so extra fields are an unquoted caption split at its commas.
            caption = ",".join(row[1:])
            record = grouped.get(name)
            if record is None:
                record = grouped[name] = _Record(name, (images / name,), [], None)
            record.captions.append(caption)
    except csv.Error as exc:
        raise ConfigError(f"{annotations}, line {reader.line_num}: malformed CSV ({exc})") from exc
    return _Parsed(list(grouped.values()))


def _karpathy_records(data: dict[str, Any], source: Path, images: Path) -> list[_Record]:
    records = []
    for i, entry in enumerate(_list_field(data, "images", str(source))):
        where = f"{source}, images[{i}]"
        filename = _str_field(entry, "filename", where)
        filepath = entry.get("filepath")
        if filepath is not None and not isinstance(filepath, str):
            raise ConfigError(f"{where}: 'filepath' must be a string, found {filepath!r}")
        split = entry.get("split")
        if split is not None and not isinstance(split, str):
            raise ConfigError(f"{where}: 'split' must be a string, found {split!r}")
        captions = []
        for j, sentence in enumerate(_list_field(entry, "sentences", where)):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(str(t) for t in sentence["tokens"])
            if not isinstance(raw, str):
                raise ConfigError(f"{where}, sentences[{j}]: expected a string under 'raw'")
            captions.append(raw)
        if filepath:
            image_id = f"{filepath}/{filename}"
            candidates: tuple[Path, ...] = (images / filepath / filename, images / filename)
        else:
            image_id, candidates = filename, (images / filename,)
        records.append(_Record(image_id, candidates, captions, normalise_split(split)))
    return records


def _parse_karpathy(annotations: Path, images: Path, split: str | None) -> _Parsed:
    data = _read_json(annotations, "Karpathy split file")
    return _Parsed(_karpathy_records(data, annotations, images))


def _coco_file_split(path: Path) -> str | None:
    match = re.fullmatch(r"captions_(.+)\.json", path.name)
    return match.group(1) if match else None


def _coco_records(data: dict[str, Any], source: Path, images: Path, split: str | None) -> _Parsed:
    """Parse one COCO captions file; `split` also names the image subfolder (e.g. val2017) to try."""
    records: dict[str, _Record] = {}
    parsed = _Parsed([])
    for i, entry in enumerate(_list_field(data, "images", str(source))):
        where = f"{source}, images[{i}]"
        image_id = _str_field(entry, "id", where)
        file_name = _str_field(entry, "file_name", where)
        candidates = (images / file_name, images / split / file_name) if split else (images / file_name,)
        record = _Record(image_id, candidates, [], normalise_split(split))
        parsed.records.append(record)
        records.setdefault(image_id, record)
    for i, ann in enumerate(_list_field(data, "annotations", str(source))):
        where = f"{source}, annotations[{i}]"
        image_id = _str_field(ann, "image_id", where)
        caption = ann.get("caption")
        if not isinstance(caption, str):
            raise ConfigError(f"{where}: expected a string under 'caption', found {caption!r}")
        if image_id in records:
            records[image_id].captions.append(caption)
        else:
            parsed.orphans.append(image_id)
    return parsed


def _parse_coco(annotations: Path, images: Path, split: str | None) -> _Parsed:
    want = normalise_split(split)
    if annotations.is_dir():
        files = sorted(annotations.glob("captions_*.json"))
        if not files:
            raise ConfigError(f"no captions_*.json files in {annotations} (pass a COCO captions file)")
        if want is not None:
            chosen = [f for f in files if _split_matches(_coco_file_split(f), want)]
            if not chosen:
                names = ", ".join(str(_coco_file_split(f)) for f in files)
                raise ConfigError(
                    f"no COCO captions file for split {split!r} in {annotations}; found: {names}"
                )
            files = chosen
    else:
        files = [annotations]
        have = _coco_file_split(annotations)
        if want is not None and have is not None and not _split_matches(have, want):
            raise ConfigError(
                f"{annotations.name} holds split {have!r}, not {split!r}; "
                "pass the matching captions file, or the annotations folder"
            )
    parsed = _Parsed([])
    for path in files:
        file_split = _coco_file_split(path) or (split.strip() if want is not None and split else None)
        one = _coco_records(_read_json(path, "COCO captions file"), path, images, file_split)
        parsed.records.extend(one.records)
        parsed.orphans.extend(one.orphans)
    return parsed


def _parse_rsicd(annotations: Path, images: Path, split: str | None) -> _Parsed:
    data = _read_json(annotations, "RSICD annotation file")
    if "annotations" in data:
        return _coco_records(data, annotations, images, _coco_file_split(annotations))
    if "images" in data:
        return _Parsed(_karpathy_records(data, annotations, images))
    raise ConfigError(
        f"{annotations}: not an RSICD file "
        "(expected 'images' with 'sentences', or COCO-style 'images' + 'annotations')"
    )


def _parse_jsonl(annotations: Path, images: Path, split: str | None) -> _Parsed:
    text = _read_text(annotations, "JSONL captions file")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{annotations}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        image = _str_field(obj, "image", where)
        captions = obj.get("captions")
        if isinstance(captions, str) or not isinstance(captions, list):
            raise ConfigError(f"{where}: 'captions' must be a list of strings, found {captions!r}")
        if not all(isinstance(c, str) for c in captions):
            raise ConfigError(f"{where}: every caption must be a string")
        line_split = obj.get("split")
        if line_split is not None and not isinstance(line_split, str):
            raise ConfigError(f"{where}: 'split' must be a string, found {line_split!r}")
        path = Path(image)
        # Relative paths are tried under the images folder first, then beside the JSONL file, so a
        # dataset folder holding both `captions.jsonl` and `images/` works with either folder passed.
        candidates = (path,) if path.is_absolute() else (images / path, annotations.parent / path)
        records.append(_Record(image, tuple(dict.fromkeys(candidates)), list(captions), line_split))
    return _Parsed(records)


@dataclass(frozen=True)
class _Format:
    name: str
    description: str
    parse: Callable[[Path, Path, str | None], _Parsed]


_FORMATS: dict[str, _Format] = {
    f.name: f
    for f in (
        _Format(
            "flickr8k", "official Flickr8k.token.txt (+ Flickr_8k.*Images.txt split files)", _parse_flickr8k
        ),
        _Format("kaggle", "Kaggle Flickr8k captions.txt CSV (image,caption)", _parse_kaggle),
        _Format("karpathy", "Karpathy split JSON (dataset_flickr8k/flickr30k/coco.json)", _parse_karpathy),
        _Format("coco", "COCO captions_*.json (a file or the annotations folder)", _parse_coco),
        _Format("rsicd", "dataset_rsicd.json, Karpathy-like or COCO-style", _parse_rsicd),
        _Format("jsonl", 'one {"image", "captions", "split"?} object per line', _parse_jsonl),
    )
}


def list_formats() -> list[str]:
    return list(_FORMATS)


def describe_formats() -> dict[str, str]:
    """Format names with a line each, for `--help` texts and error messages."""
    return {name: f.description for name, f in _FORMATS.items()}


# --------------------------------------------------------------------------- shared clean-up


def _merge_duplicates(records: Iterable[_Record], tally: _Tally) -> list[_Record]:
    """Count each repeated id once, since the user fixes ids, not occurrences; the first entry's path wins."""
    merged: dict[str, _Record] = {}
    repeated: set[str] = set()
    for record in records:
        first = merged.get(record.image_id)
        if first is None:
            merged[record.image_id] = _Record(
                record.image_id, record.candidates, list(record.captions), record.split
            )
            continue
        if record.image_id not in repeated:
            repeated.add(record.image_id)
            tally.add(record.image_id)
        first.captions.extend(record.captions)
    return list(merged.values())


def _select_split(records: list[_Record], split: str | None, want: str) -> list[_Record]:
    chosen = [r for r in records if _split_matches(r.split, want)]
    if not chosen:
        have = sorted({r.split for r in records if r.split is not None})
        if not have:
            raise ConfigError(
                f"split {split!r} requested, but this file has no split information (pass 'all')"
            )
        raise ConfigError(f"unknown split {split!r}; this file has: {', '.join(have)} (or 'all')")
    return chosen


def _parse(fmt: str, annotations: Path, images: Path, split: str | None) -> tuple[_Format, _Parsed]:
    spec = _FORMATS.get(fmt.strip().lower())
    if spec is None:
        close = difflib.get_close_matches(fmt.strip().lower(), list(_FORMATS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown dataset format {fmt!r}; {hint}known formats: {', '.join(_FORMATS)}")
    annotations, images = Path(annotations), Path(images)
    if not annotations.exists():
        raise ConfigError(f"annotation file not found: {annotations}")
    if not images.is_dir():
        raise ConfigError(f"images folder not found: {images} (pass the folder the dataset's images live in)")
    try:
        return spec, spec.parse(annotations, images, split)
    except ConfigError as exc:
        others = [g for g in guess_formats(annotations) if g != spec.name]
        if not others:
            raise
        looks = " or ".join(repr(g) for g in others)
        raise ConfigError(f"{exc}; the file looks like the {looks} format", remedy=exc.remedy) from exc


def _clean(spec: _Format, parsed: _Parsed, split: str | None) -> LoadedDataset:
    """The shared clean-up of a parse: merge duplicates, pick the split, drop what cannot be used."""
    duplicates, empty, captionless, missing, orphans = _Tally(), _Tally(), _Tally(), _Tally(), _Tally()
    records = _merge_duplicates(parsed.records, duplicates)
    for image_id in parsed.orphans:
        orphans.add(image_id)
    want = normalise_split(split)
    if want is not None:
        records = _select_split(records, split, want)

    items = []
    for record in records:
        captions = tuple(c.strip() for c in record.captions)
        for caption in captions:
            if not caption:
                empty.add(record.image_id)
        captions = tuple(c for c in captions if c)
        if not captions:
            captionless.add(record.image_id)
            continue
        path = next((p for p in record.candidates if p.is_file()), None)
        if path is None:
            missing.add(str(record.candidates[0]))
            continue
        items.append(DatasetItem(record.image_id, path, captions, record.split))

    report = LoadReport(
        n_images=len(items),
        n_captions=sum(len(item.captions) for item in items),
        missing_images=missing.freeze(),
        duplicate_ids=duplicates.freeze(),
        empty_captions=empty.freeze(),
        images_without_captions=captionless.freeze(),
        orphan_captions=orphans.freeze(),
    )
    return LoadedDataset(items=items, format=spec.name, report=report, split=want)


def load_dataset(fmt: str, annotations: Path, images: Path, split: str | None = None) -> LoadedDataset:
    """Load a captioned-image dataset; items keep the file's order so runs are reproducible."""
    spec, parsed = _parse(fmt, annotations, images, split)
    return replace(_clean(spec, parsed, split), annotations=Path(annotations))


def load_splits_or_all(
    fmt: str, annotations: Path, images: Path, splits: Sequence[str]
) -> list[LoadedDataset] | LoadedDataset:
    """`load_dataset` of each of `splits` if any usable item carries a split, else of the whole dataset.

    Deciding costs one parse and a file check per record up to the first usable one with a split, not
    a full load: a dataset with splits is then loaded split by split, one without from that parse.
    """
    spec, parsed = _parse(fmt, annotations, images, None)
    # The same tests `_clean` applies to an item, cheapest first, stopping at the first usable one.
    if any(
        record.split
        and any(c.strip() for c in record.captions)
        and any(p.is_file() for p in record.candidates)
        for record in _merge_duplicates(parsed.records, _Tally())
    ):
        return [load_dataset(fmt, annotations, images, split) for split in splits]
    return replace(_clean(spec, parsed, None), annotations=Path(annotations))


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def format_report(report: LoadReport) -> str:
    """One paragraph a user can read after loading, saying what was dropped and where to look."""
    parts = [
        f"Loaded {_plural(report.n_images, 'image', 'images')} with "
        f"{_plural(report.n_captions, 'caption', 'captions')}."
    ]
    problems = [
        (report.missing_images, "listed image missing on disk", "listed images missing on disk"),
        (report.duplicate_ids, "duplicate image id merged", "duplicate image ids merged"),
        (report.empty_captions, "empty caption dropped", "empty captions dropped"),
        (report.images_without_captions, "image without captions dropped", "images without captions dropped"),
        (
            report.orphan_captions,
            "caption for an unknown image ignored",
            "captions for unknown images ignored",
        ),
    ]
    found = [
        f"{_plural(issue.count, one, many)} (e.g. {', '.join(issue.examples)})"
        for issue, one, many in problems
        if issue.count
    ]
    parts.append("; ".join(found) + "." if found else "No problems found.")
    return " ".join(parts)
