"""Server settings: every flag of ``lavender-flight serve`` is also ``LAVENDER_FLIGHT_<FLAG>``."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServerSettings"]


class ServerSettings(BaseSettings):
    """What a server needs to start; built from flags and the environment, never at import."""

    model_config = SettingsConfigDict(env_prefix="LAVENDER_FLIGHT_", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the Flight server binds to.")
    port: int = Field(default=8815, ge=0, le=65535, description="Flight port (0 picks a free one).")
    data_home: Path = Field(
        default=Path("~/.lavender-flight"),
        description="Folder for the catalog file and the demo dataset.",
    )
    catalog: Path | None = Field(
        default=None, description="SQLite catalog file (default: <data_home>/catalog.db)."
    )
    modules_dir: Path | None = Field(
        default=None, description="Folder of custom filter/collater/preprocessor modules."
    )
    workers: int | None = Field(
        default=None,
        ge=0,
        le=256,
        description="Preprocessing worker processes (default: the number of cores; 0: none).",
    )
    ui_port: int = Field(default=3000, ge=0, le=65535, description="Dashboard port.")
    no_ui: bool = Field(default=False, description="Do not serve the dashboard.")
    demo: bool = Field(default=False, description="Create the demo dataset (once) and serve it.")
    log_level: str = Field(default="INFO", description="Logging level of the server.")

    @property
    def home(self) -> Path:
        """The data home, with ``~`` expanded, absolute."""
        return self.data_home.expanduser().resolve()

    @property
    def catalog_path(self) -> Path:
        """Where the catalog file lives."""
        return (self.catalog or self.home / "catalog.db").expanduser().resolve()

    @property
    def worker_count(self) -> int:
        """Preprocessing workers to start."""
        return self.workers if self.workers is not None else (os.cpu_count() or 1)

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"grpc://{self.host}:{self.port}"
