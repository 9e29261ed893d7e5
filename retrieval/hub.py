"""Load transformers models by registry name, hub id or local directory, offline-first.

The order is: a local directory; the local Hugging Face cache; a download, attempted only when
the hub answers a quick probe (otherwise huggingface_hub retries for half a minute before failing).
Every failure ends in one `ModelUnavailable` whose message says how to get the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from retrieval.errors import ModelUnavailable

T = TypeVar("T")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user typed
    target: str  # hub id or absolute directory handed to from_pretrained
    revision: str | None
    is_local: bool


#: The files of a checkpoint saved by OpenCLIP (`open_clip.push_to_hf_hub`), as LAION publishes them.
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: The transformers-format twins of LAION's OpenCLIP checkpoints, by (patch size, vision width, layers).
_OPENCLIP_TWINS = {
    (32, 768, 12): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    (16, 768, 12): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    (14, 1024, 24): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
}


def openclip_only_message(directory: Path) -> str | None:
    """A one-line how-to when `directory` holds an OpenCLIP checkpoint without transformers files.

    OpenCLIP's layout (open_clip_config.json + open_clip_model.safetensors) is a different set of
    weight names and a different config, which transformers cannot load; LAION's hub repositories carry
    both layouts, so the usual fix is to fetch the whole repository, or use its transformers twin.
    """
    if not (directory / OPENCLIP_CONFIG).is_file() or (directory / "config.json").is_file():
        return None
    weights = [w for w in OPENCLIP_WEIGHTS if (directory / w).is_file()]
    twin = None
    try:
        config = json.loads((directory / OPENCLIP_CONFIG).read_text(encoding="utf-8"))
        vision = config["model_cfg"]["vision_cfg"]
        key = (int(vision["patch_size"]), int(vision["width"]), int(vision["layers"]))
        twin = _OPENCLIP_TWINS.get(key)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    suggestion = (
        f"pass the hub id of its transformers-format twin (for this architecture: --model {twin})"
        if twin
        else "pass the hub id of its transformers-format twin (see `clearsight models`)"
    )
    return (
        f"{directory} is an OpenCLIP checkpoint ({OPENCLIP_CONFIG}"
        f"{' + ' + weights[0] if weights else ', no weights'}) without the transformers files "
        f"(config.json + model.safetensors) that Clearsight loads: {suggestion}, download the full hub "
        "repository (LAION's carry both formats side by side), or convert the checkpoint to the "
        "transformers CLIP layout with save_pretrained"
    )


def resolve(name: str, hub_id: str | None = None, revision: str | None = None) -> ModelSource:
    path = Path(name).expanduser()
    if path.is_dir():
        message = openclip_only_message(path)
        if message:
            raise ModelUnavailable(message)
        return ModelSource(name, str(path.resolve()), None, True)
    if hub_id is None and (name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1]):
        raise ModelUnavailable(f"model directory {name!r} does not exist")
    return ModelSource(name, hub_id or name, revision, False)


def local_fingerprint(directory: Path) -> str:
    """Changes when the config or any weight file changes (size or mtime), cheap to compute."""
    h = hashlib.sha256()
    cfg = directory / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(directory.iterdir()):
        if f.suffix in _WEIGHT_SUFFIXES:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(src: ModelSource, model_config: object) -> str:
    """What identifies the loaded weights: a local directory's `local_fingerprint`, else hub id@commit.

    The commit is the one transformers resolved the download to (`model_config._commit_hash`), else the
    requested revision, else "main".
    """
    if src.is_local:
        return local_fingerprint(Path(src.target))
    return f"{src.target}@{getattr(model_config, '_commit_hash', None) or src.revision or 'main'}"


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def how_to_get(src: ModelSource, what: str = "model") -> str:
    return (
        f"The {what} {src.target!r} is not on this machine and cannot be downloaded here. "
        f"On a machine with internet access run `huggingface-cli download {src.target}` (or "
        f"`hf download {src.target}`) and copy the Hugging Face cache (~/.cache/huggingface) here, "
        f"or save the model with save_pretrained and pass its directory with --model. "
        f"To see every feature work without downloaded weights, run `clearsight demo`."
    )


def load(src: ModelSource, loader: Callable[..., T], what: str = "model") -> T:
    """Call `loader(target, **kwargs)` (a `from_pretrained`) with the offline-first policy."""
    _quiet_transformers()
    kwargs: dict[str, object] = {}
    if src.revision and not src.is_local:
        kwargs["revision"] = src.revision
    try:
        return loader(src.target, local_files_only=True, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        if src.is_local:
            raise ModelUnavailable(f"could not load the {what} in {src.target}: {_one_line(exc)}") from exc
    if not hub_reachable():
        raise ModelUnavailable(how_to_get(src, what))
    try:
        return loader(src.target, **kwargs)
    except Exception as exc:
        raise ModelUnavailable(f"{how_to_get(src, what)} (download failed: {_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _quiet_transformers() -> None:
    """Weight-loading progress bars and hub chatter are noise in a CLI that has its own progress."""
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported by the import itself
        pass
