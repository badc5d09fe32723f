"""Server settings: every flag of ``lavender-flight serve`` is also ``LAVENDER_FLIGHT_<FLAG>``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
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
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for s3:// shardsets, e.g. http://127.0.0.1:9000 for MinIO "
        "(default: AWS, or AWS_ENDPOINT_URL).",
    )
    s3_region: str | None = Field(
        default=None, description="S3 region (default: AWS_DEFAULT_REGION or ~/.aws/config)."
    )
    s3_profile: str | None = Field(
        default=None, description="Profile of ~/.aws/credentials and ~/.aws/config to use."
    )
    s3_access_key_id: str | None = Field(
        default=None,
        description="S3 access key id (default: the standard AWS chain: environment, "
        "~/.aws, instance role).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        description="S3 secret access key; prefer the environment variable to the flag, "
        "which other users can see in the process list.",
    )

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

    def storage_defaults(self) -> dict[str, dict[str, Any]]:
        """Default storage options per protocol, from the ``s3_*`` settings that are set.

        Every shardset's own storage options are laid over these (``LavenderService``).
        """
        s3: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if self.s3_endpoint_url:
            client["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            client["region_name"] = self.s3_region
        if client:
            s3["client_kwargs"] = client
        if self.s3_profile:
            s3["profile"] = self.s3_profile
        if self.s3_access_key_id:
            s3["key"] = self.s3_access_key_id
        if self.s3_secret_access_key is not None:
            s3["secret"] = self.s3_secret_access_key.get_secret_value()
        return {"s3": s3} if s3 else {}
