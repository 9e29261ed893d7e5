"""Property-based requests generated from the app's own OpenAPI document: no input may cause a 5xx.

The example count is kept small (two shared cores); raise CLEARSIGHT_SCHEMATHESIS_EXAMPLES for a
longer hunt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explainer.server import create_app
from tests.server_kit import build_collection, server_settings

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis not installed (pip install schemathesis)"
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = int(os.environ.get("CLEARSIGHT_SCHEMATHESIS_EXAMPLES", "12"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("schemathesis")
    data = build_collection(root, tiny_clip_dir, n=6)
    # The schema's client does not run the lifespan: the app opens its collection on first use.
    app = create_app(server_settings(data, root, max_upload_bytes=256 * 1024))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)


OPERATIONS = [
    ("POST", "/api/search"),
    ("POST", "/api/explain"),
    ("GET", "/api/images"),  # browsing the collection (explainer/server/browse.py)
    ("GET", "/api/duplicates"),  # near-duplicate groups (explainer/server/duplicates.py)
    ("GET", "/api/images/{image_id}"),
    ("GET", "/api/images/{image_id}/thumb"),
    ("GET", "/api/images/{image_id}/evidence.png"),
    ("GET", "/api/query-images/{key}"),
    ("GET", "/api/health"),
    ("POST", "/api/captions"),
    ("GET", "/api/captions/status"),
    ("POST", "/search"),  # the reference system's API (explainer/server/compat.py)
]


def test_every_route_is_covered(api_schema: Any) -> None:
    documented = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


CASES = [
    (m, p, mode)
    for m, p in OPERATIONS
    for mode in ("positive", "negative")
    if p not in ("/api/health", "/api/captions/status") or mode == "positive"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_input_causes_a_server_error(api_schema: Any, method: str, path: str, mode: str) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    run()
