"""One stream of an iteration, read message by message and cut into batches.

``stream_batches`` rides out a server that goes away: it reopens the stream on the
endpoint's other locations, then the client's own URLs, for up to the client's reconnect
window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..protocol import wire
from ..protocol.errors import ServerError, ServerUnavailable
from ..protocol.iterations import BatchMetadata, IterationTicket
from .allocator import keep_message_memory
from .connection import LavenderClient
from .formats import split

__all__ = ["stream_batches", "stream_messages", "stream_nodes"]

log = logging.getLogger(__name__)


def stream_messages(
    client: LavenderClient, ticket: IterationTicket
) -> Iterator[tuple[pa.RecordBatch, BatchMetadata]]:
    """The messages of one stream, each with its parsed ``BatchMetadata``."""
    keep_message_memory()
    with client.errors():
        reader = client.flight.do_get(flight.Ticket(wire.encode(ticket)), client.options(None))
    try:
        while True:
            with client.errors():
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    return
            if chunk.app_metadata is None:
                raise ServerError("a batch came without its metadata")
            yield chunk.data, BatchMetadata.model_validate_json(chunk.app_metadata.to_pybytes())
    finally:
        reader.cancel()


def stream_nodes(client: LavenderClient, locations: Sequence[str] = ()) -> list[str]:
    """The servers a stream may be read from, in order: the endpoint's locations, then ours.

    The client's own URLs come last: a server that advertises an address this client cannot
    reach (behind NAT, through a tunnel) is still read through the address it was given.
    """
    found: list[str] = []
    own = client.settings.api_urls
    start = own.index(client.api_url) if client.api_url in own else 0
    for url in [*locations, *own[start:], *own[:start]]:
        if url not in found:
            found.append(url)
    return found


def stream_batches(
    client: LavenderClient,
    ticket: IterationTicket,
    format: str = "arrow",
    on_metadata: Callable[[BatchMetadata], None] | None = None,
    before_reconnect: Callable[[], None] | None = None,
    locations: Sequence[str] = (),
    on_node: Callable[[LavenderClient], None] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Batches of one stream in ``format``, each with its ``seq`` ranges.

    A Flight message may carry several batches; they are cut apart here (as views). The
    stream is read from the first of ``locations`` (its endpoint's; see ``stream_nodes``),
    through connections ``client.at`` opens; ``on_node`` is told of each server it opens
    on. When that server goes away mid-stream, the stream is opened again on the next one
    at once (after ``before_reconnect``, which sends what the loop reported), round after
    round with a growing pause, for up to the client's reconnect window; the new stream
    takes over the old one's place in the rank (its session's). Batches sent again are the
    caller's to skip. ``format="message"``: each message whole (an Arrow record batch), with
    its batches' ``(rows, seq)`` instead of a batch's ``seq``.
    """
    window = client.settings.reconnect_seconds
    nodes = stream_nodes(client, locations)
    index = 0
    down_since: float | None = None
    delay = 0.2
    tried = 0  # servers tried since the stream was lost
    while True:
        node = client.at(nodes[index])
        if on_node is not None:
            on_node(node)
        if down_since is not None and before_reconnect is not None:
            try:
                before_reconnect()
            except ServerUnavailable:
                pass  # this server is down too: opening the stream will tell
        try:
            for message, metadata in stream_messages(node, ticket):
                if down_since is not None:
                    log.warning("reconnected to %s: %s goes on", node.api_url,
                                ticket.iteration_id)  # fmt: skip
                    down_since, delay, tried = None, 0.2, 0
                if on_metadata is not None:
                    on_metadata(metadata)
                if format == "message":  # whole messages, for a DataLoader's workers
                    yield message, metadata.batches
                    continue
                sizes = [rows for rows, _ in metadata.batches]
                for batch, (_, seq) in zip(
                    split(message, sizes, format), metadata.batches, strict=True
                ):
                    yield batch, seq
            return
        except ServerUnavailable as exc:
            now = time.monotonic()
            if down_since is None:
                down_since = now
                others = f" and {len(nodes) - 1} other server(s)" if len(nodes) > 1 else ""
                log.warning(
                    "lost the server at %s (%s): reconnecting to it%s for up to %g s",
                    node.api_url, exc, others, window,
                )  # fmt: skip
            tried += 1
            pause = delay if tried >= len(nodes) else 0.0  # a round of them all, then wait
            if now - down_since + pause > window:
                where = node.api_url if len(nodes) == 1 else ", ".join(nodes)
                raise ServerUnavailable(
                    f"the server at {where} did not come back within {window:g} s "
                    f"({exc}); resume iteration {ticket.iteration_id} later: nothing "
                    "completed is lost"
                ) from None
            if pause:
                time.sleep(pause)
                delay = min(2.0, delay * 2)
                tried = 0
            index = (index + 1) % len(nodes)
