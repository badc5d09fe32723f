"""Nodes for the several-machines tests: ``lavender-flight serve`` processes on one catalog,
each in a network namespace of its own when this machine allows it (root and ``ip netns``),
else all on loopback.

In a namespace a node has its own address (``10.x.y.2``, a veth pair to this namespace's
``10.x.y.1``), so nothing may depend on every node being 127.0.0.1: the node advertises its
own address, clients reach it through the veth, and it reaches PostgreSQL through the
server's Unix socket (the file system is shared; the network is not).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.flight_server.test_cli import Served, clean_env, lavender_flight_command
from tests.postgres import PostgresServer

__all__ = ["Cluster", "Netns", "netns_available", "postgres_socket_url"]

COMMAND_TIMEOUT = 30.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


@dataclass
class Netns:
    """A network namespace joined to this one by a veth pair (``10.<a>.<b>.1`` <-> ``.2``)."""

    name: str
    host_ip: str
    node_ip: str

    @classmethod
    def create(cls) -> Netns:
        """A new namespace with its own /24 out of 10.200-249.x (a random, unused one)."""
        used = subprocess.run(
            ["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        ).stdout
        while True:
            net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250) + 1}"
            if f" {net}." not in used:
                break
        name = f"lf{secrets.token_hex(4)}"
        made = cls(name, f"{net}.1", f"{net}.2")
        try:
            _ip("netns", "add", name)
            _ip("link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}n")
            _ip("link", "set", f"{name}n", "netns", name)
            _ip("addr", "add", f"{made.host_ip}/24", "dev", f"{name}h")
            _ip("link", "set", f"{name}h", "up")
            made.run("ip", "addr", "add", f"{made.node_ip}/24", "dev", f"{name}n")
            made.run("ip", "link", "set", f"{name}n", "up")
            made.run("ip", "link", "set", "lo", "up")
        except BaseException:
            made.delete()
            raise
        return made

    def run(self, *args: str) -> None:
        """Run a command inside the namespace (checked)."""
        _ip("netns", "exec", self.name, *args)

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` as a command that runs inside the namespace (``ip`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *args]

    def delete(self) -> None:
        """Remove the veth pair and the namespace (what is left of them)."""
        subprocess.run(["ip", "link", "del", f"{self.name}h"], capture_output=True,
                       timeout=COMMAND_TIMEOUT)  # fmt: skip
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True,
                       timeout=COMMAND_TIMEOUT)  # fmt: skip


def netns_available() -> bool:
    """Whether namespaces with veth pairs can be made here (root, ``ip``, a kernel that lets)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        Netns.create().delete()
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def postgres_socket_url(postgres: PostgresServer, database: str) -> str:
    """The URL of a database through the server's Unix socket (reachable from any namespace)."""
    return f"postgresql://postgres@/{database}?host={postgres.root}&port={postgres.port}"


@dataclass
class Cluster:
    """Nodes on one catalog: started, SIGKILLed, stopped and started again by index.

    Args:
        catalog: the ``--catalog`` every node gets.
        home: the data home (shared: on several machines, a shared file system).
        netns: put each node in a namespace of its own.
        node_timeout: ``--node-timeout`` of the nodes.
    """

    catalog: str
    home: Path
    netns: bool
    node_timeout: float = 2.0
    nodes: list[Served | None] = field(default_factory=list)
    spaces: list[Netns | None] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def start(self, index: int | None = None) -> str:
        """Start node ``index`` again (on its address and port), or a new node; its URL."""
        if index is None:
            index = len(self.nodes)
            self.nodes.append(None)
            self.spaces.append(Netns.create() if self.netns else None)
            self.ports.append(0)
            self.urls.append("")
        old = self.nodes[index]
        if old is not None:
            old.close()  # its pipe
        space = self.spaces[index]
        host = space.node_ip if space is not None else "127.0.0.1"
        args = [*lavender_flight_command(), "serve", "--no-ui", "--host", host,
                "--port", str(self.ports[index]), "--catalog", self.catalog,
                "--data-home", str(self.home), "--storage-root", str(self.home.parent),
                "--node-timeout", str(self.node_timeout)]  # fmt: skip
        process = subprocess.Popen(
            space.command(args) if space is not None else args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        served = Served(process)
        self.nodes[index] = served
        served.start_reading()
        url = served.wait_until_serving()
        self.ports[index] = int(url.rsplit(":", 1)[1])
        self.urls[index] = url
        return url

    def kill(self, index: int) -> None:
        """SIGKILL a node: no goodbye, its heartbeat just stops."""
        served = self.nodes[index]
        assert served is not None
        served.process.kill()
        served.process.wait(timeout=COMMAND_TIMEOUT)

    def stop(self, index: int) -> int:
        """Stop a node as an operator does (SIGTERM); its exit code."""
        served = self.nodes[index]
        assert served is not None
        return served.stop()

    def close(self) -> None:
        """Stop every node still running and remove the namespaces."""
        for served in self.nodes:
            if served is not None:
                served.close()
        for space in self.spaces:
            if space is not None:
                space.delete()
