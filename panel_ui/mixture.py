"""A mixture's part of the iteration page: its sources this epoch and its weights over time.

The sources table says, per source dataset, the weight in force, its samples per pass, how
many of them the loops reached (drawn) and completed (finished) this epoch, the passes
started and whether it ran out. The schedule table lists every weight change with the
epoch and sample where it took effect (the spec's weights first): the order a resume
replays.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ..protocol.iterations import MixtureProgress
from .common import format_time

__all__ = ["schedule_frame", "sources_frame"]


def _name(dataset_id: str, names: Mapping[str, str]) -> str:
    return names.get(dataset_id, dataset_id)


def _share(weight: float, weights: Mapping[str, float]) -> str:
    """A weight with its share of the total (weights are relative)."""
    total = sum(weights.values())
    share = f" ({100 * weight / total:.0f}%)" if total > 0 else ""
    return f"{weight:g}{share}"


def sources_frame(mixture: MixtureProgress, names: Mapping[str, str]) -> pd.DataFrame:
    """One row per source: its weight now (and share), size, drawn, finished, passes."""
    weights = {s.dataset_id: s.weight for s in mixture.sources}
    return pd.DataFrame(
        [
            {
                "source": _name(s.dataset_id, names),
                "weight": _share(s.weight, weights),
                "size": s.size,
                "drawn": s.drawn,
                "finished": s.finished,
                "passes": s.passes,
                "exhausted": "yes" if s.exhausted else "no",
            }
            for s in mixture.sources
        ],
        columns=["source", "weight", "size", "drawn", "finished", "passes", "exhausted"],
    )


def schedule_frame(mixture: MixtureProgress, names: Mapping[str, str]) -> pd.DataFrame:
    """One row per weight change, oldest first: where it took effect and the weights."""
    order = [s.dataset_id for s in mixture.sources]
    for change in mixture.schedule:
        order += [d for d in change.weights if d not in order]
    columns = ["epoch", "from sample", "set at", *(_name(d, names) for d in order)]
    rows = []
    for change in mixture.schedule:
        row: dict[str, object] = {
            "epoch": change.epoch,
            "from sample": change.from_seq,
            "set at": format_time(change.at),
        }
        for dataset_id in order:
            weight = change.weights.get(dataset_id)
            row[_name(dataset_id, names)] = (
                _share(weight, change.weights) if weight is not None else ""
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
