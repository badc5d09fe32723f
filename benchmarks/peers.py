"""The peers, each in its own virtual environment under a cache folder outside the repo.

``--peers`` creates the venvs (``python -m venv --system-site-packages``, so the installed
pyarrow is reused where versions allow), installs the torch installed here first (the local
CPU wheel: pip never pulls a multi-GB CUDA build; it stays pinned while the peer installs)
and runs a small client script in each venv's python, which prints its figures as JSON:
peers never import into our process. A peer that cannot be installed or run is recorded as
"not measured: <reason>".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .common import Server, _start

CACHE = Path(os.environ.get("LAVENDER_FLIGHT_BENCH_CACHE", "~/.cache/lavender-flight-bench"))
SCRIPTS = Path(__file__).parent / "peer_scripts"
SHARED = "peer_timing.py"
"""What the streaming peers' scripts share (a loader's timed pass, the result line)."""
PEERS = {
    # 0.1.10 imports tqdm without declaring it
    "lavender-data": (["lavender-data==0.1.10", "tqdm"], "lavender_data"),
    # their client scripts read the Parquet shards with pyarrow themselves
    "mosaicml-streaming": (["mosaicml-streaming", "pyarrow"], "streaming"),
    "litdata": (["litdata", "pyarrow"], "litdata"),
}


class PeerError(RuntimeError):
    """A peer could not be installed or run; the message says why."""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def venv_python(peer: str) -> Path:
    """The peer's venv python, created and installed on first use."""
    packages, module = PEERS[peer]
    folder = CACHE.expanduser() / "venvs" / peer
    python = folder / "bin" / "python"
    if python.exists():
        # installed is enough here (found, not imported: streaming's import needs the
        # client script's torchvision stand-in); a broken import shows when the script runs
        modules = [module, *(p for p in ("pyarrow", "tqdm") if p in packages)]
        probe = (
            "import importlib.util, sys; "
            f"sys.exit(any(importlib.util.find_spec(m) is None for m in {modules!r}))"
        )
        check = subprocess.run([str(python), "-c", probe], capture_output=True)
        if check.returncode == 0:
            return python
    folder.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        ["python3", "-m", "venv", "--system-site-packages", str(folder)],
        capture_output=True,
        text=True,
    )
    if made.returncode:
        raise PeerError(f"venv failed: {_tail(made.stderr)}")
    import torch

    pin = f"torch=={torch.__version__.split('+')[0]}"
    constraints = folder / "constraints.txt"
    constraints.write_text(pin + "\n")
    started = time.time()
    for step in ([pin], packages):  # torch first: the peer's own install then finds it there
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *step],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode:
            raise PeerError(f"pip install {' '.join(step)} failed: {_tail(done.stderr)}")
    print(f"  installed {peer} in {time.time() - started:.0f} s", flush=True)
    return python


def _script(name: str) -> Path:
    """Copy a client script, and the module the scripts share, into the cache folder (run
    from there, outside the repo)."""
    folder = CACHE.expanduser() / "scripts"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPTS / SHARED, folder / SHARED)
    shutil.copy(SCRIPTS / name, folder / name)
    return folder / name


def _run_script(python: Path, script: str, spec: dict[str, Any], timeout: float) -> Any:
    try:
        done = subprocess.run(
            [str(python), "-W", "ignore", str(_script(script)), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=CACHE.expanduser(),
        )
    except subprocess.TimeoutExpired:
        raise PeerError(f"{script} ran over {timeout:.0f} s") from None
    if done.returncode:
        raise PeerError(f"{script} failed: {_tail(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def subset(folder: Path, rows: int, target: Path) -> Path:
    """The first ``rows`` rows of a Parquet folder, as 4 shards in ``target``."""
    table = ds.dataset(folder, format="parquet").head(rows)
    target.mkdir(parents=True, exist_ok=True)
    per = -(-rows // 4)
    for index in range(4):
        part = table.slice(index * per, per)
        if part.num_rows:
            pq.write_table(part, target / f"shard.{index:08d}.parquet")
    return target


def lavender_data_server(python: Path, home: Path) -> Server:
    """lavender-data's FastAPI server on a free port, its home and SQLite under ``home``."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    env_before = dict(os.environ)
    os.environ.update(
        HOME=str(home),
        LAVENDER_DATA_DISABLE_UI="true",
        LAVENDER_DATA_DISABLE_AUTH="true",
        LAVENDER_DATA_HOST="127.0.0.1",
        LAVENDER_DATA_PORT=str(port),
    )
    try:
        server = _start(
            [str(python), "-W", "ignore", "-m", "lavender_data.server", "run", "--init",
             "--env-file", str(home / ".env")],
            r"Uvicorn running on (http://\S+)",
            "stderr",
            timeout=120,
            cwd=home,
        )  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return server


def run_lavender_data(
    python: Path, server: Server, folder: Path, rows: int, cases: list[dict[str, Any]],
    repeat: int, row_bytes: float,
) -> Any:  # fmt: skip
    spec = {
        "url": server.url,
        "folder": str(folder),
        "rows": rows,
        "cases": cases,
        "repeat": repeat,
        "row_bytes": row_bytes,
    }
    return _run_script(python, "lavender_data_client.py", spec, timeout=900)


def run_chunked(
    script: str, python: Path, folder: Path, out: Path, rows: int, columns: dict[str, str],
    batch_size: int, workers: list[int], repeat: int, row_bytes: float,
) -> Any:  # fmt: skip
    """A peer that converts the Parquet rows into its own chunk format, then reads them.

    ``script`` is ``mosaic_client.py`` (``MDSWriter`` + ``StreamingDataset`` in a torch
    ``DataLoader``) or ``litdata_client.py`` (``litdata.optimize`` + ``StreamingDataset`` in
    its ``StreamingDataLoader``); both take the same spec and print the same JSON.
    """
    spec = {
        "folder": str(folder),
        "out": str(out),
        "rows": rows,
        "columns": columns,
        "batch_size": batch_size,
        "workers": workers,
        "repeat": repeat,
        "row_bytes": row_bytes,
    }
    return _run_script(python, script, spec, timeout=900)
