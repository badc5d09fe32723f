"""A throwaway PostgreSQL server for tests (and the catalog benchmark): Debian's binaries,
a temporary folder owned by ``postgres``, a free port on 127.0.0.1, a fresh database per use.

It fails loudly when PostgreSQL is not installed: tests must not pass by skipping it.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import adbc_driver_postgresql.dbapi as pg_dbapi

__all__ = ["PostgresNotInstalled", "PostgresServer", "find_bin_dir"]

COMMAND_TIMEOUT = 120.0


class PostgresNotInstalled(RuntimeError):
    """No ``initdb``/``pg_ctl`` on this machine."""


def find_bin_dir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: the newest Debian version, else the PATH.

    Raises:
        PostgresNotInstalled: neither is there.
    """
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    if found and Path(found).with_name("pg_ctl").exists():
        return Path(found).resolve().parent
    raise PostgresNotInstalled(
        "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH): "
        "the catalog tests run on a real PostgreSQL; install it (Debian: apt-get install "
        "postgresql; .ci/run does)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 only.

    ``start()`` creates and starts it; ``stop()``/``start_again()``/``restart()`` drive it
    with ``pg_ctl``; ``create_database()`` gives each test its own database; ``destroy()``
    stops it and removes the folder. As root, every PostgreSQL command runs as ``postgres``
    (``initdb`` refuses root).
    """

    def __init__(
        self, root: Path, bin_dir: Path, port: int, settings: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.port = port
        self.data = root / "data"
        self.log = root / "server.log"
        self.settings = dict(settings or {})

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start(cls, settings: dict[str, str] | None = None) -> PostgresServer:
        """Create a cluster (``initdb -A trust``) and start it on a free port.

        ``settings`` are extra server settings (``-c name=value``).

        Raises:
            PostgresNotInstalled: PostgreSQL's binaries are not there.
        """
        bin_dir = find_bin_dir()
        root = Path(tempfile.mkdtemp(prefix="lf-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(root, bin_dir, free_port(), settings)
        try:
            server._pg("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres")
            for _ in range(3):  # the free port can be taken before the server binds it
                try:
                    server.start_again()
                    break
                except subprocess.CalledProcessError:
                    server.port = free_port()
            else:
                server.start_again()
        except BaseException:
            server.destroy()
            raise
        return server

    def _pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise subprocess.CalledProcessError(
                done.returncode, command, done.stdout, done.stderr + log[-2000:]
            )
        return done

    def _options(self) -> str:
        extra = "".join(f" -c {k}={v}" for k, v in self.settings.items())
        return f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1{extra}"

    def start_again(self) -> None:
        """Start the (stopped) cluster on its port and wait until it takes connections."""
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
                 "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        """Stop the cluster (fast: open sessions are ended)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop and start it again, as an operator's restart does to the running server."""
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
                 "-m", "fast", "-w", "-t", "60", "restart")  # fmt: skip

    def destroy(self) -> None:
        """Stop it (if running) and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------

    def url(self, database: str = "postgres", user: str = "postgres", password: str = "") -> str:
        """The URL of one of its databases (trust authentication: a password is ignored)."""
        secret = f":{password}" if password else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        with pg_dbapi.connect(self.url() + "?connect_timeout=10", autocommit=True) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"lf_{secrets.token_hex(5)}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still on it."""
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
