"""The iteration engine: plans, state in the catalog, block reads, batching, streams.

- ``plan``: the seeded order of each epoch, block by block; ``world``: ranks, replication
  groups and DataLoader workers.
- ``state``: what one rank of one epoch has been handed, taken and finished (a value).
- ``store``: that state in the catalog, changed one transaction at a time, so several
  servers on one catalog act as one.
- ``plans``: epoch plans, partitions and rank sizes from the stored record alone;
  ``setup``: those plus readers and transforms, built once per iteration.
- ``blocks``: block reads shared by the streams; ``batching``: claimed work to messages;
  ``categorized``: batches of one category each.
- ``draws``, ``mixture``: a mixture's order of draws by weight, and its sources' rows.
- ``deals``: an epoch dealt anew to another world size; ``changes``: a running iteration's
  changes (live weights, deals) and its epochs' plans under them; ``adjust``: making them.
- ``flow``: the read-ahead budget and what a server knows of a loop's pace.
- ``live``: one served iteration (streams, acks, pushback); ``work``: claims of one
  stream within the budget; ``progress``: an iteration's progress from its rank rows (no
  reader); ``manager``: all of them, and the janitor that keeps leases and dead servers'
  samples right.
"""

from __future__ import annotations

from .flow import ReadAhead
from .live import LiveIteration
from .manager import IterationManager
from .plan import Block, EpochPlan
from .setup import IterationSetup, build_pipeline
from .state import RankState
from .store import ProgressStore, StreamHandle
from .world import World, replication_partitions

__all__ = [
    "Block",
    "EpochPlan",
    "IterationManager",
    "IterationSetup",
    "LiveIteration",
    "ProgressStore",
    "RankState",
    "ReadAhead",
    "StreamHandle",
    "World",
    "build_pipeline",
    "replication_partitions",
]
