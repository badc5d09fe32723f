"""Any Flight client can read our datasets: a Node.js client of our own few lines does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lavender_flight.client import Writer
from lavender_flight.client import api as lavender
from lavender_flight.client.connection import LavenderClient

NODE_DIR = Path(__file__).parent / "node"
pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the client's npm packages installed from the lock file."""
    binary = shutil.which("node")
    npm = shutil.which("npm")
    assert binary and npm, "Node.js and npm are needed: apt-get install -y nodejs npm"
    if not (NODE_DIR / "node_modules" / "apache-arrow").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            timeout=600,
            capture_output=True,
        )
    return binary


def run_node(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(NODE_DIR / "read_dataset.mjs"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_node_lists_and_reads_joined_rows(
    node: str, client: LavenderClient, api_url: str, data_dir: Path
) -> None:
    dataset = lavender.create_dataset(name="from-node")
    main = lavender.create_shardset(
        dataset.id,
        (data_dir / "main").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="text", type_="str"),
            lavender.DatasetColumnOptions(name="weight", type_="float64"),
        ],
    )
    feature = lavender.create_shardset(
        dataset.id,
        (data_dir / "feat").as_uri(),
        [
            lavender.DatasetColumnOptions(name="uid", type_="int"),
            lavender.DatasetColumnOptions(name="tags", type_="list<str>"),
        ],
    )
    main_writer = Writer.get(dataset_id=dataset.id, shardset_id=main.id)
    for index in range(3):
        uids = range(index * 40, index * 40 + 40)
        main_writer.write(
            [
                {"uid": u, "text": f"héllo {u} ✓", "weight": None if u % 7 == 0 else u / 8}
                for u in uids
            ],
            shard_index=index,
        )
    Writer.get(dataset_id=dataset.id, shardset_id=feature.id).write(
        [{"uid": u, "tags": [f"t{u % 3}"] * (u % 3)} for u in range(0, 120, 2)]
    )
    lavender.create_dataset(name="other")

    done = run_node(node, api_url, "from-node")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {d["name"]: d["total_records"] for d in out["datasets"]} == {
        "from-node": 120,
        "other": 0,
    }
    assert [f["name"] for f in out["schema"]] == ["uid", "text", "weight", "tags"]
    assert out["endpoints"] == 3 and out["num_rows"] == 120
    expected = lavender.read_dataset("from-node").to_pylist()
    assert out["rows"] == expected
    assert out["rows"][7] == {"uid": 7, "text": "héllo 7 ✓", "weight": None, "tags": None}
    assert out["rows"][4]["tags"] == ["t1"]


def test_node_sees_not_found(node: str, client: LavenderClient, api_url: str) -> None:
    done = run_node(node, api_url, "missing")
    assert done.returncode == 1
    assert (
        "GetFlightInfo failed: NOT_FOUND: DatasetNotFound: no dataset named 'missing'"
        in done.stderr
    )


def test_node_is_told_plainly_that_a_dataset_has_nothing_to_read(
    node: str, client: LavenderClient, api_url: str
) -> None:
    lavender.create_dataset(name="nothing")
    done = run_node(node, api_url, "nothing")
    assert done.returncode == 1, done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "GetFlightInfo failed: INVALID_ARGUMENT: InvalidArgument: dataset 'nothing' has no shardset"
    )
