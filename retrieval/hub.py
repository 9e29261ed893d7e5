"""Load transformers models by registry name, hub id or local directory, offline-first.

The order is: a local directory; the local Hugging Face cache; a download, attempted only when
huggingface_hub is not in offline mode and the hub answers a metadata request for that very repository
(otherwise a download retries for half a minute before failing). Every failure ends in one
`ModelUnavailable` whose message says how to get the weights; a name that is neither a directory, a
registry name nor a hub id ends in a `ConfigError` naming the closest registry names.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from retrieval.errors import ConfigError, ModelUnavailable

T = TypeVar("T")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Files whose presence in the cache means a repository's weights are there (single file or sharded).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


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


def resolve(
    name: str,
    hub_id: str | None = None,
    revision: str | None = None,
    known: Sequence[str] = (),
    what: str = "model",
) -> ModelSource:
    """Say where `name` is loaded from: a local directory, or a hub id (the registry's or the name itself).

    A name that is no directory, not in the registry (`known` lists its names) and not shaped like a hub
    id (`owner/name`) nor already in the local cache is a typo until proven otherwise: it is refused with
    the closest known names rather than sent to the hub.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        message = openclip_only_message(path)
        if message:
            raise ModelUnavailable(message)
        return ModelSource(name, str(path.resolve()), None, True)
    if hub_id is None and (name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1]):
        raise ModelUnavailable(f"model directory {name!r} does not exist")
    if hub_id is None and known and "/" not in name and not in_cache(name):
        raise ConfigError(unknown_name(name, known, what), remedy="list_models")
    return ModelSource(name, hub_id or name, revision, False)


def close_names(name: str, known: Sequence[str], n: int = 3) -> list[str]:
    """The registry names most like `name` (difflib's ratio, case-insensitive), best first; only those
    about as close as the best one, so a clear favourite is named alone."""
    lowered = {k.lower(): k for k in known}
    scored = sorted(
        ((difflib.SequenceMatcher(None, name.lower(), k).ratio(), k) for k in lowered), reverse=True
    )
    scored = [(r, k) for r, k in scored if r >= 0.6]
    if not scored:
        return []
    best = scored[0][0]
    return [lowered[k] for r, k in scored[:n] if r >= best - 0.02]


def unknown_name(name: str, known: Sequence[str], what: str = "model") -> str:
    """One line for a mistyped model name: the closest names, and where the full list is."""
    close = close_names(name, known)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (
        f"unknown {what} {name!r}: {hint}known names: {', '.join(known)} "
        "(or give a hub id such as owner/name, or a local model directory)"
    )


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


def offline_mode() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE), plus transformers' older TRANSFORMERS_OFFLINE.

    The environment is read on every call (huggingface_hub snapshots it once at import, and a test or a
    notebook may change it later); with neither variable set, huggingface_hub's own setting decides.
    """
    from huggingface_hub import constants

    truthy = ("1", "true", "yes", "on")
    values = [os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if all(v is None for v in values):
        return bool(constants.HF_HUB_OFFLINE)
    return any((v or "").strip().lower() in truthy for v in values)


def in_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether the local Hugging Face cache holds `repo_id`'s config and weights (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
        except ValueError:  # not a valid repo id
            return False

    return cached("config.json") and any(cached(f) for f in _WEIGHT_FILES)


def hub_has(repo_id: str, revision: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub answers for this repository now: one metadata request, no retries.

    A download would retry for half a minute on a machine without a network; this fails in under a
    second. Raises ModelUnavailable when the hub answers that the repository or revision does not exist.
    """
    if offline_mode():
        return False
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=timeout)
    except RevisionNotFoundError as exc:
        raise ModelUnavailable(f"the hub has {repo_id!r} but no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(f"the hub has no model {repo_id!r} (or it is private)") from exc
    except Exception:  # no network, DNS, TLS, timeouts, 5xx: the hub cannot be used now
        return False
    return True


def how_to_get(src: ModelSource, what: str = "model") -> str:
    return (
        f"The {what} {src.target!r} is not on this machine and cannot be downloaded here. "
        f"On a machine with internet access run `hf download {src.target}` (huggingface_hub's command) "
        f"and copy the Hugging Face cache (~/.cache/huggingface) here, "
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
    if not hub_has(src.target, src.revision):
        raise ModelUnavailable(how_to_get(src, what))
    try:
        return loader(src.target, **kwargs)
    except Exception as exc:
        raise ModelUnavailable(f"{how_to_get(src, what)} (download failed: {_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def quiet_transformers() -> None:
    """Weight loading and saving bars ("Writing model shards"), hub chatter and the "requires torchvision"
    fallback notice are noise in a CLI that has its own progress: torchvision is deliberately absent here
    (see DESIGN.md) and the Pillow image processor it falls back to is the one this project uses."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        disable_progress_bars()
    except Exception:  # pragma: no cover - transformers missing is reported by the import itself
        pass


_quiet_transformers = quiet_transformers  # the name callers used before it was public
