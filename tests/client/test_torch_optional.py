"""PyTorch is an extra: the client works without it and says what to install when it is needed.

The "no torch" runs are fresh interpreters whose import system refuses ``torch`` (a meta path
finder), as on a machine where it was never installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lavender_flight.client import ClientSettings, LavenderClient, Writer
from tests.conftest import CALL_TIMEOUT

ROWS = 50
MISSING = (
    '{what} needs PyTorch, which is not installed: pip install "lavender-flight[torch]" (on a '
    "CPU-only machine, first: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)

BLOCK_TORCH = """
import sys

class NoTorch:
    '''Refuses torch as if it were not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
"""

USE_THE_CLIENT = """
import json, sys
from lavender_flight.client import Iteration
from lavender_flight.client import api as lavender

url, dataset_id = sys.argv[1:3]
lavender.init(url, timeout=30)
seen = {}
iteration = Iteration.from_dataset(dataset_id, batch_size=8)
seen["python"] = sum(len(batch["uid"]) for batch in iteration)
numpy = Iteration.from_dataset(dataset_id, batch_size=8, format="numpy")
seen["numpy"] = sum(len(batch["uid"]) for batch in numpy)
for what, call in (
    ("format", lambda: Iteration.from_dataset(dataset_id, batch_size=8, format="torch")),
    ("loader", lambda: iteration.to_torch_dataloader()),
):
    try:
        call()
        seen[what] = "no error"
    except ImportError as exc:
        seen[what] = f"{type(exc).__name__}: {exc}"
seen["torch imported"] = "torch" in sys.modules
print(json.dumps(seen))
"""


@pytest.fixture
def dataset_id(api_url: str, data_dir: Path) -> str:
    """``ROWS`` samples in one shard."""
    with LavenderClient(ClientSettings(api_url, timeout=CALL_TIMEOUT)) as client:
        dataset = client.create_dataset("no-torch")
        shardset = client.create_shardset(
            dataset.id, (data_dir / "main").as_uri(), [{"name": "uid", "type": "int"}]
        )
        Writer.get(dataset_id=dataset.id, shardset_id=shardset.id, client=client).write(
            [{"uid": u} for u in range(ROWS)]
        )
        return dataset.id


def run(code: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_without_torch_the_client_works_and_torch_uses_say_what_to_install(
    api_url: str, dataset_id: str
) -> None:
    seen = run(BLOCK_TORCH + USE_THE_CLIENT, api_url, dataset_id)
    assert seen == {
        "python": ROWS,
        "numpy": ROWS,
        "format": "ImportError: " + MISSING.format(what='format="torch"'),
        "loader": "ImportError: " + MISSING.format(what="to_torch_dataloader()"),
        "torch imported": False,
    }


def test_the_block_is_real_torch_cannot_be_imported_under_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + "import torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr


def test_with_torch_installed_python_batches_do_not_import_it(
    api_url: str, dataset_id: str
) -> None:
    seen = run(USE_THE_CLIENT, api_url, dataset_id)
    assert (seen["python"], seen["numpy"], seen["format"], seen["loader"]) == (
        ROWS,
        ROWS,
        "no error",
        "no error",
    )
    assert seen["torch imported"] is True  # the torch format and the loader did


def test_plain_iteration_never_imports_torch(api_url: str, dataset_id: str) -> None:
    code = USE_THE_CLIENT.split("for what, call")[0] + (
        'print(json.dumps({"torch imported": "torch" in sys.modules, **seen}))'
    )
    assert run(code, api_url, dataset_id) == {
        "torch imported": False,
        "python": ROWS,
        "numpy": ROWS,
    }


def test_torch_is_an_extra_and_the_test_extra_takes_it() -> None:
    requires = importlib.metadata.requires("lavender-flight") or []
    extras: dict[str, list[str]] = {}
    for line in requires:
        found = re.search(r';\s*extra\s*==\s*"([^"]+)"', line)
        extras.setdefault(found.group(1) if found else "", []).append(line.split(";")[0])
    names = {extra: {re.split(r"[<>=\[ ]", r)[0] for r in rs} for extra, rs in extras.items()}
    assert "torch" not in names[""]  # pip install -e . brings no torch
    assert "torch" in names["torch"]
    assert "lavender-flight[torch]" in extras["test"]
