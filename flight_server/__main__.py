"""``python -m lavender_flight.flight_server``: the same as ``lavender-flight``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
