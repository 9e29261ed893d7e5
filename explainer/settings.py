"""One settings object for the application, from the environment (prefix CLEARSIGHT_) and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    # Groq: the key is read from GROQ_API_KEY too (the name Groq's own tools use).
    groq_api_key: SecretStr | None = Field(default=None, validation_alias="GROQ_API_KEY")
    groq_base_url: str | None = Field(default=None, validation_alias="GROQ_BASE_URL")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
