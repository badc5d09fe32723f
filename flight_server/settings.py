"""Server settings: every flag of ``lavender-flight serve`` is also ``LAVENDER_FLIGHT_<FLAG>``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..catalog import parse_target
from ..protocol.errors import InvalidArgument

__all__ = ["LOG_LEVELS", "ServerSettings"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ServerSettings(BaseSettings):
    """What a server needs to start; built from flags and the environment, never at import."""

    model_config = SettingsConfigDict(env_prefix="LAVENDER_FLIGHT_", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the Flight server binds to.")
    port: int = Field(default=8815, ge=0, le=65535, description="Flight port (0 picks a free one).")
    data_home: Path = Field(
        default=Path("~/.lavender-flight"),
        description="Folder for the catalog file and the demo dataset.",
    )
    catalog: str | None = Field(
        default=None,
        repr=False,  # a PostgreSQL URL may hold a password
        description="The catalog: a SQLite file (a path, sqlite:///relative.db, "
        "sqlite:////absolute.db or file:///absolute.db; default: <data_home>/catalog.db) or "
        "a PostgreSQL database (postgresql://user@host:port/database); give PostgreSQL's "
        "password by PGPASSWORD or ~/.pgpass rather than in the URL, which other users can "
        "see in the process list.",
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
    plugin_timeout: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="Seconds one plugin call (a filter, collater or preprocessor on one "
        "batch) may take; then that batch fails by the iteration's policy (skipped as failed "
        "with skip_on_failure, else TransformFailed): a worker process running it is killed "
        "and replaced, a call in the server process is abandoned.",
    )
    ui_port: int = Field(default=3000, ge=0, le=65535, description="Dashboard port.")
    no_ui: bool = Field(default=False, description="Do not serve the dashboard.")
    demo: bool = Field(default=False, description="Create the demo dataset (once) and serve it.")
    log_level: str = Field(
        default="INFO",
        description="Logging level of the server: DEBUG, INFO, WARNING, ERROR or CRITICAL "
        "(DEBUG also shows the dashboard's access log and gRPC's own logging).",
    )
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

    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API key every client must send (repeatable, or a comma list); with no "
        "key and no --api-keys-file the server is open. Prefer the environment variable or "
        "--api-keys-file to the flag, which other users can see in the process list.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of API keys, one per line (# starts a comment); adds to --api-key.",
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate (chain) to serve grpc+tls:// (with --tls-key)."
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert.")
    storage_root: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folder under which file:// shardset locations may be read and written, "
        "besides the data home and the folder the server was started in (repeatable; the "
        "environment variable takes a list separated by the path separator).",
    )
    allow_protocol: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="fsspec protocol to allow for shardset locations besides file:// (under "
        "the storage roots) and the object stores s3, s3a, gs, gcs, az, abfs, abfss "
        "(repeatable, or a comma list). DANGEROUS: anyone with an API key can then make the "
        "server open whatever that protocol reaches with the server's own network and "
        "credentials (http/https: any URL, internal ones included; read-only). Chained URLs "
        "and storage options naming a local path or another protocol stay refused.",
    )
    allow_memory: bool = Field(
        default=False,
        description="Allow memory:// shardset locations: shards kept in the server's RAM, "
        "lost when it stops (for tests and demos).",
    )
    max_shard_mb: int = Field(
        default=1024,
        ge=1,
        le=1 << 20,
        description="Largest shard (MiB of Arrow data) a client may write through the server; "
        "a larger upload is refused as soon as it passes the limit.",
    )
    lease_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Seconds a stream's samples stay its own when its server cannot renew "
        "them (cut off from the catalog). A live client keeps them however long its loop "
        "pauses; a client that goes away frees them at once.",
    )
    node_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds without a heartbeat after which a server sharing the catalog "
        "counts as dead: the samples its streams held go back to the queue.",
    )
    advertise: str | None = Field(
        default=None,
        description="The URL clients reach this server at, e.g. grpc://host:8815 behind NAT "
        "(default: --host and the port it listens on).",
    )
    read_ahead_seconds: float = Field(
        default=0.5,
        gt=0,
        le=600,
        description="How far a stream runs ahead of a training loop that reports what it "
        "takes: about this many seconds of the loop's pace (a crash or a pushback repeats at "
        "most that much).",
    )
    read_ahead_mb: int = Field(
        default=64,
        ge=1,
        le=1 << 20,
        description="And never more than this many MiB ahead of the loop, per rank.",
    )

    join_cache_mb: int = Field(
        default=512,
        ge=0,
        le=1 << 30,
        description="Memory (MiB) for feature shards read by joins by uid (shardsets not "
        "aligned with the main one), shared by every read of the server.",
    )

    shutdown_grace: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Seconds a stopping server (SIGTERM, Ctrl-C) gives open calls to end after "
        "saving what the streams held; calls still open then (a client not reading its "
        "stream) are cut.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
            return value.strip().upper()
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")

    @field_validator("api_key", "allow_protocol", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [k.strip() for v in value for k in str(v).split(",") if k.strip()]
        return value

    @field_validator("storage_root", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p]
        return value

    @property
    def home(self) -> Path:
        """The data home, with ``~`` expanded, absolute."""
        return self.data_home.expanduser().resolve()

    @property
    def catalog_target(self) -> str:
        """What ``open_catalog`` opens: the ``catalog`` setting, or ``<data_home>/catalog.db``."""
        return self.catalog if self.catalog else str(self.home / "catalog.db")

    @property
    def catalog_path(self) -> Path:
        """Where the SQLite catalog file lives.

        Raises:
            InvalidArgument: the catalog is not a SQLite file (PostgreSQL, an unknown URL).
        """
        return parse_target(self.catalog_target).path

    @property
    def worker_count(self) -> int:
        """Preprocessing workers to start."""
        return self.workers if self.workers is not None else (os.cpu_count() or 1)

    @property
    def scheme(self) -> str:
        """``grpc+tls`` with a TLS certificate, ``grpc`` without."""
        return "grpc+tls" if self.tls_cert is not None else "grpc"

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def api_keys(self) -> list[str]:
        """Every accepted API key: ``--api-key`` values, then the keys file's lines.

        Raises:
            InvalidArgument: the keys file cannot be read, or it names no key.
        """
        keys = [k.get_secret_value() for k in self.api_key]
        if self.api_keys_file is not None:
            path = self.api_keys_file.expanduser()
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise InvalidArgument(f"cannot read --api-keys-file {path}: {exc}") from exc
            found = [ln.split("#", 1)[0].strip() for ln in lines]
            found = [k for k in found if k]
            if not found:
                raise InvalidArgument(f"--api-keys-file {path} holds no key")
            keys.extend(found)
        return keys

    def tls_certificates(self) -> list[tuple[bytes, bytes]]:
        """``[(cert PEM, key PEM)]`` to serve TLS, or ``[]``.

        Raises:
            InvalidArgument: only one of --tls-cert/--tls-key is set, or a file is unreadable.
        """
        if self.tls_cert is None and self.tls_key is None:
            return []
        if self.tls_cert is None or self.tls_key is None:
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        try:
            return [
                (self.tls_cert.expanduser().read_bytes(), self.tls_key.expanduser().read_bytes())
            ]
        except OSError as exc:
            raise InvalidArgument(f"cannot read the TLS certificate or key: {exc}") from exc

    def storage_roots(self, cwd: Path | None = None) -> list[Path]:
        """Folders file:// locations must lie under.

        The data home, ``cwd`` (where the server started), and every ``--storage-root``.
        """
        roots = [self.home, (cwd or Path.cwd()).resolve()]
        for extra in self.storage_root:
            found = extra.expanduser().resolve()
            if found not in roots:
                roots.append(found)
        return roots

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
