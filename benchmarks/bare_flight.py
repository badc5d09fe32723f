"""The limit: a bare pyarrow.flight server streaming a Parquet folder's rows from memory.

Run as ``python -m benchmarks.bare_flight DIR``; prints ``PORT <n>`` when serving. The
ticket is the batch size, as text.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight


class BareServer(flight.FlightServerBase):
    """Serves one in-memory table, sliced into batches of the ticket's size."""

    def __init__(self, folder: str) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.table = ds.dataset(folder, format="parquet").to_table().combine_chunks()

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        batches = self.table.to_batches(max_chunksize=int(ticket.ticket.decode()))
        return flight.RecordBatchStream(
            pa.RecordBatchReader.from_batches(self.table.schema, batches)
        )


def main() -> None:
    server = BareServer(sys.argv[1])
    print(f"PORT {server.port}", flush=True)
    server.serve()


if __name__ == "__main__":
    main()
