"""One settings object for the application, from the environment (prefix CLEARSIGHT_) and `.env`."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from explainer.explain.gguf import checked_gguf
from retrieval.imageio import DEFAULT_MAX_PIXELS
from retrieval.paths import default_data_dir


class Settings(BaseSettings):
    """Every knob a deployment may turn. Secrets are SecretStr: never printed, logged or rendered."""

    model_config = SettingsConfigDict(env_prefix="CLEARSIGHT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    model: str | None = None  # encoder; None: the registry default (or the index's own model)
    device: str = "auto"
    precision: str = "auto"
    index_factory: str = "flat"
    batch_size: int = 32
    workers: int = 2

    # Captioner (BLIP). Greedy decoding by default: on a CPU each beam multiplies the decoder's cost,
    # and captions are precomputed once per image, so the cheap setting is the one most users can run.
    caption_model: str | None = None  # None: the registry's default captioner
    caption_num_beams: int = Field(default=1, ge=1, le=16)
    caption_max_new_tokens: int = Field(default=30, ge=1, le=512)
    caption_min_new_tokens: int = Field(default=5, ge=0, le=512)
    caption_repetition_penalty: float = Field(default=1.0, gt=0.0)
    # auto: 8 on a CPU, grown with a GPU's memory (explainer.captions.captioner.auto_batch_size)
    caption_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    caption_prefix: str | None = None  # e.g. "a photography of": BLIP then completes the sentence

    # Groq: the key is read from GROQ_API_KEY too (the name Groq's own tools use).
    groq_api_key: SecretStr | None = Field(default=None, validation_alias="GROQ_API_KEY")
    groq_base_url: str | None = Field(default=None, validation_alias="GROQ_BASE_URL")

    # Server (`clearsight serve`). Limits are enforced before any work is done on a request, so a
    # hostile client cannot make the server buffer or decode more than these.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_upload_pixels: int = Field(default=40_000_000, ge=64)
    allow_url_queries: bool = False  # the server fetches image URLs given as queries (public hosts only)
    keep_uploads: bool = False  # uploaded query images stay in memory only, unless this is set
    upload_dir: Path | None = None  # None: <data_dir>/uploads (used only with keep_uploads)
    thumb_dir: Path | None = None  # None: <data_dir>/thumbs
    top_k_max: int = Field(default=100, ge=1, le=1000)
    offset_max: int = Field(default=10_000, ge=0)
    default_top_k: int = Field(default=12, ge=1, le=1000)
    # Near-duplicate hits fold into the best of them ("+N similar"; a query's show_all shows them all)
    collapse_duplicates: bool = True
    explain_backend: str = "auto"  # auto: Groq with a key, else offline
    explain_model: str | None = None  # None: the LLM config's default Groq model
    explain_concurrency: int = Field(default=16, ge=1, le=64)  # >= a page, so a page is one round trip
    explain_timeout_s: float = Field(default=20.0, gt=0)
    explain_max_retries: int = Field(default=2, ge=0, le=10)
    # `--explain-backend local`: a GGUF model for llama-cpp-python; None: the PyPI-packaged Gemma 3 270M
    # when installed (explainer/explain/gguf.py). Checked here: exists, a file, .gguf, a bounded size.
    local_gguf: Path | None = None
    evidence_regions: int = Field(default=3, ge=0, le=16)  # boxes per card; 0 turns evidence off
    reload_interval_s: float = Field(default=2.0, ge=0)  # 0: never look for a newer index version
    # `serve --engine ray`: the image index split over Ray actors, queries fanned out and merged
    engine: Literal["local", "ray"] = "local"
    shards: int = Field(default=2, ge=1, le=256)
    ray_address: str | None = Field(default=None, max_length=300)  # None: a private local cluster
    # `serve --watch`: follow the indexed folders and index what changes (retrieval/watch.py)
    watch: bool = False

    # Sharing on a network (explainer/server/security.py). Binding a non-loopback address needs a
    # token: CLEARSIGHT_API_TOKEN, or one generated once (`generate_token`) and kept in the data dir.
    api_token: SecretStr | None = None
    generate_token: bool = False  # make a token on first start (printed once, kept mode 0600)
    token_on_loopback: bool = False  # also require the token on 127.0.0.1 / ::1 / localhost
    # Host names beyond loopback and the bind address: "a.example,b.example" or a JSON list
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_failures_per_minute: int = Field(default=10, ge=1, le=10_000)  # wrong tokens per client, then 429
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)  # a sign-in lasts this long (cookie Max-Age)
    secure_cookie: bool | None = (
        None  # None: Secure when the request came over HTTPS; true behind a TLS proxy
    )
    # Every route that searches (page, detail, evidence, /api/search, /search, /api/explain) shares one
    # per-client limit, and together they hold at most `search_budget_hits` hits in work at once.
    explain_requests_per_minute: int = Field(default=240, ge=1, le=100_000)  # per client, then 429
    explain_burst: int = Field(default=48, ge=1, le=10_000)  # requests a client may send at once
    search_budget_hits: int = Field(default=200, ge=1, le=100_000)  # hits searched at once, all clients
    upload_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 86400)  # an unused query image is dropped
    decode_budget_mb: int = Field(default=384, ge=16, le=1_000_000)  # decoded pixels held at once
    body_budget_mb: int = Field(default=64, ge=1, le=1_000_000)  # large request bodies held at once
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=64)  # collection images (ingest's limit)
    # Photos' GPS location (EXIF, XMP) in originals served by /api/images/{id}: None strips it when the
    # server is bound beyond loopback (other people see the photos), keeps it on 127.0.0.1.
    strip_location: bool | None = None
    # The LLM provider's rate budget (explainer/explain/budget.py) and page calls (explain/page.py).
    explain_page_size: int = Field(default=12, ge=1, le=48)  # hits per LLM call; 1: one call per hit
    explain_provider_rpm: int = Field(default=30, ge=1, le=1_000_000)  # Groq free tier, llama-3.1-8b
    explain_provider_tpm: int = Field(default=6000, ge=100, le=100_000_000)  # headers replace it once seen
    explain_budget_wait_s: float = Field(default=600.0, ge=0)  # a call's wait for budget, then offline
    explain_wait_s: float = Field(default=120.0, ge=0, le=3600)  # POST /api/explain answers by then (pending)
    explain_rate_window_s: float = Field(default=60.0, gt=0, le=86_400)  # the rate minute; tests shorten it
    # Captions in the server (explainer/captions/worker.py): one worker per process captions the hits pages
    # show, then the rest of the collection while idle. auto: on when CLEARSIGHT_CAPTION_MODEL is set;
    # `clearsight run DIR` turns it on (`--no-captions`: off).
    server_captions: Literal["auto", "on", "off"] = "auto"
    caption_background: bool = True  # caption the collection while no request needs the model
    # Patch features for evidence: "background" stores each image's (ViT-B/32: ~25 KB, int8) from the pass
    # that indexes it, and a server fills in those missing (explainer/patch_worker.py: images indexed
    # before) while idle, so a page's boxes need no image-tower pass; "off" stores none
    # (hits get dense evidence, one forward each, unless `index --patches` stored them).
    patch_features: Literal["background", "off"] = "background"
    patch_fill_batch: int = Field(default=4, ge=1, le=64)  # images per background batch

    @field_validator("local_gguf", mode="before")
    @classmethod
    def _usable_gguf(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # CLEARSIGHT_LOCAL_GGUF= (empty) means: not set
        return checked_gguf(value) if isinstance(value, str | Path) else value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [h.strip() for h in text.split(",") if h.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, or a ConfigError naming each environment variable whose value is unusable."""
    from pydantic import ValidationError

    from retrieval.errors import ConfigError

    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(settings_problem(exc)) from None


def settings_problem(exc: Any) -> str:
    """One line for a settings validation error: the variable's name, what is wrong, and the value given.

    Values of secret fields are never repeated.
    """
    prefix = str(Settings.model_config.get("env_prefix", ""))
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else "?"
        info = Settings.model_fields.get(field)
        alias = info.validation_alias if info is not None and isinstance(info.validation_alias, str) else None
        name = alias or f"{prefix}{field}".upper()
        secret = info is not None and "SecretStr" in str(info.annotation)
        given = "" if secret or "input" not in err else f" (got {str(err['input'])[:40]!r})"
        parts.append(f"{name}: {str(err['msg']).lower()}{given}")
    return "bad setting " + "; ".join(parts)
