"""Where the benches find coco-mini, and how they say which data a figure came from.

The benches once assumed `../shared/data/coco-mini` beside the clone. From a clone anywhere else the
path did not exist, and a bench then measured drawn pictures instead without saying so loudly: its
figures looked like photo figures. A bench that needs photos now finds them through `--data DIR` or
`$CLEARSIGHT_BENCH_DATA` (coco-mini's folder), else the old place, and stops with exit status 2 and
a message saying where it looked when none holds them. Drawn pictures are only ever used when asked
for by name, and every figure's header names its data (`describe`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DATA_ENV = "CLEARSIGHT_BENCH_DATA"
#: The layout clones of this project had: a `shared` folder beside the repository.
BESIDE_CLONE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"
#: Exit status of a bench whose data is missing (argparse uses 2 for usage errors too).
MISSING = 2


def add_data_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"coco-mini's folder (holding images/); default: ${DATA_ENV}, else {BESIDE_CLONE}",
    )


def coco_mini(given: Path | None) -> Path:
    """coco-mini's folder: `given`, else $CLEARSIGHT_BENCH_DATA, else beside the clone; exits when absent.

    A folder counts when it holds `images/` with at least one JPEG in it.
    """
    env = os.environ.get(DATA_ENV)
    if given is not None:
        source, folder = "from --data", given
    elif env:
        source, folder = f"from ${DATA_ENV}", Path(env)
    else:
        source, folder = "the default, beside the clone", BESIDE_CLONE
    folder = folder.expanduser().resolve()
    images = folder / "images"
    if images.is_dir() and next(images.rglob("*.jpg"), None) is not None:
        return folder
    sys.stderr.write(
        f"bench data missing: no coco-mini photos under {images} ({source}).\n"
        f"Point at coco-mini's folder with --data DIR or {DATA_ENV}=DIR"
        " (it holds images/ with the photos).\n"
    )
    raise SystemExit(MISSING)


def describe(folder: Path, used: int) -> str:
    """What a figure ran on, for its header: how many photos from which folder."""
    return f"{used} coco-mini photos from {folder}"
