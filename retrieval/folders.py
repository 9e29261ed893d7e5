"""Which files under an indexed folder are photos: the walk, what it skips and why, and the saved rules.

A real photo library is not a folder of photos only. A NAS writes its own thumbnails beside every
picture (Synology `@eaDir/IMG_0001.jpg/SYNOPHOTO_THUMB_XL.jpg`, QNAP `.@__thumb`), desktops keep trash
and thumbnail caches in hidden folders (`.Trash-1000`, `.thumbnails`), and links make one file reachable
by several paths. Indexing all of that shows one picture as three hits. So the walk skips, by default:

- hidden folders and files (names starting with "."), unless the rules say `include_hidden`;
- the folders in `SYSTEM_FOLDERS` and the files in `SYSTEM_FILES` (thumbnails, trash, snapshots, OS
  metadata), whatever `include_hidden` says;
- whatever matches the collection's `exclude` globs (saved per indexed folder, so a re-index and a
  watch use them too): a pattern without "/" matches any folder or file name at any depth (`*.png`,
  `Private`), one with "/" matches the path relative to the indexed folder (`2019/raw`, `*/export/*`);
  matching ignores case, and `*` in a pattern with "/" also crosses folders;
- files that are not images (`unsupported format`, counted by suffix so RAW files and videos show up),
  and sidecars (`.xmp`, `.aae`, `.json`...), counted apart.

Links. A file is listed once, however many links reach it: under its real path when that is inside the
indexed folder (a link to a file or folder inside the folder is never followed; its target is listed
where it really is, if the rules keep it there), and under the link's path when the link points outside
(followed once; a second link to the same target is a `duplicate link`, and a link to the indexed
folder itself or to a folder that holds it is a `link loop`). Hard links are one file too. Where a file
is reachable twice, the first path in walk order is kept: a folder's files, then its folders by name.
The real targets of followed outside links are recorded (`linked_targets`), so the server, which
serves only files inside indexed folders, serves those too.

Every skipped file is counted by reason, and every skipped folder once (its contents are not walked:
walking a NAS's thumbnail tree would cost what skipping it saves). The counts of the last walk of each
folder are saved in the catalog, for `clearsight status`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval import imageio
from retrieval.errors import ConfigError

if TYPE_CHECKING:
    from retrieval.catalog import Catalog

# Reasons a file or folder is skipped (stable strings: they are saved and shown).
HIDDEN = "hidden"
SYSTEM = "thumbnails or system"
EXCLUDED = "excluded"
UNSUPPORTED = "unsupported format"
SIDECAR = "sidecar or metadata"
DUPLICATE_LINK = "duplicate link"
LINK_LOOP = "link loop"

#: Folders that hold a NAS's or an operating system's thumbnails, trash, snapshots or metadata
#: (Synology, QNAP, Windows, macOS, Linux desktops), never the user's own photos. Globs, case ignored.
SYSTEM_FOLDERS: tuple[str, ...] = (
    "@eaDir",  # Synology thumbnails and indexes
    "#recycle",  # Synology recycle bin
    "#snapshot",  # Synology snapshots
    "@Recycle",  # QNAP recycle bin
    "@Recently-Snapshot",  # QNAP snapshots
    "@__thumb",  # QNAP thumbnails
    ".@__thumb",
    ".thumbnails",  # freedesktop thumbnail cache
    ".thumb",
    ".Trash",
    ".Trash-*",  # Linux desktop trash, one per user id
    ".Trashes",  # macOS trash on removable volumes
    ".Spotlight-V100",
    ".fseventsd",
    ".AppleDouble",
    "__MACOSX",  # resource forks unpacked from a zip made on a Mac
    "$RECYCLE.BIN",  # Windows recycle bin
    "System Volume Information",
    "lost+found",
)
#: Files that are an operating system's metadata, whatever their suffix.
SYSTEM_FILES: tuple[str, ...] = ("Thumbs.db", "ehthumbs.db", "desktop.ini", ".DS_Store", "._*")
#: Suffixes of files that describe a photo rather than hold one (editors' sidecars, Takeout JSON).
SIDECAR_SUFFIXES = frozenset({".xmp", ".aae", ".json", ".jsonl", ".thm", ".pp3", ".dop", ".xml"})

#: At most this many exclude patterns, each at most this long (they are saved with the collection).
MAX_EXCLUDES = 64
MAX_PATTERN_LENGTH = 256

#: The dataset captions ingest reads from an indexed folder's top (retrieval.ingest).
CAPTIONS_FILE = "captions.jsonl"

RULES_KEY = "walk_rules"
SKIPS_KEY = "walk_skipped"

#: Reason recorded for a directory that cannot be listed (its images are not seen, so say so).
UNREADABLE_DIR = "unreadable directory"


@dataclass(frozen=True)
class FoundFile:
    path: str
    size: int
    mtime_ns: int
    error: str | None = None  # a reason when the file cannot even be stat'ed


def check_excludes(patterns: Iterable[str]) -> tuple[str, ...]:
    """The patterns, stripped and de-duplicated in order; ConfigError naming the first bad one."""
    out: list[str] = []
    for raw in patterns:
        if not isinstance(raw, str):
            raise ConfigError(f"an exclude pattern must be text, got {raw!r}")
        pat = raw.strip()
        if pat.endswith("/") and pat != "/":
            pat = pat.rstrip("/")  # "raw/" names the folder raw
        if not pat:
            raise ConfigError("an exclude pattern is empty: give a glob such as '*.png' or '2019/raw'")
        if len(pat) > MAX_PATTERN_LENGTH:
            raise ConfigError(
                f"exclude pattern {pat[:40]!r}... is longer than {MAX_PATTERN_LENGTH} characters"
            )
        if any(ord(c) < 32 for c in pat):
            raise ConfigError(f"exclude pattern {pat!r} holds a control character")
        if pat.startswith("/") or pat.startswith("~"):
            raise ConfigError(
                f"exclude pattern {pat!r} is absolute: patterns are relative to the indexed folder "
                "(a name such as 'Private', or a path such as '2019/raw')"
            )
        if ".." in pat.split("/"):
            raise ConfigError(f"exclude pattern {pat!r} climbs out of the indexed folder with '..'")
        if pat not in out:
            out.append(pat)
    if len(out) > MAX_EXCLUDES:
        raise ConfigError(f"{len(out)} exclude patterns: at most {MAX_EXCLUDES}")
    return tuple(out)


def _match(name: str, patterns: Sequence[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


@dataclass(frozen=True)
class WalkRules:
    """What the walk skips beyond the fixed system lists: the user's excludes, and hidden names or not."""

    exclude: tuple[str, ...] = ()
    include_hidden: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", check_excludes(self.exclude))

    def _excluded(self, name: str, rel: str) -> bool:
        names = [p for p in self.exclude if "/" not in p]
        paths = [p for p in self.exclude if "/" in p]
        return _match(name, names) or _match(rel, paths)

    def folder_reason(self, name: str, rel: str) -> str | None:
        """Why the folder `name` (at `rel` under the indexed folder) is not walked, or None."""
        if _match(name, SYSTEM_FOLDERS):
            return SYSTEM
        if name.startswith(".") and not self.include_hidden:
            return HIDDEN
        if self._excluded(name, rel):
            return EXCLUDED
        return None

    def file_reason(self, name: str, rel: str) -> str | None:
        """Why the file `name` is not a candidate photo, or None."""
        if _match(name, SYSTEM_FILES):
            return SYSTEM
        if name.startswith(".") and not self.include_hidden:
            return HIDDEN
        if self._excluded(name, rel):
            return EXCLUDED
        suffix = os.path.splitext(name)[1].lower()
        if suffix in imageio.IMAGE_SUFFIXES:
            return None
        return SIDECAR if suffix in SIDECAR_SUFFIXES else UNSUPPORTED

    def to_dict(self) -> dict[str, object]:
        return {"exclude": list(self.exclude), "include_hidden": self.include_hidden}


@dataclass
class Skips:
    """What one walk left out: files by reason, folders by reason, unsupported files by suffix."""

    files: Counter[str] = field(default_factory=Counter)
    folders: Counter[str] = field(default_factory=Counter)
    unsupported_types: Counter[str] = field(default_factory=Counter)
    linked_targets: list[str] = field(default_factory=list)  # real paths of followed outside links

    def add(self, other: Skips) -> None:
        self.files.update(other.files)
        self.folders.update(other.folders)
        self.unsupported_types.update(other.unsupported_types)
        self.linked_targets += [t for t in other.linked_targets if t not in self.linked_targets]

    def to_dict(self) -> dict[str, object]:
        return {
            "files": dict(sorted(self.files.items())),
            "folders": dict(sorted(self.folders.items())),
            "unsupported_types": dict(self.unsupported_types.most_common()),
            "linked_targets": list(self.linked_targets),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Skips:
        def counts(key: str) -> Counter[str]:
            raw = d.get(key)
            return Counter({str(k): int(v) for k, v in raw.items()}) if isinstance(raw, dict) else Counter()

        linked = d.get("linked_targets")
        return cls(
            counts("files"),
            counts("folders"),
            counts("unsupported_types"),
            [str(t) for t in linked] if isinstance(linked, list) else [],
        )


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def walk(root: Path | str, rules: WalkRules | None = None, skips: Skips | None = None) -> Iterator[FoundFile]:
    """Every candidate photo under `root`, in name order, each file once; see the module docstring.

    Only regular files (after resolving symlinks) come out clean: FIFOs, sockets and devices come
    out with the reason "not a regular file", so nobody ever opens them. Directories that cannot
    be listed come out as failures too, so a permission problem is reported instead of silently
    shrinking the collection. What is skipped is counted in `skips`.
    """
    rules = rules or WalkRules()
    skips = skips if skips is not None else Skips()
    top = str(root)
    real_top = os.path.realpath(top)
    try:
        st = os.stat(top)
    except OSError:
        yield FoundFile(top, 0, 0, UNREADABLE_DIR)
        return
    seen_dirs = {(st.st_dev, st.st_ino)}
    # Files reachable twice (hard links, or through a followed link) are tracked by inode; a plain
    # file in a plain folder can be reached once only, so a big library tracks nothing.
    seen_files: set[tuple[int, int]] = set()
    stack: list[tuple[str, str, bool]] = [(top, "", False)]  # (path as listed, relative path, via a link)
    while stack:
        dirpath, rel, via_link = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            yield FoundFile(dirpath, 0, 0, UNREADABLE_DIR)
            continue
        subdirs: list[tuple[str, str, bool]] = []
        for entry in entries:
            name = entry.name
            sub_rel = f"{rel}/{name}" if rel else name
            try:
                is_dir = entry.is_dir()  # follows links
                is_link = entry.is_symlink()
            except OSError:
                is_dir = is_link = False
            if is_dir:
                found = _enter(entry.path, name, sub_rel, is_link, rules, skips, real_top, seen_dirs)
                if found is not None:
                    subdirs.append((found, sub_rel, via_link or is_link))
                continue
            reason = rules.file_reason(name, sub_rel)
            if reason is not None and sub_rel == CAPTIONS_FILE:
                continue  # the folder's own captions, which ingest reads: not a skipped file
            if reason is not None:
                skips.files[reason] += 1
                if reason == UNSUPPORTED:
                    skips.unsupported_types[os.path.splitext(name)[1].lower() or "(no suffix)"] += 1
                continue
            yield from _file(entry.path, is_link, via_link, skips, real_top, seen_files)
        stack.extend(reversed(subdirs))


def _enter(
    path: str,
    name: str,
    rel: str,
    is_link: bool,
    rules: WalkRules,
    skips: Skips,
    real_top: str,
    seen_dirs: set[tuple[int, int]],
) -> str | None:
    """The folder's path when the walk goes into it, else None (and the reason counted)."""
    reason = rules.folder_reason(name, rel)
    real = os.path.realpath(path) if is_link else ""
    if reason is None and is_link:
        if _within(real_top, real):
            reason = LINK_LOOP  # a link to the indexed folder or to a folder that holds it
        elif _within(real, real_top):
            reason = DUPLICATE_LINK  # its target is walked where it really is
    if reason is None:
        try:
            st = os.stat(path)
        except OSError:
            return path  # listed next, where the scandir failure is reported as an unreadable directory
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            reason = DUPLICATE_LINK
        else:
            seen_dirs.add(key)
    if reason is not None:
        skips.folders[reason] += 1
        return None
    if is_link:
        skips.linked_targets.append(real)
    return path


def _file(
    path: str,
    is_link: bool,
    via_link: bool,
    skips: Skips,
    real_top: str,
    seen_files: set[tuple[int, int]],
) -> Iterator[FoundFile]:
    try:
        fst = os.stat(path)
    except FileNotFoundError:
        yield FoundFile(path, 0, 0, imageio.BROKEN_LINK if os.path.islink(path) else imageio.UNREADABLE)
        return
    except OSError:
        yield FoundFile(path, 0, 0, imageio.UNREADABLE)
        return
    if not stat.S_ISREG(fst.st_mode):
        yield FoundFile(path, 0, 0, imageio.NOT_REGULAR)
        return
    real = os.path.realpath(path) if is_link else ""
    if is_link and _within(real, real_top):
        skips.files[DUPLICATE_LINK] += 1  # listed under its real path
        return
    if is_link or via_link or fst.st_nlink > 1:
        key = (fst.st_dev, fst.st_ino)
        if key in seen_files:
            skips.files[DUPLICATE_LINK] += 1
            return
        seen_files.add(key)
    if is_link:
        skips.linked_targets.append(real)
    yield FoundFile(path, fst.st_size, fst.st_mtime_ns)


# -- what is saved with the collection -------------------------------------------------------------
def _load(catalog: Catalog, key: str) -> dict[str, dict[str, object]]:
    raw = catalog.get_meta(key)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def saved_rules(catalog: Catalog, root: str) -> WalkRules:
    """The rules saved for the indexed folder `root` (the defaults when none were saved)."""
    d = _load(catalog, RULES_KEY).get(root, {})
    exclude = d.get("exclude", [])
    return WalkRules(
        exclude=tuple(str(p) for p in exclude) if isinstance(exclude, list) else (),
        include_hidden=bool(d.get("include_hidden", False)),
    )


def rules_for(
    catalog: Catalog, root: str, exclude: Sequence[str] | None, include_hidden: bool | None
) -> WalkRules:
    """The rules this run walks `root` with: what was given, else what was saved; saved when changed."""
    saved = saved_rules(catalog, root)
    rules = WalkRules(
        exclude=saved.exclude if exclude is None else tuple(exclude),
        include_hidden=saved.include_hidden if include_hidden is None else include_hidden,
    )
    if rules != saved:
        every = _load(catalog, RULES_KEY)
        every[root] = rules.to_dict()
        catalog.set_meta(RULES_KEY, json.dumps(every, sort_keys=True))
    return rules


def save_skips(catalog: Catalog, root: str, skips: Skips) -> None:
    every = _load(catalog, SKIPS_KEY)
    every[root] = skips.to_dict()
    catalog.set_meta(SKIPS_KEY, json.dumps(every, sort_keys=True))


def collection_skips(catalog: Catalog) -> Skips:
    """What the last walk of each indexed folder skipped, added up over the folders indexed now."""
    total = Skips()
    every = _load(catalog, SKIPS_KEY)
    for root in catalog.roots():
        if root in every:
            total.add(Skips.from_dict(every[root]))
    return total


def collection_rules(catalog: Catalog) -> dict[str, WalkRules]:
    """The saved rules of each indexed folder."""
    return {root: saved_rules(catalog, root) for root in catalog.roots()}


def served_roots(catalog: Catalog) -> list[str]:
    """Where the server may serve files from: the indexed folders, and the real targets of the outside
    links their walks followed (the files there were indexed under the links' paths)."""
    return [*catalog.roots(), *collection_skips(catalog).linked_targets]
