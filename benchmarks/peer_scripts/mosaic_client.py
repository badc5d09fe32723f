"""Runs in mosaicml-streaming's own venv: MDSWriter the Parquet rows, then iterate them with
``StreamingDataset`` through a torch ``DataLoader``; print JSON.

Argument: a JSON object with ``folder`` (Parquet), ``out`` (the MDS folder), ``rows``,
``columns`` (name -> MDS encoding), ``batch_size``, ``workers`` (list), ``repeat``,
``row_bytes``. It never imports Lavender Flight.
"""

import importlib.machinery
import json
import shutil
import sys
import time
import types


def _stand_in_for_torchvision() -> None:
    """Let ``import streaming`` work where torchvision cannot load.

    streaming's package imports its vision datasets, hence torchvision, which this client
    never uses; torchvision's PyPI build is linked to the CUDA torch and fails to import
    beside the CPU torch wheel ("operator torchvision::nms does not exist"). Then empty
    modules stand in for the two names ``streaming.vision`` imports.
    """
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        modules = {}
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms",
                     "torchvision.transforms.functional"):  # fmt: skip
            modules[name] = types.ModuleType(name)
            modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules["torchvision.datasets"].VisionDataset = object
        modules["torchvision.transforms.functional"].to_tensor = None
        sys.modules.update(modules)


_stand_in_for_torchvision()

import numpy as np  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
from peer_timing import report, timed_pass  # noqa: E402  (beside this script)
from streaming import MDSWriter, StreamingDataset  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def write(spec: dict) -> float:
    shutil.rmtree(spec["out"], ignore_errors=True)
    start = time.perf_counter()
    table = ds.dataset(spec["folder"], format="parquet").head(spec["rows"])
    with MDSWriter(out=spec["out"], columns=spec["columns"], size_limit="64mb") as writer:
        for batch in table.to_batches(max_chunksize=4096):
            columns = {}
            for name, encoding in spec["columns"].items():
                column = batch.column(name)
                if encoding.startswith("ndarray"):
                    columns[name] = column.flatten().to_numpy().reshape(len(column), -1)
                elif encoding == "int64":
                    columns[name] = column.to_numpy()
                else:
                    columns[name] = column.to_pylist()
            for i in range(batch.num_rows):
                writer.write({name: values[i] for name, values in columns.items()})
    return time.perf_counter() - start


def main() -> None:
    spec = json.loads(sys.argv[1])
    write_seconds = write(spec)
    out = []
    for workers in spec["workers"]:
        runs = []
        for _ in range(spec["repeat"]):
            clean_stale_shared_memory()
            start = time.perf_counter()
            dataset = StreamingDataset(
                local=spec["out"], batch_size=spec["batch_size"], shuffle=False
            )
            loader = DataLoader(
                dataset,
                batch_size=spec["batch_size"],
                num_workers=workers,
                collate_fn=lambda samples: samples,
            )
            runs.append(timed_pass(loader, start, spec["row_bytes"]))
            del loader, dataset
        out.append({"workers": workers, "runs": runs})
    report(write_seconds, out)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
