"""Shared fixtures: an isolated environment, pinned precision, and a tiny CLIP saved with save_pretrained
and loaded like a hub model. Helper functions live in tests/helpers.py, which tests import."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.demo.tiny import make_clip
from retrieval.encoders import Encoder, EncoderConfig, create_encoder, precision_facts
from retrieval.encoders import base as encoder_base


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's data dir, a .env, or the network."""
    monkeypatch.setenv("CLEARSIGHT_DATA_DIR", str(tmp_path / "default-data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("GROQ_API_KEY", raising=False)


@pytest.fixture(autouse=True)
def _machine_independent_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers and snapshots must not depend on the CPU that runs the suite.

    `auto` picks bf16 on CPUs with native bf16 and fp32 on others, so every command and server a test
    starts (in process or not) is pinned to fp32 through the setting, and in-process `auto` resolves as
    on a CPU without native bf16. Tests of `auto` itself fake the CPU
    (tests/retrieval/encoders/test_precision.py).
    """
    monkeypatch.setenv("CLEARSIGHT_PRECISION", "fp32")
    monkeypatch.setattr(encoder_base, "cpu_has_native_bf16", lambda: False)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say which kind of machine ran the suite at the top of its log, whatever the verbosity."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"clearsight {precision_facts()}; the tests pin fp32")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("tiny-clip"), "tiny", seed=0)


@pytest.fixture(scope="session")
def other_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model with other weights, for mismatch checks."""
    return make_clip(tmp_path_factory.mktemp("other-clip"), "tiny", seed=1)


@pytest.fixture(scope="session")
def encoder(tiny_clip_dir: Path) -> Iterator[Encoder]:
    enc = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    yield enc
